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
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from workers.errors import ConfigError
from workers.schema import claims, deliveries, locks, replays, runs, steps
from workers.session import Session, new_id

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


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
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"store.url: cannot use {parsed.get_backend_name()!r}: {exc}") from None
        if parsed.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def create_schema(self) -> None:
        """Bring the database to the current schema (alembic migrations; a no-op when up to date)."""
        upgrade(self.engine)

    def ping(self) -> None:
        """Read a table: ``SELECT 1`` would pass on SQLite without ever touching the file."""
        with self.engine.connect() as conn:
            conn.execute(sa.select(deliveries.c.id).limit(1)).first()

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work on one pooled connection: committed at the end, rolled back on an error."""
        connection = self.engine.raw_connection()
        try:
            session = Session(connection.dbapi_connection, self.engine.dialect.name)
            try:
                yield session
            except BaseException:
                session.rollback()
                raise
            session.commit()
        finally:
            connection.close()

    # deliveries -------------------------------------------------------------

    def insert_delivery(self, values: dict[str, Any]) -> tuple[str, bool]:
        """Store a delivery once per dedupe key: ``(id, duplicate)``."""
        delivery_id = new_id("dlv")
        try:
            with self.engine.begin() as conn:
                conn.execute(deliveries.insert().values(id=delivery_id, received_at=time.time(), **values))
            return delivery_id, False
        except IntegrityError:
            with self.engine.connect() as conn:
                existing = conn.execute(
                    sa.select(deliveries.c.id).where(deliveries.c.dedupe_key == values["dedupe_key"])
                ).scalar_one_or_none()
            if existing is None:  # the unique clash was on something else: a real bug
                raise
            return existing, True

    def delete_delivery(self, delivery_id: str) -> None:
        """Undo a delivery that could not be enqueued, so the sender's retry is not a 'duplicate'."""
        with self.engine.begin() as conn:
            conn.execute(deliveries.delete().where(deliveries.c.id == delivery_id))

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
                sa.select(sa.func.count(), sa.func.min(steps.c.due_at)).where(steps.c.status == "scheduled")
            ).one()
        return int(count), earliest

    def prune(self, received_before: float, *, batch: int = 500) -> int:
        """Delete deliveries received before the cutoff, with their runs, steps, claims and replays.

        A delivery with a step still scheduled is kept, whatever its age: its work is not done.
        Deleted ``batch`` deliveries per transaction: a first prune of a long history must not
        hold SQLite's write lock, which the intake waits for, for its whole length.
        """
        waiting = sa.select(runs.c.delivery_id).join(steps, steps.c.run_id == runs.c.id).where(
            steps.c.status == "scheduled")
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


def _create_private_file(path: Path) -> None:
    """Create the SQLite file (and folder) readable by its owner only: history holds personal data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the intake write while workers read and write from other processes.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()

