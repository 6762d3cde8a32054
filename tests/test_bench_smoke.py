"""``python -m bench`` end to end on a tiny load: it exits 0 and writes its JSON with every section.

No figure is asserted (the machine's load decides them); only that each stage ran and reported.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.worker import DRAIN_FACTOR

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--n", "20", "--duration", "1", "--only", "intake,e2e,worker",
         "--processes", "1", "--recipes", "1", "--budget", "200", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    latest = json.loads((tmp_path / "latest.json").read_text())
    stamped = [p for p in tmp_path.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    assert {"meta", "stages", "memory", "profiles", "peers"} <= set(latest)
    assert latest["meta"]["failed"] == []
    stages = latest["stages"]

    intake = stages["intake"]
    assert {"vivoflow", "ceiling", "ratio_accepted_vs_ceiling"} <= set(intake)
    for side in ("vivoflow", "ceiling"):
        assert {"req_s", "accepted_s", "p50_ms", "p99_ms", "non_2xx", "peak_rss_mib"} <= set(intake[side])
    assert intake["vivoflow"]["accepted"] > 0
    assert intake["vivoflow"]["store"]["stored"] >= intake["vivoflow"]["accepted"]

    (config,) = stages["e2e"]["configs"]
    (rate,) = config["rates"]
    assert {"completed_s", "e2e_p50_ms", "e2e_p99_ms", "arrived", "lost", "duplicates", "exactly_once"} <= set(rate)
    assert rate["arrived"] == rate["n"] == 20 and rate["exactly_once"] is True

    worker = stages["worker"]
    assert [d["recipes"] for d in worker["drains"]] == [1]
    assert all(d["runs"] == 20 * DRAIN_FACTOR and d["runs_s"] for d in worker["drains"])
    assert "ratio_most_vs_fewest_recipes" in worker and worker["ceiling"]["messages"] > 0

    assert latest["memory"] and all(v is None or v > 0 for v in latest["memory"].values())
    assert "vivoflow bench" in done.stdout and "Intake" in done.stdout


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not found: apt-get install valgrind")
def test_bench_instructions_counts_a_run_of_the_engine() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.instructions", "--recipe", "noop", "--n", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"engine, noop recipe: ([\d,]+) instructions a run \(callgrind, 5 runs\)", done.stdout)
    assert found, done.stdout
    # A no-op run is hundreds of thousands of instructions: a count of the warm-up or of nothing would not be.
    assert 100_000 < int(found.group(1).replace(",", "")) < 50_000_000
