"""The queue and its actors, bound to an engine: process a delivery, resume a run, replay a delivery.

Messages carry ids only; the store holds the data. The intake only enqueues
(it needs no actor code), workers declare the actors and run them.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq import Broker, Message, Middleware
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries

from workers.engine import Engine
from workers.errors import Busy
from workers.store import Store
from workers.wakeups import WakingRedisBroker

log = logging.getLogger("vivoflow.actors")

DEFAULT_QUEUE = "vivoflow"
PROCESS_DELIVERY = "process_delivery"
RESUME_RUN = "resume_run"
REPLAY_DELIVERY = "replay_delivery"

#: Dramatiq's own retries cover what is not a step's outcome (the store briefly
#: unreachable, a bug): a message is tried again with backoff, then dead-lettered
#: and recorded as failed (RecordDeadLetters).
ACTOR_OPTIONS = {"max_retries": 20, "min_backoff": 1_000, "max_backoff": 300_000}

#: The longest a message waits in the broker's delay queue. A longer delay is split:
#: the run wakes up, sees its step is not due yet, and goes back to sleep. Workers hold
#: delayed messages in memory, so days-long delays must not sit there whole.
MAX_DELAY_MS = 3_600_000


class Queue:
    """vivoflow's queue on a broker: what the intake, the CLI and the engine put work on.

    Messages carry ids only. The name is ``broker.queue`` (so two vivoflows, or two
    tests, can share one RabbitMQ); on Redis the namespace separates them as well.
    """

    def __init__(self, broker: Broker, name: str = DEFAULT_QUEUE) -> None:
        self.broker = broker
        self.name = name
        broker.declare_queue(name)

    def _send(self, actor: str, args: tuple[Any, ...], delay_ms: int = 0) -> None:
        message = Message(queue_name=self.name, actor_name=actor, args=args, kwargs={}, options={})
        self.broker.enqueue(message, delay=min(max(delay_ms, 0), MAX_DELAY_MS) or None)

    def delivery(self, delivery_id: str, delay_ms: int = 0) -> None:
        """Put a stored delivery on the queue."""
        self._send(PROCESS_DELIVERY, (delivery_id,), delay_ms)

    def deliveries(self, delivery_ids: list[str]) -> None:
        """Put many stored deliveries on the queue: on Redis in one round trip
        (``WakingRedisBroker.enqueue_batch``); a broker without that (RabbitMQ), one by one."""
        if isinstance(self.broker, WakingRedisBroker):
            self.broker.enqueue_batch(self.name, PROCESS_DELIVERY, [(delivery_id,) for delivery_id in delivery_ids])
            return
        for delivery_id in delivery_ids:
            self.delivery(delivery_id)

    def resume(self, run_id: str, delay_ms: int) -> None:
        """Hand a run back to the queue, to continue after ``delay_ms``."""
        self._send(RESUME_RUN, (run_id,), delay_ms)

    def replay(self, delivery_id: str, replay_id: str, recipe: str | None = None, delay_ms: int = 0) -> None:
        self._send(REPLAY_DELIVERY, (delivery_id, replay_id, recipe), delay_ms)

    def depth(self) -> dict[str, int]:
        """Messages waiting: ``ready``, and ``delayed`` ones not yet taken by a worker."""
        if isinstance(self.broker, RedisBroker):
            ns = self.broker.namespace
            return {"ready": self.broker.client.llen(f"{ns}:{self.name}"),
                    "delayed": self.broker.client.llen(f"{ns}:{self.name}.DQ")}
        ready, delayed, _dead = self.broker.get_queue_message_counts(self.name)  # type: ignore[attr-defined]
        return {"ready": ready, "delayed": delayed}

    def ping(self) -> None:
        """Raise if the broker does not answer."""
        if isinstance(self.broker, RedisBroker):
            self.broker.client.ping()
        else:
            self.depth()


class RecordDeadLetters(Middleware):
    """A message Dramatiq gives up on leaves a failed run behind, never only a dead letter."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def after_process_message(self, broker: Broker, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None or not message.failed:
            return
        # One line: a database error's text goes on with the SQL and its parameters (personal data).
        first = (str(exception).strip().splitlines() or [""])[0][:300]
        reason = f"gave up after {message.options.get('retries', 0)} tries: {type(exception).__name__}: {first}"
        try:
            if message.actor_name == RESUME_RUN:
                self.store.finish_run(message.args[0], "failed", reason)
            elif message.actor_name in (PROCESS_DELIVERY, REPLAY_DELIVERY):
                delivery_id = message.args[0]
                self.store.ensure_run(run_key=f"{delivery_id}:dead-letter:{message.message_id}",
                                      delivery_id=delivery_id, recipe="(delivery)", event="(processing)",
                                      status="failed", reason=reason)
        except Exception:  # noqa: BLE001 - the store may be what failed; the log keeps the trace
            log.exception("could not record the dead letter %s", message.message_id)
        log.error("message %s (%s %s) dead-lettered: %s", message.message_id, message.actor_name,
                  message.args, reason)


def declare_actors(queue: Queue, engine: Engine) -> None:
    """Declare the actors on the queue's broker, closing over ``engine`` (no global broker)."""
    broker = queue.broker

    def process_delivery(delivery_id: str) -> None:
        try:
            engine.process_delivery(delivery_id)
        except Busy as busy:
            # Another worker holds this invitee: come back shortly, without spending a retry.
            queue.delivery(delivery_id, busy.delay_ms)

    def resume_run(run_id: str) -> None:
        engine.resume_run(run_id)

    def replay_delivery(delivery_id: str, replay_id: str, recipe: str | None = None) -> None:
        try:
            engine.replay_delivery(delivery_id, replay_id, recipe)
        except Busy as busy:
            queue.replay(delivery_id, replay_id, recipe, busy.delay_ms)

    broker.add_middleware(RecordDeadLetters(engine.store), before=Retries)
    for fn, name in ((process_delivery, PROCESS_DELIVERY), (resume_run, RESUME_RUN),
                     (replay_delivery, REPLAY_DELIVERY)):
        dramatiq.Actor(fn, broker=broker, actor_name=name, queue_name=queue.name, priority=0, options=ACTOR_OPTIONS)
