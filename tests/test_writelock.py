"""The SQLite write lock: writers of one database file queue on it, across threads and processes,
from a transaction's first write to its commit or rollback, and nothing leaves it held.

Whether it is held is asked from another process, as another vivoflow process would find it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from workers.store import Store
from workers.writelock import WriteLock

_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def held(lock: WriteLock) -> bool:
    """Whether another process would have to wait for ``lock``."""
    code = subprocess.run([sys.executable, "-c", _PROBE, lock.path], timeout=30).returncode
    assert code in (0, 3)
    return code == 3


def test_a_held_lock_makes_other_processes_and_threads_wait(tmp_path: Path) -> None:
    lock = WriteLock(str(tmp_path / "db"))
    with lock:
        assert held(lock)
        other_thread = threading.Thread(target=lock.acquire, daemon=True)
        other_thread.start()
        other_thread.join(0.2)
        assert other_thread.is_alive()  # still waiting for us
    other_thread.join(20)
    assert not other_thread.is_alive()  # got it once we let go
    lock.release()
    assert not held(lock)


def _hold_forever(path: str, ready: Any) -> None:
    WriteLock(path).acquire()
    ready.set()
    threading.Event().wait()


def test_a_killed_holder_leaves_the_lock_free(tmp_path: Path) -> None:
    lock = WriteLock(str(tmp_path / "db"))
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_forever, args=(str(tmp_path / "db"), ready), daemon=True)
    holder.start()
    assert ready.wait(60)
    assert held(lock)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert not held(lock)
    with lock:
        assert held(lock)


def test_a_forked_child_queues_behind_its_parent(tmp_path: Path) -> None:
    """``flock`` belongs to the open file: a child must open its own, not share the parent's hold."""
    lock = WriteLock(str(tmp_path / "db"))
    with lock:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: would it get the lock while the parent holds it?
            import fcntl
            try:
                fcntl.flock(lock._handle(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(write, b"took it")
            except BlockingIOError:
                os.write(write, b"waits")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 16) == b"waits"


def test_a_session_holds_the_lock_from_its_first_write_to_its_commit(store: Store) -> None:
    with store.session() as db:
        db.delivery("dlv_none")  # a read takes nothing
        assert not held(store.write_lock)
        db.claim("k1", "me")
        assert held(store.write_lock)
        db.commit()
        assert not held(store.write_lock)
        db.claim("k2", "me")
        assert held(store.write_lock)
    assert not held(store.write_lock)


def _run_with_a_claimed_step(store: Store) -> str:
    with store.session() as db:
        run, _ = db.ensure_run(run_key="k:r", delivery_id="dlv_x", recipe="r", event="invitee.created",
                               status="running")
        assert db.claim_step(run_id=run["id"], step_id="s1", position=0, use="log.write", lease_seconds=60) == 1
    return run["id"]


def test_an_outcome_waits_for_the_next_statement_before_it_takes_the_lock(store: Store) -> None:
    """A step's outcome, a run's status and an unlock need no answer: the engine's work after
    them (the next step's templates and checks) must not hold up every other writer."""
    run_id = _run_with_a_claimed_step(store)
    with store.session() as db:
        db.record_step(run_id=run_id, step_id="s1", position=0, use="log.write", status="succeeded",
                       output_json='{"ok": true}')
        db.finish_run(run_id, "succeeded")
        assert not held(store.write_lock)
        assert db.steps_of(run_id)[0]["status"] == "succeeded"  # a read sees the transaction's own writes
        assert held(store.write_lock)
    assert not held(store.write_lock)
    assert store.get_run(run_id)["status"] == "succeeded"


def test_an_outcome_is_written_at_commit_or_not_at_all(store: Store) -> None:
    run_id = _run_with_a_claimed_step(store)
    with store.session() as db:
        db.finish_run(run_id, "failed", "kept")
        db.commit()
        assert not held(store.write_lock)
        db.finish_run(run_id, "succeeded")
        db.rollback()
    with pytest.raises(RuntimeError), store.session() as db:
        db.finish_run(run_id, "succeeded")
        raise RuntimeError("the engine failed before the commit")
    run = store.get_run(run_id)
    assert (run["status"], run["reason"]) == ("failed", "kept")


def test_a_failed_unit_of_work_lets_go_of_the_lock(store: Store) -> None:
    with pytest.raises(RuntimeError), store.session() as db:
        db.claim("k1", "me")
        raise RuntimeError("the engine failed mid-transaction")
    assert not held(store.write_lock)
    with store.session() as db:
        assert db.claim("k1", "someone else") == "someone else"  # rolled back: the key is free


def test_a_write_that_cannot_begin_lets_go_of_the_lock(store: Store, tmp_path: Path) -> None:
    """Another writer that does not queue (a migration, sqlite3 by hand) holds SQLite's own lock too long."""
    store.engine.dispose()
    sa.event.listen(store.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=50"))
    outsider = sqlite3.connect(tmp_path / "vivoflow.db", isolation_level=None)
    outsider.execute("BEGIN IMMEDIATE")
    try:
        with store.session() as db:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                db.claim("k1", "me")
            assert not held(store.write_lock)
    finally:
        outsider.rollback()
        outsider.close()


def test_inserting_deliveries_takes_the_lock_and_lets_go(store: Store) -> None:
    observed = []
    original = store.write_lock.acquire

    def acquire() -> None:
        original()
        observed.append(held(store.write_lock))

    store.write_lock.acquire = acquire  # observed, not replaced
    store.insert_deliveries([{"dedupe_key": "a" * 64, "event": "invitee.created", "payload_uri": "u",
                              "invitee_uri": "u", "sender_created_at": None, "body": "{}"}])
    assert observed == [True]
    assert not held(store.write_lock)


def test_a_lock_file_that_cannot_be_opened_leaves_writers_to_sqlites_own_lock(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    os.mkdir(store.write_lock.path)  # a folder where the file should be: open() fails
    for key in ("k1", "k2"):
        with store.session() as db:
            assert db.claim(key, "me") == "me"
    warnings = [r.getMessage() for r in caplog.records if "write-lock" in r.getMessage()]
    assert len(warnings) == 1 and "SQLite's lock alone" in warnings[0]
