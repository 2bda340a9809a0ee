"""Prometheus metrics (prometheus-client). Names and meanings: docs/operations.md."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector


class LabelledCounter(Collector):
    """A labelled counter kept as plain ints and read at scrape time: the hot path pays a
    dict update, not prometheus-client's labels() (microseconds per call)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: defaultdict[tuple[str, ...], int] = defaultdict(int)
        REGISTRY.register(self)

    def inc(self, *values: str) -> None:
        self.counts[values] += 1

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in list(self.counts.items()):
            family.add_metric(list(values), count)
        yield family


class SampledHistogram:
    """Observe one call in `every`: latency distributions don't need each request."""

    def __init__(self, histogram: Histogram, every: int = 16) -> None:
        self._histogram = histogram
        self._every = every
        self._calls: defaultdict[str, int] = defaultdict(int)  # per label: none is starved
        self._children: dict[str, Histogram] = {}

    def due(self, label: str) -> bool:
        self._calls[label] += 1
        return self._calls[label] % self._every == 0

    def observe(self, label: str, seconds: float) -> None:
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self._histogram.labels(label)
        child.observe(seconds)

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

CONNECTIONS = Gauge("tablelock_connections", "Open authenticated connections", ["role"])
REQUESTS = LabelledCounter("tablelock_requests", "Requests answered, by type and result code",
                 ["type", "code"])
LOCK_EVENTS = LabelledCounter("tablelock_lock_events",
                    "Lock outcomes: grants, conflicts, forces, expiries, releases, payments",
                    ["outcome"])
FANOUT_SECONDS = Histogram("tablelock_fanout_seconds",
                           "From state change to event frame written to a socket (sampled)",
                           buckets=_FAST)
BACKEND_SECONDS = SampledHistogram(Histogram(
    "tablelock_backend_seconds", "Backend call latency, by call (one call in 16)", ["call"],
    buckets=_FAST))
REDIS_EVENTS = LabelledCounter("tablelock_redis_events",
                               "Redis pub/sub messages received, subscription losses, "
                               "resynchronisations, gap recoveries, lost commit replies "
                               "resolved (applied or void) and WAIT timeouts", ["kind"])
SLOW_CONSUMERS = Counter("tablelock_slow_consumers_total",
                         "Connections closed (4010) because their send queue passed its bound")
ANONYMOUS_EVICTED = Counter("tablelock_anonymous_evicted_total",
                            "Sockets without hello closed (4008) to make room for newer ones")
RATE_LIMITED = Counter("tablelock_rate_limited_total", "Requests refused RATE_LIMITED")
HELLO_REFUSED = Counter("tablelock_hello_refused_total",
                        "Connections refused at hello (or for want of one), by reason", ["reason"])
EXPIRY_LAG = Histogram("tablelock_expiry_lag_seconds",
                       "How late a lock.expired was published after its deadline",
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


class QueueDepth(Collector):
    """Outbound queue depth over all connections, read at scrape time (nothing per send)."""

    def __init__(self, depths: Callable[[], Iterable[int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depths = list(self._depths())
        total = GaugeMetricFamily("tablelock_send_queue_frames",
                                  "Frames waiting in outbound queues", labels=["stat"])
        total.add_metric(["sum"], sum(depths))
        total.add_metric(["max"], max(depths, default=0))
        yield total


_queue_collector: QueueDepth | None = None


def watch_queues(depths: Callable[[], Iterable[int]]) -> None:
    global _queue_collector
    if _queue_collector is not None:
        REGISTRY.unregister(_queue_collector)
    _queue_collector = QueueDepth(depths)
    REGISTRY.register(_queue_collector)
