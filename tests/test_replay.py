"""`vivoflow replay` through the real CLI (a subprocess) while the harness's worker does the queued work.

Also: a message Dramatiq gives up on must leave a failed run that `vivoflow runs --status failed` shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import sqlalchemy as sa

from tests.harness import FIXTURES, Vivoflow, wait_until
from workers.actors import PROCESS_DELIVERY

ROOT = Path(__file__).resolve().parents[1]
WHO = "ops@example.com"
API = "https://api.vivocalendar.com/scheduled_events"

TWO_EMAILS = """
name: two-emails
on: invitee.created
steps:
  - id: first
    use: email.send
    with: {to: first@example.com, subject: "first for {{ invitee.name }}", text: one}
  - id: second
    use: email.send
    with: {to: second@example.com, subject: second, text: two}
  - id: third
    use: log.write
    with: {message: "third saw {{ steps.second.output.message_id }}"}
"""


@pytest.fixture
def vivoflow(make_config: Callable[..., Path], recipes_dir: Path, smtp_sink: Any) -> Iterator[Vivoflow]:
    """Intake and worker running TWO_EMAILS only, sending to the test's SMTP server."""
    (recipes_dir / "two-emails.yaml").write_text(TWO_EMAILS)
    with Vivoflow(make_config(smtp_port=smtp_sink.port)) as running:
        yield running


def cli(config_path: Path, *args: str, broker_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """`vivoflow --config CONFIG ARGS…` in a process of its own, as a user types it."""
    env = {**os.environ, **({"VIVOFLOW_BROKER_URL": broker_url} if broker_url else {})}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "--config", str(config_path), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )


def vivoflow_cli(vivoflow: Vivoflow, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(vivoflow.config_path, *args, broker_url=vivoflow.config.broker.url)


def booking(tag: str = "") -> bytes:
    """The invitee.created sample; with a tag, a booking of an invitee of its own."""
    data = json.loads((FIXTURES / "invitee.created.json").read_text())
    if tag:
        data["payload"]["uri"] = f"{API}/{tag}/invitees/{tag}"
    return json.dumps(data).encode()


def steps_of(vivoflow: Vivoflow, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["step_id"]: s for s in vivoflow.store.steps_of(run_id)}


def finished(vivoflow: Vivoflow, run_id: str, status: str = "succeeded", timeout: float = 30) -> dict[str, Any]:
    return wait_until(lambda: (r := vivoflow.store.get_run(run_id)) and r["status"] == status and r, timeout)


def recipients(messages: list[Any]) -> list[str]:
    return sorted(m["To"] for m in messages)


def failed_run(vivoflow: Vivoflow, smtp_sink: Any, tag: str = "") -> dict[str, Any]:
    """A run whose first email went out and whose second was refused for good (550)."""
    smtp_sink.rcpt_replies["second@example.com"] = "550 5.1.1 no such user"
    run = vivoflow.wait_for_runs(vivoflow.post(booking(tag)).json()["delivery_id"])[0]
    assert run["status"] == "failed"
    assert steps_of(vivoflow, run["id"])["second"]["status"] == "failed"
    return run


# --- replay DELIVERY_ID ------------------------------------------------------------------------


def test_replay_delivery_makes_new_linked_runs_and_leaves_the_old_ones_alone(
    vivoflow: Vivoflow, smtp_sink: Any
) -> None:
    delivery_id = vivoflow.post(booking()).json()["delivery_id"]
    original = vivoflow.wait_for_runs(delivery_id)[0]
    old_steps = vivoflow.store.steps_of(original["id"])
    smtp_sink.wait_for(2)

    done = vivoflow_cli(vivoflow, "replay", delivery_id, "--by", WHO)

    assert (done.returncode, done.stderr) == (0, "")
    replays = vivoflow.store.replays_of(delivery_id)
    assert [(r["mode"], r["who"]) for r in replays] == [("delivery", WHO)]
    assert done.stdout == f"replay {replays[0]['id']} of {delivery_id} queued: new runs linked to the old ones\n"
    runs = vivoflow.wait_for_runs(delivery_id, count=2)
    new = next(r for r in runs if r["id"] != original["id"])
    assert (new["status"], new["replay_of"], new["replay_id"]) == ("succeeded", original["id"], replays[0]["id"])
    assert vivoflow.store.get_run(original["id"]) == original
    assert vivoflow.store.steps_of(original["id"]) == old_steps
    assert recipients(smtp_sink.wait_for(4)) == ["first@example.com"] * 2 + ["second@example.com"] * 2
    shown = vivoflow_cli(vivoflow, "runs", "show", new["id"])
    assert f"replay {replays[0]['id']} of run {original['id']}" in shown.stdout


# --- replay --run --------------------------------------------------------------------------------


def test_replay_run_resumes_a_failed_run_at_the_step_that_failed(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    run = failed_run(vivoflow, smtp_sink)
    first = steps_of(vivoflow, run["id"])["first"]
    smtp_sink.rcpt_replies.clear()  # the mailbox is fixed

    done = vivoflow_cli(vivoflow, "replay", "--run", run["id"], "--by", WHO)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.endswith(f"run {run['id']} resumes (1 step(s) to redo, succeeded steps kept)\n")
    resumed = finished(vivoflow, run["id"])
    assert resumed["reason"] is None
    steps = steps_of(vivoflow, run["id"])
    assert steps["first"] == first  # not run again: same attempt, same output
    assert (steps["second"]["status"], steps["second"]["attempts"]) == ("succeeded", 1)
    assert steps["third"]["input"]["message"] == f"third saw {steps['second']['output']['message_id']}"
    assert recipients(smtp_sink.wait_for(2)) == ["first@example.com", "second@example.com"]
    assert len(vivoflow.runs(run["delivery_id"])) == 1  # the same run, resumed
    replay = vivoflow.store.replays_of(run["id"])
    assert [(r["mode"], r["who"]) for r in replay] == [("resume", WHO)]
    shown = vivoflow_cli(vivoflow, "runs", "show", run["id"]).stdout
    assert f"replayed (resume) by {WHO} at " in shown and replay[0]["id"] in shown
    assert shown.startswith(f"run {run['id']}: succeeded\n")


def test_replay_run_force_runs_every_step_again_as_a_new_run(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    delivery_id = vivoflow.post(booking()).json()["delivery_id"]
    original = vivoflow.wait_for_runs(delivery_id)[0]
    assert original["status"] == "succeeded"
    old_steps = vivoflow.store.steps_of(original["id"])

    done = vivoflow_cli(vivoflow, "replay", "--run", original["id"], "--force", "--by", WHO)

    assert (done.returncode, done.stderr) == (0, "")
    replay = vivoflow.store.replays_of(original["id"])
    assert [(r["mode"], r["who"]) for r in replay] == [("force", WHO)]
    new = next(r for r in vivoflow.wait_for_runs(delivery_id, count=2) if r["id"] != original["id"])
    assert (new["status"], new["replay_of"], new["replay_id"]) == ("succeeded", original["id"], replay[0]["id"])
    assert {s: (v["status"], v["attempts"]) for s, v in steps_of(vivoflow, new["id"]).items()} == {
        "first": ("succeeded", 1), "second": ("succeeded", 1), "third": ("succeeded", 1),
    }
    assert vivoflow.store.steps_of(original["id"]) == old_steps
    assert recipients(smtp_sink.wait_for(4)) == ["first@example.com"] * 2 + ["second@example.com"] * 2


def test_replay_run_of_a_succeeded_run_without_force_is_refused_in_one_line(vivoflow: Vivoflow) -> None:
    run = vivoflow.wait_for_runs(vivoflow.post(booking()).json()["delivery_id"])[0]

    done = vivoflow_cli(vivoflow, "replay", "--run", run["id"])

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"vivoflow: run {run['id']} is succeeded, not failed")
    assert vivoflow.store.replays_of(run["id"]) == []
    assert vivoflow.store.get_run(run["id"]) == run


def test_replay_failed_resumes_every_failed_run_of_the_window(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    runs = [failed_run(vivoflow, smtp_sink, f"FAIL{n}") for n in range(3)]
    smtp_sink.rcpt_replies.clear()

    done = vivoflow_cli(vivoflow, "replay", "--failed", "--since", "1h", "--rate", "50", "--by", WHO)

    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "3 failed run(s) resumed"
    for line, run in zip(lines, runs, strict=False):
        assert f"run {run['id']} resumes (1 step(s) to redo" in line
    for run in runs:
        assert finished(vivoflow, run["id"])["status"] == "succeeded"
        assert [r["mode"] for r in vivoflow.store.replays_of(run["id"])] == ["resume"]
    assert recipients(smtp_sink.wait_for(6)) == ["first@example.com"] * 3 + ["second@example.com"] * 3


@pytest.mark.parametrize(("args", "says"), [
    ((), "give exactly one of DELIVERY_ID, --run RUN_ID or --failed"),
    (("dlv_1", "--run", "run_1"), "give exactly one of DELIVERY_ID, --run RUN_ID or --failed"),
    (("dlv_1", "--force"), "--resume and --force go with --run"),
    (("--failed", "--force"), "--resume and --force go with --run"),
], ids=["nothing", "delivery-and-run", "force-without-run", "failed-and-force"])
def test_replay_usage_errors_exit_2_with_one_line(
    make_config: Callable[..., Path], args: tuple[str, ...], says: str
) -> None:
    done = cli(make_config(), "replay", *args)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and says in done.stderr
    assert "Traceback" not in done.stderr


# --- dead letters --------------------------------------------------------------------------------


def dead_letter(vivoflow: Vivoflow) -> dict[str, Any]:
    """Break the store under the worker (a table is gone) and return the failed run Dramatiq's give-up leaves.

    Not a step's outcome, so Dramatiq's retries own it. The intake's own message would be retried 20 times
    over hours: the test puts the same delivery on the queue with Dramatiq's per-message ``max_retries: 0``,
    so it is dead-lettered on its first failure.
    """
    assert vivoflow.worker_app is not None
    vivoflow.stop_worker()
    delivery_id = vivoflow.post(booking()).json()["delivery_id"]
    queue = vivoflow.worker_app.queue
    queue.broker.flush(queue.name)  # the intake's message, with the actor's 20 retries
    with vivoflow.store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE claims"))
    queue.broker.enqueue(dramatiq.Message(queue_name=queue.name, actor_name=PROCESS_DELIVERY, args=(delivery_id,),
                                          kwargs={}, options={"max_retries": 0}))
    # Not vivoflow.start_worker(): it declares the actors again, which Dramatiq 2 refuses.
    worker = dramatiq.Worker(queue.broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        dead: list[dict[str, Any]] = wait_until(lambda: vivoflow.store.page_runs(status="failed"))
    finally:
        worker.stop(timeout=10_000)
    assert [(r["delivery_id"], r["recipe"], r["event"]) for r in dead] == [(delivery_id, "(delivery)", "(processing)")]
    return dead[0]


def test_a_message_dramatiq_gives_up_on_leaves_a_failed_run_in_the_history(vivoflow: Vivoflow) -> None:
    dead = dead_letter(vivoflow)

    assert dead["reason"].startswith("gave up after 1 tries: ")
    assert "claims" in dead["reason"]  # the store's own error, naming the missing table
    listed = vivoflow_cli(vivoflow, "runs", "--status", "failed")
    assert listed.returncode == 0
    line = next(line for line in listed.stdout.splitlines() if line.startswith(dead["id"]))
    assert "failed" in line and "(delivery)" in line and "gave up after 1 tries" in line


def test_a_dead_letter_reason_is_one_line_without_the_sql_parameters(vivoflow: Vivoflow) -> None:
    dead = dead_letter(vivoflow)

    listed = vivoflow_cli(vivoflow, "runs", "--status", "failed")
    assert len(listed.stdout.splitlines()) == 1
    assert "\n" not in dead["reason"] and "[parameters:" not in dead["reason"]
