"""A worker's unit of work on the store: the run path's statements, in as few transactions as it may.

One delivery costs about ten statements. Through SQLAlchemy Core each cost ~100 µs of CPU
(building, caching and compiling the statement), several times what SQLite itself spends, so
the statements a worker runs per delivery are written here as plain parameterised SQL for the
pooled DBAPI connection (``:name`` placeholders, translated once for psycopg). The engine decides
where transactions end (``commit``): a step's claim is committed before its connector is called
and its outcome after, and nothing network-bound runs inside a transaction.

Claims are ``INSERT … ON CONFLICT DO NOTHING`` with the row count as the answer: unlike catching
an IntegrityError it leaves a PostgreSQL transaction usable, so a claim can share a transaction
with the writes around it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from functools import cache
from typing import Any

from workers.groupcommit import GroupCommit

TERMINAL = ("succeeded", "failed", "skipped")

#: A ``:name`` placeholder (never ``::``, PostgreSQL's cast); the run path's SQL uses no ``%`` either.
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


def new_id(prefix: str) -> str:
    """A sortable id: milliseconds since the epoch, then randomness (``run_018f…``)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


@cache
def _pyformat(sql: str) -> str:
    """The same statement with psycopg's placeholders (``%(name)s``); values stay parameters."""
    return _NAMED.sub(r"%(\1)s", sql)


def _named(sql: str) -> str:
    return sql


class Session:
    """Statements on one pooled DBAPI connection; ``commit`` ends the transaction the first write began.

    Reads before the first write run on their own. The first write begins the transaction, on
    SQLite with ``BEGIN IMMEDIATE``: in WAL mode a deferred transaction that has read and then
    writes fails at once with SQLITE_BUSY if another process wrote meanwhile, whatever the busy
    timeout; taking the write lock first makes it wait its turn instead. (psycopg begins a
    transaction at any first statement, which is as good: PostgreSQL locks rows, not the file.)
    On a SQLite file the ``GroupCommit`` below takes the machine's ``WriteLock`` before it begins,
    so the turn comes as soon as the last writer commits (``workers.writelock``).

    Writes nobody reads an answer from (a step's outcome, a run's status, an unlock) wait in
    ``_pending`` until the transaction's next statement or its commit, and run then, in order.
    The write lock is then held for the statements alone, not for the engine's work between
    them (templates, metrics, the next step's checks): one writer at a time serves the whole
    machine, and in a worker with eight threads every GIL hand-over inside a transaction made
    each other writer wait longer.

    On a SQLite file, the writes of a unit of work go through the process's shared connection
    (``workers.groupcommit``) from its first write to its commit, which may then be shared with
    other threads' units of work; reads before the first write use the session's own connection.
    """

    def __init__(self, dbapi_connection: Any, dialect: str, group: GroupCommit | None = None) -> None:
        self._conn = dbapi_connection
        self._cursor = dbapi_connection.cursor()
        self._sqlite = dialect == "sqlite"
        self._sql = _named if self._sqlite else _pyformat
        #: With a ``GroupCommit``: from the first write to the commit, the shared connection's cursor.
        self._group = group
        self._shared: Any = None
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._after_commit: list[Callable[[], None]] = []

    # plumbing -----------------------------------------------------------------

    def commit(self) -> None:
        """Make everything written so far durable (the engine calls it before any network call)."""
        try:
            self._flush()
        except BaseException:
            self.rollback()
            raise
        if self._shared is not None:
            self._shared = None
            self._group.leave(keep=True)  # type: ignore[union-attr]
        else:
            self._conn.commit()
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            action()

    def rollback(self) -> None:
        self._pending.clear()
        self._after_commit.clear()
        if self._shared is not None:
            self._shared = None
            self._group.leave(keep=False)  # type: ignore[union-attr]
            return
        self._conn.rollback()

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once what is written so far is committed (a rollback drops it): a log line
        that says so is then true, and its write waits outside SQLite's write lock."""
        self._after_commit.append(action)

    def _read(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        self._flush()  # a read sees the transaction's own writes
        cursor = self._shared or self._cursor
        cursor.execute(self._sql(sql), params)
        rows = cursor.fetchall()
        if not rows:
            return []
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _write(self, sql: str, params: dict[str, Any]) -> Any:
        """Run a write (beginning the transaction if none is open); returns the cursor, rows unread."""
        self._flush()
        return self._execute_write(sql, params)

    def _write_later(self, sql: str, params: dict[str, Any]) -> None:
        """A write whose answer nobody reads: run before the transaction's next statement, or at commit."""
        self._pending.append((sql, params))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for sql, params in pending:
            self._execute_write(sql, params)

    def _execute_write(self, sql: str, params: dict[str, Any]) -> Any:
        if self._shared is None and self._group is not None:
            self._shared = self._group.join()
        if self._shared is not None:
            self._shared.execute(self._sql(sql), params)
            return self._shared
        if self._sqlite and not self._conn.in_transaction:  # an in-memory database: no other writer
            self._cursor.execute("BEGIN IMMEDIATE")
        self._cursor.execute(self._sql(sql), params)
        return self._cursor

    def _first(self, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    # deliveries ---------------------------------------------------------------

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        return self._first("SELECT * FROM deliveries WHERE id = :id", {"id": delivery_id})

    def find_delivery(self, event: str, invitee_uri: str) -> dict[str, Any] | None:
        """The first delivery of ``event`` for this invitee that is not a duplicate, if any."""
        return self._first(
            "SELECT * FROM deliveries WHERE invitee_uri = :uri AND event = :event AND duplicate_of IS NULL"
            " ORDER BY received_at LIMIT 1", {"uri": invitee_uri, "event": event})

    def has_delivery(self, event: str, invitee_uri: str) -> bool:
        """Whether any delivery of ``event`` for this invitee was stored (webhook or reconciled)."""
        return bool(self._read("SELECT id FROM deliveries WHERE invitee_uri = :uri AND event = :event LIMIT 1",
                               {"uri": invitee_uri, "event": event}))

    def earlier_unprocessed(self, delivery: dict[str, Any], received_after: float) -> str | None:
        """An unprocessed delivery about the same invitee that the sender created before this one."""
        if not delivery["invitee_uri"] or not delivery["sender_created_at"]:
            return None
        row = self._first(
            "SELECT id FROM deliveries WHERE invitee_uri = :uri AND id <> :id AND processed_at IS NULL"
            " AND sender_created_at < :created AND received_at > :after LIMIT 1",
            {"uri": delivery["invitee_uri"], "id": delivery["id"], "created": delivery["sender_created_at"],
             "after": received_after})
        return row["id"] if row else None

    def mark_processed(self, delivery_id: str) -> None:
        self._write_later("UPDATE deliveries SET processed_at = :now WHERE id = :id",
                          {"now": time.time(), "id": delivery_id})

    def mark_duplicate(self, delivery_id: str, of: str) -> None:
        self._write_later("UPDATE deliveries SET duplicate_of = :of, processed_at = :now WHERE id = :id",
                          {"of": of, "now": time.time(), "id": delivery_id})

    # claims, locks and rate windows -------------------------------------------

    def claim(self, key: str, owner: str) -> str:
        """Claim ``key`` for ``owner``; returns whoever holds it (``owner`` if the claim is ours)."""
        taken = self._write("INSERT INTO claims (key, owner, created_at) VALUES (:key, :owner, :now)"
                            " ON CONFLICT (key) DO NOTHING", {"key": key, "owner": owner, "now": time.time()})
        if taken.rowcount == 1:
            return owner
        return self._read("SELECT owner FROM claims WHERE key = :key", {"key": key})[0]["owner"]

    def try_lock(self, key: str, owner: str, lease_seconds: float) -> bool:
        """Take ``key`` for ``owner`` unless someone else holds it and their lease runs."""
        now = time.time()
        taken = self._write(
            "INSERT INTO locks (key, owner, expires_at) VALUES (:key, :owner, :expires)"
            " ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
            " WHERE locks.expires_at < :now OR locks.owner = :owner",
            {"key": key, "owner": owner, "expires": now + lease_seconds, "now": now})
        return taken.rowcount == 1

    def unlock(self, key: str, owner: str) -> None:
        self._write_later("DELETE FROM locks WHERE key = :key AND owner = :owner", {"key": key, "owner": owner})

    def take_rate(self, key: str, limit: int, window_seconds: float) -> float:
        """Count one call against ``key``'s current window: 0 if allowed, else seconds to wait.

        One atomic upsert, so workers on any number of hosts share the count.
        """
        now = time.time()
        start = now - now % window_seconds
        calls = self._write(
            "INSERT INTO rate_windows (key, window_start, calls) VALUES (:key, :start, 1)"
            " ON CONFLICT (key, window_start) DO UPDATE SET calls = rate_windows.calls + 1 RETURNING calls",
            {"key": key, "start": start}).fetchall()[0][0]
        self._write("DELETE FROM rate_windows WHERE key = :key AND window_start < :start", {"key": key, "start": start})
        return 0.0 if calls <= limit else start + window_seconds - now

    # runs -----------------------------------------------------------------------

    def ensure_run(self, *, run_key: str, delivery_id: str, recipe: str, event: str, recipe_source: str | None = None,
                   replay_of: str | None = None, replay_id: str | None = None,
                   status: str = "queued", reason: str | None = None) -> tuple[dict[str, Any], bool]:
        """The run for ``run_key`` and whether this call created it (a redelivered message resumes it)."""
        now = time.time()
        values = dict(
            id=new_id("run"), run_key=run_key, delivery_id=delivery_id, recipe=recipe, event=event,
            status=status, reason=reason, created_at=now, recipe_source=recipe_source,
            replay_of=replay_of, replay_id=replay_id, finished_at=now if status in TERMINAL else None,
        )
        created = self._write(
            "INSERT INTO runs (id, run_key, delivery_id, recipe, event, status, reason, created_at, recipe_source,"
            " replay_of, replay_id, finished_at) VALUES (:id, :run_key, :delivery_id, :recipe, :event, :status,"
            " :reason, :created_at, :recipe_source, :replay_of, :replay_id, :finished_at)"
            " ON CONFLICT (run_key) DO NOTHING", values).rowcount == 1
        if created:
            return values, True
        return self._read("SELECT * FROM runs WHERE run_key = :key", {"key": run_key})[0], False

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return self._first("SELECT * FROM runs WHERE id = :id", {"id": run_id})

    def finish_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        self._write_later(
            "UPDATE runs SET status = :status, reason = :reason, finished_at = :finished WHERE id = :id",
            {"status": status, "reason": reason, "finished": time.time() if status in TERMINAL else None,
             "id": run_id})

    def start_run(self, run_id: str) -> bool:
        """Mark a waiting run ``running``; False if it finished meanwhile (another worker resumed it)."""
        return self._write(
            "UPDATE runs SET status = 'running', reason = NULL, finished_at = NULL"
            " WHERE id = :id AND status IN ('queued', 'scheduled', 'running')", {"id": run_id}).rowcount == 1

    # steps ------------------------------------------------------------------------

    def steps_of(self, run_id: str) -> list[dict[str, Any]]:
        return [_decode_step(row) for row in self._read(
            "SELECT * FROM steps WHERE run_id = :run_id ORDER BY position", {"run_id": run_id})]

    def claim_step(self, *, run_id: str, step_id: str, position: int, use: str, lease_seconds: float) -> int | None:
        """Take a step for execution: the attempt number, or None if it is not ours to run.

        Not ours: it succeeded, was skipped or failed, or another worker runs it and its
        lease has not run out. The insert, or else the conditional update, decides
        atomically, so two workers handed the same message never both call the connector.
        """
        now = time.time()
        key = {"run_id": run_id, "step_id": step_id}
        inserted = self._write(
            "INSERT INTO steps (run_id, step_id, position, use, status, attempts, started_at)"
            " VALUES (:run_id, :step_id, :position, :use, 'running', 1, :now) ON CONFLICT (run_id, step_id) DO NOTHING",
            {**key, "position": position, "use": use, "now": now})
        if inserted.rowcount == 1:
            return 1
        claimed = self._write(
            "UPDATE steps SET status = 'running', attempts = attempts + 1, started_at = :now"
            " WHERE run_id = :run_id AND step_id = :step_id AND (status IN ('queued', 'scheduled')"
            " OR (status = 'running' AND started_at < :stale)) RETURNING attempts",
            {**key, "now": now, "stale": now - lease_seconds}).fetchall()
        return claimed[0][0] if claimed else None

    def record_step(
        self, *, run_id: str, step_id: str, position: int, use: str, status: str,
        input_json: str | None = None, output_json: str | None = None, error: str | None = None,
        due_at: float | None = None,
    ) -> None:
        """Write a step's outcome (a row of its own for a step that never started, e.g. skipped).

        Input and output come as JSON text, already redacted (``Redactor.json``): encoded once.
        """
        self._write_later(
            "INSERT INTO steps (run_id, step_id, position, use, status, attempts, input, output, error, due_at,"
            " finished_at) VALUES (:run_id, :step_id, :position, :use, :status, 0, :input, :output, :error, :due_at,"
            " :finished_at) ON CONFLICT (run_id, step_id) DO UPDATE SET status = excluded.status,"
            " input = excluded.input, output = excluded.output, error = excluded.error, due_at = excluded.due_at,"
            " finished_at = excluded.finished_at",
            {"run_id": run_id, "step_id": step_id, "position": position, "use": use, "status": status,
             "input": input_json, "output": output_json, "error": error, "due_at": due_at,
             "finished_at": None if status in ("scheduled", "running") else time.time()})


def _decode_step(step: dict[str, Any]) -> dict[str, Any]:
    for key in ("input", "output"):
        if step.get(key) is not None:
            step[key] = json.loads(step[key])
    return step
