"""Stage ``cluster``: the end-to-end job on a multi-process deployment, as deploy/ runs one.

Two intakes (``vivoflow serve`` on two ports) and two workers (``vivoflow worker --processes 1
--threads <threads>``), each a process of its own, share one external Redis (the machine's
redis-server at 127.0.0.1:6379 under a namespace of this run; when it does not answer, the run's
EmbeddedRedis, and the result says so) and one PostgreSQL store (a schema created for the stage and
dropped after it; no PostgreSQL: the stage is skipped, with the reason). ``vivoflow db upgrade`` runs
first, as the migration service does. The load generator, the sink and the recipe are the e2e
stage's; the requests alternate between the two intakes. Figures: completed/s, send-to-sink
p50/p99, every id exactly once (counted at the sink), and what the store holds after.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from typing import Any

import sqlalchemy as sa
import yaml

from bench import procs
from bench.config import E2E_RECIPE, write_recipes
from bench.e2e import Sink, one_rate, warm_up
from bench.payloads import SIGNING_KEY
from bench.procs import Child, peak_rss_mib
from workers.runner import WORKER_CPU_ENV

POSTGRES_URL = os.environ.get("VIVOFLOW_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VIVOFLOW_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
#: The section's own time budget (start-up, every rate, shut-down): past it, rates are skipped.
SECTION_BUDGET_S = 55.0
PORT_VARIABLE = "VIVOFLOW_BENCH_INTAKE_PORT"
RUN_FINISHED = re.compile(r"run (run_\w+) \([\w-]+\) (?:succeeded|failed)")


def _admin_engine() -> sa.Engine:
    return sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                            connect_args={"connect_timeout": 3})


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it answers."""
    try:
        engine = _admin_engine()
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, and say why
        return (f"PostgreSQL not reachable at {POSTGRES_URL} ({type(exc).__name__}); "
                f"set VIVOFLOW_BENCH_POSTGRES_URL")
    return None


def external_redis() -> str | None:
    """The machine's redis-server URL when it answers a PING, else None."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        return REDIS_URL if client.ping() else None
    except redis.RedisError:
        return None
    finally:
        client.close()


def _write_config(folder: Any, broker_url: str, namespace: str, store_url: str, threads: int) -> Any:
    """One config for all four processes (as in deploy/): the intake's port comes from the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "intake": {"host": "127.0.0.1", "port": f"${{{PORT_VARIABLE}:-8000}}", "signing_key": SIGNING_KEY},
        "broker": {"url": broker_url, "namespace": namespace, "data_dir": "./data"},
        "store": {"url": store_url},
        "recipes": {"dir": "recipes"},
        "workers": {"processes": 1, "threads": threads},
        "connectors": {"email": {"host": ""}, "http": {"timeout_seconds": 10}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _store_counts(store_url: str, schema: str) -> dict[str, Any]:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'SET search_path TO "{schema}"'))  # a generated name, not input
            stored, processed = conn.execute(sa.text("SELECT count(*), count(processed_at) FROM deliveries")).one()
            runs = dict(conn.execute(sa.text("SELECT status, count(*) FROM runs GROUP BY status")).all())
    finally:
        engine.dispose()
    return {"stored": stored, "processed": processed, "runs": runs}


def _deployment(ctx: Any, sink: Sink, folder: Any, broker_url: str, store_url: str, schema: str,
                started: float) -> dict[str, Any]:
    namespace = f"bench-cluster-{ctx.run_id}-{uuid.uuid4().hex[:6]}"
    config = _write_config(folder, broker_url, namespace, store_url, ctx.threads)
    write_recipes(folder / "recipes", E2E_RECIPE.format(sink=sink.url), 1)
    metrics = folder / "metrics"  # one machine: every process counts into one folder (deploy/README.md)
    metrics.mkdir(exist_ok=True)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics), "VIVOFLOW_BROKER_URL": broker_url}
    logs = ctx.tmp / "logs"

    t0 = time.monotonic()
    migrate = subprocess.run(procs.vivoflow(config, "db", "upgrade"), cwd=folder, capture_output=True, text=True,
                             timeout=90, env={**os.environ, **env,
                                              "PYTHONPATH": os.pathsep.join(filter(None, [
                                                  str(procs.ROOT), os.environ.get("PYTHONPATH")]))})
    if migrate.returncode != 0:
        raise RuntimeError(f"vivoflow db upgrade exited with {migrate.returncode}: {migrate.stderr[-2000:]}")
    upgrade_s = round(time.monotonic() - t0, 1)

    ports = [procs.free_port(), procs.free_port()]
    children: list[Child] = []
    try:
        intakes = [Child(f"vivoflow serve :{port}", procs.vivoflow(config, "serve"),
                         logs / f"cluster-serve-{i + 1}.log", cwd=folder, env={**env, PORT_VARIABLE: str(port)})
                   for i, port in enumerate(ports)]
        children += intakes
        # Each on a CPU of its own, as the README tells those who start workers one by one.
        cpus = sorted(os.sched_getaffinity(0))
        workers = [Child(f"vivoflow worker {i + 1}",
                         procs.vivoflow(config, "worker", "--processes", "1", "--threads", str(ctx.threads)),
                         logs / f"cluster-worker-{i + 1}.log", cwd=folder,
                         env={**env, WORKER_CPU_ENV: str(cpus[i % len(cpus)])} if len(cpus) > 1 else env)
                   for i in range(2)]
        children += workers
        for intake, port in zip(intakes, ports, strict=True):
            intake.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90)
        for w in workers:
            procs.wait_until(lambda w=w: w.check() or " ready (" in w.log(), 90, what=f"{w.name} ready")
        ready_s = round(time.monotonic() - t0, 1)
        # `vivoflow worker --processes 1` may run its consumer in a child process: measure the whole tree.
        worker_pids = [[w.pid, *procs.children_of(w.pid)] for w in workers]
        pids = [*(c.pid for c in intakes), *(p for tree in worker_pids for p in tree)]
        warm_up(ctx, sink, ports, f"c{ctx.run_id}")
        cpu0 = {p: procs.cpu_seconds(p) for p in pids}
        rates = []
        for rate in ctx.rates:
            section_left = SECTION_BUDGET_S - (time.monotonic() - started)
            if ctx.remaining() < 20 or (rates and section_left < 15):
                left = (f"time budget ({ctx.remaining():.0f} s left)" if ctx.remaining() < 20
                        else f"section budget ({SECTION_BUDGET_S:g} s)")
                rates.append({"rate": rate or "max", "n": ctx.n_at(rate), "skipped": left})
                continue
            tag = f"c{ctx.run_id}r{rate or 'max'}-"
            rates.append(one_rate(ctx, sink, ports, tag, ctx.n_at(rate), rate))
        cpu1 = {p: procs.cpu_seconds(p) for p in pids}
        arrived = sum(r.get("arrived", 0) for r in rates)
        requests = sum(r["n"] for r in rates if "skipped" not in r)

        def cpu(ps: list[int]) -> float:
            return sum((cpu1[p] or 0) - (cpu0[p] or 0) for p in ps)

        def runs_by(w: Child) -> int:
            return len(set(RUN_FINISHED.findall(w.log())))

        peak = {f"intake {i + 1} (vivoflow serve)": peak_rss_mib(c.pid) for i, c in enumerate(intakes)}
        for i, tree in enumerate(worker_pids):
            peak.update({f"worker {i + 1}" + ("" if j == 0 else f" child {j}"): peak_rss_mib(p)
                         for j, p in enumerate(tree)})
        return {
            "processes": "2 intakes + 2 workers", "threads": ctx.threads, "rates": rates,
            "intake_ports": ports, "db_upgrade_s": upgrade_s, "ready_s": ready_s,
            "intake_cpu_ms_per_request": round(cpu([c.pid for c in intakes]) / requests * 1000, 3)
            if requests else None,
            "worker_cpu_ms_per_run": round(cpu([p for tree in worker_pids for p in tree]) / arrived * 1000, 3)
            if arrived else None,
            "runs_per_worker": [runs_by(w) for w in workers],
            "store": _store_counts(store_url, schema),
            "peak_rss_mib": peak,
        }
    finally:
        for child in reversed(children):  # workers first, then the intakes
            child.stop(timeout=30)
        _forget(broker_url, namespace)


def _forget(broker_url: str, namespace: str) -> None:
    """Delete this run's keys (queues, heartbeats) from the shared Redis."""
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


def run(ctx: Any) -> dict[str, Any]:
    started = time.monotonic()
    if reason := postgres_unreachable():
        print(f"[bench] cluster: skipped: {reason}", flush=True)
        return {"skipped": reason}
    if ctx.remaining() < 25:
        return {"skipped": f"time budget ({ctx.remaining():.0f} s left)"}
    broker_url = external_redis()
    broker = {"kind": "external", "url": broker_url}
    if broker_url is None:
        note = f"no redis-server answering at {REDIS_URL}: the run's EmbeddedRedis (workers.broker) instead"
        print(f"[bench] cluster: {note}", flush=True)
        broker = {"kind": "embedded", "url": ctx.redis_url, "note": note}
        broker_url = ctx.redis_url

    schema = f"bench_{ctx.run_id}_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine()
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))  # a generated name, not input
    store_url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    sink = Sink(ctx)
    try:
        result = _deployment(ctx, sink, ctx.tmp / "cluster", broker_url, store_url, schema, started)
    finally:
        sink.stop()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return {"broker": broker, "store": {"url": POSTGRES_URL, "schema": schema, "dropped": True},
            "configs": [result]}
