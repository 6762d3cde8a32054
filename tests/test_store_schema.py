"""The store's migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from workers.config import load_config
from workers.schema import metadata
from workers.store import Store

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
