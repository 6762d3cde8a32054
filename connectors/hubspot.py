"""The ``hubspot`` connector: contacts and notes through HubSpot's CRM v3 API.

Authenticates as a private app (``Authorization: Bearer <token>``); contacts are keyed by email so a
retried or replayed step updates the contact it created instead of making a second one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import SecretStr, field_validator, model_validator

from connectors import httpcalls
from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, HtmlText, action
from workers.errors import PermanentStepError, RetryableStepError

SERVICE = "HubSpot"
#: HubSpot-defined association type of a note to a contact.
NOTE_TO_CONTACT = 202
#: What an HTTP header value may hold; anything else would be quoted back in httpx's error text.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")

PropertyValue = str | int | float | bool | None


class HubspotConfig(ConnectorConfig):
    """``connectors.hubspot``: a private app's access token; ``base_url`` lets tests point at a local server."""

    base_url: str = "https://api.hubapi.com"
    token: SecretStr = SecretStr("")
    timeout_seconds: float = 10


class UpsertContactInput(ActionInput):
    """Inputs of ``hubspot.upsert_contact``: the contact's email and the properties to set on it."""

    email: str
    properties: dict[str, PropertyValue] = {}

    @field_validator("email")
    @classmethod
    def _present(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("needs the contact's email address")
        return value


class CreateNoteInput(ActionInput):
    """Inputs of ``hubspot.create_note``: the contact (by id, or by email) and the note's HTML body."""

    contact_id: str | None = None
    email: str | None = None
    body: HtmlText

    @field_validator("contact_id", "email")
    @classmethod
    def _blank_is_absent(cls, value: str | None) -> str | None:
        # A template over a missing value renders "", which means "not given", not "the contact ''".
        return (value or "").strip() or None

    @model_validator(mode="after")
    def _names_a_contact(self) -> CreateNoteInput:
        if not self.contact_id and not self.email:
            raise ValueError("hubspot.create_note needs contact_id or email")
        return self


def hubspot_properties(email: str, properties: dict[str, PropertyValue]) -> dict[str, str]:
    """Properties as HubSpot's API types them (strings), with the email that keys the contact.

    None and "" are left out rather than sent: HubSpot clears a property given "", and a template
    over a value this event lacks renders "", which must not wipe what an earlier booking stored.
    """
    found: dict[str, str] = {}
    for name, value in properties.items():
        if value is None or value == "":
            continue
        if isinstance(value, bool):  # before int: bool is an int, and HubSpot wants "true"/"false"
            found[name] = "true" if value else "false"
        else:
            found[name] = str(value)
    found["email"] = email
    return found


def _now_ms() -> str:
    """Now, as HubSpot's ``hs_timestamp`` wants it: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubspotConnector(Connector):
    """One pooled client per worker process; every call is checked the same way (``_post``)."""

    name = "hubspot"
    config_model = HubspotConfig

    config: HubspotConfig

    def __init__(self, config: HubspotConfig) -> None:
        super().__init__(config)
        # Surrounding whitespace is a copy-paste accident (a trailing newline in an env file).
        self._token = config.token.get_secret_value().strip()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._client = httpcalls.make_client(
            config.base_url, timeout=config.timeout_seconds, headers={**headers, "Accept": "application/json"},
        )

    def close(self) -> None:
        self._client.close()

    @action("upsert_contact", input=UpsertContactInput)
    def upsert_contact(self, inputs: UpsertContactInput, call: ActionCall) -> dict[str, Any]:
        """Create or update the contact with this email (never a duplicate), setting its properties."""
        body = {"inputs": [{
            "idProperty": "email", "id": inputs.email,
            "properties": hubspot_properties(inputs.email, inputs.properties),
        }]}
        data = self._post("/crm/v3/objects/contacts/batch/upsert", body)
        results = data.get("results") or []
        if not results or not results[0].get("id"):
            # A 207 (multi-status) carries the failure in `errors` instead of a result.
            errors = data.get("errors") or [{}]
            message = errors[0].get("message") or "no contact in the answer"
            raise PermanentStepError(f"{SERVICE} did not upsert the contact: {message}")
        contact = results[0]
        created = bool(contact.get("new"))
        self.log.info("hubspot contact %s %s", contact["id"], "created" if created else "updated")
        return {"id": str(contact["id"]), "created": created}

    @action("create_note", input=CreateNoteInput)
    def create_note(self, inputs: CreateNoteInput, call: ActionCall) -> dict[str, Any]:
        """Add a note (HTML) to a contact's timeline, the contact given by id or found by email."""
        contact_id = inputs.contact_id or self._contact_id_by_email(inputs.email or "")
        body = {
            "properties": {"hs_note_body": inputs.body, "hs_timestamp": _now_ms()},
            "associations": [{
                "to": {"id": contact_id},
                "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": NOTE_TO_CONTACT}],
            }],
        }
        note = self._post("/crm/v3/objects/notes", body)
        if not note.get("id"):
            raise PermanentStepError(f"{SERVICE} answered without a note id")
        self.log.info("hubspot note %s added to contact %s", note["id"], contact_id)
        return {"id": str(note["id"])}

    def _contact_id_by_email(self, email: str) -> str:
        """The id of the contact with this email, through the CRM search endpoint."""
        body = {
            "filterGroups": [{"filters": [{"propertyName": "email", "operator": "EQ", "value": email}]}],
            "properties": ["email"],
            "limit": 1,
        }
        results = self._post("/crm/v3/objects/contacts/search", body).get("results") or []
        if not results or not results[0].get("id"):
            raise PermanentStepError(f"no {SERVICE} contact with email {email}")
        return str(results[0]["id"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON and return the answer's JSON object; every failure becomes a step error."""
        self._check_token()
        response = httpcalls.send(lambda: self._client.post(path, json=body), SERVICE)
        _raise_for_status(response)
        try:
            data = response.json()
        except ValueError:
            raise PermanentStepError(f"{SERVICE} answered {response.status_code} with no JSON") from None
        if not isinstance(data, dict):
            raise PermanentStepError(f"{SERVICE} answered {response.status_code} with unexpected JSON")
        return data

    def _check_token(self) -> None:
        if not self._token:
            raise self.not_configured("token")
        if not _HEADER_SAFE.fullmatch(self._token):
            # Said here, without the value: httpx would refuse it quoting the whole header.
            raise PermanentStepError(
                "connectors.hubspot.token contains characters a token cannot have (spaces, line breaks…)"
            )


def _raise_for_status(response: httpx.Response) -> None:
    """httpcalls' reading of failures, plus HubSpot's own: the 401 hint and its rate-limit window."""
    if response.status_code == 401:
        raise PermanentStepError(
            f"{SERVICE} answered 401: {httpcalls.remote_message(response)} (check connectors.hubspot.token)"
        )
    try:
        httpcalls.raise_for_status(response, SERVICE)
    except RetryableStepError as exc:
        if exc.retry_after is None and response.status_code == 429:
            exc.retry_after = _rate_limit_window(response)
        raise


def _rate_limit_window(response: httpx.Response) -> float | None:
    """Seconds until HubSpot's rate-limit window resets, from its headers when it sent no Retry-After."""
    interval = response.headers.get("x-hubspot-ratelimit-interval-milliseconds")
    try:
        return int(interval) / 1000 if interval else None
    except ValueError:
        return None
