"""The intake: verify, store and enqueue Vivocalendar webhooks (SPEC §4).

It answers fast and never runs recipes: a delivery is stored once per dedupe
key and put on the queue; workers do the rest. Nothing is kept for a request
it refuses, and a broker or store that does not answer is a 503 the sender
retries, never a half-written delivery.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from workers.admission import Unavailable
from workers.app import App
from workers.dashboard import dashboard_routes
from workers.events import EnvelopeHead, delivery_facts
from workers.metrics import CONTENT_TYPE_LATEST, exposition, process_metrics
from workers.signing import SIGNATURE_HEADERS, SignatureError, verify

log = logging.getLogger("vivoflow.intake")

#: The ``outcome`` label of ``vivoflow_webhooks`` for each answer.
OUTCOMES = {202: "accepted", 200: "duplicate", 401: "unauthorized", 413: "too_large", 400: "bad_request",
            408: "timeout", 503: "unavailable", 500: "error"}


class BodyTooLarge(Exception):
    pass


async def read_limited(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The raw body, refused as soon as it passes ``limit`` bytes (never buffered past it)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse(body: bytes) -> EnvelopeHead:
    """The envelope's head, parsed by the parser the workers use; ``ValueError`` says what is wrong.

    Only a refused body is looked at again (by ``json``), to tell malformed JSON from JSON of
    the wrong shape: the accepted path pays for one parse.
    """
    try:
        return EnvelopeHead.model_validate_json(body)
    except ValidationError as exc:
        problem = exc
    try:
        data: Any = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ValueError("body is not valid UTF-8 JSON") from None
    shaped = isinstance(data, dict) and isinstance(data.get("event"), str) and isinstance(data.get("payload"), dict)
    if not shaped:
        raise ValueError("body must be a JSON object with 'event' (a string) and 'payload' (an object)")
    err = problem.errors()[0]
    where = ".".join(map(str, err["loc"]))
    raise ValueError(f"{where}: {err['msg']}" if where else err["msg"])


class Webhook:
    """``POST {intake.path}`` as a bare ASGI app, the one path that takes the flood.

    Starlette's request and response objects cost about as much as storing the delivery
    does once deliveries are written in batches; here the headers are read straight from
    the ASGI scope and the answer is two ``send`` calls. Everything else the intake serves
    goes through Starlette.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.config.intake
        counter = process_metrics().webhooks
        # The labelled children looked up once: ``labels()`` takes a lock and builds a key per call.
        self.counted = {status: counter.labels(outcome) for status, outcome in OUTCOMES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, answer, close = await self.answer(scope, receive)
        except Exception:  # a bug: one JSON line for the sender, the trace for us
            log.exception("webhook failed")
            status, answer, close = 500, {"error": "internal error"}, False
        self.counted[status].inc()
        body = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            # After a refused body: otherwise the server keeps reading (and discarding)
            # whatever the client goes on sending on that connection.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def answer(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], bool]:
        """``(status, JSON answer, close the connection)`` for one webhook (SPEC §4)."""
        settings = self.settings
        wanted: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _WANTED_HEADERS and name not in wanted:  # the first of repeated headers, as Starlette
                wanted[name] = value
        try:
            async with asyncio.timeout(settings.read_timeout_seconds):
                body = await read_limited(receive, wanted.get(b"content-length"), settings.max_body_bytes)
        except BodyTooLarge:
            return 413, {"error": f"body larger than {settings.max_body_bytes} bytes"}, True
        except TimeoutError:
            return 408, {"error": "body not received in time"}, True
        except ClientDisconnect:
            return 400, {"error": "client disconnected"}, False
        header = next((wanted[h].decode("latin-1") for h in _SIGNATURE_HEADERS if h in wanted), None)
        try:
            verify(header, body, self.app.signing_keys(), tolerance=settings.tolerance_seconds)
        except SignatureError as exc:
            return 401, {"error": str(exc)}, False
        try:
            envelope = parse(body)
        except ValueError as exc:
            return 400, {"error": str(exc)}, False
        facts = delivery_facts(envelope, body)
        try:
            admitted = await self.app.admission.admit({
                "dedupe_key": facts.dedupe_key, "event": facts.event, "payload_uri": facts.uri,
                "invitee_uri": facts.invitee_uri, "sender_created_at": facts.sender_created_at,
                "body": body.decode("utf-8"),
            })
        except Unavailable as exc:
            return 503, {"error": str(exc)}, False
        answer = {"delivery_id": admitted.delivery_id, "duplicate": admitted.duplicate}
        return (200 if admitted.duplicate else 202), answer, False


_SIGNATURE_HEADERS = tuple(h.encode() for h in SIGNATURE_HEADERS)
_WANTED_HEADERS = frozenset({b"content-length", *_SIGNATURE_HEADERS})


class Intake(Starlette):
    """The intake's routes, with the webhook path dispatched before Starlette's routing."""

    def __init__(self, webhook: Webhook, path: str, routes: list[BaseRoute]) -> None:
        super().__init__(routes=routes)
        self.webhook = webhook
        self.webhook_path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.webhook_path:
            await self.webhook(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_intake(app: App) -> Intake:
    """The ASGI application: the webhook path, ``/healthz``, ``/readyz``, ``/metrics`` and the dashboard."""
    intake = app.config.intake
    webhook = Webhook(app)

    async def metrics_endpoint(request: Request) -> Response:
        body = await run_in_threadpool(exposition, app)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        checks = await run_in_threadpool(app.readiness)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", **checks}, status_code=200 if ready else 503)

    return Intake(webhook, intake.path, [
        Route(intake.path, webhook, methods=["POST"]),  # reached only for a GET and the like: a 405
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *dashboard_routes(app),  # last: pages and /api/, behind the admin token (workers.dashboard_access)
    ])
