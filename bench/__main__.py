"""``python -m bench``: run the stages, print the table, write bench/results/<stamp>.json and latest.json.

Stages: intake (+ per-request parts and the Redis ceiling), e2e, cluster (2 intakes + 2 workers on
PostgreSQL and Redis), worker, then the py-spy profiles.
Full run: under 4 minutes on 2 cores; ``--quick``: about 30 s. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import cluster, components, e2e, intake, report, worker
from bench.flood import wrk_path
from bench.procs import loadavg
from bench.profile import py_spy

STAGES = ("intake", "components", "e2e", "cluster", "worker", "profile")
RESULTS = Path(__file__).resolve().parent / "results"
#: Above this 1-minute load average per core, other work competes with the bench: say so.
BUSY_LOAD_PER_CORE = 0.5
#: Time budgets (seconds): the full run stays under 5 minutes, --quick near 30 s.
FULL_BUDGET_S, QUICK_BUDGET_S = 285.0, 60.0


#: How long a low rate (under 100/s) is kept up: enough sends for a p99, not a minute of the budget.
LOW_RATE_SECONDS = 8


@dataclass
class Context:
    """What every stage reads: knobs, where to write, and the shared Redis."""

    tmp: Path
    results_dir: Path
    stamp: str
    run_id: str
    redis_url: str = ""
    duration: float = 10.0
    connections: int = 32
    loadgen: str = "auto"
    n: int = 500
    #: Sent as fast as possible: enough for a sustained rate. 500 were sent in a fifth of a second and
    #: done in about half a second, a burst whose figure was mostly start-up (first fetches, connections).
    n_max: int = 5000
    #: 20/s is a quiet moment (where idle consumers' wake-up shows); the rest, load.
    rates: list[float | None] = field(default_factory=lambda: [20.0, 100.0, 200.0, 500.0, None])
    processes: list[int] = field(default_factory=lambda: [2, 1])
    threads: int = 8
    recipe_counts: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    log_compare: bool = True
    quick: bool = False
    profile: bool = True
    profile_seconds: float = 10.0
    component_seconds: float = 1.0
    #: The run's time budget: stages skip what would not fit (and say so) past it.
    deadline: float = field(default_factory=lambda: time.monotonic() + FULL_BUDGET_S)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def n_at(self, rate: float | None) -> int:
        """Webhooks sent at ``rate``: ``n``, but no more than ``LOW_RATE_SECONDS`` worth below 100/s,
        and at least ``n_max`` as fast as possible."""
        if rate is None:
            return max(self.n, self.n_max)
        if rate >= 100:
            return self.n
        return min(self.n, max(50, int(rate * LOW_RATE_SECONDS)))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rates(text: str) -> list[float | None]:
    return [None if x.strip() == "max" else float(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="~35 s: short flood, small N, fewer configurations, no profiles")
    parser.add_argument("--n", type=int, help="webhooks per end-to-end rate, and per worker drain (default 500)")
    parser.add_argument("--n-max", type=int,
                        help="webhooks sent as fast as possible, if more than --n (default 5000; --quick: --n)")
    parser.add_argument("--duration", type=float, help="seconds of each intake flood (default 10)")
    parser.add_argument("--only", help=f"comma-separated stages of {','.join(STAGES)} (default: all)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                        help="intake flood: wrk when installed (auto), or the python one")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=8, help="worker threads per process")
    parser.add_argument("--processes", help="end-to-end worker processes to try (default 2,1)")
    parser.add_argument("--rates", help="end-to-end rates per second, 'max' for as fast as possible "
                                        "(default 20,100,200,500,max; below 100/s at most 8 s of sends)")
    parser.add_argument("--recipes", help="recipe counts for the worker stage (default 1,10,100,1000)")
    parser.add_argument("--profile-seconds", type=float, help="py-spy sampling time per profile (default 10)")
    parser.add_argument("--budget", type=float, help=f"seconds the run may take before stages skip what would not "
                                                     f"fit (default {FULL_BUDGET_S:g}, --quick {QUICK_BUDGET_S:g})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    return parser.parse_args(argv)


def context(args: argparse.Namespace, tmp: Path) -> tuple[Context, set[str]]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = Context(tmp=tmp, results_dir=args.results, stamp=stamp, run_id=uuid.uuid4().hex[:6],
                  connections=args.connections, loadgen=args.loadgen, threads=args.threads)
    stages = set(STAGES)
    if args.quick:
        ctx.duration, ctx.n, ctx.n_max, ctx.rates, ctx.processes = 2.0, 80, 0, [None], [2]
        ctx.recipe_counts, ctx.log_compare, ctx.component_seconds = [1, 1000], False, 0.2
        ctx.deadline, ctx.quick = time.monotonic() + QUICK_BUDGET_S, True
        stages.discard("profile")
    ctx.duration = args.duration or ctx.duration
    ctx.n = args.n or ctx.n
    ctx.n_max = args.n_max or ctx.n_max
    ctx.rates = _rates(args.rates) if args.rates else ctx.rates
    ctx.processes = _ints(args.processes) if args.processes else ctx.processes
    ctx.recipe_counts = _ints(args.recipes) if args.recipes else ctx.recipe_counts
    ctx.profile_seconds = args.profile_seconds or ctx.profile_seconds
    if args.budget:
        ctx.deadline = time.monotonic() + args.budget
    if args.only:
        stages = {s.strip() for s in args.only.split(",")}
        unknown = stages - set(STAGES)
        if unknown:
            raise SystemExit(f"bench: unknown stage(s) {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
    ctx.profile = "profile" in stages
    return ctx, stages


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("uvicorn", "starlette", "h11", "httptools", "uvloop", "dramatiq", "redis", "SQLAlchemy", "httpx",
                 "pydantic"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _stage(name: str, fn: Any, failures: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    print(f"[bench] {name}…", file=sys.stderr, flush=True)
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one failed stage is reported; the others still run
        traceback.print_exc()
        failures.append(name)
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["stage_s"] = round(time.monotonic() - started, 1)
    print(f"[bench] {name} done in {result['stage_s']} s", file=sys.stderr, flush=True)
    return result


def _memory(stages: dict[str, Any]) -> dict[str, float | None]:
    mem: dict[str, float | None] = {}
    intake_res = stages.get("intake", {})
    if "vivoflow" in intake_res:
        mem["intake: vivoflow serve (flood)"] = intake_res["vivoflow"]["peak_rss_mib"]
        mem["intake ceiling: bare Starlette"] = intake_res["ceiling"]["peak_rss_mib"]
    for cfg in stages.get("e2e", {}).get("configs", []):
        for name, value in cfg["peak_rss_mib"].items():
            mem[f"e2e {cfg['processes']}x{cfg['threads']}: {name}"] = value
    for cfg in stages.get("cluster", {}).get("configs", []):
        for name, value in cfg.get("peak_rss_mib", {}).items():
            mem[f"cluster 2+2x{cfg['threads']}: {name}"] = value
    work = stages.get("worker", {})
    for d in work.get("drains", []):
        mem[f"worker: {d['recipes']} recipe(s), {d['log_level']}"] = d["peak_rss_mib"]
    if "ceiling" in work:
        mem["worker ceiling: bare Dramatiq"] = work["ceiling"].get("peak_rss_mib")
    return mem


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vivoflow-bench-"))
    ctx, stages = context(args, tmp)
    from workers.broker import EmbeddedRedis

    started, before = time.monotonic(), loadavg()
    failures: list[str] = []
    redis_server = EmbeddedRedis(tmp / "redis")
    results: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    try:
        ctx.redis_url = redis_server.start()
        if "intake" in stages:
            results["intake"] = _stage("intake", lambda: intake.run(ctx), failures)
            prof = results["intake"].get("vivoflow", {}).pop("profile", None)
            if prof:
                profiles["intake"] = prof
        if "components" in stages:
            results["components"] = _stage("components", lambda: {
                "redis": components.redis_ceiling(ctx.redis_url, ctx.component_seconds * 2),
                "parts": components.intake_parts(ctx.redis_url, tmp / "parts", ctx.component_seconds),
                "store_statement_forms": components.store_statement_forms(tmp / "forms", ctx.component_seconds),
            }, failures)
        if "e2e" in stages:
            results["e2e"] = _stage("e2e", lambda: e2e.run(ctx), failures)
        if "cluster" in stages:
            results["cluster"] = _stage("cluster", lambda: cluster.run(ctx), failures)
        if "worker" in stages:
            results["worker"] = _stage("worker", lambda: worker.run(ctx), failures)
        if "profile" in stages and ctx.remaining() < ctx.profile_seconds + 20:
            profiles["worker"] = {"skipped": f"time budget ({ctx.remaining():.0f} s left)"}
        elif "profile" in stages:
            def profile_worker() -> dict[str, Any]:
                sink = e2e.Sink(ctx)
                try:
                    drains = results.get("worker", {}).get("drains") or [{}]
                    return worker.profile(ctx, sink.url, drains[0].get("runs_s"))
                finally:
                    sink.stop()
            profiles["worker"] = _stage("profile (worker)", profile_worker, failures)
    finally:
        redis_server.stop()
    after = loadavg()
    cpus = os.cpu_count() or 1
    json_path = ctx.results_dir / f"{ctx.stamp}.json"
    result = {
        "meta": {
            "stamp": ctx.stamp, "mode": "quick" if args.quick else "full",
            "argv": sys.argv[1:] if argv is None else argv,
            "stages": sorted(stages), "failed": failures, "elapsed_s": round(time.monotonic() - started, 1),
            "cpus": cpus, "loadavg_before": before, "loadavg_after": after,
            "busy": max(before[0], after[0]) / cpus > BUSY_LOAD_PER_CORE,
            "python": platform.python_version(), "platform": platform.platform(), "versions": _versions(),
            "wrk": wrk_path(), "py_spy": py_spy(), "json": str(json_path),
            "knobs": {"duration": ctx.duration, "n": ctx.n, "n_max": ctx.n_max, "connections": ctx.connections,
                      "threads": ctx.threads, "rates": [r or "max" for r in ctx.rates], "processes": ctx.processes,
                      "recipes": ctx.recipe_counts, "profile_seconds": ctx.profile_seconds},
        },
        "stages": results,
        "memory": _memory(results),
        "profiles": profiles,
        "peers": report.PEERS,
    }
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    json_path.write_text(text)
    (ctx.results_dir / "latest.json").write_text(text)
    print(report.render(result))
    if args.keep or failures:
        print(f"\nlogs and databases kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
