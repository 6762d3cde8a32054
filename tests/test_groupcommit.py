"""Units of work of one process's threads share a SQLite commit: each is durable when its commit
returns, a rollback undoes its own writes only, and a failed commit fails every one of them.

Real threads on a real SQLite file; the only thing a test steers is the order in which two
units of work reach the write lock (the second one waits for its turn while the first is open).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tests.harness import wait_until
from tests.test_writelock import held
from workers.session import Session
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


def two_units(store: Store, first: Callable[[Session], None], second: Callable[[Session], None]) -> list[Any]:
    """Run ``first`` and ``second`` as units of work of two threads, the second reaching the write
    lock while the first holds it; returns what each ended with, and the order they ended in."""
    first_in = threading.Event()
    ended: list[Any] = []

    def unit(work: Callable[[Session], None], name: str, after: threading.Event | None) -> None:
        if after is not None:
            after.wait(30)
        try:
            with store.session() as db:
                work(db)
                if name == "first":
                    first_in.set()
                    wait_until(lambda: store.group._waiting == 1)  # the second waits for its turn
            ended.append((name, "committed"))
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            ended.append((name, f"{type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=unit, args=(first, "first", None)),
               threading.Thread(target=unit, args=(second, "second", first_in))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return ended


def test_two_threads_units_of_work_share_one_commit_and_each_returns_once_durable(
    store: Store, statements: list[str]
) -> None:
    ended = two_units(store, lambda db: db.claim("k1", "first"), lambda db: db.claim("k2", "second"))

    # The first handed its open transaction to the second instead of committing, and its own
    # commit returned only once the second had committed both.
    assert [name for name, _ in ended] == ["second", "first"]
    assert all(outcome == "committed" for _, outcome in ended)
    assert statements.count("COMMIT") == 1
    assert (owner(store, "k1"), owner(store, "k2")) == ("first", "second")
    assert not held(store.write_lock)


def test_a_unit_of_work_that_rolls_back_undoes_its_own_writes_only(store: Store) -> None:
    def second(db: Session) -> None:
        db.claim("k2", "second")
        raise RuntimeError("the engine failed mid-transaction")

    ended = two_units(store, lambda db: db.claim("k1", "first"), second)

    assert sorted(ended) == [("first", "committed"), ("second", "RuntimeError: the engine failed mid-transaction")]
    assert (owner(store, "k1"), owner(store, "k2")) == ("first", None)
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

    ended = two_units(store, lambda db: db.claim("k1", "first"), lambda db: db.claim("k2", "second"))

    assert len(ended) == 2
    for _, outcome in ended:
        assert outcome.startswith("OperationalError: ") and "not authorized" in outcome
    assert (owner(store, "k1"), owner(store, "k2")) == (None, None)
    assert not held(store.write_lock)
    refusing.clear()
    with store.session() as db:  # the shared connection is usable again
        assert db.claim("k3", "later") == "later"
    assert owner(store, "k3") == "later"
