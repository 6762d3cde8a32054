"""The store's tables: deliveries, runs, steps, and the small tables that keep workers in step.

The migrations in ``workers/migrations`` build exactly these (a test compares them).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("dedupe_key", sa.String(64), nullable=False, unique=True),
    sa.Column("event", sa.String(100), nullable=False),
    sa.Column("payload_uri", sa.Text),
    sa.Column("invitee_uri", sa.String(500)),
    sa.Column("sender_created_at", sa.String(40)),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("processed_at", sa.Float),
    #: ``webhook``, or ``reconcile`` for a booking found through the API that no webhook brought.
    sa.Column("source", sa.String(20), nullable=False, default="webhook"),
    #: Set when the same booking event reached us twice by different routes (a webhook and
    #: reconciliation): this delivery is kept for the record and runs nothing.
    sa.Column("duplicate_of", sa.String(40)),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_deliveries_invitee_event", "invitee_uri", "event"),
)

#: First-come claims on a name (``booking:invitee.created:<uri>``): the database's
#: primary key, not process memory, decides which of two racing workers owns it.
claims = sa.Table(
    "claims", metadata,
    sa.Column("key", sa.String(600), primary_key=True),
    sa.Column("owner", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    # delivery + recipe for a first run; replays get keys of their own.
    sa.Column("run_key", sa.String(200), nullable=False, unique=True),
    sa.Column("delivery_id", sa.String(40), sa.ForeignKey("deliveries.id"), nullable=False, index=True),
    sa.Column("recipe", sa.String(200), nullable=False),
    sa.Column("event", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    #: The recipe's YAML as it was when the run began: a delayed step runs the version it was scheduled with.
    sa.Column("recipe_source", sa.Text),
    #: For a replay: the run it replays (if any) and the replay that made it.
    sa.Column("replay_of", sa.String(40)),
    sa.Column("replay_id", sa.String(40)),
    sa.Index("ix_runs_status_created", "status", "created_at"),
    sa.Index("ix_runs_recipe_created", "recipe", "created_at"),
)

#: The rows of ``ix_steps_scheduled``, a partial index.
_WAITING = sa.text("status = 'scheduled'")

steps = sa.Table(
    "steps", metadata,
    sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("step_id", sa.String(100), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("use", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("input", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    #: When a scheduled step (delay, at, or a retry) falls due.
    sa.Column("due_at", sa.Float),
    # Only steps that wait are indexed: the others change status twice per step, and each change
    # rewrote a page of a whole-table status index (queries name 'scheduled' literally, as the
    # planners need to use a partial index: ``SCHEDULED``).
    sa.Index("ix_steps_scheduled", "due_at", sqlite_where=_WAITING, postgresql_where=_WAITING),
)

#: Steps that wait (delay, ``at``, a retry's backoff), as ``ix_steps_scheduled`` selects them.
SCHEDULED = steps.c.status == sa.literal_column("'scheduled'")

#: Short-lived exclusive holds (one invitee's deliveries processed one at a time), with an expiry
#: so a holder that died releases them.
locks = sa.Table(
    "locks", metadata,
    sa.Column("key", sa.String(600), primary_key=True),
    sa.Column("owner", sa.String(60), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    # On SQLite, one b-tree keyed by ``key`` instead of a rowid table plus its key's index: each
    # delivery takes and releases a lock, and wrote two pages each time.
    sqlite_with_rowid=False,
)

#: Calls per connector per fixed time window, for rate limits shared by every worker.
rate_windows = sa.Table(
    "rate_windows", metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("window_start", sa.Float, primary_key=True),
    sa.Column("calls", sa.Integer, nullable=False),
)

#: Every replay: who asked, when, in which mode, and the runs it made.
replays = sa.Table(
    "replays", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("who", sa.String(200), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),
    sa.Column("target", sa.String(40), nullable=False),
    sa.Column("note", sa.Text),
)

#: Step and run statuses, as SPEC §8 names them.
STATUSES = ("queued", "running", "succeeded", "failed", "skipped", "scheduled")
