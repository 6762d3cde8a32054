"""The run store: deliveries, runs and steps, through SQLAlchemy Core.

SQLite by default (WAL, file created 0600), any SQLAlchemy URL otherwise. Every
statement is parameterised; uniqueness constraints, not process memory, make a
delivery, a run and a step exist once however many processes race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from workers.errors import ConfigError
from workers.schema import claims, deliveries, locks, rate_windows, replays, runs, steps

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


def new_id(prefix: str) -> str:
    """A sortable id: milliseconds since the epoch, then randomness (``run_018f…``)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


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
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).first()
        return dict(row._mapping) if row else None

    def mark_processed(self, delivery_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                deliveries.update().where(deliveries.c.id == delivery_id).values(processed_at=time.time())
            )

    def mark_duplicate(self, delivery_id: str, of: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                deliveries.update().where(deliveries.c.id == delivery_id)
                .values(duplicate_of=of, processed_at=time.time())
            )

    def has_delivery(self, event: str, invitee_uri: str) -> bool:
        """Whether any delivery of ``event`` for this invitee was stored (webhook or reconciled)."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(deliveries.c.id).where(
                    deliveries.c.invitee_uri == invitee_uri, deliveries.c.event == event
                ).limit(1)
            ).first() is not None

    def find_delivery(self, event: str, invitee_uri: str) -> dict[str, Any] | None:
        """The first delivery of ``event`` for this invitee that is not a duplicate, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(deliveries).where(
                    deliveries.c.invitee_uri == invitee_uri, deliveries.c.event == event,
                    deliveries.c.duplicate_of.is_(None),
                ).order_by(deliveries.c.received_at).limit(1)
            ).first()
        return dict(row._mapping) if row else None

    def earlier_unprocessed(self, delivery: dict[str, Any], received_after: float) -> str | None:
        """An unprocessed delivery about the same invitee that the sender created before this one."""
        if not delivery["invitee_uri"] or not delivery["sender_created_at"]:
            return None
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(deliveries.c.id).where(
                    deliveries.c.invitee_uri == delivery["invitee_uri"],
                    deliveries.c.id != delivery["id"],
                    deliveries.c.processed_at.is_(None),
                    deliveries.c.sender_created_at < delivery["sender_created_at"],
                    deliveries.c.received_at > received_after,
                ).limit(1)
            ).scalar_one_or_none()

    def try_lock(self, key: str, owner: str, lease_seconds: float) -> bool:
        """Take ``key`` for ``owner`` unless someone else holds it and their lease runs."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(locks.insert().values(key=key, owner=owner, expires_at=now + lease_seconds))
            return True
        except IntegrityError:
            pass
        with self.engine.begin() as conn:
            taken = conn.execute(
                locks.update().where(locks.c.key == key, (locks.c.expires_at < now) | (locks.c.owner == owner))
                .values(owner=owner, expires_at=now + lease_seconds)
            ).rowcount
        return bool(taken)

    def unlock(self, key: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(locks.delete().where(locks.c.key == key, locks.c.owner == owner))

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

    def prune(self, received_before: float) -> int:
        """Delete deliveries received before the cutoff, with their runs, steps, claims and replays.

        A delivery with a step still scheduled is kept, whatever its age: its work is not done.
        """
        old = sa.select(deliveries.c.id).where(deliveries.c.received_at < received_before)
        waiting = sa.select(runs.c.delivery_id).join(steps, steps.c.run_id == runs.c.id).where(
            steps.c.status == "scheduled")
        doomed = old.where(deliveries.c.id.not_in(waiting))
        doomed_runs = sa.select(runs.c.id).where(runs.c.delivery_id.in_(doomed))
        with self.engine.begin() as conn:
            conn.execute(steps.delete().where(steps.c.run_id.in_(doomed_runs)))
            conn.execute(replays.delete().where(replays.c.target.in_(doomed_runs) | replays.c.target.in_(doomed)))
            conn.execute(runs.delete().where(runs.c.delivery_id.in_(doomed)))
            conn.execute(claims.delete().where(claims.c.owner.in_(doomed)))
            conn.execute(locks.delete().where(locks.c.expires_at < time.time()))
            return conn.execute(deliveries.delete().where(deliveries.c.id.in_(doomed))).rowcount

    def take_rate(self, key: str, limit: int, window_seconds: float) -> float:
        """Count one call against ``key``'s current window: 0 if allowed, else seconds to wait.

        One atomic upsert (SQLite and PostgreSQL both have ``ON CONFLICT … DO UPDATE``), so
        workers on any number of hosts share the count.
        """
        now = time.time()
        start = now - now % window_seconds
        dialect = self.engine.dialect.name
        insert = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(rate_windows)
        statement = insert.values(key=key, window_start=start, calls=1).on_conflict_do_update(
            index_elements=["key", "window_start"], set_={"calls": rate_windows.c.calls + 1},
        ).returning(rate_windows.c.calls)
        with self.engine.begin() as conn:
            calls = conn.execute(statement).scalar_one()
            conn.execute(rate_windows.delete().where(rate_windows.c.key == key, rate_windows.c.window_start < start))
        return 0.0 if calls <= limit else start + window_seconds - now

    def claim(self, key: str, owner: str) -> str:
        """Claim ``key`` for ``owner``; returns whoever holds it (``owner`` if the claim is ours)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(claims.insert().values(key=key, owner=owner, created_at=time.time()))
            return owner
        except IntegrityError:
            with self.engine.connect() as conn:
                return conn.execute(sa.select(claims.c.owner).where(claims.c.key == key)).scalar_one()

    def unprocessed_deliveries(self, older_than: float) -> list[str]:
        """Deliveries stored but never processed: to be enqueued again after a crash."""
        with self.engine.connect() as conn:
            return list(conn.execute(
                sa.select(deliveries.c.id).where(
                    deliveries.c.processed_at.is_(None), deliveries.c.received_at < older_than
                )
            ).scalars())

    # runs -------------------------------------------------------------------

    def ensure_run(self, *, run_key: str, delivery_id: str, recipe: str, event: str, recipe_source: str | None = None,
                   replay_of: str | None = None, replay_id: str | None = None,
                   status: str = "queued", reason: str | None = None) -> dict[str, Any]:
        """The run for ``run_key``, created ``queued`` the first time: a redelivered message resumes it."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_key == run_key)).first()
        if row:
            return dict(row._mapping)
        values = dict(
            id=new_id("run"), run_key=run_key, delivery_id=delivery_id, recipe=recipe, event=event,
            status=status, reason=reason, created_at=time.time(), recipe_source=recipe_source,
            replay_of=replay_of, replay_id=replay_id,
            finished_at=time.time() if status in ("succeeded", "failed", "skipped") else None,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(runs.insert().values(**values))
            return values
        except IntegrityError:
            with self.engine.connect() as conn:
                return dict(conn.execute(sa.select(runs).where(runs.c.run_key == run_key)).one()._mapping)

    def finish_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        finished = time.time() if status in ("succeeded", "failed", "skipped") else None
        with self.engine.begin() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(status=status, reason=reason, finished_at=finished)
            )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
        return dict(row._mapping) if row else None

    def runs_of_delivery(self, delivery_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs).where(runs.c.delivery_id == delivery_id).order_by(runs.c.created_at)
            )
            return [dict(r._mapping) for r in rows]

    # steps ------------------------------------------------------------------

    def steps_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position))
            return [_decode_step(r._mapping) for r in rows]

    def claim_step(
        self, *, run_id: str, step_id: str, position: int, use: str, lease_seconds: float
    ) -> int | None:
        """Take a step for execution: the attempt number, or None if it is not ours to run.

        Not ours: it succeeded, was skipped or failed, or another worker runs it
        and its lease has not run out. One atomic insert-or-update decides, so two
        workers handed the same message never both call the connector.
        """
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(steps.insert().values(
                    run_id=run_id, step_id=step_id, position=position, use=use, status="running",
                    attempts=1, started_at=now,
                ))
            return 1
        except IntegrityError:
            pass
        key = (steps.c.run_id == run_id) & (steps.c.step_id == step_id)
        claimable = steps.c.status.in_(("queued", "scheduled")) | (
            (steps.c.status == "running") & (steps.c.started_at < now - lease_seconds)
        )
        with self.engine.begin() as conn:
            claimed = conn.execute(
                steps.update().where(key & claimable)
                .values(status="running", attempts=steps.c.attempts + 1, started_at=now)
            ).rowcount
            if not claimed:
                return None
            return conn.execute(sa.select(steps.c.attempts).where(key)).scalar_one()

    def record_step(
        self,
        *,
        run_id: str,
        step_id: str,
        position: int,
        use: str,
        status: str,
        input: Any = None,  # noqa: A002 - the column's name
        output: Any = None,
        error: str | None = None,
        due_at: float | None = None,
    ) -> None:
        """Write a step's outcome (insert for steps that never started, e.g. skipped)."""
        values = dict(
            status=status, input=_encode(input), output=_encode(output), error=error, due_at=due_at,
            finished_at=None if status in ("scheduled", "running") else time.time(),
        )
        with self.engine.begin() as conn:
            updated = conn.execute(
                steps.update().where(steps.c.run_id == run_id, steps.c.step_id == step_id).values(**values)
            ).rowcount
            if not updated:
                conn.execute(steps.insert().values(
                    run_id=run_id, step_id=step_id, position=position, use=use, attempts=0, **values
                ))


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


def _encode(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _decode_step(row: Any) -> dict[str, Any]:
    step = dict(row)
    for key in ("input", "output"):
        if step.get(key) is not None:
            step[key] = json.loads(step[key])
    return step


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

