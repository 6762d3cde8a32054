"""The engine's promises, end to end: per-step retries, permanent failures, steps never run twice, delays.

Each test writes its own recipe, runs the real intake and worker, and talks to a real SMTP server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Vivoflow, fixture_body, wait_until
from workers.errors import Busy

#: These run on SQLite and, where one answers, PostgreSQL.
pytestmark = pytest.mark.stores("sqlite", "postgresql")

TWO_STEPS = """
name: two-steps
on: invitee.created
steps:
  - id: first
    use: email.send
    with: {to: first@example.com, subject: "first for {{ invitee.name }}", text: one}
  - id: second
    use: email.send
    {extra}
    with: {to: second@example.com, subject: second, text: two}
  - id: third
    use: log.write
    with: {message: "third saw {{ steps.second.output.message_id }}"}
"""


@pytest.fixture
def run_recipe(
    make_config: Callable[..., Path], recipes_dir: Path, smtp_sink: Any
) -> Iterator[Callable[..., Vivoflow]]:
    """Start vivoflow with one recipe (its YAML text) and config overrides; stopped after the test."""
    started: list[Vivoflow] = []

    def start(recipe: str, **config: Any) -> Vivoflow:
        (recipes_dir / "recipe.yaml").write_text(recipe)
        running = Vivoflow(make_config(smtp_port=smtp_sink.port, **config)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def steps_of(vivoflow: Vivoflow, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["step_id"]: s for s in vivoflow.store.steps_of(run_id)}


def test_retryable_smtp_error_retries_the_step_without_repeating_earlier_ones(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    smtp_sink.rcpt_replies["second@example.com"] = "451 4.3.0 mailbox busy, try later"
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", "retry: {max_attempts: 50}"))

    delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    run_id = wait_until(lambda: vivoflow.runs(delivery_id))[0]["id"]
    # Two failed attempts of the second step recorded, waiting for the third.
    def second_failed_twice() -> dict[str, Any] | None:
        step = steps_of(vivoflow, run_id).get("second")
        return step if step and step["status"] == "scheduled" and step["attempts"] >= 2 else None

    failing = wait_until(second_failed_twice)
    assert "mailbox busy" in failing["error"]
    smtp_sink.rcpt_replies.clear()

    run = vivoflow.wait_for_runs(delivery_id)[0]
    assert run["status"] == "succeeded"
    steps = steps_of(vivoflow, run_id)
    assert steps["first"]["attempts"] == 1
    assert steps["second"]["attempts"] >= 3
    assert steps["third"]["status"] == "succeeded"
    assert steps["second"]["output"]["message_id"] in steps["third"]["input"]["message"]
    smtp_sink.wait_for(2)
    assert [m["To"] for m in smtp_sink.messages].count("first@example.com") == 1


def test_permanent_error_fails_the_step_at_once_and_stops_the_run(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    smtp_sink.rcpt_replies["second@example.com"] = "550 5.1.1 no such user"
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", ""))

    delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]

    run = vivoflow.wait_for_runs(delivery_id)[0]
    assert run["status"] == "failed"
    steps = steps_of(vivoflow, run["id"])
    assert steps["second"]["status"] == "failed"
    assert steps["second"]["attempts"] == 1
    assert "no such user" in steps["second"]["error"]
    assert "third" not in steps


def test_on_error_continue_runs_the_next_step_and_the_run_still_fails(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    smtp_sink.rcpt_replies["second@example.com"] = "550 5.1.1 no such user"
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", "on_error: continue").replace(
        "third saw {{ steps.second.output.message_id }}", "third ran"))

    run = vivoflow.wait_for_runs(vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"])[0]

    steps = steps_of(vivoflow, run["id"])
    assert steps["second"]["status"] == "failed"
    assert steps["third"]["status"] == "succeeded"
    assert run["status"] == "failed"


def test_retries_stop_at_max_attempts(run_recipe: Callable[..., Vivoflow], smtp_sink: Any) -> None:
    smtp_sink.rcpt_replies["second@example.com"] = "421 4.7.0 too many connections"
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", "retry: {max_attempts: 3}"))

    run = vivoflow.wait_for_runs(vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"])[0]

    second = steps_of(vivoflow, run["id"])["second"]
    assert (run["status"], second["status"], second["attempts"]) == ("failed", "failed", 3)
    assert second["error"].startswith("gave up after 3 attempts")


def test_a_delivery_processed_twice_at_once_sends_each_email_once(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", ""))
    vivoflow.stop_worker()  # process by hand, from two threads at once, as two redeliveries would
    delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    engine = vivoflow.intake_app.engine
    barrier = threading.Barrier(2)

    def process() -> None:
        barrier.wait()
        wait_until(attempt)

    def attempt() -> bool:
        try:
            engine.run_delivery(delivery_id)
        except Busy:  # the other thread holds the invitee; the actor would requeue, we try again
            busy.append(True)
            return False
        return True

    busy: list[bool] = []

    threads = [threading.Thread(target=process) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.run_delivery(delivery_id)  # and a third time, after the fact

    smtp_sink.wait_for(2)
    assert sorted(m["To"] for m in smtp_sink.messages) == ["first@example.com", "second@example.com"]
    runs = vivoflow.runs(delivery_id)
    assert len(runs) == 1
    assert {s["step_id"]: s["attempts"] for s in vivoflow.store.steps_of(runs[0]["id"])} == {
        "first": 1, "second": 1, "third": 1,
    }


DELAYED = """
name: delayed
on: invitee.created
steps:
  - id: now
    use: log.write
    with: {message: booked}
  - id: later
    use: email.send
    delay: 1s
    with: {to: "{{ invitee.email }}", subject: "How was it?", text: "Tell us"}
"""


def test_delayed_step_is_scheduled_then_sent(run_recipe: Callable[..., Vivoflow], smtp_sink: Any) -> None:
    vivoflow = run_recipe(DELAYED)

    delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    run = wait_until(lambda: [r for r in vivoflow.runs(delivery_id) if r["status"] == "scheduled"])[0]
    later = steps_of(vivoflow, run["id"])["later"]
    assert later["status"] == "scheduled" and later["due_at"] > run["created_at"]
    assert smtp_sink.messages == []

    run = vivoflow.wait_for_runs(delivery_id)[0]
    assert run["status"] == "succeeded"
    assert smtp_sink.wait_for(1)[0]["Subject"] == "How was it?"


def test_delayed_step_is_skipped_when_the_invitee_cancels_first(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    vivoflow = run_recipe(DELAYED.replace("delay: 1s", "delay: 2s"))

    booked = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    wait_until(lambda: [r for r in vivoflow.runs(booked) if r["status"] == "scheduled"])
    assert vivoflow.post(fixture_body("invitee.canceled")).status_code == 202

    run = vivoflow.wait_for_runs(booked, timeout=15)[0]
    later = steps_of(vivoflow, run["id"])["later"]
    assert later["status"] == "skipped"
    assert "canceled" in later["error"]
    assert smtp_sink.messages == []


def test_template_error_at_run_time_fails_the_step_not_the_worker(run_recipe: Callable[..., Vivoflow]) -> None:
    vivoflow = run_recipe("""
on: invitee.created
steps:
  - id: deep
    use: log.write
    with: {message: "{{ payload.tracking.nothing_here.deeper }}"}
""")
    run = vivoflow.wait_for_runs(vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"])[0]

    step = steps_of(vivoflow, run["id"])["deep"]
    assert run["status"] == "failed"
    assert step["status"] == "failed" and step["error"].startswith("template:")
    # The worker is still alive: the next booking runs.
    again = vivoflow.post(fixture_body("invitee.created.rescheduled"))
    assert vivoflow.wait_for_runs(again.json()["delivery_id"])[0]["status"] == "failed"


def test_the_same_booking_delivered_again_with_a_new_timestamp_runs_nothing(
    run_recipe: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    vivoflow = run_recipe(TWO_STEPS.replace("{extra}", ""))
    first = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    vivoflow.wait_for_runs(first)

    # Not a duplicate for the intake (its created_at differs), but the same invitee booked once.
    second = vivoflow.post(fixture_body("invitee.created", created_at="2027-02-01T10:05:00.000000Z"))

    assert second.status_code == 202
    delivery = vivoflow.wait_processed(second.json()["delivery_id"])
    assert delivery["duplicate_of"] == first
    assert vivoflow.runs(delivery["id"]) == []
    assert len(smtp_sink.wait_for(2)) == 2


def test_a_delay_longer_than_the_broker_holds_is_chained(
    run_recipe: Callable[..., Vivoflow], redis_url: str
) -> None:
    """A 2-day reminder never sits whole in the broker: it sleeps at most MAX_DELAY_MS at a time,
    and waking up early just schedules the rest."""
    import dramatiq
    import redis as redis_client

    from workers.actors import MAX_DELAY_MS

    vivoflow = run_recipe(DELAYED.replace("delay: 1s", "delay: 2d"))
    vivoflow.stop_worker()  # the delayed messages stay in Redis, where the test can read them
    engine = vivoflow.intake_app.engine
    queue = vivoflow.intake_app.queue
    client = redis_client.Redis.from_url(redis_url)
    delayed = f"{queue.broker.namespace}:{queue.name}.DQ.msgs"

    def etas() -> list[int]:
        return sorted(dramatiq.Message.decode(m).options["eta"] for m in client.hvals(delayed))

    delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    client.delete(f"{queue.broker.namespace}:{queue.name}", f"{queue.broker.namespace}:{queue.name}.msgs")
    engine.run_delivery(delivery_id)  # as the worker would
    run = vivoflow.runs(delivery_id)[0]
    later = steps_of(vivoflow, run["id"])["later"]

    assert run["status"] == "scheduled"
    assert later["due_at"] - time.time() > 2 * 86400 - 60
    [first] = etas()
    assert first / 1000 - time.time() <= MAX_DELAY_MS / 1000 + 1

    client.delete(delayed)
    engine.resume_run(run["id"])  # the wake-up, a day and a half early

    assert steps_of(vivoflow, run["id"])["later"]["status"] == "scheduled"
    [second] = etas()
    assert second / 1000 - time.time() <= MAX_DELAY_MS / 1000 + 1
    client.close()
