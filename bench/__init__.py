"""The tablelock benchmark: `python -m bench` (see bench/README.md)."""
