"""Stage 3, worker throughput: one worker process draining a pre-filled queue, with 1…1,000 recipes loaded.

One recipe matches (a condition and a ``log.write``); the others listen to other events, as
unrelated recipes do. Deliveries are stored and enqueued as the intake does while no worker
runs; then the worker starts and runs/s is timed from the store (first run created to last run
finished), so start-up and recipe loading are reported apart. Also: the worker profile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import product
from bench.config import E2E_RECIPE, NOOP_RECIPE, write_config, write_recipes
from bench.payloads import Bodies
from bench.procs import Child, cpu_seconds, peak_rss_mib, python_module, vivoflow, wait_until
from bench.profile import Profiler


def prefill(config: Path, tag: str, n: int) -> float:
    """Store and enqueue ``n`` distinct deliveries; returns the seconds it took."""
    app = product.open_app(config)
    bodies = Bodies(tag)
    start = time.perf_counter()
    try:
        for i in range(n):
            product.enqueue(app, product.store_delivery(app, bodies.body(i)))
    finally:
        app.close()
    return round(time.perf_counter() - start, 2)


def _wait_processed(db: Path, n: int, child: Child, timeout: float, on_first: Any = None) -> dict[str, Any]:
    first_seen = False

    def done() -> dict[str, Any] | None:
        nonlocal first_seen
        child.check()
        counts = product.sqlite_counts(db)
        if not first_seen and counts["first_run_at"] is not None:
            first_seen = True
            if on_first:
                on_first()
        return counts if counts["processed"] >= n else None

    return wait_until(done, timeout, 0.25, what=f"{n} deliveries processed")


def statements_per_delivery(config: Path, tag: str) -> dict[str, Any]:
    """SQL statements and commits one delivery costs, read from SQLite's own statement trace.

    The trace sees what reaches SQLite whichever layer sent it (the run path talks to the
    driver directly, past SQLAlchemy's events).
    """
    import sqlalchemy as sa

    app = product.open_app(config)
    try:
        bodies = Bodies(tag)
        traced: list[str] = []
        app.store.engine.dispose()  # connections opened from here on are traced
        sa.event.listen(app.store.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(traced.append))
        app.engine.run_delivery(product.store_delivery(app, bodies.body(0)))  # warm: recipes, connections
        delivery_id = product.store_delivery(app, bodies.body(1))
        traced.clear()
        started = time.perf_counter()
        app.engine.run_delivery(delivery_id)
        took = time.perf_counter() - started
        counts: dict[str, int] = {}
        for text in traced:
            verb = text.lstrip().split(None, 1)[0].upper()
            counts[verb] = counts.get(verb, 0) + 1
        statements = sum(v for k, v in counts.items() if k not in ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"))
        return {"statements": statements, "by_verb": counts, "wall_ms_one_thread": round(took * 1000, 2)}
    finally:
        app.close()


def drain(ctx: Any, recipes: int, n: int, log_level: str = "WARNING") -> dict[str, Any]:
    folder = ctx.tmp / f"worker-{recipes}-{log_level.lower()}"
    namespace = f"bench-worker-{ctx.run_id}-{recipes}-{log_level.lower()}"
    config = write_config(folder, broker_url=ctx.redis_url, namespace=namespace, threads=ctx.threads)
    write_recipes(folder / "recipes", NOOP_RECIPE, recipes)
    prefill_s = prefill(config, f"w{ctx.run_id}k{recipes}", n)
    spawned = time.time()
    child = Child("worker", python_module("bench.workerproc", "--config", str(config), "--threads",
                                          str(ctx.threads), "--log-level", log_level),
                  ctx.tmp / "logs" / f"worker-{recipes}-{log_level.lower()}.log", cwd=folder)
    cpu_at_first: list[float | None] = []
    try:
        counts = _wait_processed(folder / "data" / "vivoflow.db", n, child, timeout=max(90.0, n / 10),
                                 on_first=lambda: cpu_at_first.append(cpu_seconds(child.pid)))
        cpu_end = cpu_seconds(child.pid)
        runs = sum(counts["runs"].values())
        span = (counts["last_run_at"] or 0) - (counts["first_run_at"] or 0)
        cpu = (cpu_end or 0) - (cpu_at_first[0] or 0) if cpu_at_first else None
        rss = peak_rss_mib(child.pid)
        stopping = time.monotonic()
        child.stop()
        stop_s = round(time.monotonic() - stopping, 2)
        sql = statements_per_delivery(config, f"ws{ctx.run_id}k{recipes}") if log_level == "WARNING" else None
        return {
            "recipes": recipes, "matching": 1, "log_level": log_level, "deliveries": n, "runs": runs,
            "runs_by_status": counts["runs"], "runs_s": round(runs / span, 1) if span > 0 else None,
            "startup_s": round(counts["first_run_at"] - spawned, 2) if counts["first_run_at"] else None,
            "cpu_ms_per_run": round(cpu / runs * 1000, 3) if cpu and runs else None,
            "prefill_s": prefill_s, "peak_rss_mib": rss, "stop_s": stop_s, "sql_per_delivery": sql,
        }
    finally:
        child.stop()


def queue_ceiling(ctx: Any, n: int) -> dict[str, Any]:
    """A bare Dramatiq worker with the same threads draining ``n`` no-op messages."""
    import json
    import subprocess

    from bench.procs import PYTHON, ROOT
    from bench.queue_ceiling import fill

    namespace = f"bench-qceil-{ctx.run_id}"
    fill(ctx.redis_url, namespace, n)
    done = subprocess.run([PYTHON, "-m", "bench.queue_ceiling", "--url", ctx.redis_url, "--namespace", namespace,
                           "--n", str(n), "--threads", str(ctx.threads)], capture_output=True, text=True,
                          cwd=ROOT, timeout=180, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


#: A drain is this many times ``--n``: a no-op run takes ~1 ms, and a drain of a few hundred ended
#: within the bench's 0.25 s polling, which made runs/s and CPU ms/run mostly noise.
DRAIN_FACTOR = 6


def run(ctx: Any) -> dict[str, Any]:
    n = ctx.n * DRAIN_FACTOR
    ceiling = queue_ceiling(ctx, n)
    results, skipped = [], []
    for k in ctx.recipe_counts:
        if results and ctx.remaining() < 25:
            skipped.append(k)
            continue
        results.append(drain(ctx, k, n))
    for r in results:
        r["ratio_vs_ceiling"] = round(r["runs_s"] / ceiling["messages_s"], 3) \
            if r["runs_s"] and ceiling.get("messages_s") else None
    by = {r["recipes"]: r["runs_s"] for r in results}
    lo, hi = min(by), max(by)
    out: dict[str, Any] = {"threads": ctx.threads, "ceiling": ceiling, "drains": results,
                           "ratio_most_vs_fewest_recipes": round(by[hi] / by[lo], 3) if by[lo] and by[hi] else None,
                           "fewest_recipes": lo, "most_recipes": hi,
                           "skipped_recipe_counts": skipped}
    if ctx.log_compare and ctx.remaining() > 35:
        info = drain(ctx, lo, n, "INFO")
        out["drains"].append(info)
        out["ratio_info_vs_warning_logging"] = round(info["runs_s"] / by[lo], 3) if info["runs_s"] and by[lo] else None
    return out


def profile(ctx: Any, sink_url: str, runs_s: float | None) -> dict[str, Any]:
    """Profile the real ``vivoflow worker`` (INFO logging, as deployed) running the end-to-end recipe."""
    folder = ctx.tmp / "worker-profile"
    namespace = f"bench-worker-profile-{ctx.run_id}"
    config = write_config(folder, broker_url=ctx.redis_url, namespace=namespace, threads=ctx.threads)
    write_recipes(folder / "recipes", E2E_RECIPE.format(sink=sink_url), 1)
    # Enough work that the worker is busy for the whole sampling, plus its start-up.
    n = int(min(max((runs_s or 100) * (ctx.profile_seconds + 8) * 1.3, 500), 8000))
    prefill(config, f"wp{ctx.run_id}", n)
    child = Child("vivoflow worker", vivoflow(config, "worker", "--processes", "1", "--threads", str(ctx.threads)),
                  ctx.tmp / "logs" / "worker-profile.log", cwd=folder)
    try:
        wait_until(lambda: child.check() or product.sqlite_counts(folder / "data" / "vivoflow.db")["first_run_at"],
                   60, 0.2, what="first run")
        time.sleep(2.0)  # steady state: past the first use of each connector and connection
        before = product.sqlite_counts(folder / "data" / "vivoflow.db")["processed"]
        with Profiler(child.pid, "worker", ctx) as profiler:
            time.sleep(ctx.profile_seconds)
        after = product.sqlite_counts(folder / "data" / "vivoflow.db")["processed"]
        summary = profiler.summary
        summary["deliveries_during_profile"] = after - before
        summary["prefilled"] = n
        summary["still_busy_at_end"] = after < n
        child.stop()
        summary["sql_per_delivery"] = statements_per_delivery(config, f"wps{ctx.run_id}")
        return summary
    finally:
        child.stop()
