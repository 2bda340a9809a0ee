"""An event sink for benchmarks that drive a backend in process: it drops every frame."""

from __future__ import annotations


class DropSink:
    """Takes every frame and does nothing with it. `follows`: the channels it says it has
    subscribers of (None: every channel), which decides what a backend keeps or listens to."""

    def __init__(self, follows: set[str] | None = None) -> None:
        self.follows = follows

    def publish(self, channel: str, seq: int, frame: bytes, table_id: str | None) -> None:
        pass

    def direct(self, store_id: str, holder: str, frame: bytes, unless_on: tuple[str, ...],
               coalesce: str = "") -> None:
        pass

    def has_subscribers(self, channel: str) -> bool:
        return self.follows is None or channel in self.follows

    def lost(self, channel: str) -> None:
        pass
