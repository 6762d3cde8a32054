"""The OpenAPI 3.1 document of the intake's HTTP surface: the webhook, health, metrics and the dashboard API.

Hand-written beside the handlers it describes, so it says exactly what they answer;
``tests/test_dashboard.py`` checks its paths against the routes.
"""

from __future__ import annotations

from typing import Any

_STATUS = {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "skipped", "scheduled"]}
_TIME = {"type": ["number", "null"], "description": "Unix seconds"}
_TEXT = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_DENIED = {"401": _error("No or wrong admin token (or, with admin.token empty, a client that is not loopback)"),
           "403": _error("A post without the CSRF token of a browser session")}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Run": {"type": "object", "properties": {
        "id": {"type": "string"}, "run_key": {"type": "string"}, "delivery_id": {"type": "string"},
        "recipe": {"type": "string"}, "event": {"type": "string"}, "status": _STATUS, "reason": _TEXT,
        "created_at": _TIME, "finished_at": _TIME,
        "replay_of": {**_TEXT, "description": "The run this one replays"},
        "replay_id": {**_TEXT, "description": "The replay that made this run"},
    }},
    "Step": {"type": "object", "properties": {
        "run_id": {"type": "string"}, "step_id": {"type": "string"}, "position": {"type": "integer"},
        "use": {"type": "string"}, "status": _STATUS, "attempts": {"type": "integer"},
        "input": {"description": "Rendered inputs, secrets redacted"}, "output": {}, "error": _TEXT,
        "started_at": _TIME, "finished_at": _TIME, "due_at": _TIME,
    }},
    "RunDetail": {"allOf": [_ref("Run"), {"type": "object", "properties": {
        "steps": {"type": "array", "items": _ref("Step")}}}]},
    "Replay": {"type": "object", "properties": {
        "id": {"type": "string"}, "created_at": _TIME, "who": {"type": "string"},
        "mode": {"type": "string", "enum": ["delivery", "resume", "force"]}, "target": {"type": "string"},
        "note": _TEXT,
    }},
    "Delivery": {"type": "object", "properties": {
        "id": {"type": "string"}, "dedupe_key": {"type": "string"}, "event": {"type": "string"},
        "payload_uri": _TEXT, "invitee_uri": _TEXT, "sender_created_at": _TEXT,
        "received_at": _TIME, "processed_at": _TIME,
        "source": {"type": "string", "enum": ["webhook", "reconcile"]},
        "duplicate_of": {**_TEXT, "description": "Set when the same booking event arrived by another route"},
        "body": {"description": "The webhook body as received, parsed (a string if it is not JSON)"},
        "runs": {"type": "array", "items": _ref("Run")},
        "replays": {"type": "array", "items": _ref("Replay")},
    }},
    "Recipe": {"type": "object", "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "file": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string"}},
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "use": {"type": "string"}}}},
        "last_run": {"oneOf": [_ref("Run"), {"type": "null"}]},
    }},
    "RecipeError": {"type": "object", "properties": {
        "file": {"type": "string"}, "line": {"type": ["integer", "null"]}, "message": {"type": "string"},
        "text": {"type": "string", "description": "file:line: message"},
    }},
}


def _dashboard_paths() -> dict[str, Any]:
    secured = {"security": [{"adminToken": []}, {"session": []}]}
    return {
        "/api/runs": {"get": {
            **secured, "summary": "Recent runs, newest first (keyset paginated)",
            "parameters": [
                _query("status", "Only runs with this status", _STATUS), _query("recipe", "Only this recipe's runs"),
                _query("event", "Only runs of this event"),
                _query("since", "Only runs created in this window: 1h, 24h, 7d"),
                _query("before", "The `next` cursor of the previous page (`<created_at>:<id>`)"),
                _query("limit", "Page size, 1 to 200", {"type": "integer", "default": 50}),
            ],
            "responses": {
                "200": _json("A page of runs", {"type": "object", "required": ["runs", "next"], "properties": {
                    "runs": {"type": "array", "items": _ref("Run")},
                    "next": {"type": ["string", "null"], "description": "Cursor of the next (older) page"}}}),
                "400": _error("A filter that does not parse"), **_DENIED,
            },
        }},
        "/api/runs/{run_id}": {"get": {
            **secured, "summary": "One run with its steps", "parameters": [_path("run_id")],
            "responses": {"200": _json("The run", _ref("RunDetail")), "404": _error("No such run"), **_DENIED},
        }},
        "/api/deliveries/{delivery_id}": {"get": {
            **secured, "summary": "One delivery: its body, runs and replays", "parameters": [_path("delivery_id")],
            "responses": {"200": _json("The delivery", _ref("Delivery")), "404": _error("No such delivery"),
                          **_DENIED},
        }},
        "/api/deliveries/{delivery_id}/replay": {"post": {
            **secured, "summary": "Run a stored delivery again against today's recipes",
            "description": "New runs link to the old ones (`replay_of`, `replay_id`). A browser session "
                           "must send its CSRF token (`csrf` field or `X-CSRF-Token` header); Bearer calls need none.",
            "parameters": [_path("delivery_id")],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"recipe": {"type": "string", "description": "Only this recipe"},
                                                 "csrf": {"type": "string"}}}}}},
            "responses": {
                "202": _json("Replay queued", {"type": "object", "required": ["replay_id", "delivery_id"],
                                               "properties": {"replay_id": {"type": "string"},
                                                              "delivery_id": {"type": "string"}}}),
                "400": _error("The recipe named is not loaded"), "404": _error("No such delivery"), **_DENIED,
            },
        }},
        "/api/recipes": {"get": {
            **secured, "summary": "Loaded recipes with their last run, and the files that did not load",
            "responses": {"200": _json("Recipes and errors", {"type": "object", "properties": {
                "recipes": {"type": "array", "items": _ref("Recipe")},
                "errors": {"type": "array", "items": _ref("RecipeError")}}}), **_DENIED},
        }},
        "/api/openapi.json": {"get": {
            **secured, "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}, **_DENIED},
        }},
    }


def _service_paths(webhook_path: str) -> dict[str, Any]:
    def status(description: str) -> dict[str, Any]:
        return _json(description, {"type": "object", "additionalProperties": {"type": "string"}})

    delivery = {"type": "object", "properties": {"delivery_id": {"type": "string"}, "duplicate": {"type": "boolean"}}}
    return {
        webhook_path: {"post": {
            "summary": "A Vivocalendar (or Calendly) webhook delivery",
            "security": [{"webhookSignature": []}, {"calendlySignature": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["event", "payload"],
                "properties": {"event": {"type": "string"}, "payload": {"type": "object"},
                               "created_at": {"type": "string"}, "created_by": {"type": "string"}}}}}},
            "responses": {
                "202": _json("Stored and enqueued", delivery),
                "200": _json("Already received: the first delivery's id", delivery),
                "400": _error("Not JSON, or no event/payload"),
                "401": _error("Missing or bad signature, or a timestamp out of tolerance"),
                "408": _error("Body not received in time"),
                "413": _error("Body over intake.max_body_bytes"),
                "503": _error("Broker or store unavailable: retry later"),
            },
        }},
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": status("ok")}}},
        "/readyz": {"get": {"summary": "The broker and the store answer", "responses": {
            "200": status("Ready"), "503": status("Not ready: which part and why")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics: deliveries, runs, steps, step latency, queue depth",
                             "responses": {"200": {"description": "Prometheus text exposition",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }


def openapi(webhook_path: str) -> dict[str, Any]:
    """The document, with the webhook at its configured path (``intake.path``)."""
    signature = "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>' with the signing key>"
    return {
        "openapi": "3.1.0",
        "info": {"title": "vivoflow", "version": "0.1.0",
                 "description": "Webhook intake, health, metrics and the dashboard's JSON API. Times are Unix "
                                "seconds. With admin.token empty, /api/ answers loopback clients only."},
        "paths": {**_service_paths(webhook_path), **_dashboard_paths()},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "admin.token"},
                "session": {"type": "apiKey", "in": "cookie", "name": "vivoflow_session",
                            "description": "Set by POST /login"},
                "webhookSignature": {"type": "apiKey", "in": "header", "name": "Vivocalendar-Webhook-Signature",
                                     "description": signature},
                "calendlySignature": {"type": "apiKey", "in": "header", "name": "Calendly-Webhook-Signature",
                                      "description": signature},
            },
        },
    }
