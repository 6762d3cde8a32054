"""The intake's ceiling: a bare Starlette app on uvicorn, served with the intake's own settings.

It reads the body and answers 202 with a small JSON, nothing else: what this machine's Python,
Starlette and uvicorn (with whichever HTTP parser and loop uvicorn picks here) allow per request.
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.payloads import WEBHOOK_PATH


async def webhook(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"delivery_id": "dlv_ceiling", "duplicate": False}, status_code=202)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    app = Starlette(routes=[Route(WEBHOOK_PATH, webhook, methods=["POST"]), Route("/healthz", healthz)])
    # The same uvicorn.Config as workers.runner.serve.
    uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
        lifespan="off", timeout_graceful_shutdown=10,
    )).run()


if __name__ == "__main__":
    main()
