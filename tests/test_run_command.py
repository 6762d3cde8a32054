"""``vivoflow run`` as a user starts it: a real process with the embedded broker, workers and SQLite.

These tests own their embedded redis-server (in the test's data folder), so
they check what the session-wide Redis cannot: start, clean stop, restart with
queued messages kept, and recovery from a run that was killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import SIGNING_KEY, fixture_body, wait_until
from tests.smtp_server import free_port
from workers.signing import sign

SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class RunProcess:
    """One ``vivoflow run`` subprocess, its stderr kept in a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / f"run-{os.urandom(3).hex()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RunProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "--config", str(self.config), "run"],
                cwd=self.config.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        port = yaml.safe_load(self.config.read_text())["intake"]["port"]
        self.url = f"http://127.0.0.1:{port}"
        wait_until(self._healthy, timeout=30, interval=0.1)
        # Workers announce themselves once they consume the queue.
        wait_until(lambda: "ready" in self.log() or "processes: 0" in self.config.read_text(), timeout=30)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"vivoflow run exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers_ready(self, count: int) -> list[int]:
        """The pids of the workers that said they were ready, once ``count`` have (else empty)."""
        pids = [int(pid) for pid in re.findall(r"worker (\d+) ready", self.log())]
        return pids if len(pids) == count else []

    def post(self, body: bytes) -> httpx.Response:
        return httpx.post(self.url + "/webhooks/vivocalendar", content=body,
                          headers={"Vivocalendar-Webhook-Signature": sign(body, SIGNING_KEY)}, timeout=10)

    def broker_pid(self) -> int:
        return int(re.findall(r"redis-server pid (\d+)", self.log())[-1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the run and its workers, as an OOM kill would
            else:
                self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (the daemonised server is not our child, so this is rare).
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@pytest.fixture
def run_config(tmp_path: Path, smtp_sink: Any) -> Iterator[Any]:
    """Write a config for ``vivoflow run`` in tmp_path; returns a function taking overrides."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for recipe in SHIPPED_RECIPES.glob("*.yaml"):
        (recipes / recipe.name).write_text(recipe.read_text())
    started: list[RunProcess] = []

    def make(processes: int = 1, smtp: bool = True, *, intake: dict[str, Any] | None = None,
             workers: dict[str, Any] | None = None) -> Path:
        """``intake``, ``workers``: settings added to those sections."""
        config = {
            "intake": {"port": free_port(), "signing_key": SIGNING_KEY, **(intake or {})},
            "broker": {"url": "embedded", "data_dir": "./data"},
            "workers": {"processes": processes, "threads": 2, **(workers or {})},
            "connectors": {"email": {"host": "127.0.0.1" if smtp else "", "port": smtp_sink.port,
                                     "starttls": False}},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(path: Path) -> RunProcess:
        run = RunProcess(path).start()
        started.append(run)
        return run

    make.start = start  # type: ignore[attr-defined]
    yield make
    for run in started:  # never leave a server behind, whatever the test did
        if run.proc and run.proc.poll() is None:
            run.stop(signal.SIGKILL, timeout=10)
        for pid in re.findall(r"redis-server pid (\d+)", run.log()):
            if alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def test_run_sends_the_cancel_followup_and_stops_cleanly(run_config: Any, smtp_sink: Any) -> None:
    run = run_config.start(run_config())

    assert run.post(fixture_body("invitee.canceled")).status_code == 202
    subjects = sorted(m["Subject"] for m in smtp_sink.wait_for(2, timeout=20))
    assert subjects == ["Discovery Call with Jamie Rivera canceled by Jamie Rivera", "Sorry we missed you, Jamie"]
    pid = run.broker_pid()

    assert run.stop() == 0
    assert not alive(pid), "the embedded redis-server outlived vivoflow run"
    assert "stopped" in run.log()
    assert "Traceback" not in run.log()


def test_ctrl_c_stops_run_cleanly(run_config: Any) -> None:
    run = run_config.start(run_config(smtp=False))
    pid = run.broker_pid()

    assert run.stop(signal.SIGINT) == 0
    assert not alive(pid)
    assert "stopped" in run.log()
    assert "aborted" not in run.log() and "Traceback" not in run.log()


def test_ctrl_c_in_a_terminal_stops_the_workers_for_good_while_the_intake_finishes(run_config: Any) -> None:
    """A terminal's Ctrl-C reaches the whole process group: the workers stop at once, while the
    intake may take seconds to finish a request in flight. Nothing must start them again meanwhile
    (the monitor used to see a worker gone and start another, which could outlive the run)."""
    run = run_config.start(run_config(smtp=False, intake={"read_timeout_seconds": 3}))
    assert run.proc is not None
    # A webhook whose body never arrives in full: the intake answers it 408 after its read timeout.
    slow = socket.create_connection(("127.0.0.1", int(run.url.rsplit(":", 1)[1])))
    slow.sendall(b"POST /webhooks/vivocalendar HTTP/1.1\r\nHost: vivoflow\r\nContent-Length: 100\r\n\r\n{")
    assert httpx.get(run.url + "/healthz", timeout=5).status_code == 200  # the loop has read it by now

    os.killpg(run.proc.pid, signal.SIGINT)
    answer = slow.recv(4096)
    slow.close()

    assert run.proc.wait(60) == 0
    assert answer.startswith(b"HTTP/1.1 408 ")  # still in flight while the run was stopping
    assert "starting another" not in run.log()
    assert "Traceback" not in run.log()


def cpus_of(pid: int) -> set[str]:
    """The CPU lists the threads of process ``pid`` may run on (``/proc``'s ``Cpus_allowed_list``)."""
    lists = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        lists.update(line.split(":", 1)[1].strip() for line in status.read_text().splitlines()
                     if line.startswith("Cpus_allowed_list:"))
    return lists


@pytest.mark.parametrize("pin", [True, False])
def test_each_worker_process_keeps_its_threads_on_a_cpu_of_its_own(run_config: Any, pin: bool) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU here: there is nothing to spread the workers over")
    run = run_config.start(run_config(processes=2, smtp=False, workers={"pin_cpus": pin}))

    placed = [cpus_of(pid) for pid in wait_until(lambda: run.workers_ready(2))]
    everywhere = cpus_of(os.getpid())  # what the run and its workers inherit from this test

    if pin:  # every thread of a worker on one CPU, and the two workers on different ones
        assert all(len(cpus) == 1 and next(iter(cpus)).isdigit() for cpus in placed), placed
        assert placed[0] != placed[1]
    else:
        assert placed == [everywhere, everywhere]
    assert run.stop() == 0


def test_a_worker_that_dies_is_started_again_on_its_cpu(run_config: Any) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU here: workers are not pinned")
    run = run_config.start(run_config(processes=2, smtp=False))

    second_cpu = {str(sorted(os.sched_getaffinity(0))[1])}
    # The worker started second, on the second CPU (the first to die could be started on the first).
    [second] = [pid for pid in wait_until(lambda: run.workers_ready(2)) if cpus_of(pid) == second_cpu]
    os.kill(second, signal.SIGKILL)  # as the OOM killer would

    replacement = wait_until(lambda: run.workers_ready(3))[2]
    assert f"worker {second} exited with status -9; starting another" in run.log()
    assert cpus_of(replacement) == second_cpu
    assert run.stop() == 0


def test_a_worker_given_a_cpu_it_cannot_use_runs_anywhere_and_says_so() -> None:
    probe = ("import logging, os; from workers.runner import keep_to_cpu; logging.basicConfig(); "
             "keep_to_cpu('4095'); print(os.sched_getaffinity(0) == os.sched_getaffinity(os.getppid()))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "runs on any CPU: cannot keep it to CPU 4095" in done.stderr


def test_without_smtp_host_the_email_lands_in_the_outbox(run_config: Any, tmp_path: Path) -> None:
    run = run_config.start(run_config(smtp=False))

    assert run.post(fixture_body("invitee.canceled")).status_code == 202

    files = wait_until(lambda: sorted((tmp_path / "data" / "outbox").glob("*.eml")), timeout=20)
    wait_until(lambda: len(list((tmp_path / "data" / "outbox").glob("*.eml"))) == 2, timeout=20)
    assert files
    assert any("Sorry we missed you, Jamie" in f.read_text() for f in (tmp_path / "data" / "outbox").glob("*.eml"))
    # The step logs its line after the file is written: wait for the lines too.
    lines = wait_until(lambda: [line for line in run.log().splitlines() if "written to data/outbox/" in line]
                       if run.log().count("written to data/outbox/") == 2 else None, timeout=20)
    assert "jamie.rivera@example.com" in "\n".join(lines)
    assert run.stop() == 0


def test_queued_messages_survive_a_restart(run_config: Any, smtp_sink: Any) -> None:
    intake_only = run_config.start(run_config(processes=0))
    assert intake_only.post(fixture_body("invitee.canceled")).status_code == 202
    assert intake_only.stop() == 0
    assert smtp_sink.messages == []

    run_config.start(run_config(processes=1))

    assert len(smtp_sink.wait_for(2, timeout=30)) == 2


def test_a_killed_run_leaves_nothing_that_stops_the_next_one(run_config: Any, smtp_sink: Any, tmp_path: Path) -> None:
    config = run_config()
    killed = run_config.start(config)
    orphan = killed.broker_pid()
    killed.stop(signal.SIGKILL)
    assert alive(orphan)  # the daemonised redis-server survived its owner, as after an OOM kill

    again = run_config.start(config)
    assert again.post(fixture_body("invitee.canceled")).status_code == 202
    assert len(smtp_sink.wait_for(2, timeout=30)) == 2
    assert again.stop() == 0
    assert not alive(orphan) and not alive(again.broker_pid())
    settings = tmp_path / "data" / "broker.rdb.settings"
    assert not settings.exists(), json.loads(settings.read_text())


def test_a_second_run_on_the_same_data_or_port_is_refused_and_the_first_keeps_working(
    run_config: Any, smtp_sink: Any, tmp_path: Path
) -> None:
    config = run_config()
    first = run_config.start(config)
    other_port = tmp_path / "other-port.yaml"
    data = yaml.safe_load(config.read_text())
    other_port.write_text(yaml.safe_dump({**data, "intake": {**data["intake"], "port": free_port()}}))

    def second(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(path), "run"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)

    same_port, same_data = second(config), second(other_port)

    assert same_port.returncode == 1 and "is not available" in same_port.stderr
    assert same_data.returncode == 1 and f"(pid {first.proc.pid}) owns the embedded broker" in same_data.stderr
    for refused in (same_port, same_data):
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert first.post(fixture_body("invitee.canceled")).status_code == 202
    assert len(smtp_sink.wait_for(2, timeout=20)) == 2
    assert first.stop() == 0
