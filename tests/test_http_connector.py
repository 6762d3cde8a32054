"""http.request against a real HTTP server on 127.0.0.1 that records every request it gets.

Direct calls cover methods, headers, named credentials, status handling and input validation;
two recipes run end to end to show that event values stay inside the URL's path segment.
"""

from __future__ import annotations

import asyncio
import base64
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
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from connectors.base import ActionCall
from connectors.http import BODY_LIMIT, HttpConfig, HttpConnector, RequestInput
from tests.fake_service import FakeService
from tests.harness import Vivoflow, fixture_body
from tests.smtp_server import free_port
from workers.errors import PermanentStepError, RetryableStepError

CALL = ActionCall(run_id="r1", step_id="s1", idempotency_key="r1:s1", event={})
TOKEN = "crm-s3cret-token"
PASSWORD = "basic-s3cret-pass"
AUTH = {
    "crm": {"type": "bearer", "token": TOKEN},
    "sheet": {"type": "basic", "username": "robot", "password": PASSWORD},
}
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


class Gate:
    """Holds the slow endpoint's answer until the test opens it at teardown: nothing sleeps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def wait(self) -> None:
        event = asyncio.Event()
        with self._lock:
            if self._opened:
                return
            self._waiting.append((asyncio.get_running_loop(), event))
        await event.wait()

    def open(self) -> None:
        """Called from the test's thread, so each event is set on the server's own loop."""
        with self._lock:
            self._opened = True
            for loop, event in self._waiting:
                loop.call_soon_threadsafe(event.set)


def remote_app(gate: Gate) -> Starlette:
    """An API of the kind recipes call: echoes, plain text, chosen statuses, a redirect, a slow and a huge answer."""

    async def echo(request: Request) -> Response:
        # Like httpbin: the request comes back, credentials included.
        return JSONResponse({"method": request.method, "authorization": request.headers.get("authorization")},
                            status_code=201 if request.method == "POST" else 200)

    async def deny(request: Request) -> Response:
        return JSONResponse({"message": f"invalid credentials: {request.headers.get('authorization')}"}, 401)

    async def text(request: Request) -> Response:
        return PlainTextResponse("stored, thanks")

    async def status(request: Request) -> Response:
        code = int(request.path_params["code"])
        headers = {"Retry-After": "7"} if code == 429 else None
        return JSONResponse({"message": f"contact not found (status {code})"}, code, headers=headers)

    async def moved(request: Request) -> Response:
        return RedirectResponse(str(request.url_for("echo")), status_code=302)

    async def slow(request: Request) -> Response:
        await gate.wait()
        return JSONResponse({"late": True})

    async def huge(request: Request) -> Response:
        return PlainTextResponse("x" * (BODY_LIMIT * 2))

    async def login(request: Request) -> Response:
        # A service that hands out a session cookie (as many web APIs behind a login do).
        response = JSONResponse({"ok": True})
        response.set_cookie("session", "invitee-one-s3ssion")
        return response

    async def hook(request: Request) -> Response:
        # The path as it came over the wire, before the server decodes it.
        return JSONResponse({"raw_path": request.scope["raw_path"].decode(), "host": request.headers["host"]})

    return Starlette(routes=[
        Route("/echo", echo, methods=ALL_METHODS, name="echo"),
        Route("/deny", deny, methods=ALL_METHODS),
        Route("/text", text, methods=ALL_METHODS),
        Route("/status/{code:int}", status, methods=ALL_METHODS),
        Route("/moved", moved, methods=ALL_METHODS),
        Route("/slow", slow, methods=ALL_METHODS),
        Route("/huge", huge, methods=["GET"]),
        Route("/hooks/{rest:path}", hook, methods=ALL_METHODS),
        Route("/login", login, methods=ALL_METHODS),
    ])


@pytest.fixture
def fake() -> Iterator[FakeService]:
    gate = Gate()
    with FakeService(remote_app(gate)) as service:
        try:
            yield service
        finally:
            gate.open()  # before the server stops: it waits for the slow handler to return


@pytest.fixture
def connector(tmp_path: Path) -> Iterator[Callable[..., HttpConnector]]:
    made: list[HttpConnector] = []

    def make(**config: Any) -> HttpConnector:
        made.append(HttpConnector(HttpConfig.model_validate(config, context={"base_dir": tmp_path})))
        return made[-1]

    yield make
    for each in made:
        each.close()


def request(conn: HttpConnector, **inputs: Any) -> dict[str, Any]:
    """One ``http.request`` call, inputs validated as the engine does."""
    result = conn.run("request", RequestInput.model_validate(inputs), CALL)
    assert result is not None
    return result


def test_post_sends_json_with_the_steps_idempotency_key(connector: Callable[..., HttpConnector],
                                                        fake: FakeService) -> None:
    out = request(connector(), url=f"{fake.url}/echo", json={"name": "Jamie", "seats": 20})

    assert out["status"] == 201
    assert out["json"] == {"method": "POST", "authorization": None}
    assert out["headers"]["content-type"] == "application/json"
    [got] = fake.received("POST", "/echo")
    assert got.json == {"name": "Jamie", "seats": 20}
    assert got.headers["content-type"] == "application/json"
    assert got.headers["idempotency-key"] == "r1:s1"


def test_get_adds_query_to_the_urls_own_query_string(connector: Callable[..., HttpConnector],
                                                      fake: FakeService) -> None:
    out = request(connector(), method="get", url=f"{fake.url}/echo?src=linkedin", query={"q": "a&b=c", "limit": 3})

    assert out["json"]["method"] == "GET"
    [got] = fake.received("GET", "/echo")
    assert got.query == "src=linkedin&q=a%26b%3Dc&limit=3"
    assert got.body == b""


def test_put_sends_body_text_as_is_and_returns_a_text_answer_as_text(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    out = request(connector(), method="PUT", url=f"{fake.url}/text", body="name=Jamie\nseats=20",
                  headers={"Content-Type": "text/plain"})

    assert out == {"status": 200, "json": None, "text": "stored, thanks",
                   "headers": {"content-type": "text/plain; charset=utf-8", "location": None}}
    [got] = fake.received("PUT", "/text")
    assert got.body == b"name=Jamie\nseats=20"
    assert got.headers["content-type"] == "text/plain"


def test_custom_headers_reach_the_server_and_the_recipes_idempotency_key_wins(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    request(connector(), url=f"{fake.url}/echo",
            headers={"X-Source": "vivoflow", "X-Invitee": "Zoé", "Idempotency-Key": "mine", "X-Count": 2})

    [got] = fake.received("POST", "/echo")
    assert got.headers["x-source"] == "vivoflow"
    assert got.headers["x-invitee"].encode("latin-1").decode("utf-8") == "Zoé"  # sent as UTF-8
    assert got.headers["x-count"] == "2"
    assert got.headers["idempotency-key"] == "mine"


@pytest.mark.parametrize(("name", "header", "secret"), [
    ("crm", f"Bearer {TOKEN}", TOKEN),
    ("sheet", "Basic " + base64.b64encode(f"robot:{PASSWORD}".encode()).decode(), PASSWORD),
])
def test_named_auth_from_config_is_sent_and_its_secret_never_shown(
    connector: Callable[..., HttpConnector], fake: FakeService, caplog: pytest.LogCaptureFixture,
    name: str, header: str, secret: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = connector(auth=AUTH)

    out = request(conn, url=f"{fake.url}/echo", auth=name)
    with pytest.raises(PermanentStepError) as denied:
        request(conn, url=f"{fake.url}/deny", auth=name)

    assert [r.headers["authorization"] for r in fake.received()] == [header, header]
    assert out["json"]["authorization"].endswith("********")  # the server echoed it back: scrubbed
    assert "invalid credentials" in denied.value.message
    for shown in (json.dumps(out), str(denied.value), caplog.text, repr(conn.config)):
        assert secret not in shown
        assert header not in shown


def test_unknown_auth_name_fails_permanently_naming_the_config_key(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    with pytest.raises(PermanentStepError, match=r"connectors\.http\.auth\.billing"):
        request(connector(auth=AUTH), url=f"{fake.url}/echo", auth="billing")
    assert fake.received() == []


def test_a_status_listed_in_expect_is_a_success(connector: Callable[..., HttpConnector], fake: FakeService) -> None:
    out = request(connector(), method="GET", url=f"{fake.url}/status/404", expect=[200, 404])

    assert out["status"] == 404
    assert out["json"] == {"message": "contact not found (status 404)"}


def test_404_without_expect_fails_permanently_with_the_servers_message(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    with pytest.raises(PermanentStepError) as failed:
        request(connector(), method="GET", url=f"{fake.url}/status/404")
    assert "404" in failed.value.message
    assert "contact not found (status 404)" in failed.value.message


def test_503_is_retryable(connector: Callable[..., HttpConnector], fake: FakeService) -> None:
    with pytest.raises(RetryableStepError, match="503"):
        request(connector(), url=f"{fake.url}/status/503", expect=[200])


def test_429_is_retryable_after_the_servers_retry_after(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    with pytest.raises(RetryableStepError) as limited:
        request(connector(), url=f"{fake.url}/status/429")
    assert limited.value.retry_after == 7


def test_a_server_slower_than_the_timeout_is_retryable(
    connector: Callable[..., HttpConnector], fake: FakeService
) -> None:
    with pytest.raises(RetryableStepError, match="did not answer in time"):
        request(connector(timeout_seconds=0.2), url=f"{fake.url}/slow")


def test_a_refused_connection_is_retryable(connector: Callable[..., HttpConnector]) -> None:
    with pytest.raises(RetryableStepError, match="cannot reach"):
        request(connector(), url=f"http://127.0.0.1:{free_port()}/hook")


def test_a_redirect_is_returned_not_followed(connector: Callable[..., HttpConnector], fake: FakeService) -> None:
    conn = connector(auth=AUTH)
    with pytest.raises(PermanentStepError, match="redirects are not followed") as failed:
        request(conn, url=f"{fake.url}/moved", auth="crm")
    out = request(conn, url=f"{fake.url}/moved", auth="crm", expect=[302])

    assert f"{fake.url}/echo" in failed.value.message
    assert out["status"] == 302
    assert out["headers"]["location"] == f"{fake.url}/echo"
    assert fake.received(path="/echo") == []  # the credentials went nowhere else


def test_a_huge_answer_is_cut_to_the_body_limit(connector: Callable[..., HttpConnector], fake: FakeService) -> None:
    out = request(connector(), method="GET", url=f"{fake.url}/huge")

    assert out["truncated"] is True
    assert out["text"] == "x" * BODY_LIMIT


@pytest.mark.parametrize(("inputs", "problem"), [
    ({"url": "ftp://files.example.com/report.csv"}, "http:// or https://"),
    ({"url": "http%3A%2F%2Fexample.com%2Fhook"}, "mark a trusted one |safe"),
    ({"url": "https:///no-host"}, "with a host"),
    ({"url": "https://robot:pw@example.com/"}, "connectors.http.auth"),
    ({"url": "https://example.com/", "headers": {"X-Name": "Jamie\r\nX-Admin: yes"}}, "line break"),
    ({"url": "https://example.com/", "headers": {"X-Name": "Jamie\nX-Admin: yes"}}, "line break"),
    ({"url": "https://example.com/", "json": {"a": 1}, "body": "a=1"}, "json or body"),
    ({"url": "https://example.com/", "method": "TRACE"}, "method"),
])
def test_invalid_inputs_are_rejected_before_any_call(inputs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem.replace("|", r"\|")):
        RequestInput.model_validate(inputs)


# end to end -----------------------------------------------------------------------------------

EVIL_EMAIL = "x@evil.com/../../admin?"


def canceled_by(email: str) -> bytes:
    """The shipped invitee.canceled sample, from an invitee with this email."""
    data = json.loads(fixture_body("invitee.canceled"))
    data["payload"]["email"] = email
    return json.dumps(data).encode()


def run_recipe(make_config: Callable[..., Path], recipes_dir: Path, recipe: str) -> dict[str, Any]:
    """Run ``recipe`` on a cancellation by ``EVIL_EMAIL``; returns its one stored step."""
    (recipes_dir / "hook.yaml").write_text(recipe)
    with Vivoflow(make_config(connectors={"http": {"auth": AUTH}})) as vf:
        answer = vf.post(canceled_by(EVIL_EMAIL))
        assert answer.status_code == 202, answer.text
        delivery_id = answer.json()["delivery_id"]
        vf.wait_processed(delivery_id)  # its runs are done by then (none waits: no delay, no retry)
        [run] = vf.runs(delivery_id)
        [step] = vf.store.steps_of(run["id"])
    assert run["status"] == "succeeded", step["error"]
    return step


def test_recipe_event_values_stay_inside_one_path_segment_of_the_authors_host(
    make_config: Callable[..., Path], recipes_dir: Path, fake: FakeService
) -> None:
    step = run_recipe(make_config, recipes_dir, f"""
on: invitee.canceled
steps:
  - id: hook
    use: http.request
    with:
      url: "{fake.url}/hooks/{{{{ invitee.email }}}}?src={{{{ utm.source }}}}"
      auth: crm
      headers: {{X-Invitee: "{{{{ invitee.name }}}}"}}
""")

    [got] = fake.received("POST")
    assert got.path == f"/hooks/{EVIL_EMAIL}"  # decoded by the server: still one segment under /hooks/
    assert got.query == "src=linkedin"
    assert got.headers["authorization"] == f"Bearer {TOKEN}"
    assert got.headers["x-invitee"] == "Jamie Rivera"
    assert step["output"]["json"] == {
        "raw_path": "/hooks/x%40evil.com%2F..%2F..%2Fadmin%3F", "host": fake.url.removeprefix("http://"),
    }
    assert TOKEN not in json.dumps(step)


def test_recipe_json_arrives_as_json_with_rendered_values(
    make_config: Callable[..., Path], recipes_dir: Path, fake: FakeService
) -> None:
    run_recipe(make_config, recipes_dir, f"""
on: invitee.canceled
steps:
  - id: hook
    use: http.request
    with:
      url: "{fake.url}/hooks/canceled"
      json: {{name: "{{{{ invitee.name }}}}", reason: "{{{{ reason }}}}"}}
""")

    [got] = fake.received("POST", "/hooks/canceled")
    assert got.json == {"name": "Jamie Rivera", "reason": "I have a conflict that day"}


def test_a_cookie_one_call_receives_is_never_sent_on_another(
    fake: FakeService, connector: Callable[..., HttpConnector],
) -> None:
    """Calls of different runs (different invitees) share the connector's client, not a session."""
    conn = connector()

    request(conn, method="POST", url=f"{fake.url}/login")
    request(conn, method="GET", url=f"{fake.url}/echo")

    [later] = fake.received("GET", "/echo")
    assert "cookie" not in later.headers
