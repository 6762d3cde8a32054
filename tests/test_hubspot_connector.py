"""hubspot.upsert_contact and hubspot.create_note against a local HubSpot speaking the CRM v3 protocol.

The fake keeps contacts keyed by email, checks the private-app token, and can play a rate-limited
or failing HubSpot for a given number of calls.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from connectors.base import ActionCall, RenderAs
from connectors.hubspot import CreateNoteInput, HubspotConfig, HubspotConnector, UpsertContactInput
from tests.fake_service import FakeService
from tests.harness import Vivoflow, fixture_body
from tests.smtp_server import free_port
from workers.errors import PermanentStepError, RetryableStepError, StepError

TOKEN = "pat-na1-0123abcd-test-token"
CALL = ActionCall(run_id="r1", step_id="s1", idempotency_key="r1:s1", event={})


def hubspot_error(status: int, message: str, category: str, **headers: str) -> JSONResponse:
    body = {"status": "error", "message": message, "correlationId": "4b1a7c0e-0000-4000-8000-000000000000",
            "category": category}
    return JSONResponse(body, status_code=status, headers=headers)


class FakeHubspot:
    """Contacts (by lower-cased email, as HubSpot dedupes them) and notes, in memory."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.contacts: dict[str, dict[str, Any]] = {}
        self.notes: list[dict[str, Any]] = []
        self._ids = itertools.count(501)
        self._lock = threading.Lock()
        self._failures: list[tuple[int, dict[str, str]]] = []
        self.app = Starlette(routes=[
            Route("/crm/v3/objects/contacts/batch/upsert", self.upsert, methods=["POST"]),
            Route("/crm/v3/objects/contacts/search", self.search, methods=["POST"]),
            Route("/crm/v3/objects/notes", self.create_note, methods=["POST"]),
        ])

    def fail_next(self, status: int, times: int = 1, **headers: str) -> None:
        """Answer the next ``times`` calls with ``status`` (429 or 5xx) and these headers."""
        self._failures += [(status, headers)] * times

    def contact(self, email: str) -> dict[str, Any]:
        return self.contacts[email.lower()]

    def _refusal(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return hubspot_error(401, "Authentication credentials not found. This API supports OAuth 2.0 "
                                 "authentication.", "INVALID_AUTHENTICATION")
        if self._failures:
            status, headers = self._failures.pop(0)
            if status == 429:
                return JSONResponse({"status": "error", "message": "You have reached your ten_secondly_rolling "
                                     "limit.", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING",
                                     "correlationId": "c0"}, status_code=429, headers=headers)
            return hubspot_error(status, "Service temporarily unavailable", "SERVICE_UNAVAILABLE", **headers)
        return None

    async def upsert(self, request: Request) -> JSONResponse:
        if refusal := self._refusal(request):
            return refusal
        results, created = [], False
        with self._lock:
            for item in (await request.json())["inputs"]:
                email = str(item["id"])
                if item.get("idProperty") != "email" or "@" not in email:
                    return hubspot_error(400, f"Property values were not valid: Email address {email} is invalid",
                                         "VALIDATION_ERROR")
                contact = self.contacts.get(email.lower())
                new = contact is None
                if contact is None:
                    contact = self.contacts[email.lower()] = {"id": str(next(self._ids)), "properties": {}}
                contact["properties"].update(item.get("properties", {}))
                created = created or new
                results.append({"id": contact["id"], "properties": dict(contact["properties"]), "new": new})
        body = {"status": "COMPLETE", "results": results, "startedAt": "2027-02-01T10:00:01.000Z",
                "completedAt": "2027-02-01T10:00:01.100Z"}
        return JSONResponse(body, status_code=201 if created else 200)

    async def search(self, request: Request) -> JSONResponse:
        if refusal := self._refusal(request):
            return refusal
        [group] = (await request.json())["filterGroups"]
        [condition] = group["filters"]
        assert (condition["propertyName"], condition["operator"]) == ("email", "EQ")
        contact = self.contacts.get(str(condition["value"]).lower())
        results = [{"id": contact["id"], "properties": {"email": contact["properties"]["email"]}}] if contact else []
        return JSONResponse({"total": len(results), "results": results})

    async def create_note(self, request: Request) -> JSONResponse:
        if refusal := self._refusal(request):
            return refusal
        data = await request.json()
        if "hs_timestamp" not in data.get("properties", {}):
            return hubspot_error(400, "Property values were not valid: hs_timestamp is required", "VALIDATION_ERROR")
        known = {c["id"] for c in self.contacts.values()}
        for association in data.get("associations", []):
            if association["to"]["id"] not in known:
                return hubspot_error(400, "One or more associations are invalid", "VALIDATION_ERROR")
        note = {"id": str(next(self._ids)), **data}
        self.notes.append(note)
        return JSONResponse({"id": note["id"], "properties": data["properties"]}, status_code=201)


@pytest.fixture
def hubspot() -> FakeHubspot:
    return FakeHubspot()


@pytest.fixture
def service(hubspot: FakeHubspot) -> Iterator[FakeService]:
    with FakeService(hubspot.app) as running:
        yield running


def connector(tmp_path: Path, base_url: str, token: str = TOKEN) -> HubspotConnector:
    config = HubspotConfig.model_validate({"base_url": base_url, "token": token}, context={"base_dir": tmp_path})
    return HubspotConnector(config)


@pytest.fixture
def hub(tmp_path: Path, service: FakeService) -> Iterator[HubspotConnector]:
    conn = connector(tmp_path, service.url)
    yield conn
    conn.close()


def upsert(conn: HubspotConnector, email: str = "jamie@example.com", **properties: Any) -> Any:
    return conn.run("upsert_contact", UpsertContactInput(email=email, properties=properties), CALL)


def note(conn: HubspotConnector, **inputs: Any) -> Any:
    return conn.run("create_note", CreateNoteInput(**inputs), CALL)


def test_upsert_creates_then_updates_one_contact_with_merged_properties(
    hub: HubspotConnector, hubspot: FakeHubspot, service: FakeService
) -> None:
    first = upsert(hub, firstname="Jamie", utm_source="linkedin")
    second = upsert(hub, lastname="Rivera", utm_source="newsletter")
    assert first == {"id": first["id"], "created": True}
    assert second == {"id": first["id"], "created": False}
    assert len(hubspot.contacts) == 1
    assert hubspot.contact("jamie@example.com")["properties"] == {
        "email": "jamie@example.com", "firstname": "Jamie", "lastname": "Rivera", "utm_source": "newsletter",
    }
    sent = service.received("POST", "/crm/v3/objects/contacts/batch/upsert")[0]
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.json == {"inputs": [{"idProperty": "email", "id": "jamie@example.com", "properties": {
        "firstname": "Jamie", "utm_source": "linkedin", "email": "jamie@example.com"}}]}


def test_upsert_leaves_out_none_and_blank_properties(hub: HubspotConnector, hubspot: FakeHubspot) -> None:
    upsert(hub, utm_source="linkedin", company="Rivera Consulting")
    upsert(hub, utm_source="", company=None, phone=None, seats=20, vip=True)
    assert hubspot.contact("jamie@example.com")["properties"] == {
        "email": "jamie@example.com", "utm_source": "linkedin", "company": "Rivera Consulting",
        "seats": "20", "vip": "true",
    }


def test_note_by_contact_id_is_associated_to_that_contact(
    hub: HubspotConnector, hubspot: FakeHubspot, service: FakeService
) -> None:
    contact_id = upsert(hub)["id"]
    output = note(hub, contact_id=contact_id, body="<p>Booked a <b>Discovery Call</b></p>")
    [stored] = hubspot.notes
    assert output == {"id": stored["id"]}
    assert stored["properties"]["hs_note_body"] == "<p>Booked a <b>Discovery Call</b></p>"
    assert stored["properties"]["hs_timestamp"].endswith("Z")
    assert stored["associations"] == [{"to": {"id": contact_id}, "types": [
        {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 202}]}]
    assert not service.received(path="/crm/v3/objects/contacts/search")


def test_note_by_email_finds_the_contact_then_associates_with_type_202(
    hub: HubspotConnector, hubspot: FakeHubspot, service: FakeService
) -> None:
    contact_id = upsert(hub)["id"]
    note(hub, email="jamie@example.com", body="Rescheduled")
    [search] = service.received("POST", "/crm/v3/objects/contacts/search")
    assert search.json == {"filterGroups": [{"filters": [
        {"propertyName": "email", "operator": "EQ", "value": "jamie@example.com"}]}],
        "properties": ["email"], "limit": 1}
    [stored] = hubspot.notes
    assert stored["associations"][0]["to"] == {"id": contact_id}
    assert stored["associations"][0]["types"][0]["associationTypeId"] == 202


def test_note_for_unknown_email_fails_permanently_without_creating_a_note(
    hub: HubspotConnector, hubspot: FakeHubspot
) -> None:
    with pytest.raises(PermanentStepError, match="no HubSpot contact with email ghost@example.com"):
        note(hub, email="ghost@example.com", body="Hello")
    assert hubspot.notes == []


def test_note_needs_a_contact_id_or_an_email() -> None:
    with pytest.raises(ValidationError, match="contact_id or email"):
        CreateNoteInput(contact_id="", email=" ", body="Hello")


def test_note_body_is_rendered_as_html() -> None:
    assert HubspotConnector.actions["create_note"].render_kinds()["body"] is RenderAs.HTML


def test_invalid_email_fails_permanently_with_hubspots_message(hub: HubspotConnector) -> None:
    with pytest.raises(PermanentStepError, match="HubSpot answered 400: .*Email address not-an-email is invalid"):
        upsert(hub, "not-an-email")


def test_wrong_token_is_permanent_and_says_which_key_to_check(tmp_path: Path, service: FakeService) -> None:
    with pytest.raises(PermanentStepError, match="401: Authentication credentials not found") as caught:
        upsert(connector(tmp_path, service.url, token="pat-na1-wrong"))
    assert "check connectors.hubspot.token" in caught.value.message


def test_rate_limited_is_retryable_after_retry_after(hub: HubspotConnector, hubspot: FakeHubspot) -> None:
    hubspot.fail_next(429, **{"Retry-After": "3"})
    with pytest.raises(RetryableStepError, match="ten_secondly_rolling") as caught:
        upsert(hub)
    assert caught.value.retry_after == 3
    assert upsert(hub)["created"] is True


def test_rate_limited_without_retry_after_waits_for_hubspots_window(
    hub: HubspotConnector, hubspot: FakeHubspot
) -> None:
    hubspot.fail_next(429, **{"X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
                              "X-HubSpot-RateLimit-Remaining": "0"})
    with pytest.raises(RetryableStepError) as caught:
        upsert(hub)
    assert caught.value.retry_after == 10


def test_service_unavailable_is_retryable_and_the_retry_creates_one_contact(
    hub: HubspotConnector, hubspot: FakeHubspot
) -> None:
    hubspot.fail_next(503)
    with pytest.raises(RetryableStepError, match="HubSpot answered 503: Service temporarily unavailable"):
        note(hub, email="jamie@example.com", body="Hello")
    upsert(hub)
    note(hub, email="jamie@example.com", body="Hello")
    assert len(hubspot.contacts) == 1 and len(hubspot.notes) == 1


def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(RetryableStepError, match="cannot reach HubSpot"):
        upsert(connector(tmp_path, f"http://127.0.0.1:{free_port()}"))


def test_without_a_token_the_step_says_which_key_to_set(tmp_path: Path, service: FakeService) -> None:
    for action, inputs in [("upsert_contact", UpsertContactInput(email="jamie@example.com")),
                           ("create_note", CreateNoteInput(contact_id="1", body="Hi"))]:
        with pytest.raises(PermanentStepError, match=r"set connectors\.hubspot\.token in config.yaml"):
            connector(tmp_path, service.url, token="").run(action, inputs, CALL)
    assert service.requests == []


def test_token_never_appears_in_errors_logs_or_repr(
    tmp_path: Path, hubspot: FakeHubspot, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = connector(tmp_path, service.url)
    attempts: list[tuple[Callable[[], None], Callable[[], None]]] = [
        (lambda: hubspot.fail_next(429, **{"Retry-After": "3"}), lambda: upsert(conn)),
        (lambda: hubspot.fail_next(503), lambda: upsert(conn)),
        (lambda: None, lambda: note(conn, email="ghost@example.com", body="Hi")),
        (lambda: None, lambda: upsert(conn, "bad")),
        (lambda: None, lambda: upsert(connector(tmp_path, service.url, token="pat-na1-other"))),
        (lambda: None, lambda: upsert(connector(tmp_path, f"http://127.0.0.1:{free_port()}"))),
    ]
    errors = []
    for prepare, attempt in attempts:
        prepare()
        with pytest.raises(StepError) as caught:
            attempt()
        errors.append(caught.value.message)
    output = upsert(conn, firstname="Jamie")
    note(conn, contact_id=output["id"], body="Hi")
    seen = [*errors, caplog.text, json.dumps(output), repr(conn.config), str(conn.config.model_dump())]
    assert all(TOKEN not in text for text in seen)
    assert len(errors) == 6 and hubspot.notes


def test_token_with_a_line_break_fails_without_quoting_it(tmp_path: Path, service: FakeService) -> None:
    with pytest.raises(PermanentStepError, match="token contains characters") as caught:
        upsert(connector(tmp_path, service.url, token="pat-na1-abc\ndef"))
    assert "abc" not in caught.value.message


def test_surrounding_whitespace_in_the_token_is_ignored(tmp_path: Path, service: FakeService) -> None:
    assert upsert(connector(tmp_path, service.url, token=f" {TOKEN}\n"))["created"] is True


RECIPE = """\
name: crm-sync
on: invitee.created
steps:
  - id: contact
    use: hubspot.upsert_contact
    with:
      email: "{{ invitee.email }}"
      properties:
        firstname: "{{ invitee.first_name }}"
        lastname: "{{ invitee.last_name }}"
        utm_source: "{{ utm.source }}"
  - id: booked_note
    use: hubspot.create_note
    with:
      contact_id: "{{ steps.contact.output.id }}"
      body: "<p>{{ invitee.name }} booked <b>{{ meeting.name }}</b></p>"
"""


def another_booking(name: str) -> bytes:
    """The same person booking again: a new invitee (its own URI) with the same email, another name."""
    data = json.loads(fixture_body("invitee.created", created_at="2027-02-02T09:00:00.000000Z"))
    data["payload"]["uri"] = data["payload"]["uri"].replace("AAAAAAAAAAAAAAA3", "BBBBBBBBBBBBBBB3")
    data["payload"]["name"] = name
    return json.dumps(data).encode()


def test_recipe_keeps_one_contact_per_email_and_notes_each_booking(
    make_config: Callable[..., Path], recipes_dir: Path, hubspot: FakeHubspot, service: FakeService
) -> None:
    (recipes_dir / "crm.yaml").write_text(RECIPE)
    config = make_config(connectors={"hubspot": {"base_url": service.url, "token": TOKEN}})
    with Vivoflow(config) as vivoflow:
        first = vivoflow.post(fixture_body("invitee.created"))
        assert first.status_code == 202, first.text
        [run] = vivoflow.wait_for_runs(first.json()["delivery_id"])
        assert run["status"] == "succeeded", run
        steps = {s["step_id"]: s for s in vivoflow.store.steps_of(run["id"])}
        contact = hubspot.contact("jamie.rivera@example.com")
        assert steps["contact"]["output"] == {"id": contact["id"], "created": True}
        assert contact["properties"] == {"email": "jamie.rivera@example.com", "firstname": "Jamie",
                                         "lastname": "Rivera", "utm_source": "linkedin"}
        [booked] = hubspot.notes
        assert booked["properties"]["hs_note_body"] == "<p>Jamie Rivera booked <b>Discovery Call</b></p>"
        assert booked["associations"][0]["to"] == {"id": contact["id"]}
        assert steps["booked_note"]["output"] == {"id": booked["id"]}

        # The sender delivering the same booking again (new envelope created_at): nothing new in HubSpot.
        redelivered = vivoflow.post(fixture_body("invitee.created", created_at="2027-02-01T10:05:00.000000Z"))
        assert redelivered.status_code == 202 and redelivered.json()["duplicate"] is False
        vivoflow.wait_processed(redelivered.json()["delivery_id"])
        assert len(hubspot.contacts) == 1 and len(hubspot.notes) == 1

        # The same person booking again: the contact is updated, not duplicated; the name is escaped.
        rebooked = vivoflow.post(another_booking("Jamie <i>Rivera</i>"))
        [run2] = vivoflow.wait_for_runs(rebooked.json()["delivery_id"])
        assert run2["status"] == "succeeded", run2
        steps2 = {s["step_id"]: s for s in vivoflow.store.steps_of(run2["id"])}
    assert len(hubspot.contacts) == 1
    assert steps2["contact"]["output"] == {"id": contact["id"], "created": False}
    second = hubspot.notes[1]
    assert second["properties"]["hs_note_body"] == (
        "<p>Jamie &lt;i&gt;Rivera&lt;/i&gt; booked <b>Discovery Call</b></p>")
    assert second["associations"][0]["to"] == {"id": contact["id"]}
