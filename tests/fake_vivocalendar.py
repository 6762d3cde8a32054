"""A fake Vivocalendar API v2 for tests: a Starlette app speaking Calendly's documented shapes, on FakeService.

Seeded from the shipped sample webhooks (their invitees and scheduled events), so lookups and a
reconciliation see the same bookings the samples deliver; tests add more with ``add_*``.
"""

from __future__ import annotations

import base64
import copy
import itertools
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_service import FakeService, RecordedRequest
from workers.samples import load_sample

#: The host the shipped samples name; rewritten to ``uri_base`` when they are loaded.
SAMPLE_BASE = "https://api.vivocalendar.com"
TOKEN = "vc-test-token-0123456789"
#: The samples seeded by default: one reschedule, so the world is consistent (old canceled, new active).
DEFAULT_SAMPLES = ("invitee.canceled.rescheduled", "invitee.created.rescheduled")
WEBHOOK_EVENTS = ("invitee.created", "invitee.canceled", "invitee_no_show.created", "invitee_no_show.deleted",
                  "routing_form_submission.created")
#: Calendly's 403 texts: a token whose role cannot use organization scope, and an account without webhooks.
NO_PERMISSION = "You do not have permission to access this resource."
UPGRADE = "Please upgrade your Vivocalendar account to Standard"
NOT_FOUND = "The server could not find the requested resource."

Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, title: str, message: str, details: list[dict[str, str]] | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the API's shape: ``{"title", "message", "details"}``."""
    body: dict[str, Any] = {"title": title, "message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status, headers=headers)


def invalid(parameter: str, message: str) -> JSONResponse:
    return error(400, "Invalid Argument", "The supplied parameters are invalid.",
                 [{"parameter": parameter, "message": message}])


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _stamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeVivocalendar:
    """The API on a local port. ``url`` is what ``connectors.vivocalendar.base_url`` should be.

    Resource URIs start with ``uri_base`` (default: ``url``, so a connector may fetch them); pass
    ``uri_base=SAMPLE_BASE`` to keep the samples' URIs as they are delivered by webhook.
    Switches: ``forbid_organization_scope`` (a token that is not an owner or admin), ``paid_plan``
    (False: webhooks answer 403), ``busy_times`` (slot start times listed as unavailable), and
    ``fail_next``/``rate_limit`` to answer the next requests with an error.
    """

    def __init__(self, *, token: str = TOKEN, uri_base: str | None = None,
                 samples: Iterable[str] = DEFAULT_SAMPLES) -> None:
        self.token = token
        self.service = FakeService(self._app())
        self.url = self.service.url
        self.uri_base = (uri_base or self.url).rstrip("/")
        self.user: dict[str, Any] = {
            "uri": self.uri("/users/HOSTUSER0001"), "name": "Morgan Lee", "slug": "morgan-lee",
            "email": "morgan.lee@example.com", "scheduling_url": "https://vivocalendar.com/morgan-lee",
            "timezone": "America/New_York", "avatar_url": None, "locale": "en", "resource_type": "User",
            "created_at": "2026-01-05T09:00:00.000000Z", "updated_at": "2026-01-05T09:00:00.000000Z",
            "current_organization": self.uri("/organizations/ORGANIZATION01"),
        }
        self.organization: str = self.user["current_organization"]
        self.event_types: dict[str, dict[str, Any]] = {}
        self.scheduled_events: dict[str, dict[str, Any]] = {}
        #: Scheduled event URI → invitee URI → invitee resource.
        self.invitees: dict[str, dict[str, dict[str, Any]]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        #: Subscription URI → the signing key it was created with (the API never shows it back).
        self.signing_keys: dict[str, str] = {}
        self.forbid_organization_scope = False
        self.paid_plan = True
        self.busy_times: set[str] = set()
        self._failures: list[JSONResponse] = []
        self._ids = itertools.count(1)
        for name in samples:
            self.add_sample(name)

    # --- life cycle and what was received ----------------------------------------------------

    def start(self) -> FakeVivocalendar:
        self.service.start()
        return self

    def stop(self) -> None:
        self.service.stop()

    def __enter__(self) -> FakeVivocalendar:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def received(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        return self.service.received(method, path)

    # --- data ------------------------------------------------------------------------------

    def uri(self, path: str) -> str:
        return self.uri_base + path

    def add_sample(self, name: str) -> dict[str, Any]:
        """Add a sample webhook's invitee and scheduled event (a later sample replaces the same URIs)."""
        payload = self.rebase(load_sample(name)["payload"])
        event = payload.pop("scheduled_event")
        self.add_scheduled_event(event)
        return self.add_invitee(payload)

    def add_event_type(self, uri: str, scheduling_url: str = "https://vivocalendar.com/morgan-lee/discovery-call",
                       name: str = "Discovery Call") -> dict[str, Any]:
        self.event_types[uri] = {"uri": uri, "name": name, "scheduling_url": scheduling_url, "active": True}
        return self.event_types[uri]

    def add_scheduled_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Add (or replace) a scheduled event resource; its event type becomes known too."""
        self.scheduled_events[event["uri"]] = copy.deepcopy(event)
        self.invitees.setdefault(event["uri"], {})
        if event.get("event_type") and event["event_type"] not in self.event_types:
            self.add_event_type(event["event_type"])
        return self.scheduled_events[event["uri"]]

    def add_invitee(self, invitee: dict[str, Any]) -> dict[str, Any]:
        """Add (or replace) an invitee of a scheduled event already added (``invitee["event"]``)."""
        self.invitees[invitee["event"]][invitee["uri"]] = copy.deepcopy(invitee)
        return self.invitees[invitee["event"]][invitee["uri"]]

    def add_subscription(self, url: str, events: list[str], scope: str = "organization", *,
                         state: str = "active", signing_key: str = "") -> dict[str, Any]:
        uri = self.uri(f"/webhook_subscriptions/SUB{next(self._ids):013d}")
        now = _stamp(datetime.now(UTC))
        self.subscriptions[uri] = {
            "uri": uri, "callback_url": url, "created_at": now, "updated_at": now, "retry_started_at": None,
            "state": state, "events": list(events), "scope": scope, "organization": self.organization,
            "user": self.user["uri"] if scope == "user" else None, "group": None, "creator": self.user["uri"],
        }
        self.signing_keys[uri] = signing_key
        return self.subscriptions[uri]

    def fail_next(self, status: int, body: dict[str, Any], *, headers: dict[str, str] | None = None,
                  count: int = 1) -> None:
        """Answer the next ``count`` requests (any path) with this error, before any other check."""
        self._failures += [JSONResponse(body, status, headers=headers) for _ in range(count)]

    def rate_limit(self, count: int = 1, retry_after: int = 1) -> None:
        self.fail_next(429, {"title": "Too Many Requests", "message": "Rate limit exceeded"},
                       headers={"Retry-After": str(retry_after)}, count=count)

    def rebase(self, data: Any) -> Any:
        """``data`` (a sample, a webhook body) with the samples' API URIs moved to ``uri_base``."""
        if isinstance(data, dict):
            return {k: self.rebase(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.rebase(v) for v in data]
        if isinstance(data, str) and data.startswith(SAMPLE_BASE + "/"):
            return self.uri_base + data[len(SAMPLE_BASE):]
        return data

    # --- the app ---------------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes = [
            ("/users/me", self._me, ["GET"]),
            ("/webhook_subscriptions", self._list_subscriptions, ["GET"]),
            ("/webhook_subscriptions", self._create_subscription, ["POST"]),
            ("/webhook_subscriptions/{uuid}", self._subscription, ["GET", "DELETE"]),
            ("/event_type_available_times", self._available_times, ["GET"]),
            ("/scheduled_events", self._list_events, ["GET"]),
            ("/scheduled_events/{uuid}", self._event, ["GET"]),
            ("/scheduled_events/{uuid}/invitees", self._list_invitees, ["GET"]),
            ("/scheduled_events/{uuid}/invitees/{invitee}", self._invitee, ["GET"]),
        ]
        return Starlette(routes=[Route(path, self._guarded(h), methods=m) for path, h, m in routes])

    def _guarded(self, handler: Handler) -> Handler:
        """Queued failures first, then the bearer token, as the real API checks it before anything."""
        async def endpoint(request: Request) -> Response:
            if self._failures:
                return self._failures.pop(0)
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return error(401, "Unauthenticated", "The access token is invalid")
            return await handler(request)

        return endpoint

    def _page(self, request: Request, items: list[dict[str, Any]]) -> Response:
        """One page of a collection, with Calendly's ``pagination`` (opaque ``page_token``)."""
        params = dict(request.query_params)
        try:
            count = int(params.get("count", 20))
            offset = int(base64.urlsafe_b64decode(params["page_token"]).decode()) if "page_token" in params else 0
        except ValueError:
            return invalid("page_token" if "page_token" in params else "count", "is invalid")
        if not 1 <= count <= 100:
            return invalid("count", "must be between 1 and 100")

        def token(at: int) -> str | None:
            return base64.urlsafe_b64encode(str(at).encode()).decode() if 0 <= at < len(items) else None

        def link(page_token: str | None) -> str | None:
            return f"{self.uri_base}{request.url.path}?{urlencode({**params, 'page_token': page_token})}" \
                if page_token else None

        next_token = token(offset + count) if offset + count < len(items) else None
        prev_token = token(max(offset - count, 0)) if offset > 0 else None
        return JSONResponse({"collection": items[offset:offset + count], "pagination": {
            "count": len(items[offset:offset + count]), "next_page": link(next_token),
            "previous_page": link(prev_token), "next_page_token": next_token, "previous_page_token": prev_token,
        }})

    async def _me(self, request: Request) -> Response:
        return JSONResponse({"resource": self.user})

    async def _create_subscription(self, request: Request) -> Response:
        body = await request.json()
        for key in ("url", "events", "organization", "scope"):
            if not body.get(key):
                return invalid(key, "is required")
        if body["scope"] not in ("organization", "user", "group"):
            return invalid("scope", "must be one of organization, user, group")
        unknown = [e for e in body["events"] if e not in WEBHOOK_EVENTS]
        if unknown:
            return invalid("events", f"{unknown[0]} is not a valid event")
        if body["scope"] == "user" and "routing_form_submission.created" in body["events"]:
            return invalid("events", "routing_form_submission.created is only available for organization scope")
        if body["scope"] == "user" and body.get("user") != self.user["uri"]:
            return invalid("user", "is required for user scope")
        if body["organization"] != self.organization:
            return error(403, "Permission Denied", NO_PERMISSION)
        if not self.paid_plan:
            return error(403, "Permission Denied", UPGRADE)
        if body["scope"] == "organization" and self.forbid_organization_scope:
            return error(403, "Permission Denied", NO_PERMISSION)
        if any(s["callback_url"] == body["url"] for s in self.subscriptions.values()):
            return error(409, "Already Exists", "Hook with this url already exists")
        created = self.add_subscription(body["url"], body["events"], body["scope"],
                                        signing_key=body.get("signing_key") or "")
        return JSONResponse({"resource": created}, 201)

    async def _list_subscriptions(self, request: Request) -> Response:
        query = request.query_params
        for key in ("organization", "scope"):
            if not query.get(key):
                return invalid(key, "is required")
        if query["scope"] == "user" and not query.get("user"):
            return invalid("user", "is required for user scope")
        if query["organization"] != self.organization:
            return error(403, "Permission Denied", NO_PERMISSION)
        if query["scope"] == "organization" and self.forbid_organization_scope:
            return error(403, "Permission Denied", NO_PERMISSION)
        found = [s for s in self.subscriptions.values()
                 if s["scope"] == query["scope"] and (query["scope"] != "user" or s["user"] == query["user"])]
        return self._page(request, found)

    async def _subscription(self, request: Request) -> Response:
        uri = self.uri(f"/webhook_subscriptions/{request.path_params['uuid']}")
        if uri not in self.subscriptions:
            return error(404, "Resource Not Found", NOT_FOUND)
        if request.method == "DELETE":
            del self.subscriptions[uri]
            return Response(status_code=204)
        return JSONResponse({"resource": self.subscriptions[uri]})

    async def _available_times(self, request: Request) -> Response:
        query = request.query_params
        for key in ("event_type", "start_time", "end_time"):
            if not query.get(key):
                return invalid(key, "is required")
        try:
            start, end = _time(query["start_time"]), _time(query["end_time"])
        except ValueError:
            return invalid("start_time", "is not a valid time")
        if start <= datetime.now(UTC):
            return invalid("start_time", "must be in the future")
        if end <= start:
            return invalid("end_time", "must be after start_time")
        if end - start > timedelta(days=7):
            return invalid("end_time", "date range can be no greater than 1 week (7 days)")
        event_type = self.event_types.get(query["event_type"])
        if event_type is None:
            return error(404, "Resource Not Found", NOT_FOUND)
        # A slot on every full hour of the window, as an event type open around the clock would have.
        slot = start.replace(minute=0, second=0, microsecond=0)
        slot += timedelta(hours=1) if slot < start else timedelta()
        collection = []
        while slot < end:
            stamp = _stamp(slot)
            busy = stamp in self.busy_times
            collection.append({
                "status": "unavailable" if busy else "available", "invitees_remaining": 0 if busy else 1,
                "start_time": stamp, "scheduling_url":
                    f"{event_type['scheduling_url']}/{slot:%Y-%m-%dT%H:%M:%S}Z?month={slot:%Y-%m}&date={slot:%Y-%m-%d}",
            })
            slot += timedelta(hours=1)
        return JSONResponse({"collection": collection})

    async def _list_events(self, request: Request) -> Response:
        query = request.query_params
        organization, user = query.get("organization"), query.get("user")
        if not organization and not user:
            return invalid("organization", "one of organization, user or group is required")
        if (organization and organization != self.organization) or (user and user != self.user["uri"]):
            return error(403, "Permission Denied", NO_PERMISSION)
        if organization and not user and self.forbid_organization_scope:
            return error(403, "Permission Denied", NO_PERMISSION)
        try:
            low = _time(query["min_start_time"]) if query.get("min_start_time") else None
            high = _time(query["max_start_time"]) if query.get("max_start_time") else None
        except ValueError:
            return invalid("min_start_time", "is not a valid time")
        email = query.get("invitee_email")
        found = [
            e for e in self.scheduled_events.values()
            if (low is None or _time(e["start_time"]) >= low) and (high is None or _time(e["start_time"]) < high)
            and (not query.get("status") or e["status"] == query["status"])
            and (not email or any(i["email"] == email for i in self.invitees[e["uri"]].values()))
        ]
        found.sort(key=lambda e: e["start_time"], reverse=query.get("sort", "start_time:asc") == "start_time:desc")
        return self._page(request, found)

    async def _event(self, request: Request) -> Response:
        event = self.scheduled_events.get(self.uri(f"/scheduled_events/{request.path_params['uuid']}"))
        return JSONResponse({"resource": event}) if event else error(404, "Resource Not Found", NOT_FOUND)

    async def _list_invitees(self, request: Request) -> Response:
        invitees = self.invitees.get(self.uri(f"/scheduled_events/{request.path_params['uuid']}"))
        if invitees is None:
            return error(404, "Resource Not Found", NOT_FOUND)
        status, email = request.query_params.get("status"), request.query_params.get("email")
        found = sorted((i for i in invitees.values()
                        if (not status or i["status"] == status) and (not email or i["email"] == email)),
                       key=lambda i: i["created_at"])
        return self._page(request, found)

    async def _invitee(self, request: Request) -> Response:
        event_uri = self.uri(f"/scheduled_events/{request.path_params['uuid']}")
        invitee = self.invitees.get(event_uri, {}).get(f"{event_uri}/invitees/{request.path_params['invitee']}")
        return JSONResponse({"resource": invitee}) if invitee else error(404, "Resource Not Found", NOT_FOUND)
