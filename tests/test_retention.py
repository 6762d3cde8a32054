"""Retention: history older than ``store.retention_days`` is pruned, work still waiting is not."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.harness import Vivoflow, fixture_body, wait_until
from workers import schema as tables
from workers.runner import background_chores, prune

#: These run on SQLite and, where one answers, PostgreSQL.
pytestmark = pytest.mark.stores("sqlite", "postgresql")

DELAYED = """
on: invitee.created
steps:
  - id: later
    use: log.write
    delay: 1h
    with: {message: "reminder for {{ invitee.email }}"}
"""


def age(vivoflow: Vivoflow, delivery_id: str, days: float) -> None:
    with vivoflow.store.engine.begin() as conn:
        conn.execute(tables.deliveries.update().where(tables.deliveries.c.id == delivery_id)
                     .values(received_at=time.time() - days * 86400))


def count(vivoflow: Vivoflow, table: sa.Table) -> int:
    with vivoflow.store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_old_deliveries_go_with_their_runs_and_steps(vivoflow: Vivoflow) -> None:
    old = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    new = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
    vivoflow.wait_for_runs(old)
    vivoflow.wait_for_runs(new, count=2)
    age(vivoflow, old, days=31)

    prune(vivoflow.intake_app, timedelta(days=30))

    assert vivoflow.store.get_delivery(old) is None
    assert vivoflow.store.runs_of_delivery(old) == []
    assert vivoflow.store.get_delivery(new) is not None
    assert len(vivoflow.store.runs_of_delivery(new)) == 2
    kept_runs = {r["id"] for r in vivoflow.store.runs_of_delivery(new)}
    with vivoflow.store.engine.connect() as conn:
        step_runs = set(conn.execute(sa.select(tables.steps.c.run_id)).scalars())
    assert step_runs <= kept_runs


def test_a_delivery_with_a_step_still_scheduled_is_kept(
    make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    (recipes_dir / "later.yaml").write_text(DELAYED)
    with Vivoflow(make_config()) as vivoflow:
        delivery_id = vivoflow.post(fixture_body("invitee.created")).json()["delivery_id"]
        wait_until(lambda: [r for r in vivoflow.runs(delivery_id) if r["status"] == "scheduled"])
        age(vivoflow, delivery_id, days=400)

        prune(vivoflow.intake_app, timedelta(days=30))

        assert vivoflow.store.get_delivery(delivery_id) is not None
        assert count(vivoflow, tables.steps) == 1


def test_retention_runs_in_the_background_unless_turned_off(make_config: Callable[..., Path]) -> None:
    with Vivoflow(make_config(), worker=False) as keeping:
        assert "retention" in [c.name for c in background_chores(keeping.intake_app)]
    with Vivoflow(make_config(store={"url": "sqlite:///data/vivoflow.db", "retention_days": 0}),
                  worker=False) as forever:
        assert "retention" not in [c.name for c in background_chores(forever.intake_app)]


def test_a_long_history_is_pruned_a_batch_at_a_time_to_the_end(start_intake: Callable[..., Vivoflow]) -> None:
    """Short transactions (the intake waits for SQLite's write lock), and still every old one goes."""
    intake = start_intake()
    ids = [intake.post(fixture_body("invitee.created", created_at=f"2026-01-0{n + 1}T00:00:00.000000Z"))
           .json()["delivery_id"] for n in range(7)]
    for delivery_id in ids[:5]:
        age(intake, delivery_id, days=40)

    removed = intake.store.prune(time.time() - 30 * 86400, batch=2)

    assert removed == 5
    assert [d for d in ids if intake.store.get_delivery(d)] == ids[5:]
