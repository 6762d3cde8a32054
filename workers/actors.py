"""The queue's two actors, bound to an engine: process a delivery, resume a run.

Messages carry ids only; the store holds the data. The intake only enqueues
(it needs no actor code), workers declare the actors and run them.
"""

from __future__ import annotations

import dramatiq
from dramatiq import Broker, Message

from workers.engine import Engine

QUEUE = "vivoflow"
PROCESS_DELIVERY = "process_delivery"
RESUME_RUN = "resume_run"

#: Dramatiq's own retries cover what is not a step's outcome (the store briefly
#: unreachable, a bug): a message is tried again with backoff, then dead-lettered.
ACTOR_OPTIONS = {"max_retries": 20, "min_backoff": 1_000, "max_backoff": 300_000}


def enqueue_delivery(broker: Broker, delivery_id: str) -> None:
    """Put a stored delivery on the queue (from the intake, which declares no actors)."""
    broker.declare_queue(QUEUE)
    broker.enqueue(Message(
        queue_name=QUEUE, actor_name=PROCESS_DELIVERY, args=(delivery_id,), kwargs={}, options={},
    ))


def enqueue_resume(broker: Broker, run_id: str, delay_ms: int) -> None:
    """Hand a run back to the queue, to continue after ``delay_ms``."""
    broker.declare_queue(QUEUE)
    broker.enqueue(
        Message(queue_name=QUEUE, actor_name=RESUME_RUN, args=(run_id,), kwargs={}, options={}),
        delay=max(delay_ms, 0) or None,
    )


def declare_actors(broker: Broker, engine: Engine) -> None:
    """Declare the actors on ``broker``, closing over ``engine`` (no global broker)."""
    dramatiq.Actor(
        engine.process_delivery, broker=broker, actor_name=PROCESS_DELIVERY, queue_name=QUEUE,
        priority=0, options=ACTOR_OPTIONS,
    )
    dramatiq.Actor(
        engine.resume_run, broker=broker, actor_name=RESUME_RUN, queue_name=QUEUE,
        priority=0, options=ACTOR_OPTIONS,
    )
