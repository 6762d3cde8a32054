"""Stage 2, end to end: webhooks at fixed rates through ``vivoflow run`` to a local HTTP sink.

intake → queue → a two-step recipe (condition, ``http.request`` POST of a small rendered JSON to
the sink, ``log.write``) → sink. The sender (bench.loadgen, open loop) and the sink are processes of
their own; both stamp ``time.monotonic()``, one clock for the whole machine, so latency is
sink arrival minus the send's scheduled time. Every id must arrive exactly once.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from typing import Any

import httpx

from bench import procs
from bench.config import E2E_RECIPE, intake_port, write_config, write_recipes
from bench.loadgen import percentiles
from bench.procs import Child, peak_rss_mib

#: How long the bench waits for the sink to stop receiving before it calls the rest lost.
STALL_SECONDS = 15.0


class Sink:
    def __init__(self, ctx: Any) -> None:
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child = Child("sink", procs.python_module("bench.sink", "--port", str(self.port)),
                           ctx.tmp / "logs" / "sink.log")
        self.child.wait_http(self.url + "/healthz")
        # One client for every poll: httpx.get() builds a client, TLS context and CA bundle
        # included, each time (~15 ms of CPU), which took a tenth of a core from the workers
        # while the bench waited for a drain.
        self.http = httpx.Client(timeout=30)

    def count(self, prefix: str) -> int:
        return int(self.http.get(f"{self.url}/_count", params={"prefix": prefix}).json()["unique"])

    def dump(self, prefix: str) -> list[tuple[str, float]]:
        return [tuple(a) for a in self.http.get(f"{self.url}/_dump", params={"prefix": prefix}).json()]

    def stop(self) -> None:
        self.http.close()
        self.child.stop()


def send_webhooks(ctx: Any, port: int | list[int], tag: str, n: int, rate: float | None) -> dict[str, Any]:
    """``n`` webhooks from bench.loadgen; several ports: alternately to each intake."""
    out = ctx.tmp / f"send-{tag}.json"
    mode = ["paced", "--rate", str(rate), "--connections", "64"] if rate else ["flood", "--connections", "32"]
    ports = [a for p in (port if isinstance(port, list) else [port]) for a in ("--port", str(p))]
    argv = [procs.PYTHON, "-m", "bench.loadgen", *mode, *ports, "--tag", tag, "--n", str(n),
            "--out", str(out)]
    subprocess.run(argv, check=True, cwd=procs.ROOT, timeout=n / (rate or 50) + 120)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _drain(sink: Sink, tag: str, n: int, deadline: float) -> float:
    """Wait until the sink has all ``n`` ids, or stops progressing; returns the seconds waited."""
    start, last, seen = time.monotonic(), time.monotonic(), -1
    while time.monotonic() < deadline:
        count = sink.count(tag)
        if count >= n:
            break
        if count != seen:
            seen, last = count, time.monotonic()
        elif time.monotonic() - last > STALL_SECONDS:
            break
        time.sleep(0.2)
    return round(time.monotonic() - start, 2)


def one_rate(ctx: Any, sink: Sink, port: int | list[int], tag: str, n: int, rate: float | None) -> dict[str, Any]:
    sent = send_webhooks(ctx, port, tag, n, rate)
    waited = _drain(sink, tag, n, deadline=time.monotonic() + min(max(60.0, n / 20), max(ctx.remaining() - 10, 15)))
    arrivals = sink.dump(tag)
    first_arrival: dict[str, float] = {}
    for uid, t in arrivals:
        first_arrival.setdefault(uid, t)
    counts = Counter(uid for uid, _ in arrivals)
    sends = dict(sent["sends"])
    latencies = [first_arrival[uid] - t for uid, t in sends.items() if uid in first_arrival]
    span = (max(first_arrival.values()) - min(sends.values())) if first_arrival else 0.0
    statuses = {int(k): v for k, v in sent["statuses"].items()}
    e2e = percentiles(latencies)
    return {
        "rate": rate or "max", "n": n,
        "sent_rate": round(n / sent["send_s"], 1) if sent["send_s"] else None,
        "accepted": statuses.get(202, 0), "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
        "intake_p50_ms": sent["p50_ms"], "intake_p99_ms": sent["p99_ms"],
        "arrived": len(first_arrival), "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "lost": n - len(first_arrival),
        "exactly_once": len(first_arrival) == n and all(c == 1 for c in counts.values()),
        "completed_s": round(len(first_arrival) / span, 1) if span else None,
        "e2e_p50_ms": e2e["p50_ms"], "e2e_p99_ms": e2e["p99_ms"], "e2e_max_ms": e2e["max_ms"],
        "drain_wait_s": waited,
    }


#: Webhooks sent (at 20/s, not reported) before a deployment's first measured rate: the first
#: calls open connections and fill caches, which is start-up, not a quiet moment's latency.
WARM_UP = 20


def warm_up(ctx: Any, sink: Sink, port: int | list[int], tag: str) -> None:
    one_rate(ctx, sink, port, f"{tag}warm-", WARM_UP, 20.0)


def run_processes(ctx: Any, sink: Sink, processes: int) -> dict[str, Any]:
    folder = ctx.tmp / f"e2e-p{processes}"
    config = write_config(folder, broker_url="embedded", processes=processes, threads=ctx.threads)
    write_recipes(folder / "recipes", E2E_RECIPE.format(sink=sink.url), 1)
    port = intake_port(config)
    child = Child("vivoflow run", procs.vivoflow(config, "run"), ctx.tmp / "logs" / f"run-p{processes}.log",
                  cwd=folder)
    try:
        child.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90)
        procs.wait_until(lambda: child.check() or child.log().count(" ready (") >= processes, 90,
                   what=f"{processes} worker(s) ready")
        workers = [p for p in procs.children_of(child.pid) if " worker" in procs.cmdline(p)]
        pids = [child.pid, *workers]
        warm_up(ctx, sink, port, f"e{ctx.run_id}p{processes}")
        cpu0 = {p: procs.cpu_seconds(p) for p in pids}
        rates = []
        for rate in ctx.rates:
            if ctx.remaining() < 20:
                left = f"time budget ({ctx.remaining():.0f} s left)"
                rates.append({"rate": rate or "max", "n": ctx.n_at(rate), "skipped": left})
                continue
            tag = f"e{ctx.run_id}p{processes}r{rate or 'max'}-"
            rates.append(one_rate(ctx, sink, port, tag, ctx.n_at(rate), rate))
        cpu1 = {p: procs.cpu_seconds(p) for p in pids}
        arrived = sum(r.get("arrived", 0) for r in rates)
        requests = sum(r["n"] for r in rates if "skipped" not in r)

        def cpu(ps: list[int]) -> float:
            return sum((cpu1[p] or 0) - (cpu0[p] or 0) for p in ps)
        return {
            "processes": processes, "threads": ctx.threads, "rates": rates,
            "intake_cpu_ms_per_request": round(cpu([child.pid]) / requests * 1000, 3) if requests else None,
            "worker_cpu_ms_per_run": round(cpu(workers) / arrived * 1000, 3) if arrived else None,
            "peak_rss_mib": {"intake (vivoflow run)": peak_rss_mib(child.pid),
                             **{f"worker {i + 1}": peak_rss_mib(p) for i, p in enumerate(workers)}},
        }
    finally:
        child.stop(timeout=60)


def run(ctx: Any) -> dict[str, Any]:
    sink = Sink(ctx)
    try:
        configs = []
        for p in ctx.processes:
            if configs and ctx.remaining() < 40:
                configs.append({"processes": p, "skipped": f"time budget ({ctx.remaining():.0f} s left)"})
                continue
            configs.append(run_processes(ctx, sink, p))
        return {"configs": configs}
    finally:
        sink.stop()
