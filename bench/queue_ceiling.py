"""The worker's ceiling: a bare Dramatiq worker (same broker settings, same threads) draining no-op messages.

The bench enqueues ``--n`` messages first; this process then consumes them with a no-op actor and
prints, as JSON, the time from the first message to the last and its own peak memory. What is left
between it and a vivoflow worker is the engine: store, recipes, templates, connectors.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import dramatiq
from dramatiq import Message

ACTOR = "bench_noop"
QUEUE = "bench-noop"


def fill(url: str, namespace: str, n: int) -> None:
    from workers.broker import make_broker

    broker = make_broker(url, namespace=namespace)
    broker.declare_queue(QUEUE)
    try:
        for i in range(n):
            broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=(f"dlv_{i}",), kwargs={}, options={}))
    finally:
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_ceiling")
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    from bench.procs import peak_rss_mib
    from workers.broker import make_broker

    broker = make_broker(args.url, namespace=args.namespace)
    lock, done = threading.Lock(), threading.Event()
    stamps: list[float] = []

    def noop(delivery_id: str) -> None:
        with lock:
            stamps.append(time.time())
            if len(stamps) >= args.n:
                done.set()

    dramatiq.Actor(noop, broker=broker, actor_name=ACTOR, queue_name=QUEUE, priority=0, options={})
    worker = dramatiq.Worker(broker, worker_threads=args.threads, worker_timeout=100)
    worker.start()
    done.wait(args.timeout)
    worker.stop(timeout=10_000)
    broker.close()
    span = (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    import os

    print(json.dumps({"messages": len(stamps), "span_s": round(span, 3),
                      "messages_s": round(len(stamps) / span, 1) if span else None,
                      "peak_rss_mib": peak_rss_mib(os.getpid())}))


if __name__ == "__main__":
    main()
