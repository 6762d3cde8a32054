"""A fake remote service for connector tests: any ASGI app served by uvicorn on 127.0.0.1 in a thread.

It records every request it gets (method, path, query, headers, body) so a test asserts on the wire.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.harness import wait_until
from tests.smtp_server import HOST, free_port


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the service received it; header names are lower case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


class FakeService:
    """Serves ``app`` on a free local port; ``url`` is its base URL, ``requests`` what it received."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = uvicorn.Server(uvicorn.Config(
            self._recording, host=HOST, port=self.port, log_level="warning", lifespan="off", interface="asgi3",
        ))
        self._thread: threading.Thread | None = None

    async def _recording(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body, record the request, then hand the app the same body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            self.requests.append(RecordedRequest(
                scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), headers, body,
            ))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a real receive does

        await self.app(scope, replay, send)

    def received(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """The requests so far, optionally only those with this method and path."""
        with self._lock:
            found = list(self.requests)
        return [r for r in found if (method is None or r.method == method) and (path is None or r.path == path)]

    def start(self) -> FakeService:
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, timeout=10)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeService:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
