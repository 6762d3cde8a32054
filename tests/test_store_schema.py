"""The store's migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from workers.config import load_config
from workers.schema import SCHEDULED, deliveries, locks, metadata, runs, steps
from workers.store import Store, upgrade

pytestmark = pytest.mark.stores("sqlite", "postgresql")


def test_migrations_match_the_tables_the_code_uses(make_config: Callable[..., Path]) -> None:
    store = Store(load_config(make_config()).store_url())
    store.create_schema()
    store.create_schema()  # at head already: nothing to do, no error

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)

    assert diff == []


def test_db_upgrade_command(make_config: Callable[..., Path]) -> None:
    config = make_config()
    done = subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(config), "db", "upgrade"],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("store at head: ")


@pytest.mark.parametrize("command", [["db", "upgrade"], ["runs"], ["runs", "show", "run_x"]])
def test_a_database_that_does_not_answer_is_one_line(make_config: Callable[..., Path], command: list[str]) -> None:
    config = make_config(store={"url": "postgresql://nobody@127.0.0.1:1/none"})
    done = subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(config), *command],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 1
    assert done.stderr.startswith("vivoflow: store.url: cannot reach the database")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_upgrading_a_store_keeps_its_locks_and_waiting_steps(make_config: Callable[..., Path]) -> None:
    """0003 rebuilds ``locks`` (SQLite) and swaps the steps' status index for a partial one: nothing is lost."""
    store = Store(load_config(make_config()).store_url())
    upgrade(store.engine, "0002")
    with store.engine.begin() as conn:
        conn.execute(deliveries.insert().values(id="dlv_1", dedupe_key="k1", event="invitee.created",
                                                received_at=1.0, source="webhook", body="{}"))
        conn.execute(runs.insert().values(id="run_1", run_key="r1", delivery_id="dlv_1", recipe="r",
                                          event="invitee.created", status="scheduled", created_at=1.0))
        conn.execute(steps.insert(), [
            {"run_id": "run_1", "step_id": "wait", "position": 0, "use": "log.write", "status": "scheduled",
             "attempts": 0, "due_at": 50.0},
            {"run_id": "run_1", "step_id": "done", "position": 1, "use": "log.write", "status": "succeeded",
             "attempts": 1, "due_at": 10.0},
        ])
        conn.execute(locks.insert().values(key="invitee:x", owner="w1", expires_at=99.0))

    store.create_schema()

    assert store.scheduled_steps() == (1, 50.0)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(locks.c.key, locks.c.owner)).all() == [("invitee:x", "w1")]
    store.close()


def test_the_waiting_steps_query_names_scheduled_literally_so_the_partial_index_serves_it(
        make_config: Callable[..., Path]) -> None:
    """A planner uses a partial index only for the literal its WHERE names: a bound value would scan steps."""
    store = Store(load_config(make_config()).store_url())
    store.create_schema()
    query = sa.select(sa.func.count(), sa.func.min(steps.c.due_at)).where(SCHEDULED)
    sql = str(query.compile(dialect=store.engine.dialect))
    assert "'scheduled'" in sql
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
        assert "USING INDEX ix_steps_scheduled" in str(plan)
    store.close()
