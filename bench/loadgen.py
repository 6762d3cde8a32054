"""A load generator in a process of its own: raw HTTP/1.1 keep-alive over asyncio, every body signed and distinct.

``flood``: ``--connections`` closed loops for ``--duration`` seconds (or until ``--n`` requests).
Several ``--port`` s: request ``i`` goes to the ``i % len(ports)``-th (a cluster's intakes, alternately).
``paced``: ``--n`` requests at ``--rate`` per second, open loop (a request is sent at its time
whether or not earlier ones were answered), each send time recorded for end-to-end latency.
Writes one JSON document to ``--out``. Used when ``wrk`` is missing, and for the paced runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

from bench.payloads import WEBHOOK_PATH, Bodies


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> int:
        """Send one request, read the whole answer; returns its status (0: transport error)."""
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                assert self.reader is not None
                self.writer.write(request)
                head = await self.reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length, close = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                if length:
                    await self.reader.readexactly(length)
                if close:
                    self.close()
                return status
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                self.close()
                if attempt == 2:
                    return 0
        return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)
    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


async def flood(args: argparse.Namespace, bodies: Bodies) -> dict[str, Any]:
    ports = args.ports
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    sends: list[tuple[str, float]] = []
    counter = iter(range(10**9))
    start = time.perf_counter()
    stop_at = start + args.duration if args.duration else float("inf")

    async def loop() -> None:
        conns = [Connection(args.host, port) for port in ports]  # request i goes to ports[i % len(ports)]
        while time.perf_counter() < stop_at:
            i = next(counter)
            if args.n and i >= args.n:
                break
            conn = conns[i % len(ports)]
            request = bodies.request(i, f"{args.host}:{conn.port}", args.path)
            t0 = time.perf_counter()
            if args.n:  # a counted flood feeds the end-to-end figures: keep each send time
                sends.append((bodies.uid(i), time.monotonic()))
            status = await conn.exchange(request)
            latencies.append(time.perf_counter() - t0)
            statuses[status] += 1
        for conn in conns:
            conn.close()

    await asyncio.gather(*(loop() for _ in range(args.connections)))
    elapsed = time.perf_counter() - start
    return {"elapsed_s": round(elapsed, 3), "send_s": round(elapsed, 3), "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, **percentiles(latencies), "sends": sends}


async def paced(args: argparse.Namespace, bodies: Bodies) -> dict[str, Any]:
    ports = args.ports
    pools: list[asyncio.Queue[Connection]] = [asyncio.Queue() for _ in ports]
    for pool, port in zip(pools, ports, strict=True):
        for _ in range(max(1, args.connections // len(ports))):
            pool.put_nowait(Connection(args.host, port))
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    sends: list[tuple[str, float]] = []
    tasks = []

    async def send(i: int, scheduled: float) -> None:
        pool = pools[i % len(ports)]  # alternate between the intakes
        conn = await pool.get()
        try:
            request = bodies.request(i, f"{args.host}:{conn.port}", args.path)
            status = await conn.exchange(request)
        finally:
            pool.put_nowait(conn)
        latencies.append(time.monotonic() - scheduled)
        statuses[status] += 1

    start = time.monotonic() + 0.05
    for i in range(args.n):
        scheduled = start + i / args.rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append((bodies.uid(i), scheduled))
        tasks.append(asyncio.create_task(send(i, scheduled)))
    sent_done = time.monotonic()
    await asyncio.gather(*tasks)
    for pool in pools:
        while not pool.empty():
            pool.get_nowait().close()
    return {"elapsed_s": round(time.monotonic() - start, 3), "send_s": round(sent_done - start, 3),
            "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            **percentiles(latencies), "sends": sends}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=["flood", "paced"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", dest="ports", required=True,
                        help="the intake's port; repeat it to alternate requests between several intakes")
    parser.add_argument("--path", default=WEBHOOK_PATH)
    parser.add_argument("--tag", required=True, help="prefix of every body's unique id")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bodies = Bodies(args.tag)
    result = asyncio.run(flood(args, bodies) if args.mode == "flood" else paced(args, bodies))
    with open(args.out, "w") as out:
        json.dump({"mode": args.mode, "connections": args.connections, **result}, out)


if __name__ == "__main__":
    main()
