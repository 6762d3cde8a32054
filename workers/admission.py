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
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
from dramatiq.errors import BrokerConnectionError

from workers.actors import Queue
from workers.store import Store

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


@dataclass
class _Pending:
    row: dict[str, Any]
    future: asyncio.Future[Admitted]


class DeliveryWriter:
    """The intake's writer: ``await admit(row)`` returns once the delivery is stored and queued.

    Batches form on the event loop: the first request of a batch schedules its flush
    ``linger_seconds`` later, and everything that arrives meanwhile joins it. A webhook costs
    about 40 µs of store and queue work in a batch of 30, and about 200 µs alone (a commit and
    a round trip each). On SQLite the flush is due at the loop's next turn: the loop is busy
    with the previous flush while requests arrive, so they make the next batch by themselves,
    and a lone webhook is not kept waiting (idle latency 3.9 -> 2.8 ms; the flood's rate was
    the same within noise). Written from a thread (PostgreSQL), a flush lingers a millisecond
    for others to join it.

    On SQLite the flush runs on the loop itself, not a thread: a writer thread spent most of
    its time waiting for the GIL after each database or socket call while the loop parsed
    requests (Python's 5 ms switch interval), which made every batch tens of milliseconds
    long. On the loop, a batch costs its own work and the short waits of a local file and a
    loopback Redis. A database across the network (PostgreSQL) is written from one thread
    instead: its round trips, or a server that stops answering, must not stop the loop (and
    with it ``/healthz``); the thread mostly waits on the network there, GIL released.
    """

    def __init__(self, store: Store, queue_: Queue, *, max_batch: int = 256,
                 linger_seconds: float | None = None) -> None:
        self.store = store
        self.sqlite = store.engine.dialect.name == "sqlite"
        if self.sqlite:
            store.defer_checkpoints()  # the intake's chore does them (workers.runner), off the loop
        self.queue = queue_
        self.max_batch = max_batch
        self.linger_seconds = (0.0 if self.sqlite else 0.001) if linger_seconds is None else linger_seconds
        # One batch per event loop: tests drive the app from several loops in turn.
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Pending]] = (
            weakref.WeakKeyDictionary())
        self._remote = None if self.sqlite else ThreadPoolExecutor(1, thread_name_prefix="vivoflow-admission")

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
            stored = self.store.insert_deliveries(rows)
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
                self.store.delete_deliveries(fresh)
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
