"""Reconciliation: find through the API the bookings and cancellations no webhook delivered.

The sender retries a failed webhook for 24 hours, then gives up and disables the
subscription. Reconciliation lists recent scheduled events and their invitees
and stores a delivery (``source: reconcile``) for every booking or cancellation
the store has never seen, so an outage of the intake loses nothing. Running it
twice adds nothing: a booking event is recognised by its invitee URI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.vivocalendar import ApiError, VivocalendarApi
from workers.app import App
from workers.events import EnvelopeHead, delivery_facts
from workers.periodic import Periodic

log = logging.getLogger("vivoflow.reconcile")

#: ``created_by`` of a reconciled delivery, so history tells it from a webhook.
RECONCILER = "vivoflow-reconcile"


@dataclass
class Found:
    event: str
    invitee_uri: str
    delivery_id: str
    enqueued: bool


@dataclass
class ReconcileReport:
    checked: int = 0
    found: list[Found] = field(default_factory=list)


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _scheduled_events(api: VivocalendarApi, since: datetime, until: datetime) -> Iterator[dict[str, Any]]:
    """The organization's events starting in the window, or the user's when the token cannot see the organization."""
    me = api.me()
    try:
        yield from api.scheduled_events(organization=me["current_organization"], min_start_time=since,
                                        max_start_time=until)
    except ApiError as exc:
        if exc.status != 403:
            raise
        log.info("no organization access (%s); reconciling the token's own user", exc.remote)
        yield from api.scheduled_events(user=me["uri"], min_start_time=since, max_start_time=until)


def missed_events(invitee: dict[str, Any], since: datetime) -> list[tuple[str, str]]:
    """(event, envelope ``created_at``) for each booking event of this invitee inside the window."""
    out = []
    created = _time(invitee.get("created_at"))
    if created and created >= since:
        out.append(("invitee.created", invitee["created_at"]))
    cancellation = invitee.get("cancellation") or {}
    canceled_at = cancellation.get("created_at") or invitee.get("updated_at")
    if invitee.get("status") == "canceled" and (when := _time(canceled_at)) and when >= since:
        out.append(("invitee.canceled", canceled_at))
    return out


def reconcile(
    app: App, api: VivocalendarApi, *, since: timedelta, horizon: timedelta = timedelta(days=60),
    now: datetime | None = None, enqueue: Callable[[str], None] | None = None,
) -> ReconcileReport:
    """Store (and enqueue) a delivery for every booking event of the last ``since`` the store lacks.

    Events are looked up by start time, the only filter the API has: from ``since``
    ago to ``horizon`` ahead, which covers bookings made in the window for the
    coming weeks. A delivery that cannot be enqueued (no broker running) stays
    stored and unprocessed; ``vivoflow run`` enqueues it at start-up.
    """
    current = now or datetime.now(UTC)
    start = current - since
    send = enqueue or (lambda delivery_id: app.queue.delivery(delivery_id))
    report = ReconcileReport()
    for scheduled in _scheduled_events(api, start, current + horizon):
        for invitee in api.event_invitees(scheduled["uri"]):
            report.checked += 1
            for event, created_at in missed_events(invitee, start):
                if app.store.has_delivery(event, invitee["uri"]):
                    continue
                report.found.append(_store(app, event, created_at, invitee, scheduled, send))
    if report.found:
        log.warning("reconcile: %d booking event(s) no webhook delivered: %s", len(report.found),
                    ", ".join(f"{f.event} {f.delivery_id}" for f in report.found))
    return report


def _store(app: App, event: str, created_at: str, invitee: dict[str, Any], scheduled: dict[str, Any],
           send: Callable[[str], None]) -> Found:
    # The webhook's shape: the invitee resource with its scheduled event inside.
    envelope = {"created_at": created_at, "created_by": RECONCILER, "event": event,
                "payload": {**invitee, "scheduled_event": scheduled}}
    body = json.dumps(envelope).encode()
    facts = delivery_facts(EnvelopeHead.model_validate(envelope), body)
    delivery_id, _ = app.store.insert_delivery({
        "dedupe_key": facts.dedupe_key, "event": event, "payload_uri": facts.uri, "invitee_uri": facts.invitee_uri,
        "sender_created_at": created_at, "body": body.decode(), "source": "reconcile",
    })
    try:
        send(delivery_id)
        enqueued = True
    except Exception as exc:  # noqa: BLE001 - any broker failure: the delivery waits, stored
        log.warning("reconcile: %s stored, not enqueued (%s); `vivoflow run` enqueues it", delivery_id, exc)
        enqueued = False
    return Found(event=event, invitee_uri=invitee["uri"], delivery_id=delivery_id, enqueued=enqueued)


def reconciler(app: App, api_factory: Callable[[], VivocalendarApi], *, every: timedelta, window: timedelta,
               horizon: timedelta) -> Periodic:
    """Reconciliation at start-up and then every ``every``, in the background of ``run``/``serve``."""

    def round_() -> None:
        with api_factory() as api:
            reconcile(app, api, since=window, horizon=horizon)

    return Periodic("reconcile", every, round_)
