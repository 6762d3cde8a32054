"""Process lifecycles: the intake server, worker processes, and ``vivoflow run`` holding both.

``run`` owns the embedded broker: it starts it first and stops it last, after
the workers have finished their messages, so nothing is dropped on Ctrl-C.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType

import dramatiq
import uvicorn

from connectors.vivocalendar import VivocalendarApi, VivocalendarConfig
from workers.app import App
from workers.broker import EmbeddedRedis
from workers.config import Config
from workers.errors import VivoflowError
from workers.intake import create_intake
from workers.logs import redact_secrets
from workers.periodic import Periodic
from workers.reconcile import reconciler

log = logging.getLogger("vivoflow")

#: A delivery stored this long ago and still unprocessed is put on the queue again (a busy
#: queue can hold work that long; running it twice is harmless, losing it is not).
STUCK_AFTER_SECONDS = 600

#: How long a worker thread may keep the GIL while another wants it (Python's default is 5 ms).
WORKER_SWITCH_INTERVAL_S = 0.001

#: Environment variable through which a parent hands its broker's URL to worker processes.
BROKER_URL_ENV = "VIVOFLOW_BROKER_URL"
#: The CPU a worker process keeps its threads on: set by the supervisor that starts it (or by whoever
#: starts a worker alone, to the same end).
WORKER_CPU_ENV = "VIVOFLOW_WORKER_CPU"


class _Server(uvicorn.Server):
    """uvicorn's server, which also calls ``on_signal`` as soon as a signal asks it to stop.

    Its graceful shutdown waits for requests in flight (seconds, with a slow sender); meanwhile
    `vivoflow run`'s workers, which a terminal's Ctrl-C reaches too, exit by themselves and must
    not be started again.
    """

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_signal()
        super().handle_exit(sig, frame)


def serve(app: App, on_signal: Callable[[], None] = lambda: None) -> None:
    """Run the intake (and background reconciliation, when a token is set) until SIGINT/SIGTERM.

    ``on_signal``: called (in the signal handler) as soon as one of them arrives.
    """
    ensure_port_free(app.config.intake.host, app.config.intake.port)
    redact_secrets(app.secrets())
    intake = app.config.intake
    log.info("intake listening on http://%s:%s%s", intake.host, intake.port, intake.path)
    server = _Server(uvicorn.Config(
        create_intake(app), host=intake.host, port=intake.port, log_level="warning", access_log=False,
        lifespan="off", timeout_graceful_shutdown=10,
    ), on_signal)
    chores = background_chores(app)
    for chore in chores:
        chore.start()
    settle_heap()
    # uvicorn re-raises the signal that stopped it once it is done; with SIGTERM's default
    # action that would kill the process before this cleanup (and `run`'s) could happen.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # the Ctrl-C uvicorn has already handled (a clean stop), raised again on its way out
    finally:
        for chore in chores:
            chore.stop()


def settle_heap() -> None:
    """Move everything built at start-up out of the cyclic garbage collector's sight.

    Imports (SQLAlchemy, pydantic, Jinja, Starlette…), config and recipes are some half a
    million objects that live as long as the process; every full collection walked them all,
    60 ms with the event loop (or every worker thread) stopped, several times a minute under
    load: the intake's p99 under flood fell from ~45 to ~14 ms with them frozen. They are
    still freed by reference counting; only a reference cycle among them (the first recipe
    book after a hot reload, say) stays behind, once.
    """
    gc.freeze()


def background_chores(app: App) -> list[Periodic]:
    """Re-enqueueing stuck deliveries, the intake's SQLite checkpoints, pruning old history
    (``store.retention_days``), and reconciliation (when a Vivocalendar token is set)."""
    chores = [Periodic("requeue", timedelta(minutes=1), lambda: requeue_unprocessed(app, STUCK_AFTER_SECONDS))]
    if app.admission.sqlite:  # its connections leave checkpoints to this chore
        chores.append(Periodic("checkpoint", timedelta(seconds=1), app.store.checkpoint))
    if app.config.store.retention_days:
        keep = timedelta(days=app.config.store.retention_days)
        chores.append(Periodic("retention", timedelta(hours=1), lambda: prune(app, keep)))
    settings = app.registry.config_of("vivocalendar")
    every = app.config.reconcile.every
    if every and isinstance(settings, VivocalendarConfig) and settings.token.get_secret_value():
        chores.append(reconciler(app, lambda: VivocalendarApi.from_config(settings), every=every,
                                 window=app.config.reconcile.window, horizon=app.config.reconcile.horizon))
        log.info("reconciling with the Vivocalendar API every %s", every)
    return chores


def prune(app: App, keep: timedelta) -> None:
    removed = app.store.prune(time.time() - keep.total_seconds())
    if removed:
        log.info("retention: removed %d delivery(ies) older than %s days with their runs", removed, keep.days)


def work(app: App, threads: int, stop: threading.Event) -> None:
    """Consume the queue in this process with ``threads`` threads until ``stop`` is set."""
    redact_secrets(app.secrets())
    # A worker thread holding SQLite's write lock waits its turn for the GIL like any other; at
    # Python's 5 ms switch interval, with 8 threads, that stretched the lock (and the intake
    # waiting on it). 1 ms: end-to-end p99 at 200 webhooks/s 109 -> 84 ms (3 runs each).
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    keep_to_cpu(os.environ.get(WORKER_CPU_ENV))
    app.declare_actors()
    # Idle consumers are woken by a publish (workers.wakeups); this idle poll is their fallback,
    # and it paces Dramatiq's maintenance: an idle worker asks Redis ten times a second.
    worker = dramatiq.Worker(app.broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    settle_heap()
    log.info("worker %s ready (%d threads)", os.getpid(), threads)
    try:
        stop.wait()
    finally:
        # In-flight messages finish; prefetched ones go back to the queue.
        worker.stop(timeout=30_000)
        app.close()


def keep_to_cpu(cpu: str | None) -> None:
    """Keep this process's threads, all started from here on, on CPU ``cpu`` (none: anywhere).

    A worker's threads take turns holding the GIL, and every turn handed to a thread that last
    ran on the other CPU wakes it across CPUs: on this 2-core virtual machine, perf put ~40% of
    a worker's CPU in the kernel, most of it switching threads. With each worker process on a
    CPU of its own, an end-to-end drain took 0.87-0.92 instead of 1.01-1.23 ms of worker CPU a run
    (four interleaved pairs), and 1,360-1,455 instead of 990-1,212 runs/s.
    """
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, {int(cpu)})
    except (OSError, ValueError) as exc:
        log.warning("worker %s runs on any CPU: cannot keep it to CPU %s (%s)", os.getpid(), cpu, exc)


def worker_cpus() -> list[int]:
    """The CPUs this process may run on, in order (empty where that cannot be known)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class WorkerProcesses:
    """``count`` child ``vivoflow worker`` processes, restarted if one dies unexpectedly.

    With ``workers.pin_cpus`` and more than one CPU, worker ``i`` keeps its threads on the
    ``i``-th CPU this process may use (round robin), and a worker started again in its place too;
    but only when these workers are the machine's (``whole_machine``: ``vivoflow run``) or cover
    every CPU. Several ``vivoflow worker --processes 2`` on a 4-CPU host would otherwise all
    pin theirs to the first two CPUs and leave the others idle.
    """

    def __init__(self, config: Config, broker_url: str, count: int, threads: int, *,
                 whole_machine: bool = False) -> None:
        self.command = [
            sys.executable, "-m", "workers.cli", "--config", config.source,
            "worker", "--processes", "1", "--threads", str(threads),
        ]
        self.env = {**os.environ, BROKER_URL_ENV: broker_url}
        self.env.pop(WORKER_CPU_ENV, None)  # a worker's own, not its children's
        cpus = worker_cpus() if config.workers.pin_cpus else []
        self.cpus = cpus if len(cpus) > 1 and (whole_machine or count >= len(cpus)) else []
        self.count = count
        self.children: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)

    def start(self) -> None:
        self.children = [self._spawn(i) for i in range(self.count)]
        self._monitor.start()

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = {**self.env, WORKER_CPU_ENV: str(self.cpus[i % len(self.cpus)])} if self.cpus else self.env
        return subprocess.Popen(self.command, env=env, cwd=Path.cwd())

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, child in enumerate(self.children):
                code = child.poll()
                if code is not None and not self._stopping.is_set():
                    log.error("worker %s exited with status %s; starting another", child.pid, code)
                    self.children[i] = self._spawn(i)

    def keep_down(self) -> None:
        """Start no more workers: the run is stopping (``stop`` then stops those still running)."""
        self._stopping.set()

    def stop(self, timeout: float = 40.0) -> None:
        self.keep_down()
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def ensure_port_free(host: str, port: int) -> None:
    """Fail in one line before starting anything if the intake's address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise VivoflowError(f"intake {host}:{port} is not available ({exc.strerror}): stop what holds it "
                                "(another vivoflow?) or set intake.port") from None


def run_all(config: Config) -> None:
    """``vivoflow run``: embedded broker (or the configured Redis), workers, intake."""
    ensure_port_free(config.intake.host, config.intake.port)
    embedded = EmbeddedRedis(config.broker.data_dir) if config.broker.url == "embedded" else None
    broker_url = embedded.start() if embedded else config.broker.url
    workers: WorkerProcesses | None = None
    app = App(config, broker_url=broker_url)
    try:
        app.store  # noqa: B018 - creates the schema before workers race to
        book = app.recipes.current()
        log.info("%d recipe(s) loaded, %d with errors (see `vivoflow validate`)",
                 len(book.recipes), len(book.errors))
        requeue_unprocessed(app)
        if config.workers.processes:
            workers = WorkerProcesses(config, broker_url, config.workers.processes, config.workers.threads,
                                      whole_machine=True)
            workers.start()
        # uvicorn re-raises the signal that stopped it once it is done; with SIGTERM's
        # default action that would kill us before the workers and broker are stopped.
        signal.signal(signal.SIGTERM, lambda *_: None)
        serve(app, on_signal=workers.keep_down if workers else lambda: None)
    finally:
        if workers:
            log.info("stopping: workers finish the messages they hold")
            workers.stop()
        app.close()
        if embedded:
            log.info("stopping the embedded broker")
            embedded.stop()
        log.info("stopped")


def requeue_unprocessed(app: App, older_than_seconds: float = 0.0) -> None:
    """Enqueue deliveries stored but never processed (a crash between storing and enqueueing,
    or a reconciled one whose broker was down).

    Processing is idempotent, so a delivery also still on the queue costs a lookup, not a second run.
    """
    pending = app.store.unprocessed_deliveries(older_than=time.time() - older_than_seconds)
    for delivery_id in pending:
        app.queue.delivery(delivery_id)
    if pending:
        log.info("re-enqueued %d delivery(ies) not yet processed", len(pending))
