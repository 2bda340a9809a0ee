"""tablelock_demo: a simulated store and the pages of the dashboard and terminals.

`tablelock demo` serves the broker, plays the store (`simulation.py`, through the
Python SDK) and prints the dashboard's address. The pages under `static/` are
served by every broker at /app/; only a demo broker hands out tokens to them.
"""

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
