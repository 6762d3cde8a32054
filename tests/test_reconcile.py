"""Reconciliation against a local Vivocalendar API stand-in: what no webhook delivered runs, once.

The stand-in serves the shipped samples' bookings with the URIs webhooks carry,
so a reconciled delivery and a late webhook name the same invitee.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from connectors.vivocalendar import VivocalendarApi
from tests.fake_vivocalendar import SAMPLE_BASE, TOKEN, FakeVivocalendar
from tests.harness import Vivoflow, fixture_body, wait_until
from workers.reconcile import RECONCILER, reconcile, reconciler
from workers.schema import deliveries as table

#: The samples' booking was made 2027-02-01 10:00 and canceled 2027-02-02 09:00 (UTC).
NOW = datetime(2027, 2, 2, 12, 0, tzinfo=UTC)

LOG_RECIPE = """
name: trace
on: [invitee.created, invitee.canceled]
steps:
  - id: note
    use: log.write
    with: {message: "{{ event }} {{ invitee.email }}"}
"""


@pytest.fixture
def api_server() -> Iterator[FakeVivocalendar]:
    with FakeVivocalendar(uri_base=SAMPLE_BASE, samples=("invitee.canceled",)) as fake:
        yield fake


@pytest.fixture
def flow(make_config: Callable[..., Path], recipes_dir: Path, api_server: FakeVivocalendar) -> Iterator[Vivoflow]:
    (recipes_dir / "trace.yaml").write_text(LOG_RECIPE)
    config = make_config(connectors={"vivocalendar": {"base_url": api_server.url, "token": TOKEN}})
    with Vivoflow(config) as running:
        yield running


def api_for(fake: FakeVivocalendar) -> VivocalendarApi:
    return VivocalendarApi(fake.url, TOKEN)


def deliveries(flow: Vivoflow) -> list[dict[str, Any]]:
    with flow.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.received_at))]


def test_bookings_and_cancellations_no_webhook_delivered_are_run_once(
    flow: Vivoflow, api_server: FakeVivocalendar
) -> None:
    with api_for(api_server) as api:
        report = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW)

    assert sorted(f.event for f in report.found) == ["invitee.canceled", "invitee.created"]
    assert all(f.enqueued for f in report.found)
    for found in report.found:
        run = flow.wait_for_runs(found.delivery_id)[0]
        assert run["status"] == "succeeded"
    stored = deliveries(flow)
    assert {d["source"] for d in stored} == {"reconcile"}
    assert all(f'"created_by": "{RECONCILER}"' in d["body"] for d in stored)

    with api_for(api_server) as api:
        again = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW)

    assert again.found == [] and again.checked == 1
    assert len(deliveries(flow)) == 2


def test_only_what_is_missing_is_reconciled(flow: Vivoflow, api_server: FakeVivocalendar) -> None:
    booked = flow.post(fixture_body("invitee.created")).json()["delivery_id"]
    flow.wait_for_runs(booked)

    with api_for(api_server) as api:
        report = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW)

    assert [f.event for f in report.found] == ["invitee.canceled"]


def test_the_window_limits_what_is_looked_at(flow: Vivoflow, api_server: FakeVivocalendar) -> None:
    with api_for(api_server) as api:
        # Booked 26 h before NOW, canceled 3 h before: a 24 h window sees only the cancellation.
        report = reconcile(flow.intake_app, api, since=timedelta(hours=24), now=NOW)

    assert [f.event for f in report.found] == ["invitee.canceled"]


def test_a_webhook_arriving_after_reconciliation_runs_nothing_more(
    flow: Vivoflow, api_server: FakeVivocalendar
) -> None:
    with api_for(api_server) as api:
        report = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW)
    canceled = next(f for f in report.found if f.event == "invitee.canceled")
    flow.wait_for_runs(canceled.delivery_id)

    # The sender's retry finally gets through; its envelope timestamp differs from the
    # cancellation's own, so for the intake it is a new delivery.
    late = flow.post(fixture_body("invitee.canceled", created_at="2027-02-02T09:00:01.250000Z"))

    assert late.status_code == 202
    delivery = flow.wait_processed(late.json()["delivery_id"])
    assert delivery["duplicate_of"] == canceled.delivery_id
    assert flow.runs(delivery["id"]) == []


def test_every_page_of_events_and_invitees_is_read(flow: Vivoflow, api_server: FakeVivocalendar) -> None:
    template = copy.deepcopy(next(iter(next(iter(api_server.invitees.values())).values())))
    event_template = copy.deepcopy(next(iter(api_server.scheduled_events.values())))
    for i in range(120):  # more than one page of 100
        event = {**event_template, "uri": f"{SAMPLE_BASE}/scheduled_events/PAGED{i:011d}"}
        api_server.add_scheduled_event(event)
        api_server.add_invitee({**template, "uri": f"{event['uri']}/invitees/INV{i:013d}", "event": event["uri"],
                                "status": "active", "cancellation": None})

    with api_for(api_server) as api:
        report = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW, enqueue=lambda _: None)

    assert report.checked == 121
    assert len([f for f in report.found if f.event == "invitee.created"]) == 121
    pages = [r for r in api_server.received("GET", "/scheduled_events")]
    assert len(pages) == 2 and "page_token" in pages[1].query


def test_organization_forbidden_falls_back_to_the_users_own_events(
    flow: Vivoflow, api_server: FakeVivocalendar
) -> None:
    api_server.forbid_organization_scope = True

    with api_for(api_server) as api:
        report = reconcile(flow.intake_app, api, since=timedelta(hours=48), now=NOW, enqueue=lambda _: None)

    assert len(report.found) == 2
    assert "user" in api_server.received("GET", "/scheduled_events")[-1].query


def test_the_background_reconciler_runs_at_start(flow: Vivoflow, api_server: FakeVivocalendar) -> None:
    chore = reconciler(flow.intake_app, lambda: api_for(api_server), every=timedelta(hours=1),
                       window=timedelta(days=400), horizon=timedelta(days=400))
    chore.start()
    try:
        found = wait_until(lambda: len(deliveries(flow)) == 2 and deliveries(flow))
    finally:
        chore.stop()
        chore.join(10)
    assert {d["event"] for d in found} == {"invitee.created", "invitee.canceled"}


def test_reconcile_command_reports_and_is_idempotent(flow: Vivoflow, api_server: FakeVivocalendar) -> None:
    # The samples' meeting is in 2027: look far enough ahead from today to see it.
    config = yaml.safe_load(flow.config_path.read_text())
    flow.config_path.write_text(yaml.safe_dump({**config, "reconcile": {"horizon": "1000d"}}))
    command = [sys.executable, "-m", "workers.cli", "--config", str(flow.config_path), "reconcile", "--since", "2d"]

    first = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_env(flow))
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_env(flow))

    assert first.returncode == 0, first.stderr
    assert "2 booking event(s) no webhook delivered" in first.stdout
    assert "invitee.canceled https://api.vivocalendar.com/scheduled_events/" in first.stdout
    assert second.returncode == 0 and "0 booking event(s)" in second.stdout
    assert len(deliveries(flow)) == 2


def _env(flow: Vivoflow) -> dict[str, str]:
    return {**os.environ, "VIVOFLOW_BROKER_URL": flow.config.broker.url}
