"""The printed report: each figure beside this machine's ceiling (as a ratio) and the peers' figures.

Peers: /work/shared/research/peers.md, measured on the same kind of 2-core machine with the same
job (Node-RED 5.0.7, n8n 2.41.1; medians of 3 runs).
"""

from __future__ import annotations

from typing import Any

PEERS: dict[str, Any] = {
    "source": "shared/research/peers.md (same job, same kind of 2-core machine, medians of 3 runs)",
    "intake": {  # wrk -t2 -c32 -d15s
        "Node-RED": {"req_s": 3631, "p50_ms": 7.8, "p99_ms": 30.3},
        "n8n": {"req_s": 22, "p50_ms": 1440.0, "p99_ms": 1600.0},
        "n8n-queue": {"req_s": 58, "p50_ms": 534.8, "p99_ms": 984.5},
    },
    "e2e": {  # 2,000 webhooks at a fixed rate -> sink
        "Node-RED@100": {"throughput_s": 100.0, "e2e_p50_ms": 2.1, "e2e_p99_ms": 4.4},
        "Node-RED@300": {"throughput_s": 299.9, "e2e_p50_ms": 1.6, "e2e_p99_ms": 19.2},
        "n8n@100": {"throughput_s": 19.1, "e2e_p50_ms": 45367.5, "e2e_p99_ms": 84298.2},
        "n8n@300": {"throughput_s": 20.6, "e2e_p50_ms": 46536.9, "e2e_p99_ms": 89846.0},
        "n8n-queue@300": {"throughput_s": 19.9, "e2e_p50_ms": 50008.5, "e2e_p99_ms": 93042.4},
    },
    "memory_max_mib": {"Node-RED main": 2079, "n8n main": 3126, "n8n-queue main": 789, "n8n-queue worker": 813},
}


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  " + "  ".join(cells))
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _error(section: Any) -> str | None:
    if isinstance(section, dict) and "error" in section:
        return f"  stage failed: {section['error']}"
    return None


def intake(res: dict[str, Any]) -> str:
    if (err := _error(res)) or not res:
        return err or "  (not run)"
    ours, bare = res["vivoflow"], res["ceiling"]
    p = PEERS["intake"]
    rows = [["", "vivoflow", "ceiling", "ratio", "Node-RED", "n8n", "n8n-queue"],
            ["accepted req/s (202)", _n(ours["accepted_s"]), _n(bare["req_s"]),
             _ratio(res["ratio_accepted_vs_ceiling"]),
             _n(p["Node-RED"]["req_s"]), _n(p["n8n"]["req_s"]), _n(p["n8n-queue"]["req_s"])],
            ["p50 latency ms", _n(ours["p50_ms"], 1), _n(bare["p50_ms"], 1),
             _ratio(ours["p50_ms"] / bare["p50_ms"] if bare["p50_ms"] else None),
             _n(p["Node-RED"]["p50_ms"], 1), _n(p["n8n"]["p50_ms"], 0), _n(p["n8n-queue"]["p50_ms"], 0)],
            ["p99 latency ms", _n(ours["p99_ms"], 1), _n(bare["p99_ms"], 1),
             _ratio(ours["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else None),
             _n(p["Node-RED"]["p99_ms"], 1), _n(p["n8n"]["p99_ms"], 0), _n(p["n8n-queue"]["p99_ms"], 0)],
            ["non-2xx", _n(ours["non_2xx"]), _n(bare["non_2xx"]), "", "0", "0", "0"],
            ["socket errors", _n(sum(ours["socket_errors"].values())), _n(sum(bare["socket_errors"].values())),
             "", "0", "0", "0"],
            ["server CPU ms/request", _n(ours.get("server_cpu_ms_per_request"), 3),
             _n(bare.get("server_cpu_ms_per_request"), 3),
             _ratio(ours["server_cpu_ms_per_request"] / bare["server_cpu_ms_per_request"])
             if ours.get("server_cpu_ms_per_request") and bare.get("server_cpu_ms_per_request") else "-", "", "", ""],
            ["server cores busy", _n(ours.get("server_cores_busy"), 2), _n(bare.get("server_cores_busy"), 2),
             "", "", "", ""],
            ["peak RSS MiB", _n(ours["peak_rss_mib"], 1), _n(bare["peak_rss_mib"], 1), "", "2,079", "3,126", "789"]]
    paced, bare_paced = ours.get("paced") or {}, bare.get("paced") or {}
    if paced:
        rows.append([f"p50 ms at {_n(paced['rate'])}/s paced", _n(paced["p50_ms"], 1), _n(bare_paced.get("p50_ms"), 1),
                     "", "", "", ""])
        rows.append([f"p99 ms at {_n(paced['rate'])}/s paced", _n(paced["p99_ms"], 1), _n(bare_paced.get("p99_ms"), 1),
                     "", "", "", ""])
    store = ours.get("store", {})
    cpu = ours.get("server_cpu_s") or {}
    notes = [f"  load: {ours['tool']}; {ours['requests']:,} requests, statuses {ours['statuses']}; vivoflow CPU "
             f"user {_n(cpu.get('user'), 1)} s, system {_n(cpu.get('system'), 1)} s",
             f"  kept: {store.get('stored', '-'):,} stored in SQLite, {_n(ours.get('queued'))} on the queue "
             f"(every 202 must be both); wrk pool wrapped: {ours.get('pool_wrapped', 0)}"]
    if paced:
        notes.append(f"  paced: half the ceiling's flood rate by {paced.get('tool')}; {paced['n']:,} webhooks at "
                     f"{_n(paced['sent_s'])}/s (ceiling: {_n(bare_paced.get('sent_s'))}/s), statuses "
                     f"{paced['statuses']}; the ceiling's latency there is the load generator's floor")
    return _table(rows) + "\n" + "\n".join(notes)


def components(res: dict[str, Any]) -> str:
    if (err := _error(res)) or not res:
        return err or "  (not run)"
    r = res["redis"]
    rows = [["one thread, product functions", "ops/s", "µs/op"],
            [f"Redis RPUSH {r['value_bytes']} B ({r['url_kind']} socket)", _n(r["rpush"]["ops_s"]),
             _n(r["rpush"]["us_per_op"], 1)],
            ["Redis RPUSH pipelined x100", _n(r["rpush_pipelined_100"]["ops_s"]),
             _n(r["rpush_pipelined_100"]["us_per_op"], 1)]]
    for name, part in res["parts"].items():
        if "error" in part:
            rows.append([name, "error", part["error"][:40]])
        else:
            rows.append([name, _n(part["ops_s"]), _n(part["us_per_op"], 1)])
    for name, part in res.get("store_statement_forms", {}).items():
        rows.append([f"run UPDATE + commit: {name}", _n(part["ops_s"]), _n(part["us_per_op"], 1)])
    return _table(rows)


def _e2e_rows(configs: list[dict[str, Any]], label: str = "") -> list[list[str]]:
    rows = []
    for cfg in configs:
        who = f"{label}{cfg['processes']}"
        if "skipped" in cfg:
            rows.append([f"{who} x -", "skipped", cfg["skipped"], *[""] * 9])
            continue
        for r in cfg["rates"]:
            if "skipped" in r:
                rows.append([f"{who} x {cfg['threads']}", _n(r["rate"]), "skipped", r["skipped"], *[""] * 8])
                continue
            ratio = r["completed_s"] / r["sent_rate"] if r["completed_s"] and r["sent_rate"] else None
            rows.append([f"{who} x {cfg['threads']}", _n(r["rate"]), _n(r["sent_rate"]),
                         _n(r["completed_s"], 1), _ratio(ratio), _n(r["e2e_p50_ms"], 1), _n(r["e2e_p99_ms"], 1),
                         f"{_n(r['intake_p50_ms'], 1)}/{_n(r['intake_p99_ms'], 1)}",
                         f"{r['arrived']:,}/{r['n']:,}", _n(r["lost"]), _n(r["duplicates"]), _n(r["exactly_once"])])
    return rows


def e2e(res: dict[str, Any], cluster_res: dict[str, Any] | None = None) -> str:
    """The single-process end-to-end rows, and the cluster's beside them (same columns) when it ran."""
    cluster_res = cluster_res or {}
    if not res and not cluster_res:
        return "  (not run)"
    rows = [["procs x threads", "rate/s", "sent/s", "completed/s", "ratio", "e2e p50 ms", "e2e p99 ms",
             "intake p50/p99 ms", "arrived", "lost", "dup", "exactly once"]]
    notes = []
    if err := _error(res):
        notes.append(err.replace("stage failed", "e2e stage failed"))
    elif res:
        rows += _e2e_rows(res["configs"], "run: ")
    else:
        notes.append("  e2e (vivoflow run): not run")
    if err := _error(cluster_res):
        notes.append(err.replace("stage failed", "cluster stage failed"))
    elif "skipped" in cluster_res:
        notes.append(f"  cluster: skipped: {cluster_res['skipped']}")
    elif cluster_res:
        rows += _e2e_rows(cluster_res["configs"], "cluster: ")
    notes.append("  ratio: completed/s over sent/s (1.00x: it keeps up with what is offered).")
    for cfg in res.get("configs", []) if not _error(res) else []:
        if "skipped" in cfg:
            continue
        notes.append(f"  run: {cfg['processes']} worker process(es): intake CPU "
                     f"{_n(cfg['intake_cpu_ms_per_request'], 2)} ms/request, workers CPU "
                     f"{_n(cfg['worker_cpu_ms_per_run'], 2)} ms/run; peak RSS MiB "
                     + ", ".join(f"{k} {_n(v, 1)}" for k, v in cfg["peak_rss_mib"].items()))
    if cluster_res.get("configs") and not _error(cluster_res):
        broker = cluster_res["broker"]
        store = cluster_res["store"]
        notes.append(f"  cluster: 2 x `vivoflow serve` (requests alternate between them) + 2 x `vivoflow worker "
                     f"--processes 1`; store PostgreSQL (schema {store['schema']}, dropped after), broker "
                     f"{broker['kind']} Redis {broker['url']}"
                     + (f" -- {broker['note']}" if broker.get("note") else ""))
        for cfg in cluster_res["configs"]:
            st = cfg.get("store", {})
            notes.append(f"  cluster: db upgrade {_n(cfg.get('db_upgrade_s'), 1)} s, all four ready after "
                         f"{_n(cfg.get('ready_s'), 1)} s; intakes CPU {_n(cfg.get('intake_cpu_ms_per_request'), 2)} "
                         f"ms/request, workers CPU {_n(cfg.get('worker_cpu_ms_per_run'), 2)} ms/run; runs per "
                         f"worker {cfg.get('runs_per_worker')}; store after: {_n(st.get('stored'))} deliveries "
                         f"({_n(st.get('processed'))} processed), runs {st.get('runs')}")
            notes.append("  cluster: peak RSS MiB " + ", ".join(f"{k} {_n(v, 1)}" for k, v in
                                                               cfg["peak_rss_mib"].items()))
    peers = "; ".join(f"{k} {v['throughput_s']:g}/s p50 {v['e2e_p50_ms']:,g} p99 {v['e2e_p99_ms']:,g} ms"
                      for k, v in PEERS["e2e"].items())
    notes.append(f"  peers (2,000 webhooks): {peers}")
    return (_table(rows) if len(rows) > 1 else "") + "\n" + "\n".join(notes)


def worker(res: dict[str, Any]) -> str:
    if (err := _error(res)) or not res:
        return err or "  (not run)"
    ceiling = res["ceiling"]
    rows = [["recipes loaded (1 matches)", "log level", "runs/s", "ceiling", "ratio", "CPU ms/run", "start-up s",
             "peak RSS MiB"]]
    for d in res["drains"]:
        rows.append([_n(d["recipes"]), d["log_level"], _n(d["runs_s"], 1), _n(ceiling.get("messages_s"), 0),
                     _ratio(d.get("ratio_vs_ceiling")), _n(d["cpu_ms_per_run"], 2), _n(d["startup_s"], 1),
                     _n(d["peak_rss_mib"], 1)])
    notes = [f"  ceiling: a bare Dramatiq worker, same broker and {res['threads']} threads, no-op actor "
             f"({_n(ceiling.get('messages'))} messages, peak RSS {_n(ceiling.get('peak_rss_mib'), 1)} MiB)",
             f"  runs/s with {res['most_recipes']:,} recipes vs {res['fewest_recipes']:,}: "
             f"{_ratio(res.get('ratio_most_vs_fewest_recipes'))}"]
    if "ratio_info_vs_warning_logging" in res:
        notes.append(f"  INFO logging vs WARNING: {_ratio(res['ratio_info_vs_warning_logging'])}")
    if res.get("skipped_recipe_counts"):
        notes.append(f"  skipped (time budget): {res['skipped_recipe_counts']} recipes")
    sql = next((d["sql_per_delivery"] for d in res["drains"] if d.get("sql_per_delivery")), None)
    if sql:
        notes.append(f"  one delivery of the no-op recipe costs {sql['statements']} SQL statements and "
                     f"{sql['by_verb'].get('COMMIT', 0)} commits ({sql['by_verb']}); "
                     f"{sql['wall_ms_one_thread']} ms alone in one thread")
    return _table(rows) + "\n" + "\n".join(notes)


def memory(result: dict[str, Any]) -> str:
    rows = [["process", "peak RSS MiB (VmHWM)"]]
    for name, value in result.get("memory", {}).items():
        rows.append([name, _n(value, 1)])
    rows += [[f"peer: {k} (max under load)", _n(v)] for k, v in PEERS["memory_max_mib"].items()]
    return _table(rows)


def profile(name: str, prof: dict[str, Any] | None) -> str:
    if not prof:
        return f"  {name}: (not profiled)"
    if "skipped" in prof or "error" in prof:
        return f"  {name}: {prof.get('skipped') or prof.get('error')}"
    cpu, wall = prof["cpu"], prof["wall"]
    out = [f"  {name}: {prof['seconds']:g} s at 100 Hz; flame graph (GIL holder) {prof['svg']}"]
    if prof.get("sql_per_delivery"):
        sql = prof["sql_per_delivery"]
        out.append(f"    one delivery of this recipe: {sql['statements']} SQL statements, "
                   f"{sql['by_verb'].get('COMMIT', 0)} commits ({sql['by_verb']})")
    if "deliveries_during_profile" in prof:
        out.append(f"    deliveries processed while sampled: {prof['deliveries_during_profile']:,}"
                   + ("" if prof.get("still_busy_at_end") else " (the queue ran dry: the profile covers less)"))
    out.append(f"    CPU (thread holding the GIL, {cpu['samples']:,} samples = "
               f"{cpu['samples'] / (prof['seconds'] * 100):.0%} of one core) by library: "
               + ", ".join(f"{k} {v}%" for k, v in cpu["by_library"][:8]))
    out.append("    CPU, vivoflow functions inclusive:")
    out += [f"      {v:5.1f}%  {k}" for k, v in cpu["vivoflow_inclusive"][:10]]
    out.append("    CPU, hottest functions (self):")
    out += [f"      {v:5.1f}%  {k}" for k, v in cpu["top_self"][:10]]
    out.append(f"    wall (all working threads, {wall['samples']:,} samples; idle waits left out: "
               f"{wall.get('waiting_samples', 0):,}) by library: "
               + ", ".join(f"{k} {v}%" for k, v in wall["by_library"][:6]))
    out.append("    wall, hottest functions (self): "
               + "; ".join(f"{k} {v}%" for k, v in wall["top_self"][:5]))
    return "\n".join(out)


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    load = meta["loadavg_before"], meta["loadavg_after"]
    head = (f"vivoflow bench {meta['stamp']} ({meta['mode']}): {meta['cpus']} cores, load average before "
            f"{load[0][0]:.2f} / after {load[1][0]:.2f}" + (" -- BUSY machine, figures are low-side" if meta["busy"]
                                                           else "") + f", {meta['elapsed_s']:.0f} s")
    stages = result["stages"]
    sections = [head,
                "\n1. Intake: signed ~3 KB webhooks at full speed (vivoflow serve, no workers; ceiling: bare "
                "Starlette on the same uvicorn settings)", intake(stages.get("intake", {})),
                "\n   Per-request parts and the broker's ceiling", components(stages.get("components", {})),
                "\n2. End to end: intake -> queue -> recipe (condition, http.request, log.write) -> sink "
                "(run: `vivoflow run`, SQLite, embedded Redis; cluster: 2 x `vivoflow serve` + 2 x `vivoflow "
                "worker`, PostgreSQL, Redis)", e2e(stages.get("e2e", {}), stages.get("cluster")),
                "\n3. Worker throughput: one worker process, pre-filled queue, no-op step",
                worker(stages.get("worker", {})),
                "\n4. Memory", memory(result),
                "\n5. Profiles (py-spy)", profile("intake under flood", result.get("profiles", {}).get("intake")),
                profile("worker draining the end-to-end recipe", result.get("profiles", {}).get("worker")),
                f"\nJSON: {meta['json']}"]
    return "\n".join(sections)
