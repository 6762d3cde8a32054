"""Fixtures of the hostile-input suite: the intake in-process and over HTTP, and a clean-log check.

The session's Redis and each test's namespace and config come from ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.inprocess import InProcessIntake

#: Loggers that do not propagate to the root logger caplog listens on (uvicorn configures its own).
UNPROPAGATED = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture
def inprocess(make_config: Callable[..., Path]) -> Iterator[Callable[..., InProcessIntake]]:
    """Build the intake's ASGI app from this test's config (``sections`` changed); closed afterwards."""
    built: list[InProcessIntake] = []

    def build(**sections: Any) -> InProcessIntake:
        intake = InProcessIntake(make_config(**sections))
        built.append(intake)
        return intake

    yield build
    for intake in built:
        intake.close()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG, also hearing the loggers that do not propagate to the root."""
    caplog.set_level(logging.DEBUG)
    for name in UNPROPAGATED:
        logging.getLogger(name).addHandler(caplog.handler)
    yield caplog
    for name in UNPROPAGATED:
        logging.getLogger(name).removeHandler(caplog.handler)


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """No record carries an exception or says Traceback: every refusal was an answer, not a crash."""
    crashed = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not crashed, [f"{r.name}: {r.getMessage()}" for r in crashed]
