"""The load generator: one process (uvloop) that opens a workload's connections and then
runs what the coordinator asks for on stdin, one JSON line each, answering one JSON line.

    python -m bench.loadgen '<Workload JSON>'

Commands: {"cmd": "closed", "seconds": S}, {"cmd": "open", "rate": R, "seconds": S},
{"cmd": "expiry", "count": N, "seconds": S}, {"cmd": "hold", "seconds": S}, {"cmd": "quit"}.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import json
import resource
import sys
import time
import zlib
from typing import Any

from .actors import Actor, Driver
from .codec import Codec, codec_for
from .conn import Conn
from .expiry import Phone, run_expiry
from .http import put_config
from .stats import Stats, Track
from .workload import Workload, idle_store, idle_table, order_id, store_id, table_id

_now = time.perf_counter


_JWT_HEAD = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


def mint(secret: str, store: str, role: str, sub: str, table: str | None = None) -> str:
    """An HS256 JWT as the broker's `tablelock token` makes, without PyJWT's 0.4 ms a token."""
    claims: dict[str, Any] = {"sub": sub, "store": store, "role": role,
                              "exp": int(time.time()) + 6 * 3600}
    if table is not None:
        claims["table"] = table
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signing = _JWT_HEAD + b"." + body
    signature = hmac.new(secret.encode(), signing, hashlib.sha256).digest()
    return (signing + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


class LoadGen:
    def __init__(self, spec: Workload) -> None:
        self.spec = spec
        self.stats = Stats()
        self.driver = Driver(self.stats)
        self.conns: list[Conn] = []
        self.phones: list[Phone] = []
        self.published: set[str] = set()
        self._shared_codec = codec_for(spec.dialect)
        self._turn = 0
        self._gate = asyncio.Semaphore(spec.connect_concurrency)

    def _codec(self) -> Codec:
        # the socket.io codec remembers its hello id: one per connection
        return codec_for("socketio") if self.spec.dialect == "socketio" else self._shared_codec

    async def connect(self, store: str, role: str, sub: str, table: str | None = None,
                      channel: str | None = None) -> Conn | None:
        """Open, say hello, subscribe; a failure is counted, not raised."""
        urls = self.spec.urls
        if self.spec.affinity == "store":  # a balancer that hashes the store: no cross traffic
            url = urls[zlib.crc32(store.encode()) % len(urls)]
        elif self.spec.affinity == "listener":  # the last broker holds each store's last screen
            url = urls[-1] if sub == f"erp{self.spec.erp - 1}" else urls[0]
        else:  # round-robin, as a plain TCP balancer: a store's events cross brokers
            url = urls[self._turn % len(urls)]
            self._turn += 1
        conn = Conn(self._codec(), self.stats)
        async with self._gate:
            try:
                await conn.open(url)
                reply = await conn.call("hello", token=mint(self.spec.secret, store, role, sub,
                                                            table), protocol=1, locale="en")
                if not reply.ok:
                    raise ConnectionError(f"hello {reply.error.code if reply.error else ''}")
                if channel is not None:
                    reply = await conn.call("subscribe", channel=channel)
                    if not reply.ok:
                        raise ConnectionError(
                            f"subscribe {reply.error.code if reply.error else ''}")
            except Exception as exc:
                self.stats.error(f"setup:{type(exc).__name__}:{str(exc)[:40]}".rstrip(":"))
                if conn.sock is not None:
                    conn.sock.abort()
                return None
        self.conns.append(conn)
        return conn

    # --- set-up ------------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        now = _now()
        self.phases[name] = round(now - self._phase_start, 2)
        self._phase_start = now

    async def setup(self) -> None:
        spec = self.spec
        self.phases: dict[str, float] = {}
        self._phase_start = _now()
        if spec.part == 0:
            erps = await asyncio.gather(*(
                self.connect(store_id(i), "erp_main" if e == 0 else "erp_secondary",
                             f"erp{e}", channel=f"store:{store_id(i)}" if spec.erp_subscribe
                             else None)
                for i in range(spec.stores) for e in range(spec.erp)))
            for conn in erps[::spec.erp] if spec.erp else ():
                if conn is not None:  # the erp_main of its store
                    conn.fetch_answerer = True
            self._phase("erp")
            if spec.publish and spec.erp and spec.orders:
                await asyncio.gather(*(self._publish(erps[i * spec.erp], i)
                                       for i in range(spec.stores)))
            self._phase("publish")
            await asyncio.gather(*(
                self.connect(store_id(i), "h5", f"h5-{j}-{p}", table_id(i, j),
                             f"order:{store_id(i)}:{order_id(i, j)}")
                for i in range(spec.stores) for j in range(spec.orders) for p in range(spec.h5)))
            self._phase("h5")
            await self._actors()
            self._phase("actors")
            await self._phones()
            self._phase("phones")
        await asyncio.gather(*(
            self.connect(idle_store(k), "h5", f"idle{k}", idle_table(k),
                         f"order:{idle_store(k)}:{idle_table(k)}x")
            for k in range(spec.idle_first, spec.idle_first + spec.idle)))
        self._phase("idle")

    async def _publish(self, erp: Conn | None, i: int) -> None:
        if erp is None:
            return
        for j in range(self.spec.orders):
            order = {"order_id": order_id(i, j), "table_id": table_id(i, j), "version": 1,
                     "amount_cents": 4200, "status": "open",
                     "items": [{"sku": "rice", "qty": 2}, {"sku": "tea", "qty": 1}]}
            if await conn_call(erp, "order.publish", order=order, change="modify"):
                self.published.add(order_id(i, j))
            else:
                self.stats.error("setup:publish")

    async def _actors(self) -> None:
        spec = self.spec
        total = spec.stores * spec.orders
        if spec.actors > total:
            raise SystemExit(f"{spec.actors} actors need as many orders; there are {total}")
        chosen = [(a % spec.stores, a // spec.stores) for a in range(spec.actors)]
        if spec.publish and spec.erp:  # an order whose publish failed gets no actor
            chosen = [(i, j) for i, j in chosen if order_id(i, j) in self.published]
        conns = await asyncio.gather(*(self.connect(store_id(i), "erp_secondary", f"actor{j}")
                                       for i, j in chosen))
        for (i, j), conn in zip(chosen, conns, strict=True):
            if conn is not None:
                self.stats.tracks[order_id(i, j)] = Track()
                Actor(conn, order_id(i, j), self.driver)

    async def _phones(self) -> None:
        spec = self.spec
        if not spec.expiry_tables:
            return
        base = spec.urls[0].replace("ws://", "http://")
        for i in range(spec.stores):
            manager = mint(spec.secret, store_id(i), "manager", "bench-manager")
            await asyncio.to_thread(put_config, base, store_id(i), manager,
                                    {"h5_payment_lock_ttl_ms": 5000})
        pairs = [(i, j) for i in range(spec.stores) for j in range(spec.expiry_tables)]
        conns = await asyncio.gather(*(self.connect(store_id(i), "h5", f"phone{j}",
                                                    table_id(i, j)) for i, j in pairs))
        for (i, j), conn in zip(pairs, conns, strict=True):
            if conn is not None:
                orders = [f"{table_id(i, j)}o{k}" for k in range(spec.expiry_orders_per_table)]
                self.phones.append(Phone(conn, orders, self.stats))
        if self.phones:
            self.stats.clock_offset_ms = await clock_offset(self.phones[0].conn)

    # --- commands -----------------------------------------------------------------------------

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        stats = self.stats
        stats.reset()
        cpu0, t0 = time.process_time(), _now()
        seconds = float(cmd.get("seconds", 0))
        out: dict[str, Any] = {}
        if self.spec.part != 0 or cmd["cmd"] == "hold":
            await asyncio.sleep(seconds)
        elif cmd["cmd"] == "closed":
            await self.driver.closed(seconds)
        elif cmd["cmd"] == "open":
            out["missed"] = await self.driver.open(float(cmd["rate"]), seconds)
        elif cmd["cmd"] == "expiry":
            out["requested"] = await run_expiry(self.phones, stats, int(cmd["count"]), seconds)
        window = _now() - t0
        out["pairs_window"] = stats.pairs
        if not await self.driver.drain(10.0):
            stats.error("actor stuck 10 s")
        out.update(stats=stats.to_json(), cpu=time.process_time() - cpu0, wall=_now() - t0,
                   window=window)
        return out

    async def close(self, timeout: float = 3.0) -> None:
        """Close handshakes for all (bounded), then drop whatever has not finished."""
        for conn in self.conns:
            conn.close()
        pending = [c.sock.closed for c in self.conns if c.sock is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.abort()


async def conn_call(conn: Conn, type_: str, **params: Any) -> bool:
    try:
        return (await conn.call(type_, **params)).ok
    except (TimeoutError, ConnectionError):
        return False


async def clock_offset(conn: Conn, samples: int = 7) -> float:
    """Broker clock minus this machine's wall clock (ms), from the tightest ping."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        sent = time.time() * 1000
        reply = await conn.call("ping")
        back = time.time() * 1000
        if reply.server_time and (best is None or back - sent < best[1]):
            best = (reply.server_time - (sent + back) / 2, back - sent)
    return best[0] if best else 0.0


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(spec: Workload) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = LoadGen(spec)
    t0 = _now()
    await gen.setup()
    gc.collect()
    gc.freeze()
    emit({"ready": True, "connections": len(gen.conns), "setup_s": _now() - t0,
          "phases": gen.phases, "setup_errors": dict(gen.stats.errors),
          "clock_offset_ms": gen.stats.clock_offset_ms})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(100):  # bounded: a coordinator sends a handful of commands
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        emit(await gen.run(cmd))
    await gen.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(Workload.from_json(sys.argv[1])))
