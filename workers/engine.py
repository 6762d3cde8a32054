"""The recipe engine: one delivery in, one stored run per matching recipe out.

Steps run in order; each is claimed in the store before its connector is
called and recorded after, so a step that succeeded is never run again for
the same run, whichever worker picks the run up next. Retries and delays are
per step: the run is handed back to the queue as a delayed message and
resumes at the step that was waiting; the steps before it are not repeated.

Work is cut into as few transactions as those rules allow (``workers.session``):
each ends with a step's claim, committed before the connector is called; the
outcome opens the next. Nothing network-bound, connector or broker, runs inside one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dramatiq.common import compute_backoff
from jinja2 import TemplateError
from pydantic import ValidationError

from connectors.base import ActionCall, ConnectorRegistry
from workers.bookings import Bookings, ReschedulePair
from workers.errors import PermanentStepError, RetryableStepError
from workers.events import RESCHEDULED, Envelope, build_context, build_rescheduled_context
from workers.logs import later, log_context
from workers.metrics import Metrics, process_metrics
from workers.recipes import Recipe, RecipeFolder, Step
from workers.redaction import Redactor
from workers.session import TERMINAL, Session
from workers.store import Store

log = logging.getLogger("vivoflow.engine")

#: A step another worker holds for longer than this is taken to have died with it.
#: Longer than any connector's own timeout, so a live worker is never overtaken.
STEP_LEASE_SECONDS = 120.0

Schedule = Callable[[str, int], None]  # (run_id, delay in milliseconds)
#: Recipes matching an event, each with its verdict: ``running``, or ``skipped``/``failed`` and why.
Judged = list[tuple[Recipe, tuple[str, str | None]]]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff of retryable step errors: exponential from ``min_seconds``, jittered, capped."""

    min_seconds: float = 15.0
    max_seconds: float = 3600.0

    def delay_ms(self, attempt: int, retry_after: float | None) -> int:
        if retry_after is not None:
            return int(max(retry_after, 0) * 1000)
        _, backoff = compute_backoff(
            attempt - 1, factor=int(self.min_seconds * 1000), max_backoff=int(self.max_seconds * 1000)
        )
        return int(backoff)


class Engine:
    """Runs the recipes matching a delivery, and resumes runs handed back to the queue."""

    def __init__(
        self,
        store: Store,
        registry: ConnectorRegistry,
        recipes: RecipeFolder,
        *,
        schedule: Schedule,
        redact: Redactor,
        retry: RetryPolicy | None = None,
        lease_seconds: float = STEP_LEASE_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.recipes = recipes
        self.schedule = schedule
        self.redact = redact
        self.retry = retry or RetryPolicy()
        self.lease_seconds = lease_seconds
        self.bookings = Bookings(lease_seconds=lease_seconds)
        self.metrics = metrics or process_metrics()

    # entry points -----------------------------------------------------------

    def process_delivery(self, delivery_id: str) -> None:
        """The actor's entry point (Dramatiq discards return values)."""
        with log_context(delivery_id=delivery_id):
            self.run_delivery(delivery_id)

    def run_delivery(self, delivery_id: str) -> list[str]:
        """Create (or resume) one run per matching recipe and execute it; returns the run ids.

        Raises ``Busy`` when another worker is processing the same invitee. One transaction
        takes the invitee's lock, makes the booking decisions, creates the runs and claims the
        first step; then one per step records its outcome and claims the next; the last also
        marks the delivery processed and releases the lock.
        """
        with self.store.session() as db:
            delivery = db.delivery(delivery_id)
            if delivery is None:
                log.warning("delivery %s not found; nothing to do", delivery_id)
                return []
            envelope = Envelope.model_validate_json(delivery["body"])
            # Built, and the recipes' ``if`` judged, before the invitee's lock begins the transaction:
            # the store's write lock is held from there to the first commit, so work that needs no
            # store stays out.
            ctx = build_context(envelope)
            judged = self._judge(envelope.event, ctx)
            with self.bookings.in_order(db, delivery):
                if (original := self.bookings.duplicate_of(db, delivery)) is not None:
                    db.mark_duplicate(delivery_id, original)
                    log.info("delivery %s repeats %s (%s): not run again", delivery_id, original, delivery["event"])
                    return []
                superseded = self.bookings.superseded_by(db, delivery)
                skip = f"superseded: the invitee canceled ({superseded}) before this booking was processed"
                run_ids = self._run_recipes(db, delivery, envelope.event, ctx, key=delivery_id,
                                            skip_reason=skip if superseded else None, judged=judged)
                pair = self.bookings.reschedule_pair(db, delivery, envelope)
                if pair and self.bookings.claim_reschedule(db, pair, delivery_id):
                    log.info("delivery %s completes the reschedule of %s", delivery_id, pair.old_uri)
                    run_ids += self._run_recipes(db, delivery, RESCHEDULED, self._rescheduled_context(pair),
                                                 key=f"{delivery_id}:rescheduled")
                db.mark_processed(delivery_id)
        return run_ids

    def replay_delivery(self, delivery_id: str, replay_id: str, recipe: str | None = None) -> list[str]:
        """Run a stored delivery again against today's recipes, as new runs linked to the old ones."""
        earlier = self.store.runs_of_delivery(delivery_id)
        with self.store.session() as db:
            delivery = db.delivery(delivery_id)
            if delivery is None:
                return []
            envelope = Envelope.model_validate_json(delivery["body"])
            ctx = build_context(envelope)
            with self.bookings.in_order(db, delivery):
                run_ids = self._run_recipes(db, delivery, envelope.event, ctx,
                                            key=f"{delivery_id}:replay:{replay_id}", only=recipe, replay_id=replay_id,
                                            earlier=earlier)
                pair = self.bookings.reschedule_pair(db, delivery, envelope)
                if pair and any(r["event"] == RESCHEDULED for r in earlier):
                    run_ids += self._run_recipes(db, delivery, RESCHEDULED, self._rescheduled_context(pair),
                                                 key=f"{delivery_id}:rescheduled:replay:{replay_id}", only=recipe,
                                                 replay_id=replay_id, earlier=earlier)
        return run_ids

    def resume_run(self, run_id: str) -> None:
        """Continue a run whose step was waiting (a delay, a retry's backoff, or a replay --resume)."""
        with self.store.session() as db:
            run = db.get_run(run_id)
            if run is None or run["status"] in TERMINAL:
                return
            delivery = db.delivery(run["delivery_id"])
            # The recipe as the run recorded it: a delayed step keeps the version it was scheduled with.
            recipe = self.recipes.pinned(run["recipe"], run["recipe_source"])
            if delivery is None or recipe is None:
                self._finish(db, run_id, run["recipe"], "failed", f"recipe {run['recipe']!r} can no longer be loaded")
                return
            envelope = Envelope.model_validate_json(delivery["body"])
            ctx = build_context(envelope)
            if run["event"] == RESCHEDULED:
                pair = self.bookings.reschedule_pair(db, delivery, envelope)
                if pair is None:
                    self._finish(db, run_id, run["recipe"], "failed",
                                 "the other half of the reschedule is gone from the store")
                    return
                ctx = self._rescheduled_context(pair)
            self._resume(db, run, recipe, ctx, delivery)

    # runs of one delivery -----------------------------------------------------

    def _run_recipes(
        self, db: Session, delivery: dict[str, Any], event: str, ctx: dict[str, Any], *, key: str,
        skip_reason: str | None = None, only: str | None = None, replay_id: str | None = None,
        earlier: list[dict[str, Any]] | None = None, judged: Judged | None = None,
    ) -> list[str]:
        """One run per matching recipe, created with its verdict (``running``, or skipped/failed by its ``if``).

        ``judged``: the matching recipes with their verdicts, when the caller judged them already.
        """
        run_ids = []
        for recipe, verdict in self._judge(event, ctx, only) if judged is None else judged:
            replay_of = next((r["id"] for r in earlier or [] if r["recipe"] == recipe.name and r["event"] == event),
                             None)
            status, reason = ("skipped", skip_reason) if skip_reason else verdict
            run, created = db.ensure_run(
                run_key=f"{key}:{recipe.name}", delivery_id=delivery["id"], recipe=recipe.name, event=event,
                recipe_source=recipe.source, replay_of=replay_of, replay_id=replay_id, status=status, reason=reason,
            )
            run_ids.append(run["id"])
            if not created:  # a redelivered message: carry on where the run stands
                if run["status"] in ("queued", "running"):
                    self._resume(db, run, recipe, {**ctx, "steps": {}}, delivery)
            elif status == "running":
                self._execute(db, run, recipe, {**ctx, "steps": {}}, delivery, done={})
            else:
                self.metrics.runs_of(recipe.name, status).inc()
        return run_ids

    def _judge(self, event: str, ctx: dict[str, Any], only: str | None = None) -> Judged:
        """The recipes matching ``event`` (only the one named ``only``, if given), each with its verdict."""
        return [(recipe, self._verdict(recipe, ctx)) for recipe in self.recipes.current().matching(event)
                if only is None or recipe.name == only]

    def _rescheduled_context(self, pair: ReschedulePair) -> dict[str, Any]:
        return build_rescheduled_context(
            Envelope.model_validate_json(pair.canceled["body"]), Envelope.model_validate_json(pair.created["body"])
        )

    # one run ----------------------------------------------------------------

    def _verdict(self, recipe: Recipe, ctx: dict[str, Any]) -> tuple[str, str | None]:
        """The recipe's ``if`` on this event: ``running``, or ``skipped``/``failed`` with the reason."""
        if recipe.condition is None:
            return "running", None
        try:
            matched = recipe.condition(ctx)
        except Exception as exc:  # noqa: BLE001 - `none - 1`, `1 // 0`…: the recipe's error, not ours
            return "failed", f"if: {_template_error(exc)}"
        return ("running", None) if matched else ("skipped", f"if: {recipe.condition_source} was false")

    def _finish(self, db: Session, run_id: str, recipe: str, status: str, reason: str | None = None) -> None:
        db.finish_run(run_id, status, reason)
        if status in TERMINAL:
            self.metrics.runs_of(recipe, status).inc()

    def _schedule(self, db: Session, run_id: str, delay_ms: int) -> None:
        """Hand the run back to the queue, once what the resumed run will look for is committed."""
        db.commit()
        self.schedule(run_id, delay_ms)

    def _resume(self, db: Session, run: dict[str, Any], recipe: Recipe, ctx: dict[str, Any],
                delivery: dict[str, Any]) -> None:
        """Carry on with a run that exists already: its ``if`` again, then the steps not yet done."""
        status, reason = self._verdict(recipe, ctx)
        if status != "running":
            self._finish(db, run["id"], recipe.name, status, reason)
            return
        if not db.start_run(run["id"]):
            return  # finished meanwhile: another worker resumed it
        self._execute(db, run, recipe, ctx, delivery, done={s["step_id"]: s for s in db.steps_of(run["id"])})

    def _execute(self, db: Session, run: dict[str, Any], recipe: Recipe, ctx: dict[str, Any],
                 delivery: dict[str, Any], *, done: dict[str, dict[str, Any]]) -> None:
        with log_context(delivery_id=delivery["id"], run_id=run["id"]):
            self._execute_steps(db, run["id"], recipe, ctx, delivery, done)

    def _execute_steps(self, db: Session, run_id: str, recipe: Recipe, ctx: dict[str, Any], delivery: dict[str, Any],
                       done: dict[str, dict[str, Any]]) -> None:
        """The run's steps in order, given those already recorded (``done``); the run is ``running``."""
        failures = 0
        for step in recipe.steps:
            prior = done.get(step.id)
            status = prior["status"] if prior else None
            if status == "succeeded":
                ctx["steps"][step.id] = {"output": prior["output"]}
                continue
            if status in ("skipped", "failed"):
                failures += status == "failed"
                if status == "failed" and step.spec.on_error == "stop":
                    break
                continue
            with log_context(step_id=step.id):
                outcome = self._run_step(db, run_id, recipe.name, step, ctx, prior, delivery)
            if outcome == "waiting":
                self._finish(db, run_id, recipe.name, "scheduled")
                return
            if outcome == "failed":
                failures += 1
                if step.spec.on_error == "stop":
                    break
        if failures:
            self._finish(db, run_id, recipe.name, "failed", f"{failures} step(s) failed")
        else:
            self._finish(db, run_id, recipe.name, "succeeded")
        db.after_commit(later(log.info, "run %s (%s) %s", run_id, recipe.name, "failed" if failures else "succeeded"))

    def _run_step(
        self, db: Session, run_id: str, recipe: str, step: Step, ctx: dict[str, Any], prior: dict[str, Any] | None,
        delivery: dict[str, Any],
    ) -> str:
        """Run one step; returns ``succeeded``, ``skipped``, ``failed`` or ``waiting``.

        The claim is committed before the connector is called, and the outcome is written
        after it, in the transaction that goes on to the next step's claim.
        """
        record = _Recorder(db, run_id, step, self.redact, self.metrics)
        if step.condition is not None:
            try:
                if not step.condition(ctx):
                    record("skipped", error=f"if: {step.spec.if_} was false")
                    return "skipped"
            except Exception as exc:  # noqa: BLE001 - see _template_error
                record("failed", error=f"if: {_template_error(exc)}")
                return "failed"

        wait = self._wait(db, step, ctx, prior, record)
        if wait is not None:
            return wait
        if prior and prior.get("due_at") and step.spec.skip_if_canceled and (step.spec.delay or step.spec.at):
            uri = ctx["invitee"].get("uri")
            # Any cancellation of the invitee counts, whenever it arrived: the sender's order can put a
            # cancellation before its booking. A run of that very cancellation is not skipped for it
            # (a repeated delivery of it is not a new cancellation).
            own = delivery["event"] == "invitee.canceled" and delivery["invitee_uri"] == uri
            if uri and not own and db.has_delivery("invitee.canceled", uri):
                record("skipped", error="the invitee was canceled or rescheduled before this step fell due")
                return "skipped"

        if (wait_for := self._rate_limited(db, step)) is not None:
            # Not an attempt: the step waits for the connector's next window, across all workers.
            record("scheduled", error=f"rate limit of {step.connector}: next call in {wait_for:.1f}s",
                   due_at=time.time() + wait_for)
            self._schedule(db, run_id, int(wait_for * 1000) + 1)
            return "waiting"
        attempt = db.claim_step(
            run_id=run_id, step_id=step.id, position=step.position, use=step.spec.use,
            lease_seconds=self.lease_seconds,
        )
        if attempt is None:
            # Another worker holds the step (a redelivered message). Look again when its
            # lease runs out: by then it has recorded the outcome, or it died and we take over.
            self._schedule(db, run_id, int(self.lease_seconds * 1000))
            return "waiting"
        db.commit()  # the claim is durable before anything can call the connector
        try:
            raw = step.inputs(ctx)
        except Exception as exc:  # noqa: BLE001 - see _template_error; the step is claimed: record it
            record("failed", error=f"template: {_template_error(exc)}")
            return "failed"
        try:
            inputs = step.action.input_model.model_validate(raw)
        except ValidationError as exc:
            record("failed", input=raw, error=f"invalid input: {_first_error(exc)}")
            return "failed"

        started = time.perf_counter()
        call = ActionCall(run_id=run_id, step_id=step.id, idempotency_key=f"{run_id}:{step.id}", event=ctx)
        try:
            output = self.registry.instance(step.connector).run(step.action.name, inputs, call)
        except RetryableStepError as exc:
            if attempt >= step.max_attempts:
                record("failed", input=raw, error=f"gave up after {attempt} attempts: {exc.message}")
                return "failed"
            delay = self.retry.delay_ms(attempt, exc.retry_after)
            record("scheduled", input=raw, error=f"attempt {attempt} failed, retrying: {exc.message}",
                   due_at=time.time() + delay / 1000)
            self._schedule(db, run_id, delay)
            return "waiting"
        except PermanentStepError as exc:
            record("failed", input=raw, error=exc.message)
            return "failed"
        except Exception as exc:  # a connector bug must fail its step, not the worker
            log.exception("step %s of run %s raised", step.id, run_id)
            record("failed", input=raw, error=f"internal error: {type(exc).__name__}: {exc}")
            return "failed"
        took = time.perf_counter() - started
        ctx["steps"][step.id] = {"output": output}
        record("succeeded", input=raw, output=output)
        self.metrics.step_seconds_of(step.connector).observe(took)
        if (sent := _timestamp(delivery["sender_created_at"])) is not None:
            self.metrics.lag_seconds_of(recipe).observe(max(time.time() - sent, 0.0))
        log.debug("run %s step %s succeeded in %.0f ms", run_id, step.id, took * 1000)
        return "succeeded"

    def _rate_limited(self, db: Session, step: Step) -> float | None:
        """Seconds to wait if the step's connector is over its ``rate_limit``, else None."""
        limit = getattr(self.registry.config_of(step.connector), "rate_limit", None)
        if limit is None:
            return None
        wait = db.take_rate(f"connector:{step.connector}", limit.limit, limit.window_seconds)
        return wait or None

    def _wait(
        self, db: Session, step: Step, ctx: dict[str, Any], prior: dict[str, Any] | None, record: _Recorder
    ) -> str | None:
        """For a step not yet due (delay, at, or a retry's backoff): schedule it and say ``waiting``."""
        now = time.time()
        due_at = prior.get("due_at") if prior else None
        if due_at is None and (step.spec.delay or step.at):
            try:
                due_at = _due_at(step, ctx, now)
            except Exception as exc:  # noqa: BLE001 - see _template_error
                record("failed", error=f"at: {_template_error(exc)}")
                return "failed"
            if due_at <= now:
                return None
            record("scheduled", error=None, due_at=due_at)
        if due_at is None or due_at <= now:
            return None
        self._schedule(db, record.run_id, int((due_at - now) * 1000) + 1)
        return "waiting"


def _due_at(step: Step, ctx: dict[str, Any], now: float) -> float:
    if step.spec.delay is not None:
        return now + step.spec.delay.total_seconds()
    assert step.at is not None
    text = str(step.at(ctx)).strip()
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if step.spec.offset is not None:
        when += step.spec.offset
    return when.timestamp()


def _template_error(exc: Exception) -> str:
    """A rendering failure in words: Jinja's own errors as they are, others (``TypeError`` from
    arithmetic on a missing value, ``ZeroDivisionError``…) named by their type."""
    if isinstance(exc, TemplateError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _timestamp(value: str | None) -> float | None:
    """The sender's envelope ``created_at`` as a Unix time (None if absent or unreadable)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class _Recorder:
    """Writes one step's outcome, redacted, and counts it."""

    def __init__(self, db: Session, run_id: str, step: Step, redact: Redactor, metrics: Metrics) -> None:
        self.db, self.run_id, self.step, self.redact, self.metrics = db, run_id, step, redact, metrics

    def __call__(self, status: str, *, input: Any = None, output: Any = None,  # noqa: A002
                 error: str | None = None, due_at: float | None = None) -> None:
        self.db.record_step(
            run_id=self.run_id, step_id=self.step.id, position=self.step.position, use=self.step.spec.use,
            status=status, input_json=self.redact.json(input), output_json=self.redact.json(output),
            error=error and self.redact.text(error), due_at=due_at,
        )
        if status in TERMINAL:
            self.metrics.steps_of(self.step.connector, status).inc()
        elif status == "scheduled" and error and not error.startswith("rate limit"):  # a retry's backoff
            self.metrics.retries_of(self.step.connector).inc()
