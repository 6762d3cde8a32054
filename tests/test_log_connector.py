"""log.write: the rendered message lands in the worker's log, as written."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from connectors.base import ActionCall
from connectors.log import LogConfig, LogConnector, WriteInput


def test_write_logs_the_message_at_info(caplog: pytest.LogCaptureFixture) -> None:
    conn = LogConnector(LogConfig())
    with caplog.at_level(logging.INFO, logger="vivoflow.connectors.log"):
        call = ActionCall("r1", "s1", "r1:s1")
        out = conn.run("write", WriteInput(message="Jamie booked Intro call"), call)
    assert out is None
    [record] = [r for r in caplog.records if r.name == "vivoflow.connectors.log"]
    assert (record.levelno, record.getMessage()) == (logging.INFO, "Jamie booked Intro call")


def test_message_is_required_and_nothing_else_is_accepted() -> None:
    with pytest.raises(ValidationError):
        WriteInput.model_validate({})
    with pytest.raises(ValidationError):
        WriteInput.model_validate({"message": "x", "level": "debug"})


def test_config_takes_no_settings() -> None:
    assert LogConfig.model_validate({}) == LogConfig()
    with pytest.raises(ValidationError):
        LogConfig.model_validate({"level": "debug"})


def test_connector_declares_its_action() -> None:
    assert LogConnector.name == "log"
    assert LogConnector.actions["write"].input_model is WriteInput
    assert LogConnector.actions["write"].description == "Log a message at INFO."
