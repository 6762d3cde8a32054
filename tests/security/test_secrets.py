"""No secret in any artefact (SPEC §7): logs, every row of the store, the broker, `try`, errors, reprs.

One real recipe runs with every secret configured, against services that echo the request headers
back (in successes and in failures), so each credential is offered to every place it could land.
Then every artefact is searched for every secret, as sent and in the encodings it travels in.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_service import FakeService
from tests.harness import FIXTURES, Vivoflow
from tests.smtp_server import SmtpSink


def _secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


SIGNING_KEY = _secret("signing-key")
ROTATED_KEY = _secret("rotated-key")
ADMIN_TOKEN = _secret("admin-token")
SMTP_USER = "mailer"
SMTP_PASSWORD = _secret("smtp-password")
SLACK_TOKEN = "xoxb-" + _secret("slack")
SLACK_HOOK = _secret("hook")
HUBSPOT_TOKEN = "pat-" + _secret("hubspot")
HTTP_TOKEN = _secret("http-bearer")
HTTP_USER = "crm-user"
HTTP_PASSWORD = _secret("http-basic")
VIVO_TOKEN = _secret("vivocalendar-token")
SSO_KEY = _secret("sso-private-key")
SECRETS = {
    "intake.signing_key": SIGNING_KEY, "intake.signing_keys": ROTATED_KEY, "admin.token": ADMIN_TOKEN,
    "email.password": SMTP_PASSWORD, "slack.token": SLACK_TOKEN, "slack.webhook_url": SLACK_HOOK,
    "hubspot.token": HUBSPOT_TOKEN, "http.auth.crm.token": HTTP_TOKEN, "http.auth.basic.password": HTTP_PASSWORD,
    "vivocalendar.token": VIVO_TOKEN, "vivocalendar.sso_private_key": SSO_KEY,
}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


#: Each secret as it may appear: itself, base64 (AUTH LOGIN, a Basic header), SMTP AUTH PLAIN's form.
FORMS = {
    **SECRETS,
    **{f"{name} (base64)": _b64(value) for name, value in SECRETS.items()},
    "email.password (AUTH PLAIN)": _b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}"),
    "http.auth.basic (Basic header)": _b64(f"{HTTP_USER}:{HTTP_PASSWORD}"),
}


def _echo(request: Request) -> dict[str, str]:
    """The request's headers, Authorization first so it survives any cut of a quoted message."""
    headers = dict(request.headers)
    return {"authorization": headers.pop("authorization", ""), **headers}


class EchoServices:
    """Slack, HubSpot, any HTTP API and Vivocalendar, each quoting the credentials it was sent."""

    def __init__(self) -> None:
        self.service = FakeService(Starlette(routes=[
            Route("/slack/chat.postMessage", self.slack, methods=["POST"]),
            Route("/hubspot/crm/v3/objects/contacts/batch/upsert", self.refused, methods=["POST"]),
            Route("/hubspot/crm/v3/objects/contacts/search", self.broken, methods=["POST"]),
            Route("/http/echo", self.ok, methods=["GET", "POST"]),
            Route("/http/fail", self.bad_request, methods=["GET", "POST"]),
            Route("/vivo/invitees/{uuid}", self.refused, methods=["GET"]),
            Route("/vivo/event_type_available_times", self.broken, methods=["GET"]),
        ]))
        self.url = self.service.url

    async def slack(self, request: Request) -> Response:
        body = await request.json()
        if body.get("channel") == "#ok":
            return JSONResponse({"ok": True, "channel": "C0OK", "ts": "1700000000.000001", "echo": _echo(request)})
        return JSONResponse({"ok": False, "error": json.dumps(_echo(request))})

    async def ok(self, request: Request) -> Response:
        return JSONResponse({"you_sent": _echo(request)})

    async def refused(self, request: Request) -> Response:
        return JSONResponse({"title": "Unauthenticated", "message": f"bad credentials: {_echo(request)}"}, 401)

    async def bad_request(self, request: Request) -> Response:
        return JSONResponse({"error": f"no thanks: {_echo(request)}"}, 400)

    async def broken(self, request: Request) -> Response:
        return JSONResponse({"message": f"internal error while handling {_echo(request)}"}, 500)


@pytest.fixture
def echo() -> Iterator[EchoServices]:
    services = EchoServices()
    with services.service:
        yield services


@pytest.fixture
def mail() -> Iterator[SmtpSink]:
    """A sink that wants a login, and one recipient whose refusal quotes the password back."""
    with SmtpSink(users={SMTP_USER: SMTP_PASSWORD},
                  rcpt_replies={"echo@example.com": f"550 5.1.1 unknown user (you logged in with {SMTP_PASSWORD})"},
                  ) as sink:
        yield sink


RECIPE = """
name: secrets-probe
on: invitee.created
steps:
  - {{id: email_ok, use: email.send, on_error: continue,
     with: {{to: ok@example.com, subject: "Hi {{{{ invitee.first_name }}}}", text: hi}}}}
  - {{id: email_echo, use: email.send, on_error: continue, with: {{to: echo@example.com, subject: x, text: x}}}}
  - {{id: slack_ok, use: slack.post_message, on_error: continue, with: {{channel: "#ok", text: hi}}}}
  - {{id: slack_echo, use: slack.post_message, on_error: continue, with: {{channel: "#echo", text: hi}}}}
  - {{id: hubspot_upsert, use: hubspot.upsert_contact, on_error: continue, with: {{email: "{{{{ invitee.email }}}}"}}}}
  - {{id: hubspot_note, use: hubspot.create_note, on_error: continue, retry: {{max_attempts: 2}},
     with: {{email: "{{{{ invitee.email }}}}", body: hi}}}}
  - {{id: http_echo, use: http.request, on_error: continue, with: {{method: GET, url: "{echo}/http/echo", auth: crm}}}}
  - {{id: http_basic, use: http.request, on_error: continue,
     with: {{method: GET, url: "{echo}/http/echo", auth: basic}}}}
  - {{id: http_fail, use: http.request, on_error: continue,
     with: {{url: "{echo}/http/fail", auth: crm, json: {{a: 1}}}}}}
  - {{id: vivo_invitee, use: vivocalendar.get_invitee, on_error: continue, with: {{uri: "{echo}/vivo/invitees/ECHO"}}}}
  - {{id: vivo_times, use: vivocalendar.available_times, on_error: continue, retry: {{max_attempts: 2}},
     with: {{event_type: "{echo}/vivo/event_types/ECHO"}}}}
  - {{id: done, use: log.write, with: {{message: "http answered {{{{ steps.http_echo.output.status }}}}"}}}}
"""
#: What each step must come to: the echoes make all but these fail.
SUCCEEDED = {"email_ok", "slack_ok", "http_echo", "http_basic", "done"}


def secrets_config(make_config: Callable[..., Path], echo: EchoServices, mail: SmtpSink) -> Path:
    return make_config(
        intake={"signing_key": SIGNING_KEY, "signing_keys": [ROTATED_KEY]},
        admin={"token": ADMIN_TOKEN},
        connectors={
            "email": {"host": mail.host, "port": mail.port, "from": "Team <noreply@example.com>",
                      "username": SMTP_USER, "password": SMTP_PASSWORD, "starttls": False},
            "slack": {"base_url": f"{echo.url}/slack", "token": SLACK_TOKEN,
                      "webhook_url": f"{echo.url}/hooks/{SLACK_HOOK}"},
            "hubspot": {"base_url": f"{echo.url}/hubspot", "token": HUBSPOT_TOKEN},
            "http": {"timeout_seconds": 5, "auth": {
                "crm": {"type": "bearer", "token": HTTP_TOKEN},
                "basic": {"type": "basic", "username": HTTP_USER, "password": HTTP_PASSWORD}}},
            "vivocalendar": {"base_url": f"{echo.url}/vivo", "token": VIVO_TOKEN, "sso_issuer": "vivoflow",
                             "sso_private_key": SSO_KEY},
        },
    )


def found_secrets(artefacts: dict[str, str]) -> list[str]:
    return [f"{form} in {where}" for where, text in artefacts.items() for form, value in FORMS.items()
            if value in text]


def store_dump(database: str) -> str:
    """Every row of every table (all columns), as SQL text: nothing is left out by a schema we forgot."""
    with sqlite3.connect(database) as conn:
        return "\n".join(conn.iterdump())


def broker_dump(url: str, namespace: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return "\n".join(repr((key, client.dump(key))) for key in client.scan_iter(match=f"{namespace}*"))
    finally:
        client.close()


def cli(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "workers.cli", "-v", "--config", str(config), *args],
                            capture_output=True, text=True, timeout=60, cwd=config.parent)
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_no_secret_reaches_any_artefact_of_a_run_that_offers_them_everywhere(
    make_config: Callable[..., Path], recipes_dir: Path, echo: EchoServices, mail: SmtpSink,
    all_logs: pytest.LogCaptureFixture, redis_url: str, namespace: str,
) -> None:
    (recipes_dir / "secrets-probe.yaml").write_text(RECIPE.format(echo=echo.url))
    config = secrets_config(make_config, echo, mail)
    event = config.parent / "event.json"
    event.write_text((FIXTURES / "invitee.created.json").read_text())

    with Vivoflow(config) as flow:
        body = event.read_bytes()
        response = flow.post(body, key=ROTATED_KEY)
        assert response.status_code == 202, response.text
        [run] = flow.wait_for_runs(response.json()["delivery_id"], timeout=20)
        steps = {s["step_id"]: s for s in flow.store.steps_of(run["id"])}
        app = flow.worker_app
        assert app is not None
        reprs = {
            "repr(config)": repr(flow.config) + str(flow.config),
            "repr(config sections)": " ".join(repr(s) for _, s in flow.config if isinstance(s, BaseModel)),
            "repr(connector configs)": " ".join(repr(app.registry.config_of(n)) for n in app.registry.classes),
            "repr(connectors)": " ".join(f"{app.registry.instance(n)!r} {app.registry.instance(n)}"
                                         for n in app.registry.classes),
            "repr(app)": repr(app),
        }
        database = flow.store.engine.url.database

    # The run really met every credential: the echoes made the services' failures happen.
    assert mail.messages and {s for s, step in steps.items() if step["status"] == "succeeded"} == SUCCEEDED, steps
    assert len(echo.service.received()) >= 9
    errors = {f"error of {s}": step["error"] or "" for s, step in steps.items()}
    assert all(errors[f"error of {s}"] for s in steps if s not in SUCCEEDED), errors

    artefacts = {
        **errors,
        "run reason": run["reason"] or "",
        "log": "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in all_logs.records
                         if not r.name.startswith("mail.log")),  # the test's SMTP server, not vivoflow
        "store": store_dump(database),
        "broker": broker_dump(redis_url, namespace),
        "try --send": cli(config, "try", "secrets-probe", "--event", str(event), "--send"),
        "runs show": cli(config, "runs", "show", run["id"]),
        **reprs,
    }
    assert "step email_echo (email.send): failed" in artefacts["try --send"], artefacts["try --send"]
    assert run["id"] in artefacts["runs show"]

    leaks = found_secrets(artefacts)
    assert leaks == [], "\n".join(leaks)


def test_the_search_finds_a_secret_where_there_is_one() -> None:
    """The check above cannot pass by looking in the wrong way."""
    found = found_secrets({"a log": f"Authorization: Basic {_b64(f'{HTTP_USER}:{HTTP_PASSWORD}')}",
                           "an error": f"token {VIVO_TOKEN} refused", "clean": "nothing to see"})

    assert {"http.auth.basic (Basic header) in a log", "vivocalendar.token in an error"} <= set(found)
    assert not [f for f in found if f.endswith(" in clean")]
