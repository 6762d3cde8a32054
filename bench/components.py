"""Single-thread ceilings of the parts one webhook goes through, measured with the product's own functions.

Raw Redis (RPUSH of ~3 KB, plain and pipelined) is the broker's ceiling; the rest split the intake's
per-request budget: signature check, JSON + envelope validation, dedupe facts, the SQLite insert and
Dramatiq's enqueue. Each runs for a fixed time in this (otherwise idle) bench process.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.config import write_config
from bench.payloads import SIGNING_KEY, Bodies
from bench.product import enqueue, open_app, store_delivery


def _rate(op: Callable[[int], Any], seconds: float, batch: int = 1) -> dict[str, float]:
    """Calls ``op(i)`` for ``seconds`` after a few untimed warm-up calls; ``batch``: operations per call."""
    for i in range(3):
        op(-1 - i)
    n, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        op(n)
        n += 1
    elapsed = time.perf_counter() - start
    ops = n * batch
    return {"ops_s": round(ops / elapsed, 1), "us_per_op": round(elapsed / ops * 1e6, 2)}


def redis_ceiling(url: str, seconds: float) -> dict[str, Any]:
    """RPUSH of a ~3 KB value from one client: one round trip each, and pipelined by 100."""
    client = redis.Redis.from_url(url)
    key = f"bench-ceiling:{uuid.uuid4().hex[:8]}"
    value = os.urandom(1536).hex().encode()

    def plain(i: int) -> None:
        client.rpush(key, value)
        if i % 5000 == 4999:
            client.delete(key)

    def pipelined(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.rpush(key, value)
        if i % 50 == 49:
            pipe.delete(key)
        pipe.execute()

    try:
        return {"url_kind": url.split(":", 1)[0], "value_bytes": len(value),
                "rpush": _rate(plain, seconds), "rpush_pipelined_100": _rate(pipelined, seconds, batch=100)}
    finally:
        client.delete(key)
        client.close()


def store_statement_forms(folder: Path, seconds: float) -> dict[str, Any]:
    """One run-status UPDATE written four ways: what SQLAlchemy Core's per-call statement building costs.

    ``Store.finish_run`` builds its statement on every call (as every Store method does); the others
    reuse one prepared statement (bindparam), skip the SQL layer (exec_driver_sql), or use sqlite3.
    Each is its own transaction (BEGIN … COMMIT), as in the store.
    """
    import sqlite3

    import sqlalchemy as sa

    from workers.schema import runs
    from workers.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "forms.db"
    store = Store(f"sqlite:///{path}")
    store.create_schema()
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO deliveries (id, dedupe_key, event, received_at, source, body) "
                             "VALUES ('dlv_b', 'k', 'invitee.canceled', 0, 'webhook', '{}')"))
        conn.execute(sa.text("INSERT INTO runs (id, run_key, delivery_id, recipe, event, status, created_at) "
                             "VALUES ('run_b', 'k', 'dlv_b', 'r', 'invitee.canceled', 'queued', 0)"))
    prepared = runs.update().where(runs.c.id == sa.bindparam("rid")).values(
        status=sa.bindparam("st"), reason=sa.bindparam("rs"), finished_at=sa.bindparam("fa"))
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    raw.execute("PRAGMA synchronous=NORMAL")
    sql = "UPDATE runs SET status=?, reason=?, finished_at=? WHERE id=?"

    def prebuilt(i: int) -> None:
        with store.engine.begin() as conn:
            conn.execute(prepared, {"rid": "run_b", "st": "running", "rs": None, "fa": None})

    def driver(i: int) -> None:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(sql, ("running", None, None, "run_b"))

    def direct(i: int) -> None:
        raw.execute("BEGIN")
        raw.execute(sql, ("running", None, None, "run_b"))
        raw.execute("COMMIT")

    try:
        return {"Store.finish_run (built per call)": _rate(lambda i: store.finish_run("run_b", "running"), seconds),
                "prepared statement (bindparam)": _rate(prebuilt, seconds),
                "exec_driver_sql": _rate(driver, seconds),
                "sqlite3 directly": _rate(direct, seconds)}
    finally:
        raw.close()
        store.close()


def intake_parts(url: str, folder: Path, seconds: float) -> dict[str, Any]:
    """What the intake does per webhook, one part at a time (µs per call, one thread).

    A part whose product API changed under the bench reports its error instead of a figure.
    """
    from workers.events import delivery_facts
    from workers.intake import parse
    from workers.signing import verify

    bodies = Bodies("parts")
    body = bodies.body(0)
    header = bodies.signature(body)
    keys = [SIGNING_KEY.encode()]
    namespace = f"bench-parts-{uuid.uuid4().hex[:8]}"
    app = open_app(write_config(folder, broker_url=url, namespace=namespace, processes=0))
    envelope = parse(body)
    counter = iter(range(10**9))

    def store(i: int) -> None:
        store_delivery(app, bodies.body(next(counter)))

    parts: dict[str, Callable[[int], Any]] = {
        "verify_signature": lambda i: verify(header, body, keys, tolerance=180),
        "parse (the intake's envelope head)": lambda i: parse(body),
        "delivery_facts": lambda i: delivery_facts(envelope, body),
        "store_delivery (parse + facts + insert)": store,
        "broker_enqueue": lambda i: enqueue(app, f"dlv_{i}"),
    }
    results: dict[str, Any] = {}
    try:
        for name, op in parts.items():
            try:
                results[name] = _rate(op, seconds)
            except Exception as exc:  # noqa: BLE001 - report it, measure the rest
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        return results
    finally:
        client = redis.Redis.from_url(url)
        stale = list(client.scan_iter(match=f"{namespace}*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()
        app.close()
