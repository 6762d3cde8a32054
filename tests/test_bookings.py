"""One booking's deliveries taken together: reschedules, per-invitee order, supersession, duplicates, delays.

Real intake over HTTP, real Redis and Dramatiq workers, a real SMTP server; each test writes its recipes.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest

from tests.conftest import SHIPPED_RECIPES
from tests.harness import FIXTURES, SIGNING_KEY, Vivoflow, fixture_body, wait_until
from workers.app import App
from workers.signing import sign

CANCEL_HALF = "invitee.canceled.rescheduled"
CREATED_HALF = "invitee.created.rescheduled"
API = "https://api.vivocalendar.com/scheduled_events"
OLD_URI = f"{API}/AAAAAAAAAAAAAAA1/invitees/AAAAAAAAAAAAAAA3"
NEW_URI = f"{API}/AAAAAAAAAAAAAAA6/invitees/AAAAAAAAAAAAAAA8"
RESCHEDULED = "invitee.rescheduled"
UTC = "'%Y-%m-%d %H:%M %Z', 'UTC'"

MOVED = f"""
name: moved
on: invitee.rescheduled
steps:
  - id: note
    use: log.write
    with:
      message: >-
        {{{{ old.invitee.uri }}}} at {{{{ old.meeting.start_time | datetime({UTC}) }}}} ->
        {{{{ new.invitee.uri }}}} at {{{{ new.meeting.start_time | datetime({UTC}) }}}} ({{{{ reason }}}})
  - id: tell
    use: email.send
    with:
      to: "{{{{ new.invitee.email }}}}"
      subject: >-
        Moved: {{{{ old.meeting.start_time | datetime({UTC}) }}}} to
        {{{{ new.meeting.start_time | datetime({UTC}) }}}}
      text: "Was {{{{ old.invitee.uri }}}}, now {{{{ new.invitee.uri }}}}"
"""

CANCEL_SEEN = """
name: cancel-seen
on: invitee.canceled
steps:
  - id: note
    use: log.write
    with: {message: "canceled {{ invitee.uri }} rescheduled={{ rescheduled }}"}
"""

REMINDER = f"""
name: reminder
on: invitee.created
steps:
  - id: remind
    use: email.send
    delay: 2s
    {{extra}}
    with:
      to: "{{{{ invitee.email }}}}"
      subject: "Reminder: {{{{ meeting.start_time | datetime({UTC}) }}}}"
      text: "See you soon"
"""

FOLLOW_UP = """
name: follow-up
on: invitee.canceled
steps:
  - id: later
    use: email.send
    delay: 2s
    with: {to: "{{ invitee.email }}", subject: "Still interested?", text: "Book again"}
"""


@pytest.fixture
def start(make_config: Callable[..., Path], recipes_dir: Path, smtp_sink: Any) -> Iterator[Callable[..., Vivoflow]]:
    """Start vivoflow with these recipes (YAML texts), the shipped ones too if asked; stopped afterwards."""
    started: list[Vivoflow] = []

    def start_with(*recipes: str, shipped: bool = False, threads: int = 4) -> Vivoflow:
        if shipped:
            for recipe in SHIPPED_RECIPES.glob("*.yaml"):
                shutil.copy(recipe, recipes_dir / recipe.name)
        for n, text in enumerate(recipes):
            (recipes_dir / f"test-{n}.yaml").write_text(text)
        running = Vivoflow(make_config(smtp_port=smtp_sink.port), threads=threads).start()
        started.append(running)
        return running

    yield start_with
    for running in started:
        running.stop()


def sample(name: str, **payload: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    data["payload"].update(payload)
    return data


def reschedule_halves(tag: str) -> tuple[bytes, bytes]:
    """The cancel half and the created half of one reschedule, with invitee URIs of their own."""
    old, new = f"{API}/OLD{tag}/invitees/OLD{tag}", f"{API}/NEW{tag}/invitees/NEW{tag}"
    cancel = sample(CANCEL_HALF, uri=old, new_invitee=new)
    created = sample(CREATED_HALF, uri=new, old_invitee=old)
    return json.dumps(cancel).encode(), json.dumps(created).encode()


def post_at_once(vivoflow: Vivoflow, bodies: list[bytes]) -> list[str]:
    """Post the bodies from one thread each, released together by a barrier; their delivery ids."""
    barrier = threading.Barrier(len(bodies))
    answers: list[httpx.Response | None] = [None] * len(bodies)

    def post(n: int) -> None:
        headers = {"Content-Type": "application/json", "Vivocalendar-Webhook-Signature": sign(bodies[n], SIGNING_KEY)}
        with httpx.Client(timeout=10) as client:
            barrier.wait(timeout=10)
            answers[n] = client.post(vivoflow.webhook_url, content=bodies[n], headers=headers)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [a.status_code if a else None for a in answers] == [202] * len(bodies)
    return [a.json()["delivery_id"] for a in answers if a]


@contextmanager
def worker_again(vivoflow: Vivoflow, threads: int = 1) -> Iterator[None]:
    """The stopped worker running again on the same App, stopped on leaving.

    Not ``vivoflow.start_worker()``: it declares the actors a second time, which Dramatiq 2 refuses.
    """
    assert vivoflow.worker_app is not None
    worker = dramatiq.Worker(vivoflow.worker_app.broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        yield
    finally:
        worker.stop(timeout=10_000)


def runs_of(vivoflow: Vivoflow, *delivery_ids: str) -> list[dict[str, Any]]:
    return [run for d in delivery_ids for run in vivoflow.runs(d)]


def steps_of(vivoflow: Vivoflow, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["step_id"]: s for s in vivoflow.store.steps_of(run_id)}


def one_rescheduled_run_per_pair(vivoflow: Vivoflow, pairs: list[list[str]]) -> None:
    for pair in pairs:
        for delivery_id in pair:
            vivoflow.wait_processed(delivery_id, timeout=20)
        moved = [r for r in runs_of(vivoflow, *pair) if r["event"] == RESCHEDULED]
        assert [(r["recipe"], r["status"]) for r in moved] == [("moved", "succeeded")], pair


# --- reschedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("first", [CANCEL_HALF, CREATED_HALF], ids=["cancel-half-first", "created-half-first"])
def test_reschedule_fires_invitee_rescheduled_once_with_old_and_new_meeting(
    start: Callable[..., Vivoflow], smtp_sink: Any, first: str
) -> None:
    vivoflow = start(MOVED, CANCEL_SEEN, shipped=True)
    second = CREATED_HALF if first == CANCEL_HALF else CANCEL_HALF
    ids = {}
    for name in (first, second):
        ids[name] = vivoflow.post(fixture_body(name)).json()["delivery_id"]
        vivoflow.wait_processed(ids[name])

    moved = [r for r in runs_of(vivoflow, *ids.values()) if r["event"] == RESCHEDULED]
    assert [(r["recipe"], r["status"]) for r in moved] == [("moved", "succeeded")]
    assert moved[0]["delivery_id"] == ids[second]  # fired by whichever half completed the pair
    steps = steps_of(vivoflow, moved[0]["id"])
    assert steps["note"]["input"]["message"] == (
        f"{OLD_URI} at 2027-03-04 15:00 UTC -> {NEW_URI} at 2027-03-05 16:00 UTC (Rescheduled)"
    )
    assert steps["tell"]["input"]["subject"] == "Moved: 2027-03-04 15:00 UTC to 2027-03-05 16:00 UTC"
    assert steps["tell"]["input"]["text"] == f"Was {OLD_URI}, now {NEW_URI}"
    canceled = {r["recipe"]: r for r in vivoflow.runs(ids[CANCEL_HALF])}
    assert (canceled["cancel-followup"]["status"], canceled["cancel-followup"]["reason"]) == (
        "skipped", "if: not rescheduled was false")
    seen = steps_of(vivoflow, canceled["cancel-seen"]["id"])["note"]["input"]["message"]
    assert seen == f"canceled {OLD_URI} rescheduled=True"
    # The new booking still runs the booking recipes; nothing was sent for the cancellation.
    created = {r["recipe"]: r["status"] for r in vivoflow.runs(ids[CREATED_HALF]) if r["event"] != RESCHEDULED}
    assert created == {"booking-confirmation": "succeeded", "utm-campaign-leads": "succeeded"}
    subjects = sorted(m["Subject"] for m in smtp_sink.wait_for(3))
    assert "Moved: 2027-03-04 15:00 UTC to 2027-03-05 16:00 UTC" in subjects
    assert len(smtp_sink.messages) == 3


def test_reschedule_halves_posted_at_once_fire_rescheduled_once_every_time(start: Callable[..., Vivoflow]) -> None:
    vivoflow = start(MOVED, threads=8)

    pairs = [post_at_once(vivoflow, list(reschedule_halves(f"R{n}"))) for n in range(8)]

    one_rescheduled_run_per_pair(vivoflow, pairs)
    assert len([r for r in vivoflow.store.page_runs(limit=100) if r["event"] == RESCHEDULED]) == len(pairs)


class CountProcessed(dramatiq.Middleware):
    """How many messages a worker's broker saw processed (to know both workers took part)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        with self._lock:
            self.count += 1


def test_reschedule_halves_raced_across_two_workers_fire_rescheduled_once(start: Callable[..., Vivoflow]) -> None:
    vivoflow = start(MOVED, threads=4)
    assert vivoflow.worker_app is not None
    first = CountProcessed()
    vivoflow.worker_app.broker.add_middleware(first)
    other = App(vivoflow.config)  # a second worker process's parts: its own broker connection and store
    other.declare_actors()
    second = CountProcessed()
    other.broker.add_middleware(second)
    worker = dramatiq.Worker(other.broker, worker_threads=4, worker_timeout=50)
    worker.start()
    try:
        pairs: list[list[str]] = []
        # At least 6 pairs, and more until each worker has handled some messages (at most 30).
        while len(pairs) < 6 or (len(pairs) < 30 and not (first.count and second.count)):
            pairs.append(post_at_once(vivoflow, list(reschedule_halves(f"W{len(pairs)}"))))
            one_rescheduled_run_per_pair(vivoflow, pairs[-1:])
    finally:
        worker.stop(timeout=10_000)
        other.close()

    assert first.count and second.count, "one worker took every message: the race was not across workers"
    one_rescheduled_run_per_pair(vivoflow, pairs)
    assert len([r for r in vivoflow.store.page_runs(limit=100) if r["event"] == RESCHEDULED]) == len(pairs)


# --- order, supersession, duplicates ------------------------------------------------------------


def test_cancellation_received_before_its_booking_waits_for_the_booking(start: Callable[..., Vivoflow]) -> None:
    # One worker thread: the cancellation is taken first, so only the ordering rule can put the booking first.
    vivoflow = start(shipped=True, threads=1)
    vivoflow.stop_worker()
    canceled = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]  # created 2027-02-02
    booked = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]  # created 2027-02-01
    with worker_again(vivoflow):
        booking_runs = vivoflow.wait_for_runs(booked, count=2, timeout=15)
        cancel_runs = vivoflow.wait_for_runs(canceled, timeout=15)

    assert sorted((r["recipe"], r["status"]) for r in booking_runs) == [
        ("booking-confirmation", "succeeded"), ("utm-campaign-leads", "succeeded"),
    ]
    assert [(r["recipe"], r["status"]) for r in cancel_runs] == [("cancel-followup", "succeeded")]
    assert max(r["finished_at"] for r in booking_runs) <= min(r["created_at"] for r in cancel_runs)
    assert vivoflow.wait_processed(booked)["processed_at"] < vivoflow.wait_processed(canceled)["processed_at"]


def test_booking_processed_after_its_cancellation_is_skipped_as_superseded(
    vivoflow: Vivoflow, smtp_sink: Any
) -> None:
    canceled = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    vivoflow.wait_for_runs(canceled)
    vivoflow.wait_processed(canceled)

    booked = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]

    runs = vivoflow.wait_for_runs(booked, count=2)
    assert sorted((r["recipe"], r["status"]) for r in runs) == [
        ("booking-confirmation", "skipped"), ("utm-campaign-leads", "skipped"),
    ]
    assert all("superseded" in r["reason"] and canceled in r["reason"] for r in runs)
    assert all(vivoflow.store.steps_of(r["id"]) == [] for r in runs)
    assert len(smtp_sink.wait_for(2)) == 2  # the cancellation's two emails, no confirmation
    assert {m["To"] for m in smtp_sink.messages} == {"jamie.rivera@example.com", "Team <team@example.com>"}
    assert all(not m["Subject"].startswith("Confirmed") for m in smtp_sink.messages)


def test_the_same_cancellation_delivered_again_runs_nothing(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    first = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    vivoflow.wait_for_runs(first)
    smtp_sink.wait_for(2)

    # A new envelope created_at: a new delivery for the intake, but the invitee is canceled once.
    again = vivoflow.post(fixture_body("invitee.canceled", created_at="2027-02-02T09:05:00.000000Z"))

    assert again.status_code == 202
    delivery = vivoflow.wait_processed(again.json()["delivery_id"])
    assert delivery["duplicate_of"] == first
    assert vivoflow.runs(delivery["id"]) == []
    assert [r["recipe"] for r in vivoflow.store.page_runs()] == ["cancel-followup"]
    assert len(smtp_sink.messages) == 2


# --- delayed steps ----------------------------------------------------------------------------


def scheduled_run(vivoflow: Vivoflow, delivery_id: str) -> dict[str, Any]:
    return wait_until(lambda: [r for r in vivoflow.runs(delivery_id) if r["status"] == "scheduled"])[0]


@pytest.mark.parametrize("keep", [False, True], ids=["skipped-by-default", "skip_if_canceled-false"])
def test_reschedule_skips_the_old_bookings_delayed_step_and_the_new_booking_sends_its_own(
    start: Callable[..., Vivoflow], smtp_sink: Any, keep: bool
) -> None:
    vivoflow = start(REMINDER.replace("{extra}", "skip_if_canceled: false" if keep else ""))
    original = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    scheduled_run(vivoflow, original)

    vivoflow.post(fixture_body(CANCEL_HALF))
    moved_to = vivoflow.post(fixture_body(CREATED_HALF)).json()["delivery_id"]

    old_run = vivoflow.wait_for_runs(original, timeout=15)[0]
    new_run = vivoflow.wait_for_runs(moved_to, timeout=15)[0]
    old_step = steps_of(vivoflow, old_run["id"])["remind"]
    assert new_run["status"] == "succeeded"
    assert steps_of(vivoflow, new_run["id"])["remind"]["input"]["subject"] == "Reminder: 2027-03-05 16:00 UTC"
    if keep:
        assert (old_run["status"], old_step["status"]) == ("succeeded", "succeeded")
        subjects = sorted(m["Subject"] for m in smtp_sink.wait_for(2))
        assert subjects == ["Reminder: 2027-03-04 15:00 UTC", "Reminder: 2027-03-05 16:00 UTC"]
    else:
        assert old_step["status"] == "skipped"
        assert "canceled or rescheduled" in old_step["error"]
        assert [m["Subject"] for m in smtp_sink.wait_for(1)] == ["Reminder: 2027-03-05 16:00 UTC"]
    assert len(smtp_sink.messages) == (2 if keep else 1)


def test_delayed_step_keeps_the_recipe_version_it_was_scheduled_with(
    start: Callable[..., Vivoflow], recipes_dir: Path, smtp_sink: Any
) -> None:
    before = REMINDER.replace("{extra}", "").replace("delay: 2s", "delay: 3s")
    vivoflow = start(before)
    assert vivoflow.worker_app is not None
    first = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    scheduled_run(vivoflow, first)

    after = before.replace('subject: "Reminder:', 'subject: "Edited reminder:')
    (recipes_dir / "test-0.yaml").write_text(after)
    recipes = vivoflow.worker_app.recipes
    wait_until(lambda: recipes.current().recipes["reminder"].source == after, timeout=5)
    assert smtp_sink.messages == []  # reloaded while the step was still waiting

    assert vivoflow.wait_for_runs(first, timeout=15)[0]["status"] == "succeeded"
    assert [m["Subject"] for m in smtp_sink.wait_for(1)] == ["Reminder: 2027-03-04 15:00 UTC"]

    other = sample("invitee.created", uri=f"{API}/OTHER/invitees/OTHER")
    later = vivoflow.post(json.dumps(other).encode()).json()["delivery_id"]
    assert vivoflow.wait_for_runs(later, timeout=15)[0]["status"] == "succeeded"
    assert smtp_sink.wait_for(2)[1]["Subject"] == "Edited reminder: 2027-03-04 15:00 UTC"


def test_delayed_step_is_skipped_when_the_cancellation_arrived_before_its_booking(
    start: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    vivoflow = start(REMINDER.replace("{extra}", ""), threads=1)
    vivoflow.stop_worker()
    canceled = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    booked = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    with worker_again(vivoflow):
        vivoflow.wait_processed(canceled)  # after the booking (order), whose reminder waits
        run = vivoflow.wait_for_runs(booked, timeout=15)[0]

    remind = steps_of(vivoflow, run["id"])["remind"]  # scheduled, so the booking was not superseded
    assert remind["status"] == "skipped" and "canceled or rescheduled" in remind["error"]
    assert smtp_sink.messages == []


def test_a_repeated_cancellation_does_not_skip_the_cancellations_own_delayed_step(
    start: Callable[..., Vivoflow], smtp_sink: Any
) -> None:
    vivoflow = start(FOLLOW_UP)
    canceled = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    scheduled_run(vivoflow, canceled)

    again = vivoflow.post(fixture_body("invitee.canceled", created_at="2027-02-02T09:05:00.000000Z"))
    assert vivoflow.wait_processed(again.json()["delivery_id"])["duplicate_of"] == canceled

    run = vivoflow.wait_for_runs(canceled, timeout=15)[0]
    assert steps_of(vivoflow, run["id"])["later"]["status"] == "succeeded"
    assert [m["Subject"] for m in smtp_sink.wait_for(1)] == ["Still interested?"]
