"""The ``vivocalendar`` connector: look things up in Vivocalendar's API v2 (Calendly's shapes).

``VivocalendarApi`` is the small client the actions and the ``subscribe``/``subscriptions`` commands share.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field, SecretStr, field_validator

from connectors import httpcalls
from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, action
from workers.errors import PermanentStepError, RetryableStepError, StepError

SERVICE = "Vivocalendar"
#: The API's largest page (``count``); larger values are a 400.
PAGE_SIZE = 100
#: The longest window ``/event_type_available_times`` accepts.
MAX_WINDOW = timedelta(days=7)
#: How far ahead of now a default or clamped window starts, so it is still future when the API reads it.
LEAD_TIME = timedelta(minutes=1)


class VivocalendarConfig(ConnectorConfig):
    """``connectors.vivocalendar``: the API token for the actions and commands, the SSO settings for sso-link."""

    base_url: str = "https://api.vivocalendar.com"
    token: SecretStr = SecretStr("")
    app_url: str = "https://app.vivocalendar.com"
    sso_issuer: str = ""
    sso_private_key: SecretStr = SecretStr("")
    timeout_seconds: float = 10


class ApiError(PermanentStepError):
    """A 4xx retrying cannot fix; ``status`` and the service's own ``remote`` message let a caller explain it."""

    def __init__(self, message: str, *, status: int, remote: str) -> None:
        super().__init__(message)
        self.status = status
        self.remote = remote


def api_time(value: datetime) -> str:
    """A time as the API writes them (UTC, microseconds, ``Z``); a naive time is read as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class VivocalendarApi:
    """Vivocalendar's API v2 over one pooled client, with the personal access token as a bearer token.

    Every request goes to ``base_url``'s origin: a full URI from an event (an invitee's ``uri``) is
    checked first, because the token travels with the request and must never reach another host.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url + "/")
        self._client = httpcalls.make_client(self.base_url, timeout=timeout, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json",
        })

    @classmethod
    def from_config(cls, config: VivocalendarConfig) -> VivocalendarApi:
        return cls(config.base_url, config.token.get_secret_value(), timeout=config.timeout_seconds)

    def __repr__(self) -> str:  # never the token
        return f"VivocalendarApi({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VivocalendarApi:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- resources -------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """The token's user: ``uri``, ``current_organization``, ``scheduling_url``, ``timezone``…"""
        return _resource(self._request("GET", "/users/me"))

    def get(self, uri: str) -> dict[str, Any]:
        """The ``resource`` at a full API URI, as found in webhook payloads; other hosts are refused."""
        return _resource(self._request("GET", self._checked(uri)))

    def paginate(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paginated collection, page after page (``count`` at most 100)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        query["count"] = min(int(query.get("count", PAGE_SIZE)), PAGE_SIZE)
        url, seen = self._checked(path), set()
        while True:
            data = _json(self._request("GET", url, params=query))
            yield from data.get("collection") or []
            token = (data.get("pagination") or {}).get("next_page_token")
            if not token or token in seen:  # a server repeating a token must not loop us forever
                return
            seen.add(token)
            query["page_token"] = token

    # --- webhook subscriptions -------------------------------------------------------------

    def create_webhook_subscription(self, *, url: str, events: list[str], organization: str, scope: str,
                                    signing_key: str, user: str | None = None) -> dict[str, Any]:
        """POST /webhook_subscriptions; 403 (role or plan) and 409 (url taken) raise ``ApiError``."""
        body: dict[str, Any] = {"url": url, "events": events, "organization": organization, "scope": scope,
                                "signing_key": signing_key}
        if user is not None:
            body["user"] = user
        return _resource(self._request("POST", "/webhook_subscriptions", json=body))

    def list_webhook_subscriptions(self, organization: str, scope: str,
                                   user: str | None = None) -> list[dict[str, Any]]:
        params = {"organization": organization, "scope": scope, "user": user}
        return list(self.paginate("/webhook_subscriptions", params))

    def delete_webhook_subscription(self, uri: str) -> None:
        """Remove one subscription, named by its full URI or by its UUID alone."""
        target = uri if "/" in uri else f"/webhook_subscriptions/{uri}"
        self._request("DELETE", self._checked(target))

    # --- scheduling ------------------------------------------------------------------------

    def available_times(self, event_type: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Open slots of an event type; the API wants a future window of at most 7 days."""
        params = {"event_type": event_type, "start_time": api_time(start), "end_time": api_time(end)}
        return list(_json(self._request("GET", "/event_type_available_times", params=params)).get("collection") or [])

    def scheduled_events(self, *, organization: str | None = None, user: str | None = None,
                         min_start_time: datetime | None = None, max_start_time: datetime | None = None,
                         status: str | None = None, invitee_email: str | None = None,
                         sort: str = "start_time:asc") -> Iterator[dict[str, Any]]:
        """Scheduled events of an organization or a user (one of them is required by the API)."""
        params = {
            "organization": organization, "user": user, "status": status, "invitee_email": invitee_email,
            "min_start_time": api_time(min_start_time) if min_start_time else None,
            "max_start_time": api_time(max_start_time) if max_start_time else None, "sort": sort,
        }
        return self.paginate("/scheduled_events", params)

    def event_invitees(self, event_uri: str, *, status: str | None = None) -> Iterator[dict[str, Any]]:
        """The invitees of one scheduled event, named by its URI (or UUID).

        Only the UUID is taken from it: the request goes to ``base_url`` whatever host the URI names.
        """
        uuid = event_uri.rstrip("/").rsplit("/", 1)[-1]
        return self.paginate(f"/scheduled_events/{quote(uuid, safe='')}/invitees", {"status": status})

    # --- plumbing --------------------------------------------------------------------------

    def _checked(self, target: str) -> str:
        """A path under ``base_url``, or a full URI on its origin; anything else is a permanent error."""
        if target.startswith("/") and not target.startswith("//"):
            return target
        try:
            url = httpx.URL(target)
        except (httpx.InvalidURL, TypeError):
            url = None
        base = self._base
        if (
            url is None
            or (url.scheme, url.host, url.port, url.userinfo) != (base.scheme, base.host, base.port, b"")
            or not url.path.startswith(base.path)
        ):
            raise PermanentStepError(f"{target!r} is not a {SERVICE} API URI (it must start with {self.base_url}/)")
        return str(url)

    def _request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                 json: Any = None) -> httpx.Response:
        response = httpcalls.send(
            lambda: self._client.request(method, url, params=params, json=json), SERVICE
        )
        _raise_for_status(response)
        return response


def _raise_for_status(response: httpx.Response) -> None:
    """httpcalls' reading of failures, plus the API's ``details`` and a hint for a refused token."""
    try:
        httpcalls.raise_for_status(response, SERVICE)
    except StepError as exc:
        message = exc.message + _details(response)
        if response.status_code == 401:
            message += " (check connectors.vivocalendar.token)"
        if isinstance(exc, RetryableStepError):
            raise RetryableStepError(message, retry_after=exc.retry_after) from None
        raise ApiError(message, status=response.status_code, remote=httpcalls.remote_message(response)) from None


def _details(response: httpx.Response) -> str:
    """``details: [{"parameter": "start_time", "message": "must be in the future"}]`` as `` (start_time: …)``."""
    try:
        details = response.json().get("details")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(details, list):
        return ""
    parts = [
        ": ".join(str(d[k]) for k in ("parameter", "message") if d.get(k)) for d in details if isinstance(d, dict)
    ]
    text = "; ".join(p for p in parts if p)
    return f" ({text[:httpcalls.MESSAGE_LIMIT]})" if text else ""


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise PermanentStepError(f"{SERVICE} answered {response.status_code} without a JSON object")
    return data


def _resource(response: httpx.Response) -> dict[str, Any]:
    resource = _json(response).get("resource")
    if not isinstance(resource, dict):
        raise PermanentStepError(f"{SERVICE} answered {response.status_code} without a resource")
    return resource


# --- the connector -------------------------------------------------------------------------


class GetInviteeInput(ActionInput):
    #: The invitee's API URI, e.g. ``{{ invitee.uri }}``.
    uri: str


class AvailableTimesInput(ActionInput):
    #: The event type's API URI (``https://api.vivocalendar.com/event_types/…``).
    event_type: str
    #: Default: a minute from now; a past start is moved there (the API takes future windows only).
    start: datetime | None = None
    #: Default and maximum: 7 days after ``start``.
    end: datetime | None = None
    limit: int = Field(3, ge=1)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _blank_is_default(cls, value: Any) -> Any:
        # A template over a missing value renders as "": that means "the default", not an error.
        return None if isinstance(value, str) and not value.strip() else value


class VivocalendarConnector(Connector):
    """Reads from the API with the account's personal access token (``connectors.vivocalendar.token``)."""

    name = "vivocalendar"
    config_model = VivocalendarConfig

    config: VivocalendarConfig
    _api: VivocalendarApi | None = None

    def api(self) -> VivocalendarApi:
        """The pooled client, built on first use so an unconfigured connector costs nothing."""
        if not self.config.token.get_secret_value():
            raise self.not_configured("token")
        if self._api is None:
            self._api = VivocalendarApi.from_config(self.config)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    @action("get_invitee", input=GetInviteeInput)
    def get_invitee(self, inputs: GetInviteeInput, call: ActionCall) -> dict[str, Any]:
        """Fetch an invitee resource (its questions_and_answers, tracking, status…) by its URI."""
        return self.api().get(inputs.uri)

    @action("available_times", input=AvailableTimesInput)
    def available_times(self, inputs: AvailableTimesInput, call: ActionCall) -> dict[str, Any]:
        """The next open slots of an event type, each with the URL that books it."""
        start, end = _as_utc(inputs.start), _as_utc(inputs.end)
        if start and end and end <= start:
            raise PermanentStepError(f"available_times: end ({end.isoformat()}) is not after start "
                                     f"({start.isoformat()})")
        window = booking_window(start, end, datetime.now(UTC))
        if window is None:  # the whole window is in the past: nothing can be booked in it
            return {"times": []}
        slots = self.api().available_times(inputs.event_type, *window)
        times = [
            {"start_time": slot.get("start_time"), "scheduling_url": slot.get("scheduling_url")}
            for slot in slots if slot.get("status") == "available"
        ]
        return {"times": times[: inputs.limit]}


def booking_window(start: datetime | None, end: datetime | None,
                   now: datetime) -> tuple[datetime, datetime] | None:
    """The window the API accepts: starting in the future, at most 7 days; None when it is all past."""
    earliest = now + LEAD_TIME
    start = max(start or earliest, earliest)
    end = min(end or start + MAX_WINDOW, start + MAX_WINDOW)
    return (start, end) if end > start else None


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
