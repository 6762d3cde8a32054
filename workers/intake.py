"""The intake: verify, store and enqueue Vivocalendar webhooks (SPEC §4).

It answers fast and never runs recipes: a delivery is stored once per dedupe
key and put on the queue; workers do the rest. Nothing is kept for a request
it refuses, and a broker or store that does not answer is a 503 the sender
retries, never a half-written delivery.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import redis
import sqlalchemy.exc
from dramatiq.errors import BrokerConnectionError
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from workers.app import App
from workers.dashboard import dashboard_routes
from workers.events import Envelope, delivery_facts
from workers.metrics import CONTENT_TYPE_LATEST, exposition, process_metrics
from workers.signing import SIGNATURE_HEADERS, SignatureError, verify

log = logging.getLogger("vivoflow.intake")

#: A stored delivery still unprocessed this long after it arrived is enqueued again on a duplicate.
REQUEUE_AFTER_SECONDS = 60

#: The ``outcome`` label of ``vivoflow_webhooks`` for each answer.
OUTCOMES = {202: "accepted", 200: "duplicate", 401: "unauthorized", 413: "too_large", 400: "bad_request",
            408: "timeout", 503: "unavailable"}

_STORE_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DBAPIError)
_BROKER_ERRORS = (redis.RedisError, BrokerConnectionError, OSError)


def error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    # `Connection: close` after a refused body: otherwise the server keeps reading (and
    # discarding) whatever the client goes on sending on that connection.
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it passes ``limit`` bytes (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_intake(app: App) -> Starlette:
    """The ASGI application: the webhook path, ``/healthz`` and ``/readyz``."""
    intake = app.config.intake

    def accept(envelope: Envelope, body: bytes) -> JSONResponse:
        facts = delivery_facts(envelope, body)
        try:
            delivery_id, duplicate = app.store.insert_delivery({
                "dedupe_key": facts.dedupe_key, "event": facts.event, "payload_uri": facts.uri,
                "invitee_uri": facts.invitee_uri, "sender_created_at": facts.sender_created_at,
                "body": body.decode("utf-8"),
            })
        except _STORE_ERRORS as exc:
            log.error("store unavailable: %s", type(exc).__name__)
            return error(503, "run store unavailable, retry later")
        if duplicate:
            _requeue_if_stuck(delivery_id)
            return JSONResponse({"delivery_id": delivery_id, "duplicate": True}, status_code=200)
        try:
            app.queue.delivery(delivery_id)
        except _BROKER_ERRORS as exc:
            log.error("broker unavailable: %s", type(exc).__name__)
            try:
                app.store.delete_delivery(delivery_id)
            except _STORE_ERRORS:  # the sender's retry then meets a stuck duplicate, re-enqueued below
                log.error("could not withdraw delivery %s after the broker failed", delivery_id)
            return error(503, "queue unavailable, retry later")
        log.debug("delivery %s accepted (%s)", delivery_id, facts.event)
        return JSONResponse({"delivery_id": delivery_id, "duplicate": False}, status_code=202)

    def _requeue_if_stuck(delivery_id: str) -> None:
        """A delivery stored by a process that died before enqueueing it runs on the sender's retry."""
        try:
            row = app.store.get_delivery(delivery_id)
            if row and row["processed_at"] is None and time.time() - row["received_at"] > REQUEUE_AFTER_SECONDS:
                app.queue.delivery(delivery_id)
        except (*_STORE_ERRORS, *_BROKER_ERRORS):
            pass  # the duplicate answer stands; the next retry tries again

    counter = process_metrics().webhooks

    async def webhook(request: Request) -> JSONResponse:
        response = await receive(request)
        counter.labels(OUTCOMES.get(response.status_code, str(response.status_code))).inc()
        return response

    async def receive(request: Request) -> JSONResponse:
        try:
            with anyio.fail_after(intake.read_timeout_seconds):
                body = await read_limited(request, intake.max_body_bytes)
        except BodyTooLarge:
            return error(413, f"body larger than {intake.max_body_bytes} bytes", close=True)
        except TimeoutError:
            return error(408, "body not received in time", close=True)
        except ClientDisconnect:
            return error(400, "client disconnected")
        header = next((request.headers[h] for h in SIGNATURE_HEADERS if h in request.headers), None)
        try:
            verify(header, body, app.signing_keys(), tolerance=intake.tolerance_seconds)
        except SignatureError as exc:
            return error(401, str(exc))
        try:
            data: Any = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            return error(400, "body is not valid UTF-8 JSON")
        if not isinstance(data, dict) or not isinstance(data.get("event"), str) or "payload" not in data:
            return error(400, "body must be a JSON object with 'event' (a string) and 'payload'")
        try:
            # Parsed again by the parser the workers use, so nothing is accepted that they cannot read
            # (json.loads takes lone surrogate escapes and deeper nesting than pydantic does).
            envelope = Envelope.model_validate_json(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))
            return error(400, f"{where}: {err['msg']}" if where else err["msg"])
        return await run_in_threadpool(accept, envelope, body)

    async def metrics_endpoint(request: Request) -> Response:
        body = await run_in_threadpool(exposition, app)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        checks = await run_in_threadpool(app.readiness)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", **checks}, status_code=200 if ready else 503)

    return Starlette(routes=[
        Route(intake.path, webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *dashboard_routes(app),  # last: pages and /api/, behind the admin token (workers.dashboard_access)
    ])
