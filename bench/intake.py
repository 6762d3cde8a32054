"""Stage 1, the intake: signed ~3 KB webhooks at full speed against ``vivoflow serve``, and against the ceiling.

The ceiling is a bare Starlette app on the same uvicorn settings; the flood comes from a separate
process (wrk, else bench.loadgen). The intake runs with no workers: what is measured is accept =
verify + store + enqueue. The store and queue are counted afterwards, to check every 202 was kept.
"""

from __future__ import annotations

from typing import Any

from bench import product
from bench.config import intake_port, write_config
from bench.flood import flood
from bench.procs import Child, cpu_split, peak_rss_mib, python_module, vivoflow
from bench.profile import Profiler


def _measured_flood(child: Child, port: int, ctx: Any, tag: str, pool: int) -> dict[str, Any]:
    cpu0 = cpu_split(child.pid)
    result = flood(port, duration=ctx.duration, connections=ctx.connections, tag=tag, workdir=ctx.tmp,
                   pool=pool, tool=ctx.loadgen)
    cpu1 = cpu_split(child.pid)
    if cpu0 is not None and cpu1 is not None and result["requests"]:
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        result["server_cpu_s"] = {"user": round(user, 2), "system": round(system, 2)}
        result["server_cores_busy"] = round((user + system) / result["elapsed_s"], 2)
        result["server_cpu_ms_per_request"] = round((user + system) / result["requests"] * 1000, 3)
    return result


def ceiling(ctx: Any) -> dict[str, Any]:
    from bench.procs import free_port

    port = free_port()
    child = Child("ceiling", python_module("bench.ceiling", "--port", str(port)), ctx.tmp / "logs" / "ceiling.log")
    try:
        child.wait_http(f"http://127.0.0.1:{port}/healthz")
        # Bodies need not be distinct here: a small pool, cycled.
        result = _measured_flood(child, port, ctx, "ceil", pool=4000)
        result["peak_rss_mib"] = peak_rss_mib(child.pid)
        return result
    finally:
        child.stop()


def vivoflow_intake(ctx: Any) -> dict[str, Any]:
    folder = ctx.tmp / "intake"
    namespace = f"bench-intake-{ctx.run_id}"
    config = write_config(folder, broker_url=ctx.redis_url, namespace=namespace, processes=0)
    port = intake_port(config)
    child = Child("vivoflow serve", vivoflow(config, "serve"), ctx.tmp / "logs" / "serve.log", cwd=folder)
    try:
        child.wait_http(f"http://127.0.0.1:{port}/readyz")
        # Enough distinct bodies that wrk never repeats one (a repeat is a 200 duplicate, not a 202).
        pool = int(min(max(ctx.duration * 3000, 2000), 60000))
        result = _measured_flood(child, port, ctx, f"in{ctx.run_id}", pool=pool)
        result["peak_rss_mib"] = peak_rss_mib(child.pid)
        result["store"] = product.sqlite_counts(folder / "data" / "vivoflow.db")
        result["queued"] = product.queue_length(ctx.redis_url, namespace)
        if ctx.profile:
            with Profiler(child.pid, "intake", ctx) as profiler:
                flood(port, duration=ctx.profile_seconds, connections=ctx.connections, tag=f"inp{ctx.run_id}",
                      workdir=ctx.tmp, pool=int(ctx.profile_seconds * 3000), tool=ctx.loadgen)
            result["profile"] = profiler.summary
        return result
    finally:
        child.stop()


def run(ctx: Any) -> dict[str, Any]:
    ours = vivoflow_intake(ctx)
    bare = ceiling(ctx)
    ratio = round(ours["accepted_s"] / bare["req_s"], 3) if bare["req_s"] else None
    return {"vivoflow": ours, "ceiling": bare, "ratio_accepted_vs_ceiling": ratio}



