"""End to end: event values are escaped for where they land (SPEC §6), through one running vivoflow.

A hostile invitee goes webhook → intake → worker → recipe → a fake Slack and a real SMTP server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FIXTURES, Vivoflow
from tests.smtp_server import SmtpSink
from tests.test_slack_connector import TOKEN, FakeSlack

NAME = "<!channel> Eve <b>x</b>\r\nBcc: victim@example.org"
REASON = "<script>alert(1)</script> & more"
VICTIM = "victim@example.org"

RECIPE = """
on: invitee.canceled
steps:
  - id: tell_sales
    use: slack.post_message
    with: {channel: "#sales", text: "<!here> {{ invitee.name }} canceled: {{ reason }}"}
  - id: tell_team
    use: email.send
    with:
      to: team@example.com
      subject: "Canceled: {{ invitee.name }}"
      html: "<p>{{ invitee.name }} said {{ reason }}</p>"
"""

# Escaped for Slack (& < >) and for HTML; the CRLF stays in bodies, where it is only text.
SLACK_NAME = "&lt;!channel&gt; Eve &lt;b&gt;x&lt;/b&gt;\r\nBcc: victim@example.org"
SLACK_TEXT = f"<!here> {SLACK_NAME} canceled: &lt;script&gt;alert(1)&lt;/script&gt; &amp; more"
HTML = (
    "<p>&lt;!channel&gt; Eve &lt;b&gt;x&lt;/b&gt;\r\nBcc: victim@example.org said "
    "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more</p>"
)


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack()
    with fake.service:
        yield fake


def canceled_body(*, name: str = NAME, email: str | None = None) -> bytes:
    """The shipped invitee.canceled sample with a hostile name, reason and (optionally) email."""
    event = json.loads((FIXTURES / "invitee.canceled.json").read_text())
    payload = event["payload"]
    payload["name"] = payload["first_name"] = name
    payload["cancellation"]["reason"] = REASON
    if email is not None:
        payload["email"] = email
    return json.dumps(event).encode()


def run_once(config: Path, body: bytes) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Post ``body`` to a fresh vivoflow; its one finished run and that run's steps by id."""
    with Vivoflow(config) as vivoflow:
        response = vivoflow.post(body)
        assert response.status_code == 202, response.text
        [run] = vivoflow.wait_for_runs(response.json()["delivery_id"])
        steps = {s["step_id"]: s for s in vivoflow.store.steps_of(run["id"])}
    return run, steps


def test_hostile_invitee_is_escaped_in_slack_html_and_headers(
    fake_slack: FakeSlack, smtp_sink: SmtpSink, make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    (recipes_dir / "escaping.yaml").write_text(RECIPE)
    config = make_config(smtp_port=smtp_sink.port,
                         connectors={"slack": {"base_url": fake_slack.url, "token": TOKEN}})

    run, steps = run_once(config, canceled_body())

    assert run["status"] == "succeeded", (run, steps)
    assert {k: s["status"] for k, s in steps.items()} == {"tell_sales": "succeeded", "tell_team": "succeeded"}

    # Slack: the invitee's <!channel> pings nobody; the author's <!here> still does.
    [request] = fake_slack.received("/chat.postMessage")
    assert request.json == {"channel": "#sales", "text": SLACK_TEXT}
    assert "<!channel>" not in request.json["text"] and "<b>" not in request.json["text"]

    # Email: one message, to the team only; the name's "Bcc:" line is no header.
    [message] = smtp_sink.wait_for(1)
    assert len(smtp_sink.messages) == 1
    assert message.rcpt_tos == ["team@example.com"]
    assert all(VICTIM not in m.rcpt_tos for m in smtp_sink.messages)
    head = message.raw.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"^bcc\s*:", head, re.IGNORECASE | re.MULTILINE), head
    assert message["Bcc"] is None
    assert message["To"] == "team@example.com"
    subject = message["Subject"]
    assert subject == "Canceled: <!channel> Eve <b>x</b> Bcc: victim@example.org"
    assert "\r" not in subject and "\n" not in subject

    html_part = message.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    assert html.startswith("<p>") and html.rstrip().endswith("</p>")  # the recipe's own markup stays
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html and "<script>" not in html

    # The run history stores what was sent: the escaped values, not the raw event.
    assert steps["tell_sales"]["input"]["text"] == SLACK_TEXT
    assert steps["tell_team"]["input"]["html"] == HTML
    assert steps["tell_team"]["input"]["subject"] == subject


INJECTION = "jamie@example.com\r\nBcc: victim@example.org"


@pytest.mark.parametrize(("field", "fields"), [
    ("to", 'to: "{{ invitee.email }}"'),
    ("reply_to", 'to: team@example.com\n      reply_to: "{{ invitee.email }}"'),
])
def test_line_break_in_an_address_fails_the_step_and_mails_nobody(
    smtp_sink: SmtpSink, make_config: Callable[..., Path], recipes_dir: Path, field: str, fields: str
) -> None:
    (recipes_dir / "win-back.yaml").write_text(f"""
on: invitee.canceled
steps:
  - id: win_back
    use: email.send
    with:
      {fields}
      subject: "Sorry we missed you, {{{{ invitee.first_name }}}}"
      text: "Book again: {{{{ invitee.reschedule_url }}}}"
""")

    run, steps = run_once(make_config(smtp_port=smtp_sink.port), canceled_body(name="Jamie", email=INJECTION))

    assert run["status"] == "failed"
    assert run["reason"] == "1 step(s) failed"
    step = steps["win_back"]
    assert step["status"] == "failed"
    assert step["attempts"] == 1  # permanent: no retry was scheduled
    assert step["error"].startswith(f"invalid input: {field}: ")
    assert "contains a line break" in step["error"]
    # The run is final and the step never reached the connector: nothing can still arrive.
    assert smtp_sink.messages == []
