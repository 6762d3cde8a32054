"""How a delivery's work is cut into transactions: few of them, and never one open around a connector.

The engine folds the booking decisions, the runs and the first step's claim into one transaction,
and a step's outcome with the next step's claim into the next. These tests drive the real engine
and store (SQLite and PostgreSQL) with a connector of the test's own that looks at the store from
another connection while it runs, and race two workers' engines over the same deliveries.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, action
from tests.harness import fixture_body
from workers.app import App
from workers.config import load_config
from workers.engine import Engine
from workers.errors import Busy
from workers.events import EnvelopeHead, delivery_facts
from workers.recipes import RecipeFolder
from workers.redaction import Redactor

pytestmark = pytest.mark.stores("sqlite", "postgresql")

PROBED = """
name: probed
on: invitee.created
steps:
  - id: look
    use: probe.look
    with: {note: "{{ invitee.email }}"}
  - id: again
    use: probe.look
    with: {note: second}
"""


class LookInput(ActionInput):
    note: str


class Probe:
    """What the probe connector saw from outside the engine's connection, call by call."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.calls: Counter[tuple[str, str]] = Counter()
        self.seen: list[dict[str, tuple[str, int]]] = []
        self.write_lock_free: list[bool] = []
        self._lock = threading.Lock()

    def look(self, call: ActionCall) -> dict[str, Any]:
        steps = {s["step_id"]: (s["status"], s["attempts"]) for s in self.app.store.steps_of(call.run_id)}
        free = self._sqlite_write_lock_free()
        with self._lock:
            self.calls[(call.run_id, call.step_id)] += 1
            self.seen.append(steps)
            if free is not None:
                self.write_lock_free.append(free)
        return {"saw": len(steps)}

    def _sqlite_write_lock_free(self) -> bool | None:
        """On SQLite: can another connection take the write lock right now (no transaction left open)?"""
        url = self.app.store.engine.url
        if url.get_backend_name() != "sqlite":
            return None
        conn = sqlite3.connect(url.database, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:  # "database is locked"
            return False
        finally:
            conn.close()


def probe_connector(probe: Probe) -> type[Connector]:
    class ProbeConnector(Connector):
        name = "probe"
        config_model = ConnectorConfig

        @action("look", input=LookInput)
        def look(self, inputs: LookInput, call: ActionCall) -> dict[str, Any]:
            """Look at the store from another connection."""
            return probe.look(call)

    return ProbeConnector


@pytest.fixture
def world(make_config: Callable[..., Path], recipes_dir: Path) -> Iterator[Callable[[], tuple[App, Engine, Probe]]]:
    """Build a worker's parts (app, engine with the probe connector); more than one for a race."""
    (recipes_dir / "probed.yaml").write_text(PROBED)
    config = make_config()
    apps: list[App] = []

    def build() -> tuple[App, Engine, Probe]:
        app = App(load_config(config))
        apps.append(app)
        probe = Probe(app)
        app.registry.classes["probe"] = probe_connector(probe)
        recipes = RecipeFolder(app.config.recipes.dir, app.registry, app.templates)
        engine = Engine(app.store, app.registry, recipes, schedule=lambda run_id, delay: None, redact=Redactor([]))
        return app, engine, probe

    yield build
    for app in apps:
        app.close()


def store_booking(app: App, tag: str, **envelope: Any) -> str:
    """Store an ``invitee.created`` of an invitee of its own, as the intake does; its delivery id."""
    data = json.loads(fixture_body("invitee.created", **envelope))
    data["payload"]["uri"] += f"-{tag}"
    body = json.dumps(data).encode()
    facts = delivery_facts(EnvelopeHead.model_validate_json(body), body)
    delivery_id, _ = app.store.insert_delivery({
        "dedupe_key": facts.dedupe_key, "event": facts.event, "payload_uri": facts.uri,
        "invitee_uri": facts.invitee_uri, "sender_created_at": facts.sender_created_at, "body": body.decode(),
    })
    return delivery_id


def test_each_step_is_committed_as_claimed_before_its_connector_runs(world: Callable[..., Any]) -> None:
    app, engine, probe = world()

    [run_id] = engine.run_delivery(store_booking(app, uuid.uuid4().hex))

    # Seen from another connection while each call ran: its own claim, and the earlier step's outcome.
    assert probe.seen == [{"look": ("running", 1)}, {"look": ("succeeded", 1), "again": ("running", 1)}]
    assert all(probe.write_lock_free)  # on SQLite, no write transaction was left open around a call
    assert [(s["step_id"], s["status"]) for s in app.store.steps_of(run_id)] == [
        ("look", "succeeded"), ("again", "succeeded")]
    assert app.store.get_run(run_id)["status"] == "succeeded"


def test_a_delivery_costs_one_transaction_per_step_and_one_more(world: Callable[..., Any]) -> None:
    app, engine, _ = world()
    if app.store.engine.dialect.name != "sqlite":
        pytest.skip("the statements are read from SQLite's own trace")
    delivery_id = store_booking(app, uuid.uuid4().hex)
    statements: list[str] = []
    app.store.engine.dispose()  # connections opened from here on are traced
    sa.event.listen(app.store.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(statements.append))

    engine.run_delivery(delivery_id)

    verbs = [s.split(None, 1)[0].upper() for s in statements if not s.startswith("PRAGMA")]
    # Lock, booking claims, the run and the first claim; the first outcome with the second claim;
    # the second outcome with the run's end, the delivery processed and the lock released.
    assert verbs.count("COMMIT") == 3
    assert verbs.count("BEGIN") == 3  # BEGIN IMMEDIATE each: a read-then-write cannot hit SQLITE_BUSY


def test_a_delivery_that_must_wait_for_an_earlier_one_leaves_no_lock_behind(world: Callable[..., Any]) -> None:
    app, engine, probe = world()
    tag = uuid.uuid4().hex
    earlier = store_booking(app, tag, created_at="2027-02-01T10:00:01.000000Z")
    later = store_booking(app, tag, created_at="2027-02-01T10:00:02.000000Z")

    with pytest.raises(Busy, match="waiting for"):
        engine.run_delivery(later)

    invitee = app.store.get_delivery(later)["invitee_uri"]
    with app.store.session() as db:
        assert db.try_lock(f"invitee:{invitee}", "another worker", 60)  # free: the Busy rolled it back
        db.unlock(f"invitee:{invitee}", "another worker")
    assert app.store.runs_of_delivery(later) == [] and probe.calls == Counter()
    engine.run_delivery(earlier)
    engine.run_delivery(later)  # the same booking again: recorded as its duplicate, runs nothing
    assert app.store.get_delivery(later)["duplicate_of"] == earlier


def test_two_workers_racing_over_the_same_deliveries_call_each_step_once(world: Callable[..., Any]) -> None:
    parts = [world(), world()]  # two worker processes' parts: their own store connections
    app = parts[0][0]
    deliveries = [store_booking(app, f"{uuid.uuid4().hex}-{n}") for n in range(12)]
    barrier = threading.Barrier(4)
    busy = Counter[str]()

    def work(engine: Engine, order: list[str]) -> None:
        barrier.wait()
        for delivery_id in order:
            while True:  # as the actor does: Busy goes back on the queue, here at once
                try:
                    engine.run_delivery(delivery_id)
                    break
                except Busy:
                    busy[delivery_id] += 1

    # Every delivery handed to both workers, twice each (redeliveries), in opposite orders.
    threads = [threading.Thread(target=work, args=(engine, order))
               for _, engine, _ in parts for order in (deliveries, deliveries[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    calls = parts[0][2].calls + parts[1][2].calls
    runs = [run for d in deliveries for run in app.store.runs_of_delivery(d)]
    assert len(runs) == len(deliveries) and {r["status"] for r in runs} == {"succeeded"}
    assert calls == Counter({(r["id"], step): 1 for r in runs for step in ("look", "again")})
    assert all(app.store.get_delivery(d)["processed_at"] for d in deliveries)
    with app.store.session() as db:  # every invitee's lock was released
        for d in deliveries:
            key = f"invitee:{app.store.get_delivery(d)['invitee_uri']}"
            assert db.try_lock(key, "a later worker", 60)


def test_a_runs_outcome_is_logged_once_it_is_committed_with_the_runs_ids(world: Callable[..., Any]) -> None:
    """The line says what the store says: written after the commit, outside SQLite's write lock."""
    app, engine, _ = world()
    seen: list[tuple[str, str | None, str]] = []

    class Look(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("run "):
                run_id = record.args[0]  # type: ignore[index]
                seen.append((record.getMessage(), getattr(record, "run_id", None), app.store.get_run(run_id)["status"]))

    handler = Look()
    logger = logging.getLogger("vivoflow.engine")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        [run_id] = engine.run_delivery(store_booking(app, uuid.uuid4().hex))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert seen == [(f"run {run_id} (probed) succeeded", run_id, "succeeded")]
