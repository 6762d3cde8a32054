"""Durability: what reaches the outside world when a part fails — a killed worker, SMTP down, a flaky API, a restart.

Every part is real: the intake over HTTP, ``vivoflow worker`` and ``vivoflow run`` as processes, Redis,
SQLite, an SMTP server and a local HTTP server that records every call. Side effects are counted where
they land (at those servers), never inferred from vivoflow's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_service import FakeService
from tests.harness import SIGNING_KEY, Vivoflow, fixture_body, wait_until
from tests.smtp_server import SmtpSink, free_port
from tests.test_run_command import RunProcess, alive
from workers.config import load_config
from workers.runner import BROKER_URL_ENV
from workers.store import Store

FINISHED = ("succeeded", "failed", "skipped")
BOOKINGS = 300
WORKER_THREADS = 8
#: Recovery in seconds, not minutes: a worker silent for 2 s is dead and its messages go back to the
#: queue; a step it was running is taken over 3 s after it started.
FAST_RECOVERY: dict[str, dict[str, Any]] = {
    "workers": {"step_lease_seconds": 3},
    "broker": {"heartbeat_timeout_seconds": 2},
}

NOTIFY_RECIPE = """
name: notify-crm
on: invitee.created
steps:
  - id: notify
    use: http.request
    with:
      url: "{url}"
      json: {{uri: "{{{{ invitee.uri }}}}", email: "{{{{ invitee.email }}}}"}}
"""

REMINDER_RECIPE = """
name: reminder
on: invitee.created
steps:
  - id: remind
    use: email.send
    {timing}
    with:
      to: "{{{{ invitee.email }}}}"
      subject: "See you soon, {{{{ invitee.first_name }}}}"
      text: "Your {{{{ meeting.name }}}} is booked."
"""


def booking(i: int) -> bytes:
    """The invitee.created sample as a booking of its own: invitee ``i`` (uri and email), sent at its own time."""
    data = json.loads(fixture_body("invitee.created", created_at=f"2027-02-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z"))
    data["payload"]["uri"] = f"https://api.vivocalendar.com/scheduled_events/DURABILITY/invitees/INV{i:05d}"
    data["payload"]["email"] = f"guest{i}@example.com"
    return json.dumps(data).encode()


def finished_runs(store: Store, delivery_ids: set[str]) -> list[dict[str, Any]] | None:
    """The runs of ``delivery_ids`` once each delivery has a finished one, else None."""
    runs = [r for r in store.page_runs(limit=10 * len(delivery_ids) + 100) if r["delivery_id"] in delivery_ids]
    done = {r["delivery_id"] for r in runs if r["status"] in FINISHED}
    return runs if done == delivery_ids else None


def wait_for_finished_runs(store: Store, delivery_ids: set[str], timeout: float) -> list[dict[str, Any]]:
    """``finished_runs`` within ``timeout``; at the deadline the failure says how far the runs got."""
    try:
        return wait_until(lambda: finished_runs(store, delivery_ids), timeout=timeout, interval=0.2)
    except AssertionError:
        runs = [r for r in store.page_runs(limit=10 * len(delivery_ids) + 100) if r["delivery_id"] in delivery_ids]
        statuses = Counter(r["status"] for r in runs)
        raise AssertionError(f"after {timeout}s, {len(delivery_ids) - len(runs)} of {len(delivery_ids)} "
                             f"deliveries have no run; runs by status: {dict(statuses)}") from None


# --- a `vivoflow worker` process --------------------------------------------------------------


class WorkerProcess:
    """One ``vivoflow worker`` process (one process, ``threads`` threads) on the config's broker, output in a file."""

    def __init__(self, config: Path, threads: int) -> None:
        self.config = config
        # Handed over as `vivoflow run` hands it to its workers.
        self.broker_url = load_config(config).broker.url
        self.threads = threads
        self.log_path = config.parent / f"worker-{os.urandom(3).hex()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "workers.cli", "--config", str(self.config),
                   "worker", "--processes", "1", "--threads", str(self.threads)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.config.parent, env={**os.environ, BROKER_URL_ENV: self.broker_url},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(self._ready, timeout=30, interval=0.05)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"vivoflow worker exited with {self.proc.returncode}:\n{self.log()}")
        return " ready (" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a pulled plug would: no message is finished or handed back."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it has not stopped within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def start_worker() -> Iterator[Callable[[Path], WorkerProcess]]:
    """Start ``vivoflow worker`` processes for a config; every one is stopped at teardown, whatever happened."""
    started: list[WorkerProcess] = []

    def start(config: Path) -> WorkerProcess:
        worker = WorkerProcess(config, WORKER_THREADS)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def crm() -> Iterator[FakeService]:
    """An HTTP API taking ~30 ms per call, so a kill finds calls in flight; FakeService records each one."""

    async def contacts(request: Request) -> Response:
        await anyio.sleep(0.03)  # the remote's own pace, not a test's synchronisation
        return JSONResponse({"id": request.headers.get("idempotency-key")}, status_code=201)

    with FakeService(Starlette(routes=[Route("/contacts", contacts, methods=["POST"])])) as service:
        yield service


def test_a_worker_killed_mid_burst_loses_no_booking_and_repeats_only_calls_in_flight(
    make_config: Callable[..., Path], recipes_dir: Path, start_worker: Callable[[Path], WorkerProcess],
    crm: FakeService,
) -> None:
    (recipes_dir / "notify.yaml").write_text(NOTIFY_RECIPE.format(url=f"{crm.url}/contacts"))
    config = make_config(**FAST_RECOVERY)
    started = time.monotonic()
    with Vivoflow(config, worker=False) as vf:
        first = start_worker(config)
        with ThreadPoolExecutor(8) as pool:
            posting = pool.map(lambda i: vf.post(booking(i)), range(BOOKINGS))
            wait_until(lambda: len(crm.received()) >= 50, timeout=30, interval=0.005)
            first.kill()
            calls_at_kill = len(crm.received())
            answers = list(posting)
        assert calls_at_kill < BOOKINGS, "every booking was done before the kill: the test proved nothing"
        assert Counter(a.status_code for a in answers) == {202: BOOKINGS}
        delivery_ids = {a.json()["delivery_id"] for a in answers}
        assert len(delivery_ids) == BOOKINGS

        start_worker(config)
        runs = wait_for_finished_runs(vf.store, delivery_ids, timeout=90)
        unsuccessful = [r for r in runs if r["status"] != "succeeded"]
        first_error = vf.store.steps_of(unsuccessful[0]["id"]) if unsuccessful else None

    assert len(runs) == BOOKINGS  # one run per delivery, none made twice
    assert not unsuccessful, f"{len(unsuccessful)} run(s) did not succeed; the first one's steps: {first_error}"
    keys = [call.headers["idempotency-key"] for call in crm.received("POST", "/contacts")]
    assert set(keys) == {f"{run['id']}:notify" for run in runs}
    repeated = {key: n for key, n in Counter(keys).items() if n > 1}
    duplicates = len(keys) - len(set(keys))
    print(f"\n{BOOKINGS} bookings, {calls_at_kill} calls before the kill, {len(keys)} calls in all, "
          f"{duplicates} duplicate(s) {sorted(repeated.values())}, {time.monotonic() - started:.1f}s")
    # Only a call in flight at the kill can be made again, and only once: at most one per worker thread.
    assert duplicates <= WORKER_THREADS
    assert all(n == 2 for n in repeated.values())


def test_a_worker_process_keeps_one_slow_call_in_flight_per_thread(
    make_config: Callable[..., Path], recipes_dir: Path, start_worker: Callable[[Path], WorkerProcess],
) -> None:
    """A thread waiting on a socket does not hold up the others (the GIL is let go while it waits)."""
    in_flight, most = 0, 0
    all_in: asyncio.Event | None = None

    async def contacts(request: Request) -> Response:
        # Each call is held until the worker has a call in flight per thread (or 20 s have passed):
        # a worker whose calls blocked one another would never get there.
        nonlocal in_flight, most, all_in
        all_in = all_in or asyncio.Event()
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == WORKER_THREADS:
            all_in.set()
        with anyio.move_on_after(20):
            await all_in.wait()
        in_flight -= 1
        return JSONResponse({"id": "c1"}, status_code=201)

    with FakeService(Starlette(routes=[Route("/contacts", contacts, methods=["POST"])])) as crm:
        (recipes_dir / "notify.yaml").write_text(NOTIFY_RECIPE.format(url=f"{crm.url}/contacts"))
        config = make_config()
        with Vivoflow(config, worker=False) as vf:
            delivery_ids = {vf.post(booking(i)).json()["delivery_id"] for i in range(WORKER_THREADS)}
            start_worker(config)
            runs = wait_for_finished_runs(vf.store, delivery_ids, timeout=60)

    assert [r["status"] for r in runs] == ["succeeded"] * WORKER_THREADS
    assert most == WORKER_THREADS


# --- SMTP and HTTP failures, with the in-process worker -----------------------------------------


def step_of(vf: Vivoflow, delivery_id: str) -> dict[str, Any] | None:
    """The one step of the delivery's one run, once it has been recorded."""
    runs = vf.runs(delivery_id)
    steps = vf.store.steps_of(runs[0]["id"]) if runs else []
    return steps[0] if steps else None


def test_an_email_sent_while_smtp_is_down_arrives_once_when_it_comes_back(
    make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    (recipes_dir / "reminder.yaml").write_text(REMINDER_RECIPE.format(timing="retry: {max_attempts: 20}"))
    port = free_port()  # nothing listens there until the sink starts
    config = make_config(smtp_port=port, workers={"retry_min_backoff_seconds": 1, "retry_max_backoff_seconds": 2})
    sink = SmtpSink()
    try:
        with Vivoflow(config) as vf:
            started = time.monotonic()
            delivery_id = vf.post(booking(1)).json()["delivery_id"]
            failing = wait_until(
                lambda: (s := step_of(vf, delivery_id)) and s["attempts"] >= 3 and s["status"] == "scheduled" and s,
                timeout=20,
            )
            assert "refused" in failing["error"].lower(), failing["error"]
            assert sink.messages == []
            down_for = time.monotonic() - started

            sink.start(port)

            [run] = vf.wait_for_runs(delivery_id, timeout=20)
            step = step_of(vf, delivery_id)
        assert run["status"] == "succeeded", run["reason"]
        assert step is not None and step["attempts"] >= 4
        [message] = sink.wait_for(1)
        assert len(sink.messages) == 1  # the run is over: nothing else can come
        assert message["To"] == "guest1@example.com"
        assert message["Message-ID"] == step["output"]["message_id"]
        print(f"\nSMTP down {down_for:.1f}s; sent on attempt {step['attempts']}")
    finally:
        sink.stop()


def answering(*statuses: int) -> Starlette:
    """An API answering its calls with ``statuses`` in turn (the last one from then on), each saying why."""
    calls = itertools.count()
    messages = {200: "contact stored", 422: "email: must be a company address", 503: "down for maintenance"}

    async def contacts(request: Request) -> Response:
        status = statuses[min(next(calls), len(statuses) - 1)]
        return JSONResponse({"message": messages[status]}, status_code=status)

    return Starlette(routes=[Route("/contacts", contacts, methods=["POST"])])


def run_notify(make_config: Callable[..., Path], recipes_dir: Path, api: FakeService) -> tuple[dict[str, Any], Any]:
    """One booking through the notify recipe, calling ``api``; returns its finished run and its step."""
    (recipes_dir / "notify.yaml").write_text(NOTIFY_RECIPE.format(url=f"{api.url}/contacts"))
    with Vivoflow(make_config()) as vf:
        delivery_id = vf.post(booking(1)).json()["delivery_id"]
        [run] = vf.wait_for_runs(delivery_id, timeout=20)
        return run, step_of(vf, delivery_id)


def test_a_503_twice_then_200_is_three_calls_with_one_key_and_a_succeeded_run(
    make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    with FakeService(answering(503, 503, 200)) as api:
        run, step = run_notify(make_config, recipes_dir, api)
        calls = api.received()

    assert run["status"] == "succeeded", run["reason"]
    assert [c.path for c in calls] == ["/contacts"] * 3
    assert {c.headers["idempotency-key"] for c in calls} == {f"{run['id']}:notify"}
    assert step["attempts"] == 3
    assert step["output"]["status"] == 200


def test_a_422_is_one_call_and_a_failed_run_quoting_the_server(
    make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    with FakeService(answering(422)) as api:
        run, step = run_notify(make_config, recipes_dir, api)
        calls = api.received()

    assert len(calls) == 1
    assert run["status"] == "failed"
    assert step["status"] == "failed" and step["attempts"] == 1
    assert "422" in step["error"] and "email: must be a company address" in step["error"]


# --- `vivoflow run` restarted: its embedded broker with it -----------------------------------------


class RunFolder:
    """A folder for ``vivoflow run`` (embedded broker and SQLite under ./data, the reminder recipe delayed 3 s)."""

    def __init__(self, folder: Path, smtp_port: int) -> None:
        self.folder = folder
        self.smtp_port = smtp_port
        self.runs: list[RunProcess] = []
        (folder / "recipes").mkdir()
        (folder / "recipes" / "reminder.yaml").write_text(REMINDER_RECIPE.format(timing="delay: 3s"))
        self.config = self._write(processes=1)
        self.store = Store(load_config(self.config).store_url())

    def _write(self, processes: int) -> Path:
        config = {
            "intake": {"port": free_port(), "signing_key": SIGNING_KEY},
            "broker": {"url": "embedded", "data_dir": "./data", "heartbeat_timeout_seconds": 2},
            "workers": {"processes": processes, "threads": 2, "step_lease_seconds": 3,
                        "retry_min_backoff_seconds": 0.05, "retry_max_backoff_seconds": 0.2},
            "connectors": {"email": {"host": "127.0.0.1", "port": self.smtp_port, "starttls": False}},
        }
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, processes: int) -> RunProcess:
        """``vivoflow run`` with ``processes`` workers (0: the intake alone, so what it accepts stays queued)."""
        run = RunProcess(self._write(processes))
        self.runs.append(run)
        return run.start()

    def scheduled_step(self, delivery_id: str) -> dict[str, Any] | None:
        """The delivery's step once the worker has scheduled it (its run waiting on the broker)."""
        runs = self.store.runs_of_delivery(delivery_id)
        if not runs or runs[0]["status"] != "scheduled":
            return None
        steps = self.store.steps_of(runs[0]["id"])
        return steps[0] if steps and steps[0]["status"] == "scheduled" else None

    def close(self) -> None:
        """Never leave a run or its redis-server behind, whatever the test did."""
        self.store.close()
        for run in self.runs:
            if run.proc and run.proc.poll() is None:
                run.stop(signal.SIGKILL, timeout=10)
            for pid in {int(p) for p in re.findall(r"redis-server pid (\d+)", run.log())}:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run_folder(tmp_path: Path, smtp_sink: SmtpSink) -> Iterator[RunFolder]:
    folder = RunFolder(tmp_path, smtp_sink.port)
    try:
        yield folder
    finally:
        folder.close()


def post(run: RunProcess, body: bytes) -> str:
    answer: httpx.Response = run.post(body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["delivery_id"])


def test_a_delayed_step_runs_once_after_vivoflow_run_and_its_broker_restart(
    run_folder: RunFolder, smtp_sink: SmtpSink
) -> None:
    first = run_folder.start(processes=1)
    delivery_id = post(first, booking(1))
    step = wait_until(lambda: run_folder.scheduled_step(delivery_id), timeout=20)

    assert first.stop() == 0
    assert smtp_sink.messages == [], "sent before the restart: the delay did not span it"

    again = run_folder.start(processes=1)
    [message] = smtp_sink.wait_for(1, timeout=30)
    [run] = wait_until(lambda: finished_runs(run_folder.store, {delivery_id}), timeout=20)
    assert run["status"] == "succeeded", run["reason"]
    [done] = run_folder.store.steps_of(run["id"])
    assert done["finished_at"] >= step["due_at"]
    assert message["To"] == "guest1@example.com"
    assert len(smtp_sink.messages) == 1
    assert again.stop() == 0


def test_queued_and_delayed_messages_each_run_once_after_vivoflow_run_restarts(
    run_folder: RunFolder, smtp_sink: SmtpSink
) -> None:
    # A delayed message: the step is scheduled 3 s out when the run stops.
    first = run_folder.start(processes=1)
    delayed = post(first, booking(1))
    wait_until(lambda: run_folder.scheduled_step(delayed), timeout=20)
    assert first.stop() == 0
    # A queued message: accepted by an intake with no worker, beside the delayed one.
    intake_only = run_folder.start(processes=0)
    queued = post(intake_only, booking(2))
    assert intake_only.stop() == 0
    assert run_folder.store.runs_of_delivery(queued) == []
    assert run_folder.scheduled_step(delayed) is not None
    assert smtp_sink.messages == []

    again = run_folder.start(processes=1)

    messages = smtp_sink.wait_for(2, timeout=30)
    runs = wait_until(lambda: finished_runs(run_folder.store, {delayed, queued}), timeout=20)
    assert sorted(m["To"] for m in messages) == ["guest1@example.com", "guest2@example.com"]
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    assert len(smtp_sink.messages) == 2
    assert again.stop() == 0
