"""Stage 1, the intake: signed ~3 KB webhooks at full speed against ``vivoflow serve``, and against the ceiling.

The ceiling is a bare Starlette app on the same uvicorn settings; the flood comes from a separate
process (wrk, else bench.loadgen). The intake runs with no workers: what is measured is accept =
verify + store + enqueue. The store and queue are counted afterwards, to check every 202 was kept.
Then both are sent webhooks at half the ceiling's flood rate (wrk with a pause per connection, else
``bench.loadgen paced``), for the latency a busy but not saturated intake answers with; the
ceiling's own figure at that rate is the load generator's floor.
"""

from __future__ import annotations

from typing import Any

from bench import product
from bench.config import intake_port, write_config
from bench.e2e import send_webhooks
from bench.flood import flood, wrk_path
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


#: Seconds of each paced run at half the ceiling's rate (``--quick``: a third of it).
PACED_SECONDS = 3.0
PACED_CONNECTIONS = 128


def _paced(ctx: Any, port: int, rate: float, tag: str) -> dict[str, Any]:
    """About ``rate`` webhooks a second: wrk with a pause per connection (C, so the load generator
    leaves the server its core), else bench.loadgen's open loop."""
    seconds = PACED_SECONDS / (3 if ctx.quick else 1)
    if ctx.loadgen != "python" and wrk_path():
        # A connection sends every pause + latency: many connections with long pauses keep the
        # rate close to the one asked whatever the latency (a millisecond of it is assumed).
        pause_ms = max(round(PACED_CONNECTIONS * 1000 / rate) - 1, 1)
        sent = flood(port, duration=seconds, connections=PACED_CONNECTIONS, tag=tag, workdir=ctx.tmp,
                     pool=int(rate * seconds * 1.5) + 100, tool="wrk", pause_ms=pause_ms)
        return {"rate": round(rate), "n": sent["requests"], "sent_s": sent["req_s"], "p50_ms": sent["p50_ms"],
                "p99_ms": sent["p99_ms"], "statuses": sent["statuses"], "tool": sent["tool"]}
    n = max(int(rate * seconds), 50)
    sent = send_webhooks(ctx, port, tag, n, rate)
    return {"rate": round(rate), "n": n, "sent_s": round(n / sent["send_s"], 1) if sent["send_s"] else None,
            "p50_ms": sent["p50_ms"], "p99_ms": sent["p99_ms"], "statuses": sent["statuses"],
            "tool": "bench.loadgen paced (open loop)"}


def ceiling(ctx: Any) -> dict[str, Any]:
    from bench.procs import free_port

    port = free_port()
    child = Child("ceiling", python_module("bench.ceiling", "--port", str(port)), ctx.tmp / "logs" / "ceiling.log")
    try:
        child.wait_http(f"http://127.0.0.1:{port}/healthz")
        # Bodies need not be distinct here: a small pool, cycled.
        result = _measured_flood(child, port, ctx, "ceil", pool=4000)
        if result["req_s"]:
            result["paced"] = _paced(ctx, port, result["req_s"] / 2, f"cp{ctx.run_id}")
        result["peak_rss_mib"] = peak_rss_mib(child.pid)
        return result
    finally:
        child.stop()


def vivoflow_intake(ctx: Any, paced_rate: float | None) -> dict[str, Any]:
    folder = ctx.tmp / "intake"
    namespace = f"bench-intake-{ctx.run_id}"
    config = write_config(folder, broker_url=ctx.redis_url, namespace=namespace, processes=0)
    port = intake_port(config)
    child = Child("vivoflow serve", vivoflow(config, "serve"), ctx.tmp / "logs" / "serve.log", cwd=folder)
    try:
        child.wait_http(f"http://127.0.0.1:{port}/readyz")
        # Enough distinct bodies that wrk never repeats one (a repeat is a 200 duplicate, not a 202).
        pool = int(min(max(ctx.duration * 6000, 2000), 120000))
        result = _measured_flood(child, port, ctx, f"in{ctx.run_id}", pool=pool)
        if paced_rate:
            result["paced"] = _paced(ctx, port, paced_rate, f"ip{ctx.run_id}")
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
    bare = ceiling(ctx)
    ours = vivoflow_intake(ctx, bare.get("paced", {}).get("rate"))
    ratio = round(ours["accepted_s"] / bare["req_s"], 3) if bare["req_s"] else None
    return {"vivoflow": ours, "ceiling": bare, "ratio_accepted_vs_ceiling": ratio}



