"""Line breaks in an invitee's answers never reach an email header (SPEC §6).

tests/test_escaping.py proves it for the invitee's name and addresses; answers to booking questions
are free text too, reached as ``invitee.answers[...]``, in a loop, or through the raw ``payload``.
The message goes webhook → intake → worker → a real SMTP server, and the wire bytes are checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from tests.harness import FIXTURES, Vivoflow
from tests.smtp_server import SmtpSink

VICTIM = "victim@example.org"
#: Every character some mail parser may read as the end of a header line, each starting a header.
ANSWERS = {
    "Company": f"ACME\r\nBcc: {VICTIM}",
    "What would you like to discuss?": "pricing\nX-Injected: lf",
    "Role": "cto\rX-Injected: cr",
    "Team": f"ops\u2028Cc: {VICTIM}",
    "Budget": f"10k\x85To: {VICTIM}",
    "Notes": "a\x0bb\x0cc\r\n\r\nbody injected",
}
RECIPE = """
on: invitee.created
steps:
  - id: notify
    use: email.send
    with:
      to: team@example.com
      subject: "{{ invitee.answers['Company'] }} | {% for q, a in invitee.answers.items() %}{{ a }} {% endfor %}| {{ payload.questions_and_answers[0].answer }}"
      text: "{{ invitee.answers['Company'] }}"
"""  # noqa: E501 - the subject is one line on purpose


def booking_with_answers() -> bytes:
    event = json.loads((FIXTURES / "invitee.created.json").read_text())
    event["payload"]["questions_and_answers"] = [
        {"question": question, "answer": answer, "position": i} for i, (question, answer) in enumerate(ANSWERS.items())
    ]
    return json.dumps(event).encode()


def test_line_breaks_in_answers_used_in_a_subject_never_start_a_header(
    smtp_sink: SmtpSink, make_config: Callable[..., Path], recipes_dir: Path,
) -> None:
    (recipes_dir / "answers.yaml").write_text(RECIPE)

    with Vivoflow(make_config(smtp_port=smtp_sink.port)) as vivoflow:
        response = vivoflow.post(booking_with_answers())
        assert response.status_code == 202, response.text
        [run] = vivoflow.wait_for_runs(response.json()["delivery_id"])
        [step] = vivoflow.store.steps_of(run["id"])

    assert run["status"] == "succeeded", step
    [message] = smtp_sink.wait_for(1)
    assert message.rcpt_tos == ["team@example.com"]
    head = message.raw.split(b"\r\n\r\n", 1)[0]
    header_names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert b"bcc" not in header_names and b"x-injected" not in header_names, head
    assert header_names.count(b"to") == 1 and b"cc" not in header_names, head
    assert not re.search(rb"^(bcc|cc|x-injected)\s*:", head, re.IGNORECASE | re.MULTILINE), head
    subject = message["Subject"]
    assert not re.search(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", subject), repr(subject)
    assert subject.startswith(f"ACME Bcc: {VICTIM} | ACME Bcc: {VICTIM} pricing X-Injected: lf")
    assert subject.endswith(f"| ACME Bcc: {VICTIM}")
    # The history shows what was sent: the folded subject, not the raw answer.
    assert step["input"]["subject"] == subject
