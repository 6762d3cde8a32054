"""A running vivoflow for tests: the real intake over HTTP (uvicorn) and a real Dramatiq worker.

Both are built from a config file the test writes, against a real Redis (the
session's embedded one, or ``VIVOFLOW_TEST_REDIS_URL``) under a namespace of
the test's own, and a SQLite store in the test's tmp folder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import uvicorn
import yaml

from tests.smtp_server import free_port
from workers.app import App
from workers.config import load_config
from workers.intake import create_intake
from workers.signing import sign

SIGNING_KEY = "test-signing-key"
FIXTURES = Path(__file__).resolve().parents[1] / "workers" / "samples"


def write_config(folder: Path, *, redis_url: str, namespace: str, smtp_port: int | None = None,
                 **sections: Any) -> Path:
    """A config.yaml in ``folder`` for one test; ``sections`` override or add top-level keys."""
    (folder / "recipes").mkdir(exist_ok=True)
    email: dict[str, Any] = {"from": "Team <noreply@example.com>", "starttls": False}
    email["host"] = "127.0.0.1" if smtp_port else ""
    if smtp_port:
        email["port"] = smtp_port
    config: dict[str, Any] = {
        "intake": {"host": "127.0.0.1", "port": free_port(), "signing_key": SIGNING_KEY},
        # Retries within a test's patience.
        "workers": {"retry_min_backoff_seconds": 0.05, "retry_max_backoff_seconds": 0.2},
        "broker": {"url": redis_url, "namespace": namespace, "queue": namespace},
        "store": {"url": "sqlite:///data/vivoflow.db"},
        "recipes": {"dir": "recipes"},
        "connectors": {"email": email},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fixture_body(name: str, **changes: Any) -> bytes:
    """A shipped sample as bytes, with top-level envelope keys changed (``created_at=…``)."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data.update(changes)
    return json.dumps(data).encode()


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class Vivoflow:
    """The intake (uvicorn in a thread) and a worker (Dramatiq threads), from one config file."""

    def __init__(self, config_path: Path, *, worker: bool = True, threads: int = 4) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.intake_app = App(self.config)
        self.worker_app = App(self.config) if worker else None
        self.threads = threads
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._worker: dramatiq.Worker | None = None
        self.url = f"http://127.0.0.1:{self.config.intake.port}"
        self.webhook_url = self.url + self.config.intake.path
        self.http = httpx.Client(timeout=10)

    @property
    def store(self) -> Any:
        return self.intake_app.store

    def start(self) -> Vivoflow:
        self.intake_app.store  # noqa: B018 - schema first
        self._server = uvicorn.Server(uvicorn.Config(
            create_intake(self.intake_app), host="127.0.0.1", port=self.config.intake.port,
            log_level="warning", lifespan="off",
        ))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, timeout=10)
        if self.worker_app:
            self.start_worker()
        return self

    def start_worker(self) -> None:
        assert self.worker_app is not None
        self.worker_app.declare_actors()
        self._worker = dramatiq.Worker(self.worker_app.broker, worker_threads=self.threads, worker_timeout=50)
        self._worker.start()

    def stop_worker(self) -> None:
        if self._worker:
            self._worker.stop(timeout=10_000)
            self._worker = None

    def stop(self) -> None:
        self.stop_worker()
        if self._server:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(10)
        self.http.close()
        for app in (self.intake_app, self.worker_app):
            if app:
                app.close()

    def __enter__(self) -> Vivoflow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers ----------------------------------------------------------------

    def post(self, body: bytes, *, key: str = SIGNING_KEY, timestamp: int | None = None,
             header: str = "Vivocalendar-Webhook-Signature", **kwargs: Any) -> httpx.Response:
        headers = {"Content-Type": "application/json", header: sign(body, key, timestamp)}
        headers.update(kwargs.pop("headers", {}))
        return self.http.post(self.webhook_url, content=body, headers=headers, **kwargs)

    def runs(self, delivery_id: str) -> list[dict[str, Any]]:
        return self.store.runs_of_delivery(delivery_id)

    def wait_for_runs(self, delivery_id: str, count: int = 1, timeout: float = 30.0,
                      statuses: tuple[str, ...] = ("succeeded", "failed", "skipped")) -> list[dict[str, Any]]:
        """The delivery's runs once ``count`` of them have finished."""
        def finished() -> list[dict[str, Any]] | None:
            runs = self.runs(delivery_id)
            done = [r for r in runs if r["status"] in statuses]
            return runs if len(done) >= count else None

        return wait_until(finished, timeout)

    def wait_processed(self, delivery_id: str, timeout: float = 10.0) -> dict[str, Any]:
        return wait_until(lambda: (d := self.store.get_delivery(delivery_id)) and d["processed_at"] and d, timeout)
