"""The shape of one load-generator process's work, passed to it as JSON.

Names are deterministic so that a second process (the `idle` scenario's) and the
coordinator agree on them: store `s<i>`, order `s<i>o<j>` at table `s<i>t<j>`, idle store
`i<k>`. Only the first process (`part` 0) runs the actors and the subscribers that the
latency figures come from; further parts only hold idle connections.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Workload:
    urls: list[str]  # ws://127.0.0.1:port, one per broker process
    # how connections spread over brokers: "round-robin", "store" (hashed), or "listener"
    # (all on the first but each store's last ERP screen, on the last: what receiving costs)
    affinity: str = "round-robin"
    dialect: str = "tablelock"  # or "socketio"
    secret: str = ""
    stores: int = 0
    orders: int = 0  # open orders per store
    erp: int = 0  # ERP terminals per store (the first is erp_main)
    erp_subscribe: bool = True  # ... subscribed to the store channel
    h5: int = 0  # phones per order, subscribed to the order's channel
    actors: int = 0  # ERP actors, each driving one distinct order
    idle: int = 0  # idle authenticated connections, each subscribed to an order channel
    idle_first: int = 0  # index of this part's first idle connection
    part: int = 0
    publish: bool = True  # the ERP publishes the orders first (tablelock needs them)
    # expiry: h5 payment locks on orders pulled from an erp_main answering order.fetch
    expiry_tables: int = 0  # tables per store, one phone each
    expiry_orders_per_table: int = 0
    connect_concurrency: int = 100
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


def store_id(i: int) -> str:
    return f"s{i}"


def order_id(i: int, j: int) -> str:
    return f"s{i}o{j}"


def table_id(i: int, j: int) -> str:
    return f"s{i}t{j}"


def idle_store(k: int) -> str:
    return f"i{k // 500}"


def idle_table(k: int) -> str:
    return f"i{k}"
