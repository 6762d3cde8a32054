"""Log lines: JSON or text, each carrying the delivery, run and step ids, and never a secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Vivoflow, fixture_body
from workers.logs import log_context, redact_secrets, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_ids_of_the_work_in_progress(restore_logging: None, capsys: Any) -> None:
    setup_logging(logging.INFO, "json")
    log = logging.getLogger("vivoflow.test")

    with log_context(delivery_id="dlv_1"):
        log.info("received")
        with log_context(run_id="run_2", step_id="send"):
            log.info("sent to %s", "jamie@example.com")
    log.info("idle")

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["msg"] for line in lines] == ["received", "sent to jamie@example.com", "idle"]
    assert lines[0]["delivery_id"] == "dlv_1" and "run_id" not in lines[0]
    assert (lines[1]["delivery_id"], lines[1]["run_id"], lines[1]["step_id"]) == ("dlv_1", "run_2", "send")
    assert "delivery_id" not in lines[2]
    assert lines[1]["level"] == "info" and lines[1]["logger"] == "vivoflow.test"


def test_text_lines_end_with_the_ids(restore_logging: None, capsys: Any) -> None:
    setup_logging(logging.INFO, "text")

    with log_context(delivery_id="dlv_1", run_id="run_2"):
        logging.getLogger("vivoflow.test").info("hello")

    assert capsys.readouterr().err.rstrip().endswith("vivoflow.test: hello [delivery=dlv_1 run=run_2]")


def test_secrets_are_replaced_in_messages_and_tracebacks(restore_logging: None, capsys: Any) -> None:
    setup_logging(logging.INFO, "json")
    redact_secrets(["xoxb-super-secret", "hunter22"])
    log = logging.getLogger("vivoflow.test")

    log.warning("token %s rejected", "xoxb-super-secret")
    try:
        raise RuntimeError("password hunter22 refused")
    except RuntimeError:
        log.exception("login failed")

    err = capsys.readouterr().err
    assert "xoxb-super-secret" not in err and "hunter22" not in err
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines[0]["msg"] == "token ******** rejected"
    assert "password ******** refused" in lines[1]["exc"]


def test_a_steps_log_lines_are_tied_to_its_run(vivoflow: Vivoflow, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)

    delivery_id = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    run = vivoflow.wait_for_runs(delivery_id)[0]

    sent = [r for r in caplog.records if r.name == "vivoflow.engine" and "step" in r.getMessage()]
    assert len(sent) == 2
    assert {(r.delivery_id, r.run_id) for r in sent} == {(delivery_id, run["id"])}  # type: ignore[attr-defined]
    assert {r.step_id for r in sent} == {"win_back", "tell_team"}  # type: ignore[attr-defined]
