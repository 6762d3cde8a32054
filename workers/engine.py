"""The recipe engine: one delivery in, one stored run per matching recipe out.

Steps run in order; each is claimed in the store before its connector is
called and recorded after, so a step that succeeded is never run again for
the same run, whichever worker picks the run up next. Retries and delays are
per step: the run is handed back to the queue as a delayed message and
resumes at the step that was waiting; the steps before it are not repeated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dramatiq.common import compute_backoff
from jinja2 import TemplateError
from pydantic import ValidationError

from connectors.base import ActionCall, ConnectorRegistry
from workers.errors import PermanentStepError, RetryableStepError
from workers.events import Envelope, build_context
from workers.recipes import Recipe, RecipeFolder, Step
from workers.store import Store

log = logging.getLogger("vivoflow.engine")

#: A step another worker holds for longer than this is taken to have died with it.
#: Longer than any connector's own timeout, so a live worker is never overtaken.
STEP_LEASE_SECONDS = 120.0

Schedule = Callable[[str, int], None]  # (run_id, delay in milliseconds)

#: Events that happen once per invitee URI (a reschedule makes a new invitee).
BOOKING_EVENTS = ("invitee.created", "invitee.canceled")


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


class Redactor:
    """Replaces configured secrets with ``********`` wherever a value is about to be stored or logged."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, value: Any) -> Any:
        if not self.secrets or value is None:
            return value
        text = json.dumps(value, default=str)
        if not any(secret in text for secret in self.secrets):
            return value
        for secret in self.secrets:
            text = text.replace(json.dumps(secret)[1:-1], "********")
        return json.loads(text)


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
    ) -> None:
        self.store = store
        self.registry = registry
        self.recipes = recipes
        self.schedule = schedule
        self.redact = redact
        self.retry = retry or RetryPolicy()

    # entry points -----------------------------------------------------------

    def process_delivery(self, delivery_id: str) -> None:
        """The actor's entry point (Dramatiq discards return values)."""
        self.run_delivery(delivery_id)

    def run_delivery(self, delivery_id: str) -> list[str]:
        """Create (or resume) one run per matching recipe and execute it; returns the run ids."""
        delivery = self.store.get_delivery(delivery_id)
        if delivery is None:
            log.warning("delivery %s not found; nothing to do", delivery_id)
            return []
        envelope = Envelope.model_validate_json(delivery["body"])
        if not self._first_of_its_booking_event(delivery):
            return []
        book = self.recipes.current()
        run_ids = []
        for recipe in book.matching(envelope.event):
            run = self.store.ensure_run(
                run_key=f"{delivery_id}:{recipe.name}", delivery_id=delivery_id,
                recipe=recipe.name, event=envelope.event,
            )
            run_ids.append(run["id"])
            if run["status"] in ("queued", "running"):
                self._execute(run, recipe, delivery, envelope)
        self.store.mark_processed(delivery_id)
        return run_ids

    def _first_of_its_booking_event(self, delivery: dict[str, Any]) -> bool:
        """An invitee is booked once and canceled at most once: the second delivery of either
        (a webhook the sender retried with a new timestamp, or one reconciliation found first)
        is recorded as a duplicate and runs nothing."""
        if delivery["event"] not in BOOKING_EVENTS or not delivery["invitee_uri"]:
            return True
        owner = self.store.claim(f"booking:{delivery['event']}:{delivery['invitee_uri']}", delivery["id"])
        if owner == delivery["id"]:
            return True
        self.store.mark_duplicate(delivery["id"], owner)
        log.info("delivery %s is the same %s as %s: not run again", delivery["id"], delivery["event"], owner)
        return False

    def resume_run(self, run_id: str) -> None:
        """Continue a run whose step was waiting (a delay, or a retry's backoff)."""
        run = self.store.get_run(run_id)
        if run is None or run["status"] in ("succeeded", "failed", "skipped"):
            return
        delivery = self.store.get_delivery(run["delivery_id"])
        recipe = self.recipes.current().recipes.get(run["recipe"])
        if delivery is None or recipe is None:
            self.store.finish_run(run_id, "failed", f"recipe {run['recipe']!r} is no longer loaded")
            return
        self._execute(run, recipe, delivery, Envelope.model_validate_json(delivery["body"]))

    # one run ----------------------------------------------------------------

    def _execute(self, run: dict[str, Any], recipe: Recipe, delivery: dict[str, Any], envelope: Envelope) -> None:
        run_id = run["id"]
        ctx = build_context(envelope)
        if recipe.condition is not None:
            try:
                matched = recipe.condition(**ctx)
            except TemplateError as exc:
                self.store.finish_run(run_id, "failed", f"if: {exc}")
                return
            if not matched:
                self.store.finish_run(run_id, "skipped", f"if: {recipe.condition_source} was false")
                return
        self.store.finish_run(run_id, "running")
        done = {s["step_id"]: s for s in self.store.steps_of(run_id)}
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
            outcome = self._run_step(run_id, step, ctx, prior, delivery)
            if outcome == "waiting":
                self.store.finish_run(run_id, "scheduled")
                return
            if outcome == "failed":
                failures += 1
                if step.spec.on_error == "stop":
                    break
        if failures:
            self.store.finish_run(run_id, "failed", f"{failures} step(s) failed")
        else:
            self.store.finish_run(run_id, "succeeded")
        log.info("run %s (%s) %s", run_id, recipe.name, "failed" if failures else "succeeded")

    def _run_step(
        self, run_id: str, step: Step, ctx: dict[str, Any], prior: dict[str, Any] | None, delivery: dict[str, Any]
    ) -> str:
        """Run one step; returns ``succeeded``, ``skipped``, ``failed`` or ``waiting``."""
        record = _Recorder(self.store, run_id, step, self.redact)
        if step.condition is not None:
            try:
                if not step.condition(**ctx):
                    record("skipped", error=f"if: {step.spec.if_} was false")
                    return "skipped"
            except TemplateError as exc:
                record("failed", error=f"if: {exc}")
                return "failed"

        wait = self._wait(step, ctx, prior, record)
        if wait is not None:
            return wait
        if prior and prior.get("due_at") and step.spec.skip_if_canceled and (step.spec.delay or step.spec.at):
            uri = ctx["invitee"].get("uri")
            if uri and self.store.invitee_canceled_after(uri, delivery["received_at"]):
                record("skipped", error="the invitee was canceled or rescheduled after this step was scheduled")
                return "skipped"

        attempt = self.store.claim_step(
            run_id=run_id, step_id=step.id, position=step.position, use=step.spec.use,
            lease_seconds=STEP_LEASE_SECONDS,
        )
        if attempt is None:
            # Another worker holds the step (a redelivered message). Look again when its
            # lease runs out: by then it has recorded the outcome, or it died and we take over.
            self.schedule(run_id, int(STEP_LEASE_SECONDS * 1000))
            return "waiting"
        try:
            raw = step.inputs(ctx)
        except TemplateError as exc:
            record("failed", error=f"template: {exc}")
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
            self.schedule(run_id, delay)
            return "waiting"
        except PermanentStepError as exc:
            record("failed", input=raw, error=exc.message)
            return "failed"
        except Exception as exc:  # a connector bug must fail its step, not the worker
            log.exception("step %s of run %s raised", step.id, run_id)
            record("failed", input=raw, error=f"internal error: {type(exc).__name__}: {exc}")
            return "failed"
        ctx["steps"][step.id] = {"output": output}
        record("succeeded", input=raw, output=output)
        log.info("run %s step %s succeeded in %.0f ms", run_id, step.id, (time.perf_counter() - started) * 1000)
        return "succeeded"

    def _wait(
        self, step: Step, ctx: dict[str, Any], prior: dict[str, Any] | None, record: _Recorder
    ) -> str | None:
        """For a step not yet due (delay, at, or a retry's backoff): schedule it and say ``waiting``."""
        now = time.time()
        due_at = prior.get("due_at") if prior else None
        if due_at is None and (step.spec.delay or step.at):
            try:
                due_at = _due_at(step, ctx, now)
            except (TemplateError, ValueError) as exc:
                record("failed", error=f"at: {exc}")
                return "failed"
            if due_at <= now:
                return None
            record("scheduled", error=None, due_at=due_at)
        if due_at is None or due_at <= now:
            return None
        self.schedule(record.run_id, int((due_at - now) * 1000) + 1)
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


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


class _Recorder:
    """Writes one step's outcome, redacted."""

    def __init__(self, store: Store, run_id: str, step: Step, redact: Redactor) -> None:
        self.store, self.run_id, self.step, self.redact = store, run_id, step, redact

    def __call__(self, status: str, *, input: Any = None, output: Any = None,  # noqa: A002
                 error: str | None = None, due_at: float | None = None) -> None:
        self.store.record_step(
            run_id=self.run_id, step_id=self.step.id, position=self.step.position, use=self.step.spec.use,
            status=status, input=self.redact(input), output=self.redact(output),
            error=self.redact(error), due_at=due_at,
        )
