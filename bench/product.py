"""The few product calls the bench makes in-process (pre-filling a queue, counting in the store).

Everything else drives vivoflow through its command line. These mirror the intake's own
``accept`` (store, then enqueue) and follow the queue API whichever shape it has today.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa


def open_app(config: Path) -> Any:
    from workers.app import App
    from workers.config import load_config

    return App(load_config(config))


def enqueue(app: Any, delivery_id: str) -> None:
    """``app.queue.delivery`` (current), else ``workers.actors.enqueue_delivery`` (earlier)."""
    queue = getattr(app, "queue", None)
    if queue is not None and hasattr(queue, "delivery"):
        queue.delivery(delivery_id)
        return
    from workers.actors import enqueue_delivery  # type: ignore[attr-defined]

    enqueue_delivery(app.broker, delivery_id)


def store_delivery(app: Any, body: bytes) -> str:
    """Store one webhook body as the intake does; returns its delivery id."""
    from workers.events import EnvelopeHead, delivery_facts

    envelope = EnvelopeHead.model_validate_json(body)
    facts = delivery_facts(envelope, body)
    delivery_id, _ = app.store.insert_delivery({
        "dedupe_key": facts.dedupe_key, "event": facts.event, "payload_uri": facts.uri,
        "invitee_uri": facts.invitee_uri, "sender_created_at": facts.sender_created_at,
        "body": body.decode("utf-8"),
    })
    return delivery_id


def sqlite_counts(db: Path) -> dict[str, Any]:
    """Deliveries stored and processed, runs by status, and the runs' first start and last finish."""
    engine = sa.create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
    try:
        with engine.connect() as conn:
            stored, processed = conn.execute(sa.text(
                "SELECT count(*), count(processed_at) FROM deliveries")).one()
            by_status = dict(conn.execute(sa.text("SELECT status, count(*) FROM runs GROUP BY status")).all())
            first, last = conn.execute(sa.text("SELECT min(created_at), max(finished_at) FROM runs")).one()
    finally:
        engine.dispose()
    return {"stored": stored, "processed": processed, "runs": by_status, "first_run_at": first, "last_run_at": last}


def queue_length(redis_url: str, namespace: str, queue: str = "vivoflow") -> int | None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(f"{namespace}:{queue}"))
    except redis.RedisError:
        return None
    finally:
        client.close()
