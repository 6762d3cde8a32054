"""One writer at a time on a SQLite file, queued by the kernel instead of SQLite's sleeping retries.

SQLite lets one connection write at a time. A connection that finds the write lock taken calls
its busy handler, which sleeps and tries again, 1, 2, 5, 10, 15, 20, 25 ms and so on: with the
intake and two worker processes all writing, an unlucky writer kept losing the race to writers
that came later and slept 5 to 130 ms in total (measured: the intake's flushes, and with them
the end-to-end p99). Waiting on a lock the kernel releases instead wakes the next writer as soon as the
last one commits.

``WriteLock`` is taken before a write transaction begins and released when it ends: a
``threading.Lock`` queues the process's own threads, then ``flock`` on a file beside the database
queues the processes. It only orders writers that would have waited for SQLite anyway; SQLite's
own locking still guarantees correctness, so a writer that does not take it (a migration, a
prune) is merely served by the busy handler, as before. The operating system drops a dead
process's ``flock``, so a crash never leaves the lock held.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from types import TracebackType

log = logging.getLogger("vivoflow.store")


class WriteLock:
    """The machine-wide write lock of one SQLite database file (``<database>.write-lock``)."""

    def __init__(self, database: str) -> None:
        self.path = f"{database}.write-lock"
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._warned = False

    def acquire(self) -> None:
        """Wait for this process's other writers, then for other processes' (no time limit:
        a holder is inside a transaction that SQLite's own busy timeout bounds)."""
        self._threads.acquire()
        try:
            fd = self._handle()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()

    def _handle(self) -> int | None:
        """This process's descriptor: ``flock`` is held per open file, so a forked child opens its own.

        None if the file cannot be opened (a read-only or vanished folder): the writers then
        queue on SQLite's own lock as before, and the store's own error says what is wrong.
        """
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = None, os.getpid()
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot open %s (%s): writers wait on SQLite's lock alone", self.path, exc.strerror)
        return self._fd

    def close(self) -> None:
        """Close this process's descriptor (a hold still in place ends with it; never waits for one)."""
        fd, self._fd = self._fd, None
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
