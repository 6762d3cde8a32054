"""Child processes of the bench: start, wait for, measure (/proc) and stop, by pid only.

Every child gets a session of its own, so stopping one also stops what it started (``vivoflow run``'s
workers) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f}s")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Child:
    """One child process with its output in ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log_path = name, argv, log
        log.parent.mkdir(parents=True, exist_ok=True)
        # The repository first, then whatever the caller put on PYTHONPATH (e.g. httptools/uvloop to compare).
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": path, **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def wait_http(self, url: str, timeout: float = 60) -> None:
        def ready() -> bool:
            self.check()
            return http_ok(url)
        wait_until(ready, timeout, 0.1, what=f"{self.name} answering {url}")

    def stop(self, timeout: float = 45) -> int | None:
        """SIGTERM, then SIGKILL of its session (its own children) if it does not end in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def python_module(module: str, *args: str) -> list[str]:
    return [PYTHON, "-m", module, *args]


def vivoflow(config: Path, *args: str) -> list[str]:
    """The product's own command line, as `.venv/bin/vivoflow` runs it."""
    return [PYTHON, "-m", "workers.cli", "--config", str(config), *args]


# /proc ------------------------------------------------------------------------------------------

def status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (``VmHWM``: peak resident set; ``VmRSS``: now)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib(pid: int) -> float | None:
    kib = status_kib(pid, "VmHWM")
    return round(kib / 1024, 1) if kib is not None else None


def cpu_split(pid: int) -> tuple[float, float] | None:
    """User and system CPU time the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far."""
    split = cpu_split(pid)
    return sum(split) if split else None


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
