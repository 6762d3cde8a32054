"""Units of work of one process's threads share a SQLite commit: each is durable when its commit
returns, a rollback undoes its own writes only, and a failed commit fails every one of them.

Real threads on a real SQLite file; the only thing a test steers is the order in which two
units of work reach the write lock (the second one waits for its turn while the first is open).
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from tests.harness import wait_until
from tests.test_writelock import held
from workers.store import Store


@pytest.fixture
def statements(store: Store) -> list[str]:
    """Every statement the store's connections run from now on, from SQLite's own trace."""
    seen: list[str] = []
    store.engine.dispose()
    sa.event.listen(store.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(seen.append))
    return seen


def owner(store: Store, key: str) -> str | None:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT owner FROM claims WHERE key = ?", (key,)).scalar()


def two_units(store: Store, *, failing: str | None = None) -> list[tuple[str, str]]:
    """Two threads' units of work, each claiming ``k-<its name>``: the second reaches the write
    lock while the first holds it, and ``failing`` (if named) raises after its claim. Returns
    what each ended with, in the order they ended."""
    first_in = threading.Event()
    ended: list[tuple[str, str]] = []

    def unit(name: str) -> None:
        if name == "second":
            first_in.wait(30)
        try:
            with store.session() as db:
                db.claim(f"k-{name}", name)
                if name == "first":
                    first_in.set()
                    wait_until(lambda: store.group._waiting == 1)  # the second waits for its turn
                if name == failing:
                    raise RuntimeError("the engine failed mid-transaction")
            ended.append((name, "committed"))
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            ended.append((name, f"{type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=unit, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return ended


def test_two_threads_units_of_work_share_one_commit_and_each_returns_once_durable(
    store: Store, statements: list[str]
) -> None:
    ended = two_units(store)

    # The first handed its open transaction to the second instead of committing, and its own
    # commit returned only once the second had committed both.
    assert [name for name, _ in ended] == ["second", "first"]
    assert all(outcome == "committed" for _, outcome in ended)
    assert statements.count("COMMIT") == 1
    assert (owner(store, "k-first"), owner(store, "k-second")) == ("first", "second")
    assert not held(store.write_lock)


@pytest.mark.parametrize("failing", ["first", "second"])
def test_a_unit_of_work_that_rolls_back_undoes_its_own_writes_only(store: Store, failing: str) -> None:
    """The first one began the transaction (its writes are all of it); the second joined it."""
    ended = two_units(store, failing=failing)

    other = "second" if failing == "first" else "first"
    assert sorted(ended) == sorted([(other, "committed"), (failing, "RuntimeError: the engine failed mid-transaction")])
    assert (owner(store, f"k-{other}"), owner(store, f"k-{failing}")) == (other, None)
    assert not held(store.write_lock)


def test_a_shared_commit_that_fails_fails_every_unit_of_work_in_it(store: Store) -> None:
    refusing = threading.Event()

    def authorizer(action: int, operation: str | None, *_: Any) -> int:
        # SQLite asks before every statement; COMMIT is refused while the test says so.
        if refusing.is_set() and action == sqlite3.SQLITE_TRANSACTION and operation == "COMMIT":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    store.engine.dispose()
    sa.event.listen(store.engine, "connect", lambda dbapi, _: dbapi.set_authorizer(authorizer))
    refusing.set()

    ended = two_units(store)

    assert len(ended) == 2
    for _, outcome in ended:
        assert outcome.startswith("OperationalError: ") and "not authorized" in outcome
    assert (owner(store, "k-first"), owner(store, "k-second")) == (None, None)
    assert not held(store.write_lock)
    refusing.clear()
    with store.session() as db:  # the shared connection is usable again
        assert db.claim("k3", "later") == "later"
    assert owner(store, "k3") == "later"
