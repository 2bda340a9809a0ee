"""`python -m bench.chaos`: the soak-and-chaos run (cli.py says what it does)."""

import sys

from .cli import main

sys.exit(main())
