"""Webhook envelopes and payloads, and the template context recipes see (SPEC §5).

Models tolerate unknown and null fields: the sender adds fields over time, and
older payload generations carried ``canceled``/``canceled_by``/``reason`` flat.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

#: Events the sender posts, and the one vivoflow derives from a reschedule's two halves.
RAW_EVENTS = (
    "invitee.created",
    "invitee.canceled",
    "routing_form_submission.created",
    "invitee_no_show.created",
    "invitee_no_show.deleted",
)
RESCHEDULED = "invitee.rescheduled"
EVENTS = (*RAW_EVENTS, RESCHEDULED)

UTM_KEYS = ("source", "medium", "campaign", "content", "term")
INVITEE_KEYS = (
    "name", "first_name", "last_name", "email", "timezone", "uri", "cancel_url", "reschedule_url", "answers",
)
MEETING_KEYS = ("name", "start_time", "end_time", "location", "uri")
SUBMISSION_KEYS = ("answers", "result", "submitter")


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class Envelope(_Tolerant):
    """``{"created_at", "created_by", "event", "payload"}`` as posted by the sender."""

    event: str
    payload: dict[str, Any]
    created_at: str | None = None
    created_by: str | None = None


class Cancellation(_Tolerant):
    canceled_by: str | None = None
    reason: str | None = None
    canceler_type: str | None = None
    created_at: datetime | None = None


class QuestionAnswer(_Tolerant):
    question: str | None = None
    answer: Any = None
    position: int | None = None


class ScheduledEvent(_Tolerant):
    uri: str | None = None
    name: str | None = None
    status: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    event_type: str | None = None
    location: Any = None


class Tracking(_Tolerant):
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    utm_content: str | None = None
    utm_term: str | None = None


class InviteePayload(_Tolerant):
    """The invitee resource of ``invitee.*`` events (Calendly API v2 shape)."""

    uri: str | None = None
    email: str | None = None
    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    status: str | None = None
    timezone: str | None = None
    event: str | None = None
    cancel_url: str | None = None
    reschedule_url: str | None = None
    rescheduled: bool | None = None
    old_invitee: str | None = None
    new_invitee: str | None = None
    tracking: Tracking | None = None
    questions_and_answers: list[QuestionAnswer] | None = None
    scheduled_event: ScheduledEvent | None = None
    cancellation: Cancellation | None = None
    # Older payload generations carried these flat; read both places.
    canceled: bool | None = None
    canceled_by: str | None = None
    reason: str | None = None
    canceler_type: str | None = None


class RoutingFormPayload(_Tolerant):
    uri: str | None = None
    routing_form: str | None = None
    questions_and_answers: list[QuestionAnswer] | None = None
    tracking: Tracking | None = None
    submitter: Any = None
    submitter_type: str | None = None
    result: Any = None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Answers(dict[str, Any]):
    """Question → answer; a question the invitee left unanswered reads as ``none``, not an error."""

    def __missing__(self, key: str) -> None:
        return None


def _answers(items: list[QuestionAnswer] | None) -> Answers:
    return Answers({qa.question: qa.answer for qa in items or [] if qa.question})


def _utm(tracking: Tracking | None) -> dict[str, str | None]:
    t = tracking or Tracking()
    return {key: getattr(t, f"utm_{key}") for key in UTM_KEYS}


def invitee_view(p: InviteePayload) -> dict[str, Any]:
    """The ``invitee`` name of the context."""
    return {
        "name": p.name, "first_name": p.first_name, "last_name": p.last_name, "email": p.email,
        "timezone": p.timezone, "uri": p.uri, "cancel_url": p.cancel_url,
        "reschedule_url": p.reschedule_url, "answers": _answers(p.questions_and_answers),
    }


def meeting_view(p: InviteePayload) -> dict[str, Any]:
    """The ``meeting`` name of the context: the scheduled event, datetimes timezone-aware."""
    se = p.scheduled_event or ScheduledEvent()
    return {
        "name": se.name, "start_time": se.start_time, "end_time": se.end_time,
        "location": se.location, "uri": se.uri or p.event,
    }


def empty_context(event: str) -> dict[str, Any]:
    """Every documented name, set to none: a missing value is ``none``, never an error."""
    return {
        "event": event, "status": None, "canceled": False, "canceled_by": None, "reason": None,
        "canceler_type": None, "rescheduled": False,
        "utm": dict.fromkeys(UTM_KEYS),
        "invitee": dict.fromkeys(INVITEE_KEYS) | {"answers": Answers()},
        "meeting": dict.fromkeys(MEETING_KEYS),
        # none outside invitee.rescheduled, so `{% if old %}` tells a reschedule apart.
        "old": None, "new": None,
        "submission": dict.fromkeys(SUBMISSION_KEYS) | {"answers": Answers()},
        "payload": {}, "steps": {},
    }


def parse_invitee(payload: dict[str, Any]) -> InviteePayload | None:
    try:
        return InviteePayload.model_validate(payload)
    except ValidationError:
        return None


def build_context(envelope: Envelope) -> dict[str, Any]:
    """The template context of SPEC §5 for one delivery's envelope.

    A payload that does not fit its model (a field of the wrong type) still
    yields a context: the documented names stay ``none`` and ``payload`` holds
    what was sent, so a recipe can reach it.
    """
    ctx = empty_context(envelope.event)
    ctx["payload"] = envelope.payload
    if envelope.event.startswith("invitee"):
        if envelope.event.startswith("invitee_no_show"):
            # A no-show names its invitee by URI only.
            ctx["invitee"]["uri"] = _str_or_none(envelope.payload.get("invitee"))
            return ctx
        invitee = parse_invitee(envelope.payload)
        if invitee is not None:
            _fill_invitee(ctx, invitee)
    elif envelope.event.startswith("routing_form_submission"):
        try:
            form = RoutingFormPayload.model_validate(envelope.payload)
        except ValidationError:
            return ctx
        ctx["utm"] = _utm(form.tracking)
        ctx["submission"] = {
            "answers": _answers(form.questions_and_answers), "result": form.result, "submitter": form.submitter,
        }
    return ctx


def build_rescheduled_context(canceled: Envelope, created: Envelope) -> dict[str, Any]:
    """The context of the derived ``invitee.rescheduled``: the new booking, with ``old`` and ``new``.

    ``canceled`` is the cancel half (the old invitee), ``created`` the new booking; the
    cancellation's fields (``canceled_by``, ``reason``…) come from the cancel half.
    """
    old_ctx, new_ctx = build_context(canceled), build_context(created)
    ctx = {**new_ctx, "event": RESCHEDULED, "rescheduled": True}
    for key in ("canceled_by", "reason", "canceler_type"):
        ctx[key] = old_ctx[key]
    ctx["old"] = {"invitee": old_ctx["invitee"], "meeting": old_ctx["meeting"]}
    ctx["new"] = {"invitee": new_ctx["invitee"], "meeting": new_ctx["meeting"]}
    ctx["payload"] = {"canceled": canceled.payload, "created": created.payload}
    return ctx


def reschedule_link(envelope: Envelope) -> tuple[str, str] | None:
    """``(old invitee URI, new invitee URI)`` if this delivery is half of a reschedule."""
    payload = envelope.payload
    uri = _str_or_none(payload.get("uri"))
    if envelope.event == "invitee.canceled" and payload.get("rescheduled") and _str_or_none(payload.get("new_invitee")):
        return (uri, payload["new_invitee"]) if uri else None
    if envelope.event == "invitee.created" and _str_or_none(payload.get("old_invitee")):
        return (payload["old_invitee"], uri) if uri else None
    return None


def _fill_invitee(ctx: dict[str, Any], p: InviteePayload) -> None:
    cancel = p.cancellation or Cancellation()
    ctx["status"] = p.status
    ctx["canceled"] = bool(p.canceled) or p.status == "canceled" or p.cancellation is not None
    ctx["canceled_by"] = cancel.canceled_by or p.canceled_by
    ctx["reason"] = cancel.reason or p.reason
    ctx["canceler_type"] = cancel.canceler_type or p.canceler_type
    ctx["rescheduled"] = bool(p.rescheduled)
    ctx["utm"] = _utm(p.tracking)
    ctx["invitee"] = invitee_view(p)
    ctx["meeting"] = meeting_view(p)


class PayloadHead(BaseModel):
    """The payload fields the intake reads; the rest is parsed (it must be valid JSON) but never built."""

    model_config = ConfigDict(extra="ignore")

    uri: Any = None
    invitee: Any = None


class EnvelopeHead(BaseModel):
    """What the intake needs of an envelope: it accepts exactly the bodies ``Envelope`` accepts.

    Building the whole payload as Python objects (a ~3 KB booking with its answers) cost 21 µs
    of the intake's ~150 per webhook; the workers build it anyway, from the stored body. This
    reads the same JSON with the same rules (``payload`` an object, ``event`` a string) and keeps
    only what the dedupe key and the invitee need: 8 µs. The intake's fuzz tests check that every
    body it stores is one the workers' ``Envelope`` reads.
    """

    model_config = ConfigDict(extra="ignore")

    event: str
    payload: PayloadHead
    created_at: str | None = None
    created_by: str | None = None


@dataclass(frozen=True)
class DeliveryFacts:
    """What the intake keeps beside the raw body: the dedupe key's parts and the invitee."""

    event: str
    uri: str | None
    sender_created_at: str | None
    invitee_uri: str | None
    dedupe_key: str


def delivery_facts(envelope: EnvelopeHead, body: bytes) -> DeliveryFacts:
    """The dedupe key is event + payload ``uri`` + envelope ``created_at`` (SPEC §4).

    A body lacking either part is keyed by its own bytes instead, so two
    different such bodies are never taken for one another.
    """
    uri = _str_or_none(envelope.payload.uri)
    if uri and envelope.created_at:
        key = "\x1f".join([envelope.event, uri, envelope.created_at]).encode()
    else:
        key = b"body\x1f" + body
    return DeliveryFacts(
        event=envelope.event,
        uri=uri,
        sender_created_at=envelope.created_at,
        invitee_uri=(
            _str_or_none(envelope.payload.invitee) if envelope.event.startswith("invitee_no_show")
            else uri if envelope.event.startswith("invitee") else None
        ),
        dedupe_key=hashlib.sha256(key).hexdigest(),
    )
