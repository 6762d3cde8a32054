"""A cluster gives the same results as one process: two intakes and two workers, each a process of its own.

Everything runs as a real subprocess of the CLI a deployment starts (``vivoflow db upgrade``, two
``vivoflow serve`` on different ports, two ``vivoflow worker --processes 1 --threads 4``) against one
broker (Redis, or RabbitMQ when it answers) and one PostgreSQL store (a schema of the test's own).
Every booking is posted to both intakes at the same moment, as a sender's retry landing on another
host would be; every reschedule has one half posted to each intake. What reaches the outside world is
counted where it lands, at a local HTTP service, never inferred from vivoflow's bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_service import FakeService
from tests.harness import SIGNING_KEY, wait_until
from tests.smtp_server import free_port
from tests.test_bookings import reschedule_halves
from tests.test_durability import booking
from workers.config import load_config
from workers.signing import sign
from workers.store import Store

pytestmark = [pytest.mark.stores("postgresql"), pytest.mark.brokers("redis", "rabbitmq")]

BOOKINGS = 40
RESCHEDULES = 8
WORKER_THREADS = 4
FINISHED = ("succeeded", "failed", "skipped")
RESCHEDULED = "invitee.rescheduled"
#: The intake's port comes from the environment, so both intakes share one config file, as in deploy/.
PORT_VARIABLE = "VIVOFLOW_TEST_INTAKE_PORT"

NOTIFY_RECIPE = """
name: notify-crm
on: invitee.created
steps:
  - id: notify
    use: http.request
    with:
      url: "{url}/bookings"
      json: {{uri: "{{{{ invitee.uri }}}}"}}
"""

MOVED_RECIPE = """
name: moved
on: invitee.rescheduled
steps:
  - id: tell
    use: http.request
    with:
      url: "{url}/reschedules"
      json: {{old: "{{{{ old.invitee.uri }}}}", new: "{{{{ new.invitee.uri }}}}"}}
"""


def vivoflow_command() -> list[str]:
    """The installed ``vivoflow`` entry point of this interpreter's environment (what a unit's ExecStart runs)."""
    script = Path(sys.executable).with_name("vivoflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "workers.cli"]


class VivoflowProcess:
    """One long-running ``vivoflow`` subprocess (``serve`` or ``worker``), its output kept in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], folder: Path,
                 ready: Callable[[VivoflowProcess], bool]) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.folder = folder
        self.log_path = folder / f"{name}.log"
        self._ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VivoflowProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*vivoflow_command(), *self.args], cwd=self.folder, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return self._ready(self)

        wait_until(ready, timeout=timeout, interval=0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, as systemd and docker stop it; SIGKILL to the whole group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


class Intake(VivoflowProcess):
    """``vivoflow serve`` on a port of its own, ready once ``/readyz`` says broker and store answer."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(name, ["serve"], {**env, PORT_VARIABLE: str(self.port)}, folder, Intake._answers)

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, client: httpx.Client, body: bytes) -> httpx.Response:
        headers = {"Content-Type": "application/json", "Vivocalendar-Webhook-Signature": sign(body, SIGNING_KEY)}
        return client.post(self.url + "/webhooks/vivocalendar", content=body, headers=headers)


def worker(name: str, env: dict[str, str], folder: Path) -> VivoflowProcess:
    """``vivoflow worker --processes 1 --threads 4``, ready once it says it consumes the queue."""
    args = ["worker", "--processes", "1", "--threads", str(WORKER_THREADS)]
    return VivoflowProcess(name, args, env, folder, lambda p: " ready (" in p.log())


@pytest.fixture
def processes() -> Iterator[list[VivoflowProcess]]:
    """The test's vivoflow processes: every one is stopped at teardown, whatever happened."""
    started: list[VivoflowProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def sink() -> Iterator[FakeService]:
    """The service both recipes call, ~20 ms a call (so both workers get work); it records every request."""

    async def answer(request: Request) -> Response:
        await anyio.sleep(0.02)
        return JSONResponse({"id": request.headers.get("idempotency-key")}, status_code=201)

    app = Starlette(routes=[Route("/bookings", answer, methods=["POST"]),
                            Route("/reschedules", answer, methods=["POST"])])
    with FakeService(app) as service:
        yield service


def post_together(pool: ThreadPoolExecutor, client: httpx.Client,
                  posts: list[tuple[Intake, bytes]]) -> list[Any]:
    """Start ``posts`` on threads of ``pool`` released by one barrier; their futures, in order."""
    barrier = threading.Barrier(len(posts))

    def send(intake: Intake, body: bytes) -> httpx.Response:
        barrier.wait(timeout=20)
        return intake.post(client, body)

    return [pool.submit(send, intake, body) for intake, body in posts]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as ``{(sample name, sorted labels): value}``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_intakes_and_two_workers_give_the_same_results_as_one(
    make_config: Callable[..., Path], recipes_dir: Path, tmp_path: Path, sink: FakeService,
    processes: list[VivoflowProcess],
) -> None:
    started = time.monotonic()
    (recipes_dir / "notify.yaml").write_text(NOTIFY_RECIPE.format(url=sink.url))
    (recipes_dir / "moved.yaml").write_text(MOVED_RECIPE.format(url=sink.url))
    config = make_config(intake={"port": f"${{{PORT_VARIABLE}:-8000}}"})
    metrics_dir = tmp_path / "metrics"  # one machine: every process counts into one folder (deploy/README.md)
    metrics_dir.mkdir()
    env = {**os.environ, "VIVOFLOW_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    env.pop("VIVOFLOW_BROKER_URL", None)  # the config alone says where the broker is, as in deploy/

    # The migration service first, as docker compose and systemd order it.
    migrate = subprocess.run([*vivoflow_command(), "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr
    assert migrate.stdout.startswith("store at head: postgresql")

    intakes = [Intake("intake-a", env, tmp_path), Intake("intake-b", env, tmp_path)]
    workers = [worker("worker-1", env, tmp_path), worker("worker-2", env, tmp_path)]
    processes.extend([*intakes, *workers])
    for process in processes:
        process.start()
    for process in processes:
        process.wait_ready()
    ready_after = time.monotonic() - started
    a, b = intakes

    bookings = [booking(i) for i in range(BOOKINGS)]
    halves = [reschedule_halves(f"CLUSTER{j:03d}") for j in range(RESCHEDULES)]
    with httpx.Client(timeout=20) as client, ThreadPoolExecutor(16) as pool:
        # Each booking to both intakes at once; each reschedule's halves one to each intake at once.
        booking_posts = [post_together(pool, client, [(a, body), (b, body)]) for body in bookings]
        reschedule_posts = [post_together(pool, client, [(a, cancel), (b, created)] if j % 2 else
                                          [(b, cancel), (a, created)])
                            for j, (cancel, created) in enumerate(halves)]
        booking_answers = [[f.result(30) for f in pair] for pair in booking_posts]
        reschedule_answers = [[f.result(30) for f in pair] for pair in reschedule_posts]

    # Exactly one of the two posts of a booking stored it (202); the other found it (200 duplicate).
    for answers in booking_answers:
        assert sorted(r.status_code for r in answers) == [200, 202], [r.text for r in answers]
        assert len({r.json()["delivery_id"] for r in answers}) == 1
        assert sorted(r.json()["duplicate"] for r in answers) == [False, True]
    for answers in reschedule_answers:
        assert [r.status_code for r in answers] == [202, 202], [r.text for r in answers]
    booking_ids = [pair[0].json()["delivery_id"] for pair in booking_answers]
    pairs = [[r.json()["delivery_id"] for r in answers] for answers in reschedule_answers]
    all_ids = {*booking_ids, *(d for pair in pairs for d in pair)}
    assert len(all_ids) == BOOKINGS + 2 * RESCHEDULES

    store = Store(load_config(config).store_url())
    try:
        def settled() -> list[dict[str, Any]] | None:
            """Every run, once every delivery is processed, every run has finished and the sink has every call."""
            deliveries = [store.get_delivery(d) for d in all_ids]
            if not all(d and d["processed_at"] for d in deliveries):
                return None
            runs = store.page_runs(limit=1000)
            if any(r["status"] not in FINISHED for r in runs):
                return None
            expected_calls = BOOKINGS + 2 * RESCHEDULES  # a booking each, a new half and a reschedule a pair
            return runs if len(sink.received("POST")) >= expected_calls else None

        try:
            runs = wait_until(settled, timeout=30, interval=0.1)
        except AssertionError:
            statuses = Counter(r["status"] for r in store.page_runs(limit=1000))
            raise AssertionError(f"not settled after 30 s: runs {dict(statuses)}, "
                                 f"{len(sink.received())} call(s) at the sink") from None
        deliveries = store.page_deliveries(limit=1000)
        steps = {r["id"]: store.steps_of(r["id"]) for r in runs}
    finally:
        store.close()
    settled_after = time.monotonic() - started

    # One delivery per booking and per half: the duplicate posts stored nothing.
    assert {d["id"] for d in deliveries} == all_ids
    assert all(d["duplicate_of"] is None for d in deliveries)
    # One run per booking (the new half of a reschedule is a booking too), one reschedule run per pair.
    assert all(r["status"] == "succeeded" for r in runs), [(r["recipe"], r["reason"]) for r in runs]
    by_delivery = Counter((r["delivery_id"], r["event"]) for r in runs)
    assert all(n == 1 for n in by_delivery.values()), by_delivery
    assert {d for d, event in by_delivery if event == "invitee.created"} == {*booking_ids, *(p[1] for p in pairs)}
    for pair in pairs:
        moved = [r for r in runs if r["delivery_id"] in pair and r["event"] == RESCHEDULED]
        assert [r["recipe"] for r in moved] == ["moved"], pair
    assert len(runs) == BOOKINGS + 2 * RESCHEDULES
    assert all(len(s) == 1 and s[0]["attempts"] == 1 for s in steps.values())

    # At the sink: one call per booking and per reschedule, and no Idempotency-Key twice.
    calls = sink.received("POST")
    keys = Counter(call.headers["idempotency-key"] for call in calls)
    assert [key for key, n in keys.items() if n > 1] == []
    assert set(keys) == {f"{r['id']}:{'tell' if r['event'] == RESCHEDULED else 'notify'}" for r in runs}
    booked = Counter(call.json["uri"] for call in sink.received("POST", "/bookings"))
    new_halves = [json.loads(created)["payload"]["uri"] for _, created in halves]
    assert booked == Counter([json.loads(body)["payload"]["uri"] for body in bookings] + new_halves)
    moved_calls = Counter((c.json["old"], c.json["new"]) for c in sink.received("POST", "/reschedules"))
    assert moved_calls == Counter((json.loads(cancel)["payload"]["uri"], json.loads(created)["payload"]["uri"])
                                  for cancel, created in halves)

    # Both workers took part, and each run was carried out by one of them only.
    finished_by = [set(re.findall(r"run (run_\w+) \([\w-]+\) succeeded", w.log())) for w in workers]
    assert all(finished_by), "one worker ran nothing: the test did not exercise two workers"
    assert not finished_by[0] & finished_by[1]
    assert finished_by[0] | finished_by[1] == {r["id"] for r in runs}

    # One scrape of either intake sees every process of the machine (the shared PROMETHEUS_MULTIPROC_DIR).
    def scraped() -> dict[Any, float] | None:
        samples = metric_samples(httpx.get(b.url + "/metrics", timeout=5).text)
        done = samples.get(("vivoflow_runs_finished_total", (("recipe", "notify-crm"), ("status", "succeeded"))))
        return samples if done == BOOKINGS + RESCHEDULES else None

    samples = wait_until(scraped, timeout=10, interval=0.1)
    assert samples[("vivoflow_webhooks_total", (("outcome", "accepted"),))] == BOOKINGS + 2 * RESCHEDULES
    assert samples[("vivoflow_webhooks_total", (("outcome", "duplicate"),))] == BOOKINGS
    assert samples[("vivoflow_runs_finished_total", (("recipe", "moved"), ("status", "succeeded")))] == RESCHEDULES

    # A graceful stop, as systemd's and docker's SIGTERM: workers exit 0, intakes by the signal uvicorn re-raises.
    codes = {p.name: p.stop() for p in processes}
    assert all(codes[w.name] == 0 for w in workers), codes
    assert all(codes[i.name] in (0, -signal.SIGTERM) for i in intakes), codes
    for process in processes:
        assert "Traceback" not in process.log(), f"{process.name}:\n{process.log()}"
    print(f"\n{BOOKINGS} bookings x 2 intakes, {RESCHEDULES} reschedules: ready {ready_after:.1f}s, "
          f"settled {settled_after:.1f}s, runs per worker {[len(f) for f in finished_by]}, "
          f"exit codes {codes}, total {time.monotonic() - started:.1f}s")
