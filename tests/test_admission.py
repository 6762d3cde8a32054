"""The intake's group commit: webhooks that arrive together are stored in one transaction and
queued in one round trip, each answered as if it had been alone.

Driven through ``App.admission`` on a real store (SQLite and PostgreSQL) and a real Redis; the
requests are concurrent coroutines on one event loop, as uvicorn runs them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from workers.actors import PROCESS_DELIVERY
from workers.admission import REQUEUE_AFTER_SECONDS, Admitted, Unavailable
from workers.app import App
from workers.broker import EmbeddedRedis
from workers.config import load_config
from workers.schema import deliveries
from workers.store import Store

pytestmark = pytest.mark.stores("sqlite", "postgresql")


def row(n: int, event: str = "invitee.created") -> dict[str, Any]:
    """A delivery row as the intake builds it; ``n`` picks its dedupe key."""
    uri = f"https://api.vivocalendar.com/scheduled_events/E/invitees/{n}"
    return {"dedupe_key": f"{n:064x}", "event": event, "payload_uri": uri, "invitee_uri": uri,
            "sender_created_at": "2026-11-25T10:00:00.000000Z",
            "body": json.dumps({"event": event, "payload": {"uri": uri}})}


def admit_together(app: App, rows: list[dict[str, Any]]) -> list[Admitted | BaseException]:
    """Admit ``rows`` as concurrent requests on one event loop; the outcome of each, in order."""
    async def all_at_once() -> list[Admitted | BaseException]:
        return await asyncio.gather(*(app.admission.admit(r) for r in rows), return_exceptions=True)

    return asyncio.run(all_at_once())


def stored(app: App) -> dict[str, str]:
    with app.store.engine.connect() as conn:
        return dict(conn.execute(sa.select(deliveries.c.id, deliveries.c.dedupe_key)).all())


def queued_delivery_ids(app: App) -> list[str]:
    """The delivery ids on the queue, in queue order, read back through Redis as a worker would."""
    client = app.broker.client
    key = f"{app.config.broker.namespace}:{app.config.broker.queue}"
    messages = client.hmget(f"{key}.msgs", client.lrange(key, 0, -1))
    decoded = [json.loads(m) for m in messages]
    assert all(m["actor_name"] == PROCESS_DELIVERY for m in decoded)
    return [m["args"][0] for m in decoded]


@pytest.fixture
def app(make_config: Callable[..., Path]) -> Iterator[App]:
    built = App(load_config(make_config()))
    built.store  # noqa: B018 - the schema, as the intake creates it at start-up
    yield built
    built.close()


def count_commits(app: App) -> list[int]:
    commits = [0]

    def counted(_conn: Any) -> None:
        commits[0] += 1

    sa.event.listen(app.store.engine, "commit", counted)
    return commits


def test_webhooks_arriving_together_are_stored_once_each_in_one_transaction(app: App) -> None:
    rows = [row(n) for n in range(40)]
    twins = [row(n) for n in (3, 17, 17)]  # the same deliveries again, in the same batch
    commits = count_commits(app)

    outcomes = admit_together(app, rows + twins)

    firsts, repeats = outcomes[:40], outcomes[40:]
    assert all(isinstance(o, Admitted) and not o.duplicate for o in firsts)
    assert [(o.delivery_id, o.duplicate) for o in repeats] == [
        (firsts[3].delivery_id, True), (firsts[17].delivery_id, True), (firsts[17].delivery_id, True)]
    assert stored(app) == {o.delivery_id: r["dedupe_key"] for o, r in zip(firsts, rows, strict=True)}
    assert queued_delivery_ids(app) == [o.delivery_id for o in firsts]  # each once, in arrival order
    assert commits == [1]


def test_a_delivery_seen_before_the_batch_is_a_duplicate_of_the_stored_one(app: App) -> None:
    [first] = admit_together(app, [row(1)])

    outcomes = admit_together(app, [row(2), row(1)])

    assert isinstance(first, Admitted)
    assert [o.duplicate for o in outcomes] == [False, True]  # type: ignore[union-attr]
    assert outcomes[1].delivery_id == first.delivery_id  # type: ignore[union-attr]
    assert len(queued_delivery_ids(app)) == 2  # the repeat is not queued again


def test_a_stuck_stored_delivery_is_queued_again_when_the_sender_retries(app: App) -> None:
    """Stored by a process that died before enqueueing it: the sender's retry gets it run."""
    [first] = admit_together(app, [row(7)])
    assert isinstance(first, Admitted)
    client = app.broker.client
    client.delete(f"{app.config.broker.namespace}:{app.config.broker.queue}")  # as if never enqueued
    with app.store.engine.begin() as conn:
        conn.execute(deliveries.update().values(received_at=time.time() - REQUEUE_AFTER_SECONDS - 1))

    [retry] = admit_together(app, [row(7)])

    assert retry == Admitted(first.delivery_id, duplicate=True)
    assert queued_delivery_ids(app) == [first.delivery_id]


def test_broker_down_answers_the_whole_batch_unavailable_and_keeps_nothing(
    make_config: Callable[..., Path], tmp_path: Path,
) -> None:
    broker = EmbeddedRedis(tmp_path / "broker")
    try:
        app = App(load_config(make_config(broker={"url": broker.start()})))
        app.store  # noqa: B018
        broker.stop()

        outcomes = admit_together(app, [row(1), row(2), row(1)])

        assert all(isinstance(o, Unavailable) for o in outcomes)  # the twin of a withdrawn one too
        assert str(outcomes[0]) == "queue unavailable, retry later"
        assert stored(app) == {}
        app.close()
    finally:
        broker.stop()


def test_messages_queued_in_a_batch_are_dramatiq_messages_a_worker_can_fetch(app: App) -> None:
    outcomes = admit_together(app, [row(n) for n in range(3)])
    consumer = app.broker.consume(app.config.broker.queue, prefetch=3, timeout=1000)
    try:
        fetched = [next(consumer) for _ in range(3)]
        for message in fetched:
            consumer.ack(message)
    finally:
        consumer.close()

    assert [m.args[0] for m in fetched] == [o.delivery_id for o in outcomes]  # type: ignore[union-attr]


def test_the_intake_leaves_sqlite_checkpoints_to_its_background_chore(app: App) -> None:
    """A checkpoint syncs the database: on the event loop it stalled every request in flight."""
    if not app.admission.sqlite:  # the intake's writer defers its store's checkpoints
        pytest.skip("WAL checkpoints are SQLite's")
    for batch in range(12):  # ~5 MB of bodies: past SQLite's automatic checkpoint at 1,000 pages
        app.store.insert_deliveries([{**row(batch * 100 + n), "body": "x" * 4000} for n in range(100)])

    with app.store.engine.connect() as conn:
        busy, frames, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()

    assert frames > 1000  # every frame written since the start is still in the WAL…
    assert copied == frames  # …until a checkpoint (the chore's PRAGMA) copies them all


def test_after_the_chores_checkpoint_the_next_write_starts_the_wal_over(app: App) -> None:
    """Even when another writer commits while the checkpoint copies: under a steady flood the
    WAL otherwise grew without end, each frame written to a fresh, zero-filled block."""
    if not app.admission.sqlite:
        pytest.skip("WAL checkpoints are SQLite's")
    app.store.insert_deliveries([{**row(n), "body": "x" * 4000} for n in range(50)])
    database = app.store.engine.url.database
    # Another writer of this machine: it holds the write lock, as the intake and workers do, and
    # commits just after the checkpoint's first copy (SQLAlchemy's event on that statement).
    other = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
    lock = os.open(f"{database}.write-lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO deliveries (id, dedupe_key, event, received_at, source, body) "
                  "VALUES ('dlv_other', 'other', 'invitee.created', 0, 'webhook', ?)", ("y" * 4000,))
    copying = threading.Event()

    def first_copy(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("PRAGMA wal_checkpoint"):
            copying.set()

    def commit_then_unlock() -> None:
        copying.wait()
        other.execute("COMMIT")
        fcntl.flock(lock, fcntl.LOCK_UN)

    sa.event.listen(app.store.engine, "after_cursor_execute", first_copy)
    committer = threading.Thread(target=commit_then_unlock)
    committer.start()
    try:
        app.store.checkpoint()
    finally:
        copying.set()  # should the checkpoint fail before its first copy, the other writer still ends
        committer.join()
        sa.event.remove(app.store.engine, "after_cursor_execute", first_copy)
        other.close()
        os.close(lock)
    app.store.insert_deliveries([row(1000)])

    with app.store.engine.connect() as conn:
        _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    assert 0 < frames < 20  # the last delivery's pages alone, written from the WAL's start


def test_two_intakes_storing_the_same_deliveries_in_opposite_orders_both_succeed(app: App) -> None:
    """Overlapping batches lock their keys in one order, so PostgreSQL has no deadlock to break."""
    other = Store(app.store.url)  # the second intake's own engine and connections
    failures: list[BaseException] = []

    def insert(store: Store, batch: list[dict[str, Any]], start: threading.Barrier) -> None:
        start.wait()
        try:
            store.insert_deliveries(batch)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    for round_ in range(10):
        batch = [row(round_ * 100 + n) for n in range(60)]
        start = threading.Barrier(2)
        threads = [threading.Thread(target=insert, args=(app.store, batch, start)),
                   threading.Thread(target=insert, args=(other, batch[::-1], start))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    other.close()

    assert failures == []
    assert len(stored(app)) == 600


def test_on_postgresql_a_store_that_keeps_the_batch_waiting_does_not_stop_the_event_loop(app: App) -> None:
    """A database across the network is written from a thread: /healthz and the rest go on meanwhile."""
    if app.admission.sqlite:
        pytest.skip("SQLite is written on the loop (a local file)")

    async def scenario() -> tuple[int, Admitted]:
        admitting = asyncio.ensure_future(app.admission.admit(row(1)))
        turns = 0
        while not admitting.done():  # the insert waits for the table lock until the timer lifts it
            await asyncio.sleep(0.01)
            turns += 1
        return turns, await admitting

    with app.store.engine.connect() as blocker:
        blocker.execute(sa.text("LOCK TABLE deliveries IN EXCLUSIVE MODE"))
        release = threading.Timer(1.0, blocker.rollback)  # from another thread: the loop's may be stuck
        release.start()
        turns, admitted = asyncio.run(scenario())
        release.join()

    assert turns >= 20  # the loop kept turning while the batch was held (written on the loop: 0 or 1)
    assert admitted.duplicate is False
    assert list(stored(app)) == [admitted.delivery_id]
