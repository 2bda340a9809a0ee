"""A log-bucketed latency histogram (1% wide buckets from 1 µs): cheap to record, mergeable
across processes, and exact enough for p50/p99. The maximum is kept exactly."""

from __future__ import annotations

import math
from typing import Any

_LOG_STEP = math.log(1.01)
_FLOOR = 1e-6  # seconds


class Hist:
    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        index = int(math.log(seconds / _FLOOR) / _LOG_STEP) if seconds > _FLOOR else 0
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Hist) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (the middle of its bucket), None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                value = _FLOOR * math.exp((index + 0.5) * _LOG_STEP) if index else _FLOOR
                return min(value, self.max)
        return self.max

    def summary_ms(self) -> dict[str, float | None]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)
        return {"p50": ms(self.quantile(0.5)), "p99": ms(self.quantile(0.99)),
                "max": ms(self.max if self.count else None), "n": self.count}

    def to_json(self) -> dict[str, Any]:
        return {"b": {str(k): v for k, v in self.buckets.items()}, "n": self.count,
                "t": self.total, "m": self.max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hist:
        hist = cls()
        hist.buckets = {int(k): v for k, v in data["b"].items()}
        hist.count, hist.total, hist.max = data["n"], data["t"], data["m"]
        return hist
