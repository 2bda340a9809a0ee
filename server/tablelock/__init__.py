"""tablelock: a real-time order-lock broker for restaurants."""

__version__ = "0.1.0"
