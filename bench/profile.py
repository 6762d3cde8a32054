"""Sampling profiles of a running vivoflow process with py-spy, summarised into where the time goes.

Three py-spy samplers run side by side (non-blocking, 100 Hz) on the same process:

- ``cpu``: only the thread holding the GIL (``--gil``): where the interpreter's one core goes, which
  is what caps a Python process's throughput; written as collapsed stacks and as a flame graph (SVG);
- ``wall``: every thread that is not idle: also the time threads spend inside C calls that release
  the GIL, e.g. SQLite waiting for its write lock, or a socket read.

``summarise`` reads collapsed stacks: time by library (by the innermost frame), the hottest
functions, and vivoflow's own functions inclusive of what they call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: Library of a frame, by its function and file (first match wins); a sample counts for its innermost frame.
_LIB = r"(?:^|/)"
LIBRARIES = (
    ("sqlite3 (C: execute/commit, incl. WAL writes and lock waits)",
     re.compile(r"(^|\.)(do_execute|do_commit|do_executemany|do_rollback|do_close)$"),
     re.compile(_LIB + r"sqlalchemy/engine/default\.py$")),
    ("SQLAlchemy Core (build, compile, bind, rows)", None, re.compile(_LIB + r"sqlalchemy/")),
    ("alembic", None, re.compile(_LIB + r"alembic/")),
    ("redis-py (socket I/O, parsing)", None, re.compile(_LIB + r"redis/")),
    ("Dramatiq (broker, worker, middleware)", None, re.compile(_LIB + r"dramatiq/")),
    ("uvicorn + h11 (HTTP server)", None, re.compile(_LIB + r"(uvicorn|h11)/")),
    ("Starlette", None, re.compile(_LIB + r"starlette/")),
    ("anyio (thread pool hand-off)", None, re.compile(_LIB + r"anyio/")),
    ("asyncio (event loop, transports)", None, re.compile(_LIB + r"asyncio/|selectors\.py$")),
    ("pydantic", None, re.compile(_LIB + r"pydantic(_core)?/")),
    ("json", None, re.compile(_LIB + r"json/")),
    ("hmac/hashlib", None, re.compile(r"(hmac|hashlib)\.py$")),
    ("logging", None, re.compile(_LIB + r"logging/")),
    ("prometheus_client", None, re.compile(_LIB + r"prometheus_client/")),
    ("Jinja2 (templates)", None, re.compile(_LIB + r"(jinja2|markupsafe)/")),
    ("outgoing HTTP (httpx, http.client, connectors/transport.py)", None,
     re.compile(_LIB + r"(httpx|httpcore|h2)/|http/client\.py$|connectors/transport\.py$")),
    ("ssl (context creation, CA bundle)", None, re.compile(r"ssl\.py$")),
    ("threading/queue (hand-offs, locks)", None, re.compile(r"(threading|queue)\.py$|concurrent/futures")),
    ("socket", None, re.compile(r"socket\.py$")),
    ("vivoflow (workers/, connectors/)", None, re.compile(_LIB + r"(workers|connectors)/")),
    ("yaml", None, re.compile(_LIB + r"yaml/")),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_OURS = re.compile(_LIB + r"(workers|connectors)/[^/]+\.py$")
#: Innermost frames that mean the thread is waiting (an idle pool thread, a lock, a poll), not working.
_WAITS = re.compile(r"(^|\.)(wait|_wait_for_tstate_lock|select|poll|sleep|acquire)$")
_WAIT_FILES = re.compile(r"(threading|selectors|queue)\.py$")
_STDLIB_WAIT = re.compile(r"(threading|selectors|queue|sqlalchemy/util/queue)\.py$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).with_name("py-spy")] if p.exists()), None)


def _short(frame: str) -> str:
    """``func (…/site-packages/pkg/mod.py:12)`` → ``func (pkg/mod.py)``."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3.12/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m['func']} ({file})"


def _library(frame: str) -> str:
    m = _FRAME.match(frame)
    func, file = (m["func"], m["file"]) if m else (frame, "")
    for name, func_pattern, file_pattern in LIBRARIES:
        if file_pattern.search(file) and (func_pattern is None or func_pattern.search(func)):
            return name
    return "other (stdlib, interpreter)"


def _waiting(frames: list[str]) -> str | None:
    """For a sample whose thread waits: the first caller outside the waiting machinery (who waits)."""
    m = _FRAME.match(frames[-1])
    if not m or not (_WAITS.search(m["func"]) and _WAIT_FILES.search(m["file"])):
        return None
    for frame in reversed(frames):
        fm = _FRAME.match(frame)
        if fm and not _STDLIB_WAIT.search(fm["file"]):
            return _short(frame)
    return _short(frames[-1])


def summarise(collapsed: Path, top: int = 12) -> dict[str, Any]:
    """Time by library, hottest functions (self), vivoflow functions (inclusive), as % of working samples.

    Samples of threads that only wait (an idle pool thread on its queue, the event loop in epoll) are
    counted apart, by who waits: py-spy does not drop those that wait on a lock.
    """
    by_library: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if _FRAME.match(f)]
        if not frames:
            continue
        who = _waiting(frames)
        if who is not None:
            waits[who] += n
            continue
        total += n
        leaf = frames[-1]
        by_library[_library(leaf)] += n
        self_time[_short(leaf)] += n
        for frame in {_short(f) for f in frames if _OURS.search(_FRAME.match(f)["file"])}:  # type: ignore[index]
            ours[frame] += n

    def pct(counter: Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(k)] if total else []

    waited = sum(waits.values())
    return {"samples": total, "waiting_samples": waited,
            "waiting_by_waiter": [[k, n] for k, n in waits.most_common(5)],
            "by_library": pct(by_library, len(LIBRARIES) + 1),
            "top_self": pct(self_time, top), "vivoflow_inclusive": pct(ours, top)}


class Profiler:
    """``with Profiler(pid, name, ctx):`` samples ``pid`` for ``ctx.profile_seconds`` while the block runs."""

    def __init__(self, pid: int, name: str, ctx: Any) -> None:
        self.pid, self.name, self.ctx = pid, name, ctx
        self.folder: Path = ctx.results_dir
        self.svg = self.folder / f"profile-{name}-{ctx.stamp}.svg"
        self.cpu = self.folder / f"profile-{name}-{ctx.stamp}-cpu.txt"
        self.wall = self.folder / f"profile-{name}-{ctx.stamp}-wall.txt"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.summary: dict[str, Any] = {}

    def __enter__(self) -> Profiler:
        tool = py_spy()
        if tool is None:
            self.summary = {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        seconds = str(int(self.ctx.profile_seconds))
        for fmt, out, gil in (("flamegraph", self.svg, True), ("raw", self.cpu, True), ("raw", self.wall, False)):
            self.procs.append(subprocess.Popen(
                [tool, "record", "--pid", str(self.pid), "--duration", seconds, "--rate", "100", "--nonblocking",
                 "--format", fmt, "--output", str(out), *(["--gil"] if gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        return self

    def __exit__(self, *exc: object) -> None:
        errors = []
        for proc in self.procs:
            try:
                _, err = proc.communicate(timeout=self.ctx.profile_seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode:
                errors.append(err.decode(errors="replace").strip()[-500:])
        if not self.procs:
            return
        if self.cpu.exists() and self.wall.exists():
            self.summary = {"seconds": self.ctx.profile_seconds, "svg": str(self.svg),
                            "cpu": {**summarise(self.cpu), "collapsed": str(self.cpu)},
                            "wall": {**summarise(self.wall), "collapsed": str(self.wall)}}
        else:
            self.summary = {"skipped": "py-spy failed: " + " | ".join(errors)}
