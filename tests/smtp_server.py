"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, collecting what it receives.

It can also answer RCPT or DATA with a chosen reply (``451 …``, ``550 …``) and require a login.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"


class ReceivedMessage(EmailMessage):
    """A message as delivered (``email.policy.default``), with its SMTP envelope beside it."""

    def __init__(self, policy: Any = None) -> None:
        super().__init__(policy=policy)
        self.mail_from: str = ""
        #: The envelope recipients: every address that gets a copy, Bcc included.
        self.rcpt_tos: list[str] = []
        #: The bytes as received, for checks on the wire format (no Bcc header…).
        self.raw: bytes = b""


class _Handler:
    """aiosmtpd hooks; replies configured on the sink let a test play a failing server."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.sink.rcpt_replies.get(address) or self.sink.rcpt_replies.get("*")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_reply:
            return self.sink.data_reply
        self.sink._receive(envelope)
        return "250 Message accepted for delivery"


class SmtpSink:
    """An SMTP server in a thread; ``messages`` fills as mail arrives, ``wait_for`` waits for it.

    ``rcpt_replies`` maps a recipient (or ``"*"`` for all) to the reply RCPT gets instead of 250;
    ``data_reply`` replaces DATA's 250; ``users`` (login → password) turns on AUTH (over plain
    text: the sink has no certificate, so no STARTTLS either).
    """

    def __init__(
        self,
        *,
        rcpt_replies: Mapping[str, str] | None = None,
        data_reply: str | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.rcpt_replies = dict(rcpt_replies or {})
        self.data_reply = data_reply
        self.users = dict(users or {})
        self.host = HOST
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self._arrived = threading.Condition()
        self._controller: Controller | None = None

    def start(self, port: int | None = None) -> SmtpSink:
        """Listen on ``port`` (one a test reserved, to bring a server up where mail was failing) or a free one."""
        self.port = port or free_port()
        auth: dict[str, Any] = {}
        if self.users:
            auth = {"authenticator": self._authenticate, "auth_require_tls": False}
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port, **auth)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def wait_for(self, count: int = 1, timeout: float = 20.0) -> list[ReceivedMessage]:
        """The messages once at least ``count`` have arrived; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = len(self.messages)
                    raise AssertionError(f"expected {count} message(s) within {timeout}s, got {got}")
                self._arrived.wait(left)
            return list(self.messages)

    def _receive(self, envelope: Envelope) -> None:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        message = BytesParser(ReceivedMessage, policy=default).parsebytes(raw)
        assert isinstance(message, ReceivedMessage)
        message.mail_from = envelope.mail_from or ""
        message.rcpt_tos = list(envelope.rcpt_tos)
        message.raw = raw
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        # handled=False: aiosmtpd then sends its own 535 reply on a failure.
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            if login in self.users and self.users[login] == password:
                return AuthResult(success=True, handled=False, auth_data=auth_data)
        return AuthResult(success=False, handled=False)


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; a race with others is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])
