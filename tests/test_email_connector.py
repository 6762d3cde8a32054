"""email.send against a real SMTP server (aiosmtpd), and into the outbox when no host is set.

STARTTLS itself is not exercised: the sink has no certificate; only its absence is (a config error).
"""

from __future__ import annotations

import logging
import socket
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
from pydantic import ValidationError

from connectors.base import ActionCall, RenderAs
from connectors.email import EmailConfig, EmailConnector, SendInput
from tests.smtp_server import SmtpSink, free_port
from workers.errors import PermanentStepError, RetryableStepError

# Registers the smtp_sink fixture (an import would work too, but ruff reads it as shadowed: F811).
pytest_plugins = ["tests.conftest_smtp"]

PARIS = ZoneInfo("Europe/Paris")
EVENT: dict[str, Any] = {
    "invitee": {"name": "Jamie Doe", "email": "jamie@example.com"},
    "meeting": {
        "name": "Intro call",
        "start_time": datetime(2025, 3, 4, 10, 30, tzinfo=PARIS),
        "end_time": datetime(2025, 3, 4, 11, 0, tzinfo=PARIS),
        "location": {"type": "zoom", "join_url": "https://zoom.example/j/1"},
        "uri": "https://api.vivocalendar.com/scheduled_events/EV1",
    },
}


def connector(tmp_path: Path, **settings: Any) -> EmailConnector:
    raw = {"from": "Team <noreply@example.com>", **settings}
    return EmailConnector(EmailConfig.model_validate(raw, context={"base_dir": tmp_path}))


def smtp(tmp_path: Path, sink: SmtpSink, **settings: Any) -> EmailConnector:
    return connector(tmp_path, host=sink.host, port=sink.port, starttls=False, timeout_seconds=5, **settings)


def send(conn: EmailConnector, key: str = "r1:s1", event: dict[str, Any] | None = None, **inputs: Any) -> Any:
    fields = {"to": "jamie@example.com", "subject": "Hello", **inputs}
    if "text" not in fields and "html" not in fields:
        fields["text"] = "Hi there"
    run_id, _, step_id = key.partition(":")
    return conn.run("send", SendInput(**fields), ActionCall(run_id, step_id, key, event or EVENT))


def test_text_only_is_text_plain(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), text="Plain body")
    [msg] = smtp_sink.wait_for(1)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Plain body"
    assert msg["From"] == "Team <noreply@example.com>"
    assert msg["Date"]
    assert msg.mail_from == "noreply@example.com"


def test_html_only_is_text_html(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), html="<p>Hi</p>")
    [msg] = smtp_sink.wait_for(1)
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>Hi</p>"


def test_text_and_html_make_multipart_alternative(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), text="Plain", html="<b>Rich</b>")
    [msg] = smtp_sink.wait_for(1)
    assert msg.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg.get_body(("html",)).get_content().strip() == "<b>Rich</b>"


def test_bcc_receives_but_is_not_in_headers(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(
        smtp(tmp_path, smtp_sink),
        to=["Jamie <jamie@example.com>", "al@example.com"],
        cc="cc@example.com",
        bcc="Secret <hidden@example.com>",
    )
    [msg] = smtp_sink.wait_for(1)
    everyone = ["al@example.com", "cc@example.com", "hidden@example.com", "jamie@example.com"]
    assert sorted(msg.rcpt_tos) == everyone
    assert msg["To"] == "Jamie <jamie@example.com>, al@example.com"
    assert msg["Cc"] == "cc@example.com"
    assert msg["Bcc"] is None
    assert b"hidden@example.com" not in msg.raw


def test_comma_separated_string_is_split(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), to='a@example.com, "Doe, Bob" <bob@example.com>,')
    [msg] = smtp_sink.wait_for(1)
    assert msg.rcpt_tos == ["a@example.com", "bob@example.com"]
    assert [a.display_name for a in msg["To"].addresses] == ["", "Doe, Bob"]


def test_reply_to_is_set(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), reply_to="Sales <sales@example.com>")
    [msg] = smtp_sink.wait_for(1)
    assert msg["Reply-To"] == "Sales <sales@example.com>"


def test_message_id_is_the_same_for_the_same_step(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    conn = smtp(tmp_path, smtp_sink)
    first = send(conn, key="r1:s1")["message_id"]
    again = send(conn, key="r1:s1")["message_id"]
    other = send(conn, key="r2:s1")["message_id"]
    messages = smtp_sink.wait_for(3)
    assert first == again != other
    assert first.startswith("<") and first.endswith("@example.com>")
    assert [m["Message-ID"] for m in messages] == [first, again, other]


def test_subject_line_break_cannot_inject_a_header(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), subject="Hi\r\nBcc: evil@example.net")
    [msg] = smtp_sink.wait_for(1)
    assert msg["Subject"] == "Hi Bcc: evil@example.net"
    assert msg["Bcc"] is None
    assert msg.rcpt_tos == ["jamie@example.com"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("to", "jamie@example.com\r\nBcc: evil@example.net"),
        ("cc", ["ok@example.com", "x@example.com\nBcc: evil@example.net"]),
        ("reply_to", "a@example.com\rX: y"),
        ("to", "not an address"),
        ("to", "jamie@example.com>"),
        ("bcc", "@example.com"),
        ("to", ""),
    ],
)
def test_bad_address_is_rejected_by_the_input_model(field: str, value: Any) -> None:
    fields = {"to": "jamie@example.com", "subject": "Hi", "text": "x", field: value}
    with pytest.raises(ValidationError):
        SendInput(**fields)


def test_event_values_are_escaped_for_where_they_land() -> None:
    # html escapes event values; the subject folds line breaks; addresses keep them, to be rejected.
    kinds = EmailConnector.actions["send"].render_kinds()
    assert (kinds["html"], kinds["subject"], kinds["to"]) == (RenderAs.HTML, RenderAs.HEADER, RenderAs.TEXT)


def test_a_body_is_required() -> None:
    with pytest.raises(ValidationError, match="give text or html"):
        SendInput(to="jamie@example.com", subject="Hi")


def test_from_must_be_one_valid_address(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="from"):
        EmailConfig.model_validate({"from": "nobody"})


def test_outbox_writes_one_eml_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    conn = connector(tmp_path / "conf")  # outbox_dir defaults to data/outbox beside the config
    with caplog.at_level(logging.INFO, logger="vivoflow.connectors.email"):
        first = send(conn, key="r1:s1", subject="Your booking")
        [record] = [r for r in caplog.records if r.name == "vivoflow.connectors.email"]
    second = send(conn, key="r1:s1", subject="Your booking")
    send(conn, key="r1:s2")
    outbox = tmp_path / "conf" / "data" / "outbox"
    files = sorted(p.name for p in outbox.iterdir())
    assert len(files) == 2 and all(name.endswith(".eml") for name in files)
    assert first == second and Path(first["path"]).parent == outbox
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f'email to jamie@example.com "Your booking" written to conf/data/outbox/{Path(first["path"]).name}'
        " (no SMTP host set)"
    )
    saved = Path(first["path"]).read_bytes()
    assert b"Subject: Your booking" in saved and first["message_id"].encode() in saved


def test_ics_attachment_carries_the_meeting(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    send(smtp(tmp_path, smtp_sink), text="See you", html="<p>See you</p>", ics=True)
    [msg] = smtp_sink.wait_for(1)
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_content_type() == "text/calendar"
    assert attachment.get_filename() == "invite.ics"
    assert attachment.get_param("method") == "PUBLISH"
    calendar = icalendar.Calendar.from_ical(attachment.get_content())
    [vevent] = calendar.walk("VEVENT")
    assert vevent.decoded("dtstart") == EVENT["meeting"]["start_time"]
    assert vevent.decoded("dtend") == EVENT["meeting"]["end_time"]
    assert str(vevent["summary"]) == "Intro call"
    assert str(vevent["location"]) == "https://zoom.example/j/1"
    assert str(vevent["attendee"]) == "mailto:jamie@example.com"
    assert str(calendar["method"]) == "PUBLISH"
    assert msg.get_body(("plain",)).get_content().strip() == "See you"


def test_ics_uid_follows_the_meeting(tmp_path: Path) -> None:
    conn = connector(tmp_path)

    def uid(key: str, event: dict[str, Any]) -> str:
        path = Path(send(conn, key=key, ics=True, event=event)["path"])
        calendar = icalendar.Calendar.from_ical(_attachment(path))
        return str(calendar.walk("VEVENT")[0]["uid"])

    moved = {
        **EVENT,
        "meeting": {**EVENT["meeting"], "uri": "https://api.vivocalendar.com/scheduled_events/EV2"},
    }
    assert uid("r1:s1", EVENT) == uid("r2:s1", EVENT) != uid("r3:s1", moved)


def test_ics_without_a_meeting_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentStepError, match="no meeting"):
        send(connector(tmp_path), ics=True, event={"submission": {"answers": {}}})


@pytest.mark.parametrize(
    "sink_settings, error, server_text",
    [
        ({"rcpt_replies": {"*": "451 4.3.0 try later"}}, RetryableStepError, "try later"),
        ({"rcpt_replies": {"*": "550 5.1.1 no such user"}}, PermanentStepError, "no such user"),
        ({"data_reply": "452 4.3.1 out of storage"}, RetryableStepError, "out of storage"),
        ({"data_reply": "554 5.7.1 rejected as spam"}, PermanentStepError, "rejected as spam"),
    ],
)
def test_server_replies_classify_the_error(
    tmp_path: Path, sink_settings: dict[str, Any], error: type[Exception], server_text: str
) -> None:
    with SmtpSink(**sink_settings) as sink:
        with pytest.raises(error, match=server_text) as raised:
            send(smtp(tmp_path, sink))
        assert type(raised.value) is error
        assert sink.messages == []


def test_some_recipients_refused_still_sends_to_the_others(tmp_path: Path) -> None:
    with SmtpSink(rcpt_replies={"gone@example.com": "550 5.1.1 no such user"}) as sink:
        out = send(smtp(tmp_path, sink), to="jamie@example.com, gone@example.com")
        [msg] = sink.wait_for(1)
    assert msg.rcpt_tos == ["jamie@example.com"]
    assert "no such user" in out["refused"]["gone@example.com"]


def test_refused_connection_is_retryable(tmp_path: Path) -> None:
    conn = connector(tmp_path, host="127.0.0.1", port=free_port(), starttls=False, password="hunter2-secret")
    with pytest.raises(RetryableStepError, match="127.0.0.1") as raised:
        send(conn)
    assert "hunter2-secret" not in str(raised.value)


def test_silent_server_times_out_as_retryable(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        conn = connector(tmp_path, host="127.0.0.1", port=port, starttls=False, timeout_seconds=0.3)
        with pytest.raises(RetryableStepError, match="timed out"):
            send(conn)


def test_starttls_required_but_not_offered_is_permanent(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    conn = connector(tmp_path, host=smtp_sink.host, port=smtp_sink.port, starttls=True)
    with pytest.raises(PermanentStepError, match="connectors.email.starttls: false"):
        send(conn)
    assert smtp_sink.messages == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # aiosmtpd warns about AUTH without TLS: a test server
def test_login_failure_is_permanent_and_never_shows_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-Pa55word"
    with SmtpSink(users={"bot": "the-right-one"}) as sink, caplog.at_level(logging.DEBUG):
        conn = smtp(tmp_path, sink, username="bot", password=secret)
        with pytest.raises(PermanentStepError, match="535") as raised:
            send(conn)
    assert secret not in str(raised.value)
    assert secret not in repr(conn.config) and secret not in str(conn.config)
    assert secret not in caplog.text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_login_with_the_right_password_sends(tmp_path: Path) -> None:
    with SmtpSink(users={"bot": "the-right-one"}) as sink:
        send(smtp(tmp_path, sink, username="bot", password="the-right-one"))
        assert len(sink.wait_for(1)) == 1


def _attachment(eml: Path) -> bytes:
    from email import message_from_bytes, policy

    msg = message_from_bytes(eml.read_bytes(), policy=policy.default)
    [part] = list(msg.iter_attachments())  # type: ignore[attr-defined]
    return part.get_content().encode()
