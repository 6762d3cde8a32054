"""slack.post_message against a fake Slack on 127.0.0.1: the Web API's chat.postMessage and an incoming webhook.

The fake speaks Slack's documented protocol: bearer token, JSON ``ok``/``error`` answers, 429 with
``Retry-After``, and a webhook that answers ``ok`` or a plain-text error code.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from connectors.base import ActionCall, RenderAs
from connectors.slack import PostMessageInput, SlackConfig, SlackConnector
from tests.fake_service import FakeService, RecordedRequest
from tests.harness import FIXTURES, Vivoflow
from tests.smtp_server import free_port
from workers.errors import ConfigError, PermanentStepError, RetryableStepError

TOKEN = "xoxb-test"
WEBHOOK_PATH = "/services/T000/B000/XXXX"
CALL = ActionCall(run_id="r1", step_id="s1", idempotency_key="r1:s1", event={})


class FakeSlack:
    """Slack's chat.postMessage and one incoming webhook; ``script`` queues answers given before the real logic."""

    #: Channel ID → (name, whether the bot is a member).
    CHANNELS = {"C0GENERAL": ("general", True), "C0SALES": ("sales", True), "C0PRIVATE": ("private", False)}

    def __init__(self) -> None:
        self.scripted: deque[Response] = deque()
        self._ts = itertools.count(1)
        self.service = FakeService(Starlette(routes=[
            Route("/chat.postMessage", self.post_message, methods=["POST"]),
            Route("/services/{team}/{bot}/{secret}", self.webhook, methods=["POST"]),
        ]))
        self.url = self.service.url
        self.webhook_url = self.url + WEBHOOK_PATH

    def script(self, response: Response) -> None:
        self.scripted.append(response)

    def received(self, path: str) -> list[RecordedRequest]:
        return self.service.received("POST", path)

    async def post_message(self, request: Request) -> Response:
        if self.scripted:
            return self.scripted.popleft()
        auth = request.headers.get("authorization", "")
        if not auth:
            return _api_error("not_authed")
        if auth != f"Bearer {TOKEN}":
            return _api_error("invalid_auth")
        try:
            body = await request.json()
        except ValueError:
            return _api_error("invalid_json")
        channel = self._channel(str(body.get("channel") or ""))
        if channel is None:
            return _api_error("channel_not_found")
        if not self.CHANNELS[channel][1]:
            return _api_error("not_in_channel")
        if not body.get("text") and not body.get("blocks"):
            return _api_error("no_text")
        if not _valid_blocks(body.get("blocks")):
            return _api_error("invalid_blocks")
        ts = f"1700000000.{next(self._ts):06d}"
        message = {"type": "message", "text": body.get("text", ""), "ts": ts, "bot_id": "B0BOT"}
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "message": message})

    async def webhook(self, request: Request) -> Response:
        if self.scripted:
            return self.scripted.popleft()
        if request.url.path != WEBHOOK_PATH:
            return PlainTextResponse("no_service", status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return PlainTextResponse("invalid_payload", status_code=400)
        if not body.get("text") and not body.get("blocks"):
            return PlainTextResponse("no_text", status_code=400)
        if not _valid_blocks(body.get("blocks")):
            return PlainTextResponse("invalid_blocks", status_code=400)
        return PlainTextResponse("ok")

    def _channel(self, given: str) -> str | None:
        """Slack takes a channel ID or a name, with or without ``#``; it answers with the ID."""
        if given in self.CHANNELS:
            return given
        name = given.removeprefix("#")
        return next((cid for cid, (known, _) in self.CHANNELS.items() if known == name), None)


def _api_error(code: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": code})


def _valid_blocks(blocks: Any) -> bool:
    if blocks is None:
        return True
    return isinstance(blocks, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks)


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    fake = FakeSlack()
    with fake.service:
        yield fake


@pytest.fixture
def make_connector(tmp_path: Path) -> Iterator[Callable[..., SlackConnector]]:
    """Build connectors from config sections (as config.yaml would); their clients are closed afterwards."""
    built: list[SlackConnector] = []

    def make(**settings: Any) -> SlackConnector:
        conn = SlackConnector(SlackConfig.model_validate(settings, context={"base_dir": tmp_path}))
        built.append(conn)
        return conn

    yield make
    for conn in built:
        conn.close()


def post(conn: SlackConnector, **inputs: Any) -> Any:
    return conn.run("post_message", PostMessageInput(**inputs), CALL)


# Web API -------------------------------------------------------------------


def test_token_posts_json_with_bearer_header_and_returns_ts_and_channel(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    conn = make_connector(base_url=slack.url, token=TOKEN)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*Hi*"}}]

    output = post(conn, channel="#general", text="Hello", blocks=blocks)

    [request] = slack.received("/chat.postMessage")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json; charset=utf-8"
    assert request.json == {"channel": "#general", "text": "Hello", "blocks": blocks}  # no null thread_ts
    assert output == {"ts": "1700000000.000001", "channel": "C0GENERAL"}
    post(conn, channel=output["channel"], text="in the thread", thread_ts=output["ts"])
    assert slack.received("/chat.postMessage")[1].json["thread_ts"] == output["ts"]


@pytest.mark.parametrize(("token", "channel", "expected"), [
    (TOKEN, "#nope", "channel_not_found"),
    ("xoxb-wrong", "#general", "invalid_auth (check connectors.slack.token)"),
    (TOKEN, "#private", "not_in_channel (invite the bot to the channel"),
])
def test_slack_refusals_are_permanent_with_slacks_code_and_a_hint(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector], token: str, channel: str, expected: str
) -> None:
    with pytest.raises(PermanentStepError) as caught:
        post(make_connector(base_url=slack.url, token=token), channel=channel, text="Hello")

    assert caught.value.message.startswith(f"Slack chat.postMessage failed: {expected}")


def test_missing_scope_names_the_scope_slack_asks_for(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    slack.script(JSONResponse({"ok": False, "error": "missing_scope", "needed": "chat:write"}))

    with pytest.raises(PermanentStepError, match="missing_scope .the token needs the chat:write scope"):
        post(make_connector(base_url=slack.url, token=TOKEN), channel="#general", text="Hello")


@pytest.mark.parametrize("code", ["ratelimited", "service_unavailable", "internal_error", "request_timeout"])
def test_transient_ok_false_errors_are_retryable(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector], code: str
) -> None:
    slack.script(_api_error(code))

    with pytest.raises(RetryableStepError) as caught:
        post(make_connector(base_url=slack.url, token=TOKEN), channel="#general", text="Hello")

    assert code in caught.value.message


def test_http_429_is_retryable_after_retry_after(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    slack.script(JSONResponse({"ok": False, "error": "ratelimited"}, status_code=429, headers={"Retry-After": "7"}))

    with pytest.raises(RetryableStepError) as caught:
        post(make_connector(base_url=slack.url, token=TOKEN), channel="#general", text="Hello")

    assert caught.value.retry_after == 7
    assert "429" in caught.value.message and "ratelimited" in caught.value.message


def test_server_error_is_retryable(slack: FakeSlack, make_connector: Callable[..., SlackConnector]) -> None:
    slack.script(PlainTextResponse("upstream broke", status_code=500))

    with pytest.raises(RetryableStepError, match="500: upstream broke"):
        post(make_connector(base_url=slack.url, token=TOKEN), channel="#general", text="Hello")


def test_connection_refused_is_retryable(make_connector: Callable[..., SlackConnector]) -> None:
    conn = make_connector(base_url=f"http://127.0.0.1:{free_port()}", token=TOKEN)

    with pytest.raises(RetryableStepError, match="cannot reach Slack"):
        post(conn, channel="#general", text="Hello")


def test_an_answer_without_slacks_json_points_at_base_url(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    slack.script(PlainTextResponse("<html>a login page</html>"))

    with pytest.raises(PermanentStepError, match="check connectors.slack.base_url"):
        post(make_connector(base_url=slack.url, token=TOKEN), channel="#general", text="Hello")


def test_token_without_channel_fails_before_calling_slack(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    with pytest.raises(PermanentStepError, match="needs a channel"):
        post(make_connector(base_url=slack.url, token=TOKEN), text="Hello")

    assert slack.received("/chat.postMessage") == []


def test_token_is_used_when_a_webhook_is_also_set(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    conn = make_connector(base_url=slack.url, token=TOKEN, webhook_url=slack.webhook_url)

    assert post(conn, channel="#general", text="Hello")["channel"] == "C0GENERAL"
    assert slack.received(WEBHOOK_PATH) == []


# incoming webhook ----------------------------------------------------------


def test_webhook_posts_text_and_blocks_without_channel_or_token(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    conn = make_connector(webhook_url=slack.webhook_url)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*Hi*"}}]

    output = post(conn, channel="#ignored", text="Hello", blocks=blocks)

    [request] = slack.received(WEBHOOK_PATH)
    assert request.json == {"text": "Hello", "blocks": blocks}
    assert "authorization" not in request.headers
    assert output == {"ts": None}


def test_webhook_invalid_payload_is_permanent_with_slacks_words(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    slack.script(PlainTextResponse("invalid_payload", status_code=400))

    with pytest.raises(PermanentStepError) as caught:
        post(make_connector(webhook_url=slack.webhook_url), text="Hello")

    assert caught.value.message.startswith("Slack incoming webhook answered 400: invalid_payload")


def test_webhook_rejects_blocks_without_a_type(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    with pytest.raises(PermanentStepError, match="400: invalid_blocks"):
        post(make_connector(webhook_url=slack.webhook_url), blocks=[{"text": "no type"}])


def test_revoked_webhook_is_permanent_and_says_to_replace_it(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    revoked = slack.url + "/services/T000/B000/REVOKED"

    with pytest.raises(PermanentStepError) as caught:
        post(make_connector(webhook_url=revoked), text="Hello")

    assert "404: no_service" in caught.value.message
    assert "set a new connectors.slack.webhook_url" in caught.value.message
    assert "REVOKED" not in str(caught.value)


def test_a_server_echoing_the_webhook_path_does_not_leak_it(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    slack.script(PlainTextResponse(f"Cannot POST {WEBHOOK_PATH}", status_code=404))

    with pytest.raises(PermanentStepError) as caught:
        post(make_connector(webhook_url=slack.webhook_url), text="Hello")

    assert str(caught.value) == "Slack incoming webhook answered 404: Cannot POST ***"


def test_webhook_rate_limit_and_server_errors_are_retryable(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector]
) -> None:
    conn = make_connector(webhook_url=slack.webhook_url)
    slack.script(PlainTextResponse("rate_limited", status_code=429, headers={"Retry-After": "7"}))
    slack.script(PlainTextResponse("service_unavailable", status_code=503))

    with pytest.raises(RetryableStepError) as limited:
        post(conn, text="Hello")
    with pytest.raises(RetryableStepError, match="503"):
        post(conn, text="Hello")

    assert limited.value.retry_after == 7


def test_webhook_connection_refused_is_retryable(make_connector: Callable[..., SlackConnector]) -> None:
    with pytest.raises(RetryableStepError, match="cannot reach Slack incoming webhook"):
        post(make_connector(webhook_url=f"http://127.0.0.1:{free_port()}{WEBHOOK_PATH}"), text="Hello")


# configuration, inputs and secrets -----------------------------------------


def test_neither_token_nor_webhook_is_permanent_naming_the_settings(
    make_connector: Callable[..., SlackConnector]
) -> None:
    with pytest.raises(PermanentStepError) as caught:
        post(make_connector(), channel="#general", text="Hello")

    assert "connectors.slack.token" in caught.value.message
    assert "connectors.slack.webhook_url" in caught.value.message


def test_text_or_blocks_is_required() -> None:
    with pytest.raises(ValidationError, match="needs text or blocks"):
        PostMessageInput(channel="#general")


def test_text_and_blocks_are_rendered_with_slack_escaping() -> None:
    kinds = SlackConnector.actions["post_message"].render_kinds()

    assert kinds["text"] is RenderAs.SLACK
    assert kinds["blocks"] is RenderAs.SLACK
    assert kinds["channel"] is RenderAs.TEXT


def test_token_and_webhook_url_never_appear_in_errors_or_logs(
    slack: FakeSlack, make_connector: Callable[..., SlackConnector], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # As the CLI sets it (workers/cli.py): httpx logs every request's full URL at INFO.
    caplog.set_level(logging.WARNING, logger="httpx")
    secret_hook = slack.url + "/services/T000/B000/SECRETPART"
    errors: list[Exception] = []
    for conn in (make_connector(base_url=slack.url, token="xoxb-wrong-secret"),
                 make_connector(webhook_url=secret_hook),
                 make_connector(webhook_url=f"http://127.0.0.1:{free_port()}/services/T/B/SECRETPART")):
        with pytest.raises((PermanentStepError, RetryableStepError)) as caught:
            post(conn, channel="#general", text="Hello")
        errors.append(caught.value)
    post(make_connector(webhook_url=slack.webhook_url), text="Hello")  # a success logs too

    seen = " ".join(map(str, errors)) + caplog.text
    assert "xoxb-wrong-secret" not in seen
    assert "SECRETPART" not in seen and "XXXX" not in seen
    assert "Slack incoming webhook" in seen
    assert "SecretStr('**********')" in repr(make_connector(token=TOKEN).config)


# end to end ----------------------------------------------------------------

RECIPE = """
name: tell-sales
on: invitee.canceled
steps:
  - id: tell_sales
    use: slack.post_message
    with: {channel: "#sales", text: "<!here> {{ invitee.name }} canceled"}
"""


def test_recipe_escapes_the_invitees_mention_but_keeps_the_authors(
    slack: FakeSlack, make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    (recipes_dir / "tell-sales.yaml").write_text(RECIPE)
    event = json.loads((FIXTURES / "invitee.canceled.json").read_text())
    event["payload"]["name"] = "<!channel> & <b>"

    with Vivoflow(make_config(connectors={"slack": {"base_url": slack.url, "token": TOKEN}})) as vivoflow:
        delivery_id = vivoflow.post(json.dumps(event).encode()).json()["delivery_id"]
        [run] = vivoflow.wait_for_runs(delivery_id)
        [step] = vivoflow.store.steps_of(run["id"])

    [request] = slack.received("/chat.postMessage")
    assert request.json == {"channel": "#sales", "text": "<!here> &lt;!channel&gt; &amp; &lt;b&gt; canceled"}
    assert run["status"] == "succeeded"
    assert step["status"] == "succeeded"
    assert step["output"] == {"ts": "1700000000.000001", "channel": "C0SALES"}


@pytest.mark.parametrize(("key", "value"), [
    ("base_url", "slack.com/api"), ("webhook_url", "hooks.slack.com/services/T000/B000/SECRETPART"),
])
def test_url_without_scheme_stops_vivoflow_at_start_without_quoting_it(
    make_config: Callable[..., Path], key: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"connectors.slack.{key}: must start with https://") as caught:
        Vivoflow(make_config(connectors={"slack": {key: value}}))

    assert value not in str(caught.value)
