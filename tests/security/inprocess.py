"""The intake's ASGI application driven in-process: a request in, the answer out, no socket.

For properties checked over hundreds of requests; the real-HTTP tests use ``tests.harness.Vivoflow``.
The app, its store and its Redis broker are the real ones, built from a config file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa

from workers.app import App
from workers.config import load_config
from workers.intake import create_intake
from workers.schema import deliveries


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class InProcessIntake:
    """``post`` sends raw bytes and raw header pairs straight to the intake's ASGI app."""

    def __init__(self, config_path: Path) -> None:
        self.app = App(load_config(config_path))
        self.asgi = create_intake(self.app)
        self.path = self.app.config.intake.path
        self.app.store  # noqa: B018 - schema first, as the intake does at start-up

    def post(self, body: bytes, headers: Sequence[tuple[bytes, bytes]] = (), *, chunk: int | None = None,
             path: str | None = None) -> Answer:
        """POST ``body`` with exactly ``headers``, in pieces of ``chunk`` bytes (one piece by default)."""
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
        return anyio.run(self._exchange, path or self.path, list(headers), pieces or [b""])

    async def _exchange(self, path: str, headers: list[tuple[bytes, bytes]], pieces: list[bytes]) -> Answer:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(name.lower(), value) for name, value in headers],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
        }
        incoming = [{"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
                    for i, piece in enumerate(pieces)]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.asgi(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        headers_out = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
        return Answer(start["status"], headers_out, body)

    def stored(self) -> int:
        """How many deliveries the store holds."""
        with self.app.store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar_one()

    def close(self) -> None:
        self.app.close()
