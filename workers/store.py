"""The run store: deliveries, runs and steps, through SQLAlchemy Core.

SQLite by default (WAL, file created 0600), any SQLAlchemy URL otherwise. Every
statement is parameterised; uniqueness constraints, not process memory, make a
delivery, a run and a step exist once however many processes race. The statements
a worker runs per delivery live in ``workers.session`` (plain SQL, fewer transactions);
the one-off calls of the same kind below go through a session of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from workers.errors import ConfigError
from workers.groupcommit import GroupCommit
from workers.schema import SCHEDULED, claims, deliveries, locks, replays, runs, steps
from workers.session import Session, new_id
from workers.writelock import WriteLock

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Unlocked checkpoint rounds before the last one: each copies what arrived during the one before.
CHECKPOINT_ROUNDS = 8


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` on ``engine``'s database.

    On PostgreSQL an advisory lock serialises processes starting at once (two
    ``vivoflow serve`` behind a load balancer), so each migration runs once.
    """
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))  # "vivo" on a phone keypad
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


@contextlib.contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[None]:
    """On SQLite, a lock file beside the database does what PostgreSQL's advisory lock does."""
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Store:
    """All reads and writes of deliveries, runs and steps."""

    #: Queues this machine's writers of a SQLite file (``workers.writelock``); None elsewhere.
    write_lock: WriteLock | None = None
    #: This process's units of work write through it, committed together (``workers.groupcommit``).
    group: GroupCommit | None = None

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigError(f"store.url: not a database URL: {url!r}") from None
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not SQLAlchemy's psycopg2 default
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            # Pool as large as the threads that use it (uvicorn's thread pool, worker threads):
            # a connection opened per call pays its PRAGMAs every time.
            kwargs.update(connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=30)
            if parsed.database and parsed.database != ":memory:":
                _create_private_file(Path(parsed.database))
                self.write_lock = WriteLock(parsed.database)
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"store.url: cannot use {parsed.get_backend_name()!r}: {exc}") from None
        if parsed.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            if self.write_lock is not None:
                self.group = GroupCommit(self.engine.raw_connection, self.write_lock)

    def create_schema(self) -> None:
        """Bring the database to the current schema (alembic migrations; a no-op when up to date)."""
        upgrade(self.engine)

    def ping(self) -> None:
        """Read a table: ``SELECT 1`` would pass on SQLite without ever touching the file."""
        with self.engine.connect() as conn:
            conn.execute(sa.select(deliveries.c.id).limit(1)).first()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.engine.dispose()
        if self.write_lock is not None:
            self.write_lock.close()

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        """Around a write transaction of the hot path: wait for this machine's other writers first."""
        return self.write_lock if self.write_lock is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work on one pooled connection: committed at the end, rolled back on an error."""
        connection = self.engine.raw_connection()
        try:
            session = Session(connection.dbapi_connection, self.engine.dialect.name, self.group)
            try:
                yield session
            except BaseException:
                session.rollback()
                raise
            session.commit()
        finally:
            connection.close()

    # deliveries -------------------------------------------------------------

    def insert_deliveries(self, rows: list[dict[str, Any]]) -> list[StoredDelivery]:
        """Store each row once per dedupe key, in one transaction; one ``StoredDelivery`` per row, in order.

        A row whose dedupe key is stored already (or a twin in the same batch, or another
        intake's that won the race) inserts nothing; only when the driver reports fewer rows
        than it was given are the batch's keys looked up, to name the first delivery of each.
        """
        now = time.time()
        values = [{"id": new_id("dlv"), "received_at": now, "source": "webhook", **row} for row in rows]
        # In key order: two intakes inserting overlapping batches then lock the keys in the same
        # order, where PostgreSQL would otherwise break a deadlock by failing one of them.
        ordered = sorted(values, key=lambda v: v["dedupe_key"])
        insert = self._delivery_insert
        with self._writing(), self.engine.begin() as conn:
            inserted = conn.exec_driver_sql(insert.sql, insert.parameters(ordered)).rowcount
            if inserted == len(values):
                return [StoredDelivery(value["id"], False, now, None) for value in values]
            lookup = sa.select(deliveries.c.dedupe_key, deliveries.c.id, deliveries.c.received_at,
                               deliveries.c.processed_at).where(
                deliveries.c.dedupe_key.in_(sorted({row["dedupe_key"] for row in rows})))
            found = {r.dedupe_key: r for r in conn.execute(lookup)}
        stored = []
        for value in values:
            row = found[value["dedupe_key"]]
            stored.append(StoredDelivery(row.id, row.id != value["id"], row.received_at, row.processed_at))
        return stored

    def insert_delivery(self, values: dict[str, Any]) -> tuple[str, bool]:
        """Store a delivery once per dedupe key: ``(id, duplicate)``."""
        [stored] = self.insert_deliveries([values])
        return stored.delivery_id, stored.duplicate

    @cached_property
    def _delivery_insert(self) -> _BatchInsert:
        return _BatchInsert(self.engine)

    def delete_deliveries(self, ids: list[str]) -> None:
        """Undo deliveries that could not be enqueued, so the sender's retry is not a 'duplicate'."""
        if ids:
            with self._writing(), self.engine.begin() as conn:
                conn.execute(deliveries.delete().where(deliveries.c.id.in_(ids)))

    def defer_checkpoints(self) -> None:
        """On SQLite, leave WAL checkpoints to ``checkpoint()`` (a background chore) in this process.

        A checkpoint copies the WAL into the database and syncs it, 10 ms or more, inside
        whichever commit crossed 1,000 pages: on the intake's event loop that stalled every
        request. Each of this store's connections stops checkpointing the first time it is
        taken from the pool from now on; other processes' connections (the workers') still do.
        """
        if self.engine.dialect.name == "sqlite" and not sa.event.contains(self.engine, "checkout", _no_autocheckpoint):
            sa.event.listen(self.engine, "checkout", _no_autocheckpoint)

    def checkpoint(self) -> None:
        """Copy the SQLite WAL into the database, and let its next writer start the WAL over.

        SQLite rewinds the WAL only when a write begins with every frame already copied. Under
        a steady flood a checkpoint never ends that way (frames keep arriving while it copies),
        so the WAL grew without end and every frame went to fresh, zero-filled blocks (the
        intake's kernel time a webhook 73-82 -> 42-47 µs once it rewinds). The bulk is copied with
        writers running; the last few frames with this machine's writers held off for a moment.
        """
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as conn:
            copied = -1
            for _ in range(CHECKPOINT_ROUNDS):
                busy, frames, done = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
                if busy or frames == done == copied:
                    break
                copied = frames
            with self._writing():
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def get_delivery(self, delivery_id: str) -> dict[str, Any] | None:
        with self.session() as db:
            return db.delivery(delivery_id)

    def has_delivery(self, event: str, invitee_uri: str) -> bool:
        """Whether any delivery of ``event`` for this invitee was stored (webhook or reconciled)."""
        with self.session() as db:
            return db.has_delivery(event, invitee_uri)

    def record_replay(self, *, who: str, mode: str, target: str, note: str | None = None) -> str:
        replay_id = new_id("rpl")
        with self.engine.begin() as conn:
            conn.execute(replays.insert().values(
                id=replay_id, created_at=time.time(), who=who, mode=mode, target=target, note=note,
            ))
        return replay_id

    def replays_of(self, target: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(replays).where(replays.c.target == target).order_by(replays.c.created_at))
            return [dict(r._mapping) for r in rows]

    def reset_unfinished_steps(self, run_id: str) -> int:
        """Queue a failed run's steps that did not succeed again, so a resume runs them afresh.

        Their last error stays in the history (marked as before the resume); attempts start
        over, so a step that had used up its retries gets its full count again.
        """
        unfinished = (steps.c.run_id == run_id) & (steps.c.status != "succeeded")
        with self.engine.begin() as conn:
            reset = conn.execute(steps.update().where(unfinished).values(
                status="queued", attempts=0, due_at=None, finished_at=None,
                error=sa.case((steps.c.error.is_(None), None), else_="before the resume: " + steps.c.error),
            )).rowcount
            conn.execute(runs.update().where(runs.c.id == run_id).values(status="queued", finished_at=None,
                                                                         reason=None))
        return reset

    def failed_runs_since(self, since: float) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs).where(runs.c.status == "failed", runs.c.created_at >= since).order_by(runs.c.created_at)
            )
            return [dict(r._mapping) for r in rows]

    def scheduled_steps(self) -> tuple[int, float | None]:
        """How many steps wait (delay or retry), and the earliest due time among them."""
        with self.engine.connect() as conn:
            count, earliest = conn.execute(
                sa.select(sa.func.count(), sa.func.min(steps.c.due_at)).where(SCHEDULED)
            ).one()
        return int(count), earliest

    def prune(self, received_before: float, *, batch: int = 500) -> int:
        """Delete deliveries received before the cutoff, with their runs, steps, claims and replays.

        A delivery with a step still scheduled is kept, whatever its age: its work is not done.
        Deleted ``batch`` deliveries per transaction: a first prune of a long history must not
        hold SQLite's write lock, which the intake waits for, for its whole length.
        """
        waiting = sa.select(runs.c.delivery_id).join(steps, steps.c.run_id == runs.c.id).where(SCHEDULED)
        removed = 0
        while True:
            with self.engine.connect() as conn:
                candidates = list(conn.execute(
                    sa.select(deliveries.c.id).where(deliveries.c.received_at < received_before,
                                                     deliveries.c.id.not_in(waiting)).limit(batch)
                ).scalars())
            # Checked again inside the transaction: a step may have been scheduled meanwhile.
            doomed = sa.select(deliveries.c.id).where(deliveries.c.id.in_(candidates), deliveries.c.id.not_in(waiting))
            doomed_runs = sa.select(runs.c.id).where(runs.c.delivery_id.in_(doomed))
            with self.engine.begin() as conn:
                conn.execute(steps.delete().where(steps.c.run_id.in_(doomed_runs)))
                conn.execute(replays.delete().where(replays.c.target.in_(doomed_runs) | replays.c.target.in_(doomed)))
                conn.execute(runs.delete().where(runs.c.delivery_id.in_(doomed)))
                conn.execute(claims.delete().where(claims.c.owner.in_(doomed)))
                removed += conn.execute(deliveries.delete().where(deliveries.c.id.in_(doomed))).rowcount
                if len(candidates) < batch:
                    conn.execute(locks.delete().where(locks.c.expires_at < time.time()))
                    return removed

    def unprocessed_deliveries(self, older_than: float) -> list[str]:
        """Deliveries stored but never processed: to be enqueued again after a crash."""
        with self.engine.connect() as conn:
            return list(conn.execute(
                sa.select(deliveries.c.id).where(
                    deliveries.c.processed_at.is_(None), deliveries.c.received_at < older_than
                )
            ).scalars())

    # runs and steps ---------------------------------------------------------------

    def ensure_run(self, **values: Any) -> dict[str, Any]:
        """The run for ``run_key``, created the first time (see ``Session.ensure_run``)."""
        with self.session() as db:
            return db.ensure_run(**values)[0]

    def finish_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        with self.session() as db:
            db.finish_run(run_id, status, reason)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.session() as db:
            return db.get_run(run_id)

    def steps_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.session() as db:
            return db.steps_of(run_id)

    def runs_of_delivery(self, delivery_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs).where(runs.c.delivery_id == delivery_id).order_by(runs.c.created_at)
            )
            return [dict(r._mapping) for r in rows]

    # dashboard queries --------------------------------------------------------

    def page_runs(
        self, *, status: str | None = None, recipe: str | None = None, event: str | None = None,
        since: float | None = None, before: tuple[float, str] | None = None, limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Runs newest first, after the keyset cursor ``before = (created_at, id)``.

        A cursor, not OFFSET: a deep page costs what the first does, and runs arriving
        meanwhile do not shift the rows under the reader.
        """
        columns = [c for c in runs.c if c.name != "recipe_source"]
        query = sa.select(*columns).order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
        for column, value in ((runs.c.status, status), (runs.c.recipe, recipe), (runs.c.event, event)):
            if value:
                query = query.where(column == value)
        if since is not None:
            query = query.where(runs.c.created_at >= since)
        if before is not None:
            created, run_id = before
            query = query.where(sa.or_(
                runs.c.created_at < created, sa.and_(runs.c.created_at == created, runs.c.id < run_id)
            ))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def page_deliveries(
        self, *, event: str | None = None, since: float | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """The latest deliveries (without their bodies), each with its number of runs."""
        run_count = sa.select(sa.func.count()).where(runs.c.delivery_id == deliveries.c.id).scalar_subquery()
        columns = [c for c in deliveries.c if c.name not in ("body", "dedupe_key")]
        query = (sa.select(*columns, run_count.label("runs"))
                 .order_by(deliveries.c.received_at.desc(), deliveries.c.id.desc()).limit(limit))
        if event:
            query = query.where(deliveries.c.event == event)
        if since is not None:
            query = query.where(deliveries.c.received_at >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def last_runs(self, recipes: list[str]) -> dict[str, dict[str, Any]]:
        """Each named recipe's most recent run, by recipe name (recipes that never ran are absent)."""
        if not recipes:
            return {}
        latest = (sa.select(runs.c.recipe, sa.func.max(runs.c.created_at).label("created_at"))
                  .where(runs.c.recipe.in_(recipes)).group_by(runs.c.recipe).subquery())
        columns = [c for c in runs.c if c.name != "recipe_source"]
        query = sa.select(*columns).join(
            latest, sa.and_(runs.c.recipe == latest.c.recipe, runs.c.created_at == latest.c.created_at)
        )
        with self.engine.connect() as conn:
            return {r.recipe: dict(r._mapping) for r in conn.execute(query)}


@dataclass(frozen=True)
class StoredDelivery:
    """One row of a batch as the store has it: ours, or the first delivery with its dedupe key."""

    delivery_id: str
    duplicate: bool
    received_at: float
    processed_at: float | None

    def stuck(self, after_seconds: float) -> bool:
        """A duplicate of a delivery stored that long ago and never processed (its process died
        before enqueueing it): the sender's retry is what gets it run."""
        return self.duplicate and self.processed_at is None and time.time() - self.received_at > after_seconds


#: The columns a delivery row is written with (the rest keep their defaults: unprocessed).
_DELIVERY_COLUMNS = ("id", "received_at", "source", "dedupe_key", "event", "payload_uri", "invitee_uri",
                     "sender_created_at", "body")


class _BatchInsert:
    """``INSERT … ON CONFLICT (dedupe_key) DO NOTHING``, compiled once for the store's dialect.

    Executed by the driver's own ``executemany``: SQLAlchemy's per-row parameter processing
    cost as much as SQLite's insert itself. The SQL text is SQLAlchemy's compilation of the
    Core statement, so it is quoted and parameterised as that database wants.
    """

    def __init__(self, engine: sa.Engine) -> None:
        dialect = engine.dialect
        insert = (sqlite_insert if dialect.name == "sqlite" else postgresql_insert)(deliveries)
        statement = insert.values({name: sa.bindparam(name) for name in _DELIVERY_COLUMNS}).on_conflict_do_nothing(
            index_elements=["dedupe_key"])
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.order = compiled.positiontup  # parameter names in order for '?' styles, None for named ones

    def parameters(self, values: list[dict[str, Any]]) -> list[Any]:
        return values if self.order is None else [tuple(v[name] for name in self.order) for v in values]


def _create_private_file(path: Path) -> None:
    """Create the SQLite file (and folder) readable by its owner only: history holds personal data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


def _no_autocheckpoint(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if not record.info.get("no_autocheckpoint"):
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")
        record.info["no_autocheckpoint"] = True


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the intake write while workers read and write from other processes.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()

