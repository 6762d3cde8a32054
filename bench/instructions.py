"""``python -m bench.instructions``: what one run of a recipe costs the engine, in CPU instructions.

Seconds on a shared 2-core machine moved by 10-20 % between identical runs, which hides any change
smaller than that. Instructions do not move: valgrind's callgrind counts them (the same total to
~0.5 %, whatever else the machine does), so an engine change can be judged on one run of each side.

The engine runs in this process, on the bench's recipes, against the bench's sink in a process of
its own (its instructions are not counted) and a SQLite store in a temporary folder; the broker is
never used (the recipes neither wait nor retry). Counted: the loop over ``--n`` runs after a
warm-up, SQLite's C code included, the kernel's work excluded. Needs ``valgrind`` (Debian's package).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import product
from bench.config import E2E_RECIPE, NOOP_RECIPE, write_config, write_recipes
from bench.payloads import Bodies
from bench.procs import PYTHON, ROOT, Child, free_port, http_ok, python_module, wait_until

RECIPES = {"e2e": E2E_RECIPE, "noop": NOOP_RECIPE}
WARM_UP = 20
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count(recipe: str, n: int) -> float:
    """Instructions per run of ``recipe`` (``e2e`` or ``noop``), counted by callgrind over ``n`` runs."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.instructions: valgrind not found (Debian: apt-get install valgrind)")
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=/dev/null",
         PYTHON, "-m", "bench.instructions", "--recipe", recipe, "--n", str(n), "--counted"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"bench.instructions: the counted run failed:\n{done.stdout}{done.stderr[-3000:]}")
    return int(found.group(1)) / n


def loop(recipe: str, n: int, *, counted: bool) -> float:
    """Run ``recipe`` ``n`` times through the engine in this process; returns CPU seconds a run.

    ``counted``: under callgrind, whose counting is switched on for the loop only.
    """
    folder = Path(tempfile.mkdtemp(prefix="vivoflow-instructions-"))
    back_to = Path.cwd()
    port = free_port()
    sink = Child("sink", python_module("bench.sink", "--port", str(port)), folder / "sink.log")
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/_count"), 30, what="the sink")
        config = write_config(folder, broker_url="redis://127.0.0.1:1/0")  # never contacted
        write_recipes(folder / "recipes", RECIPES[recipe].format(sink=f"http://127.0.0.1:{port}"), 1)
        os.chdir(folder)  # the store URL (sqlite:///data/…) is relative: the bench runs each process in its folder
        app = product.open_app(config)
        bodies = Bodies("instructions")
        deliveries = [product.store_delivery(app, bodies.body(i)) for i in range(WARM_UP + n)]
        for delivery_id in deliveries[:WARM_UP]:
            app.engine.run_delivery(delivery_id)
        _instrument(counted, "on")
        started = time.process_time()
        for delivery_id in deliveries[WARM_UP:]:
            app.engine.run_delivery(delivery_id)
        took = time.process_time() - started
        _instrument(counted, "off")
        app.close()
        return took / n
    finally:
        sink.stop()
        os.chdir(back_to)
        shutil.rmtree(folder, ignore_errors=True)


def _instrument(counted: bool, state: str) -> None:
    if counted:
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="e2e",
                        help="e2e: condition, http.request to a sink, log.write (default); noop: one log.write")
    parser.add_argument("--n", type=int, default=200, help="runs counted (default 200, ~30 s)")
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)  # the run under callgrind
    args = parser.parse_args(argv)
    if args.counted:
        loop(args.recipe, args.n, counted=True)
        return
    cpu = loop(args.recipe, args.n, counted=False)
    per_run = count(args.recipe, args.n)
    print(f"engine, {args.recipe} recipe: {per_run:,.0f} instructions a run "
          f"(callgrind, {args.n} runs); {cpu * 1000:.2f} ms of CPU a run without valgrind (noisy)")


if __name__ == "__main__":
    main(sys.argv[1:])
