"""The ``smtp_sink`` pytest fixture: a real SMTP server per test, stopped afterwards.

Import it into a test module (``from tests.conftest_smtp import smtp_sink``) or a conftest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.smtp_server import SmtpSink


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """An accepting SMTP server on 127.0.0.1 (``.host``, ``.port``); see SmtpSink for failing ones."""
    with SmtpSink() as sink:
        yield sink
