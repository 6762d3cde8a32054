"""A fixed-duration flood of signed webhooks from a separate process: ``wrk`` when installed, else bench.loadgen.

Both report the same figures: requests, statuses, socket errors and latency percentiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.payloads import WEBHOOK_PATH, Bodies
from bench.procs import PYTHON, ROOT

LUA = Path(__file__).with_name("signed.lua")
WRK_THREADS = 2


def wrk_path() -> str | None:
    return shutil.which("wrk")


def flood(port: int, *, duration: float, connections: int, tag: str, workdir: Path, pool: int,
          tool: str = "auto", pause_ms: int | None = None) -> dict[str, Any]:
    """Flood ``127.0.0.1:port`` for ``duration`` s; ``pool``: distinct bodies prepared (wrk only).

    ``pause_ms`` (wrk only): each connection waits that long after an answer, for a paced run.
    """
    use_wrk = tool == "wrk" or (tool == "auto" and wrk_path() is not None)
    result = _wrk(port, duration, connections, tag, workdir, pool, pause_ms) if use_wrk else \
        _python(port, duration, connections, tag, workdir)
    statuses = {int(k): v for k, v in result["statuses"].items()}
    elapsed = result["elapsed_s"]
    result.update(
        accepted=statuses.get(202, 0), duplicates=statuses.get(200, 0),
        non_2xx=sum(v for k, v in statuses.items() if not 200 <= k < 300),
        req_s=round(result["requests"] / elapsed, 1) if elapsed else 0.0,
        accepted_s=round(statuses.get(202, 0) / elapsed, 1) if elapsed else 0.0,
    )
    return result


def _wrk(port: int, duration: float, connections: int, tag: str, workdir: Path, pool: int,
         pause_ms: int | None = None) -> dict[str, Any]:
    bodies = Bodies(tag)
    host = f"127.0.0.1:{port}"
    prefix = workdir / f"wrk-{tag}-"
    threads = min(WRK_THREADS, connections)  # wrk wants at least one connection per thread
    files = [open(f"{prefix}{t}.dat", "wb") for t in range(threads)]  # noqa: SIM115
    try:
        for i in range(pool):
            request = bodies.request(i, host)
            files[i % threads].write(b"%d\n" % len(request) + request)
    finally:
        for f in files:
            f.close()
    seconds = max(int(round(duration)), 1)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(LUA), f"http://{host}{WEBHOOK_PATH}"]
    env = {"BENCH_WRK_PREFIX": str(prefix), "PATH": "/usr/bin:/bin"}
    if pause_ms is not None:
        env["BENCH_WRK_PAUSE_MS"] = str(pause_ms)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, env=env)
    finally:
        for t in range(threads):
            Path(f"{prefix}{t}.dat").unlink(missing_ok=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    raw = json.loads(line[len("BENCH_JSON "):])
    return {
        "tool": f"wrk -t{threads} -c{connections} -d{seconds}s (pre-signed bodies: {pool}"
                + (f", {pause_ms} ms pause per connection)" if pause_ms is not None else ")"),
        "elapsed_s": round(raw["duration_us"] / 1e6, 3), "requests": raw["requests"], "statuses": raw["statuses"],
        "socket_errors": {k: v for k, v in raw["errors"].items() if k != "status"},
        "pool_wrapped": raw["wrapped"],
        "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }


def _python(port: int, duration: float, connections: int, tag: str, workdir: Path) -> dict[str, Any]:
    out = workdir / f"loadgen-{tag}.json"
    argv = [PYTHON, "-m", "bench.loadgen", "flood", "--port", str(port), "--tag", tag,
            "--connections", str(connections), "--duration", str(duration), "--out", str(out)]
    subprocess.run(argv, check=True, timeout=duration + 120, cwd=ROOT)
    raw = json.loads(out.read_text())
    out.unlink()
    return {"tool": f"bench.loadgen (python asyncio, 1 process, {connections} connections, {duration:g}s)",
            **{k: raw[k] for k in ("elapsed_s", "requests", "statuses", "p50_ms", "p90_ms", "p99_ms", "max_ms")},
            "socket_errors": {"transport": raw["statuses"].get("0", 0)}}
