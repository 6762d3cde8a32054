"""One process's write transactions on a SQLite file, committed together: one commit for several.

SQLite takes one writer at a time for the whole machine (``workers.writelock``), and a worker
runs three write transactions a run: a step's claim is committed before its connector is
called, its outcome after. With eight threads in a worker process, py-spy found the worker
threads waiting for the write lock 81% of the time while a backlog drained: every transaction
paid for its own turn of the lock, its BEGIN and its COMMIT, which wrote the same hot pages
(the newest leaf of each index) to the WAL again and again.

Here a process's threads write through one shared connection. A thread whose statements are
done while another waits for its turn hands the open transaction on instead of committing,
and waits; the last one in line commits for all of them (at most ``MAX_GROUP``). A thread that
joins a transaction begun by another puts its statements in a savepoint of its own, so a
thread that rolls back undoes its own writes only. ``leave`` returns once the thread's writes
are durable, as a commit of its own did, and a commit that fails fails every thread of the
group: each then handles its message as after any failed commit (Dramatiq retries it). With
one writer at a time, nothing changes: it commits at once, with no savepoint.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from workers.writelock import WriteLock

#: Most threads one commit serves; the first of them waits for the others' statements.
MAX_GROUP = 16


class _Group:
    """The threads of one open transaction: told together how its commit went."""

    def __init__(self) -> None:
        self.members = 0
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """The shared write connection of one SQLite store in this process, and whose turn it is."""

    def __init__(self, connect: Callable[[], Any], lock: WriteLock, max_group: int = MAX_GROUP) -> None:
        """``connect``: a pooled connection (SQLAlchemy's ``raw_connection()``), kept for this process."""
        self._connect = connect
        self._lock = lock
        self._max_group = max_group
        self._turn = threading.Lock()
        self._counting = threading.Lock()
        self._waiting = 0
        self._pooled: Any = None
        self._pid = 0
        self._group: _Group | None = None

    def join(self) -> Any:
        """Wait for this thread's turn; returns a cursor of the shared connection in the open
        transaction, begun by this thread if none is. ``leave`` must follow.

        A thread that joins a transaction begun by another sets a savepoint of its own first.
        """
        with self._counting:
            self._waiting += 1
        try:
            self._turn.acquire()
        finally:
            with self._counting:
                self._waiting -= 1
        try:
            cursor = self._connection().cursor()
            if self._group is None:
                self._lock.acquire()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                except BaseException:
                    self._lock.release()
                    raise
                self._group = _Group()
                return cursor
        except BaseException:
            self._turn.release()
            raise
        try:
            cursor.execute("SAVEPOINT own")
        except BaseException as exc:
            self._end(self._group, error=exc)
            raise
        return cursor

    def leave(self, *, keep: bool) -> None:
        """This thread's statements are done: kept, or undone (``keep=False``). Returns once the
        kept ones are committed, by this thread or a later one of the group; raises if that failed."""
        group = self._group
        assert group is not None, "leave() without join()"
        if group.members == 0 and not keep:  # the transaction holds this thread's writes alone
            self._end(group, commit=False)
            return
        try:
            if group.members:  # joined at a savepoint of its own
                self._pooled.dbapi_connection.execute("RELEASE own" if keep else "ROLLBACK TO own")
                if not keep:
                    self._pooled.dbapi_connection.execute("RELEASE own")
        except BaseException as exc:  # the transaction is in no known state: it ends here, for everyone
            self._end(group, error=exc)
            raise
        group.members += 1
        if self._waiting and group.members < self._max_group:
            self._turn.release()  # the next thread carries the transaction on, and commits it
            group.done.wait()
        else:
            self._end(group)
        if keep and group.error is not None:
            raise sqlite3.OperationalError(f"the commit shared with other writers failed: {group.error}")

    def close(self) -> None:
        """Give the shared connection back to its pool (this process's; never one held by a group)."""
        if self._pooled is not None and self._pid == os.getpid() and self._group is None:
            self._pooled.close()
        self._pooled = None

    def _connection(self) -> Any:
        if self._pooled is None or self._pid != os.getpid():
            self._pooled, self._pid = self._connect(), os.getpid()
        return self._pooled.dbapi_connection

    def _end(self, group: _Group, error: BaseException | None = None, *, commit: bool = True) -> None:
        """Commit the group's transaction (roll it back after ``error``, or if not ``commit``),
        then let everyone go."""
        connection = self._pooled.dbapi_connection
        try:
            if error is None and commit:
                try:
                    connection.commit()
                except BaseException as exc:
                    error = exc
            if error is not None:
                group.error = error
            if error is not None or not commit:
                connection.rollback()
        finally:
            self._group = None
            self._lock.release()
            group.done.set()
            self._turn.release()
