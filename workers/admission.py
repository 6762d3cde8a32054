"""Group commit for the intake: many webhooks per store transaction and per broker round trip.

A webhook is answered 202 only once it is both stored and on the queue. Doing
that one request at a time costs a transaction and a broker round trip each,
which is what limited the intake. Here the requests that arrive together (up to
``max_batch``) are stored in one transaction, the new ones enqueued in one round
trip, and then answered all at once. Under light load a batch is one webhook;
under a flood batches grow by themselves, so the cost per webhook falls as the
load rises. The promise to the sender is unchanged: nothing is answered 202
before it is durable, and a store or broker failure is a 503 with nothing
half-written (deliveries whose enqueue failed are deleted again).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
import sqlalchemy.exc
from dramatiq.errors import BrokerConnectionError
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from workers.actors import Queue
from workers.schema import deliveries
from workers.store import Store, new_id

log = logging.getLogger("vivoflow.intake")

#: A stored delivery still unprocessed this long after it arrived is enqueued again on a duplicate.
REQUEUE_AFTER_SECONDS = 60

STORE_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DBAPIError)
BROKER_ERRORS = (redis.RedisError, BrokerConnectionError, OSError)


class Unavailable(Exception):
    """The store or the broker did not answer: the sender should retry (a 503)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} unavailable, retry later")


@dataclass(frozen=True)
class Admitted:
    delivery_id: str
    duplicate: bool


@dataclass(frozen=True)
class Stored:
    """One row of a batch as the store has it: ours, or the first delivery with its dedupe key."""

    delivery_id: str
    duplicate: bool
    received_at: float
    processed_at: float | None

    def stuck(self, after_seconds: float) -> bool:
        """Stored long ago by a process that died before enqueueing it: the sender's retry enqueues it."""
        return self.duplicate and self.processed_at is None and time.time() - self.received_at > after_seconds


#: The columns a webhook's delivery row is written with (the rest keep their defaults: unprocessed).
_COLUMNS = ("id", "received_at", "source", "dedupe_key", "event", "payload_uri", "invitee_uri",
            "sender_created_at", "body")


class DeliveryRows:
    """The intake's batch writes: insert once per dedupe key, withdraw, checkpoint.

    The insert is SQLAlchemy's compilation of ``INSERT … ON CONFLICT (dedupe_key) DO NOTHING``
    for the store's dialect (quoted and parameterised as that database wants), executed by
    the driver's own ``executemany``: SQLAlchemy's per-row parameter processing cost as much
    as SQLite's insert itself.

    On SQLite the connections that insert do not checkpoint the WAL themselves
    (``wal_autocheckpoint=0``): a checkpoint copies the WAL into the database and syncs it,
    and on the event loop that stalled every request for 10 ms or more. ``checkpoint()`` runs
    from a background thread instead (``workers.runner``), and any other process's connection
    (the workers') still checkpoints as SQLite normally does.
    """

    def __init__(self, store: Store) -> None:
        self.engine = store.engine
        dialect = self.engine.dialect
        self.sqlite = dialect.name == "sqlite"
        insert = (sqlite_insert if self.sqlite else postgresql_insert)(deliveries)
        statement = insert.values({name: sa.bindparam(name) for name in _COLUMNS}).on_conflict_do_nothing(
            index_elements=["dedupe_key"])
        compiled = statement.compile(dialect=dialect)
        self._insert = str(compiled)
        self._order = compiled.positiontup  # parameter names in order for '?' styles, None for named ones

    def insert(self, rows: list[dict[str, Any]]) -> list[Stored]:
        """Store each row once per dedupe key, in one transaction; one ``Stored`` per row, in order.

        The rows that clash with a stored dedupe key (or a twin in the same batch, or another
        intake's that won the race) insert nothing; only when the driver reports fewer rows
        than it was given are the batch's keys looked up, to name the first delivery of each.
        """
        now = time.time()
        values = [{"id": new_id("dlv"), "received_at": now, "source": "webhook", **row} for row in rows]
        # In key order: two intakes inserting overlapping batches then lock the keys in the same
        # order, where PostgreSQL would otherwise break a deadlock by failing one of them.
        ordered = sorted(values, key=lambda v: v["dedupe_key"])
        parameters = ordered if self._order is None else [tuple(v[n] for n in self._order) for v in ordered]
        with self.engine.begin() as conn:
            if self.sqlite:
                conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            inserted = conn.exec_driver_sql(self._insert, parameters).rowcount
            if inserted == len(values):
                return [Stored(value["id"], False, now, None) for value in values]
            lookup = sa.select(deliveries.c.dedupe_key, deliveries.c.id, deliveries.c.received_at,
                               deliveries.c.processed_at).where(
                deliveries.c.dedupe_key.in_(sorted({row["dedupe_key"] for row in rows})))
            found = {r.dedupe_key: r for r in conn.execute(lookup)}
        stored = []
        for value in values:
            row = found[value["dedupe_key"]]
            stored.append(Stored(row.id, row.id != value["id"], row.received_at, row.processed_at))
        return stored

    def delete(self, ids: list[str]) -> None:
        """Withdraw deliveries that could not be enqueued, so the sender's retry is not a 'duplicate'."""
        if ids:
            with self.engine.begin() as conn:
                conn.execute(deliveries.delete().where(deliveries.c.id.in_(ids)))

    def checkpoint(self) -> None:
        """Copy the SQLite WAL into the database without waiting on readers or writers."""
        if self.sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


@dataclass
class _Pending:
    row: dict[str, Any]
    future: asyncio.Future[Admitted]


class DeliveryWriter:
    """The intake's writer: ``await admit(row)`` returns once the delivery is stored and queued.

    Batches form on the event loop: the first request of a batch schedules its flush
    ``linger_seconds`` later (a millisecond by default), and everything that arrives meanwhile
    joins it. A webhook costs about 40 µs of store and queue work in a batch of 30, and
    about 200 µs alone (a commit and a round trip each): at a few thousand webhooks a second,
    a millisecond's wait is what turns lone requests into batches.

    On SQLite the flush runs on the loop itself, not a thread: a writer thread spent most of
    its time waiting for the GIL after each database or socket call while the loop parsed
    requests (Python's 5 ms switch interval), which made every batch tens of milliseconds
    long. On the loop, a batch costs its own work and the short waits of a local file and a
    loopback Redis. A database across the network (PostgreSQL) is written from one thread
    instead: its round trips, or a server that stops answering, must not stop the loop (and
    with it ``/healthz``); the thread mostly waits on the network there, GIL released.
    """

    def __init__(self, store: Store, queue_: Queue, *, max_batch: int = 256, linger_seconds: float = 0.001) -> None:
        self.rows = DeliveryRows(store)
        self.queue = queue_
        self.max_batch = max_batch
        self.linger_seconds = linger_seconds
        # One batch per event loop: tests drive the app from several loops in turn.
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Pending]] = (
            weakref.WeakKeyDictionary())
        self._remote = None if self.rows.sqlite else ThreadPoolExecutor(1, thread_name_prefix="vivoflow-admission")

    async def admit(self, row: dict[str, Any]) -> Admitted:
        """Store ``row`` once per dedupe key and enqueue it; raises ``Unavailable``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Admitted] = loop.create_future()
        batch = self._batches.setdefault(loop, [])
        batch.append(_Pending(row, future))
        if len(batch) == 1:
            loop.call_later(self.linger_seconds, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._batches.pop(loop, [])
        if len(batch) > self.max_batch:
            self._batches[loop] = batch[self.max_batch:]
            batch = batch[:self.max_batch]
            loop.call_soon(self._flush, loop)
        if self._remote is None:
            _settle(batch, self._outcomes(batch))
        else:
            self._remote.submit(lambda: loop.call_soon_threadsafe(_settle, batch, self._outcomes(batch)))

    def _outcomes(self, batch: list[_Pending]) -> list[Admitted | Exception]:
        try:
            return [*self.write([p.row for p in batch])]
        except Exception as exc:  # noqa: BLE001 - a bug: the requests get a 500, not an endless wait
            log.exception("storing %d deliveries failed", len(batch))
            return [exc] * len(batch)

    def close(self) -> None:
        """Let the batches handed to the writer thread finish (PostgreSQL and the like)."""
        if self._remote is not None:
            self._remote.shutdown(wait=True)

    def write(self, rows: list[dict[str, Any]]) -> list[Admitted | Unavailable]:
        """Store and enqueue a batch: one outcome per row, in order (``Unavailable`` is not raised)."""
        try:
            stored = self.rows.insert(rows)
        except STORE_ERRORS as exc:
            log.error("store unavailable: %s", type(exc).__name__)
            return [Unavailable("run store") for _ in rows]
        fresh = [s.delivery_id for s in stored if not s.duplicate]
        stuck = [s.delivery_id for s in stored if s.stuck(REQUEUE_AFTER_SECONDS)]
        failed: set[str] = set()
        try:
            self.queue.deliveries([*fresh, *stuck])
        except BROKER_ERRORS as exc:
            log.error("broker unavailable: %s", type(exc).__name__)
            failed = set(fresh)
            try:
                self.rows.delete(fresh)
            except STORE_ERRORS:  # the sender's retry then meets a stuck duplicate, re-enqueued then
                log.error("could not withdraw %d deliveries after the broker failed", len(fresh))
        if fresh and not failed:
            log.debug("%d deliveries accepted in one batch", len(fresh))
        # A duplicate of a delivery withdrawn just now was never really accepted either.
        return [Unavailable("queue") if s.delivery_id in failed else Admitted(s.delivery_id, s.duplicate)
                for s in stored]


def _settle(batch: list[_Pending], outcomes: list[Admitted | Exception]) -> None:
    """Answer each waiting request of a batch (on its event loop)."""
    for pending, outcome in zip(batch, outcomes, strict=True):
        if pending.future.done():  # the client went away and its request was cancelled
            continue
        if isinstance(outcome, Admitted):
            pending.future.set_result(outcome)
        else:
            pending.future.set_exception(outcome)
