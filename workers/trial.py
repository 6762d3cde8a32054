"""``vivoflow try``: a recipe against one event, without side effects unless asked.

Like a rule tester: does the recipe match, and what would each step receive?
Nothing is stored; with ``send`` the connectors are really called, in order,
and each step sees the real outputs of the steps before it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from pydantic import ValidationError

from connectors.base import ActionCall, ConnectorRegistry
from workers.errors import StepError
from workers.events import Envelope, build_context
from workers.recipes import Recipe


class _Placeholder:
    """Stands for an earlier step's output in a dry run: renders as ``<steps.x.output.id>``."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> _Placeholder:
        return _Placeholder(f"{self._path}.{name}")

    def __getitem__(self, key: Any) -> _Placeholder:
        return _Placeholder(f"{self._path}[{key!r}]")

    def __str__(self) -> str:
        return f"<{self._path}>"


@dataclass
class StepPreview:
    id: str
    use: str
    status: str  # would run, sent, skipped, scheduled, failed
    inputs: dict[str, Any] | None = None
    output: Any = None
    note: str = ""


@dataclass
class TrialResult:
    recipe: str
    event: str
    matched: bool
    reason: str = ""
    steps: list[StepPreview] = field(default_factory=list)


def trial(recipe: Recipe, envelope: Envelope, registry: ConnectorRegistry, *, send: bool = False) -> TrialResult:
    """Evaluate ``recipe`` on ``envelope``: match, then each step's rendered and validated inputs."""
    ctx = build_context(envelope)
    result = TrialResult(recipe=recipe.name, event=envelope.event, matched=envelope.event in recipe.events)
    if not result.matched:
        result.reason = f"listens to {', '.join(recipe.events)}"
        return result
    if recipe.condition is not None:
        try:
            result.matched = bool(recipe.condition(ctx))
        except TemplateError as exc:
            result.matched, result.reason = False, f"if: {exc}"
            return result
        if not result.matched:
            result.reason = f"if: {recipe.condition_source} is false"
            return result
    run_id = f"try_{uuid.uuid4().hex[:12]}"
    for step in recipe.steps:
        preview = StepPreview(id=step.id, use=step.spec.use, status="would run")
        result.steps.append(preview)
        ctx["steps"][step.id] = {"output": _Placeholder(f"steps.{step.id}.output")}
        try:
            if step.condition is not None and not step.condition(ctx):
                preview.status, preview.note = "skipped", f"if: {step.spec.if_} is false"
                continue
            preview.inputs = step.inputs(ctx)
        except TemplateError as exc:
            preview.status, preview.note = "failed", f"template: {exc}"
            break
        if step.spec.delay or step.spec.at:
            preview.note = f"runs {f'after {step.spec.delay}' if step.spec.delay else 'at ' + str(step.spec.at)}"
        try:
            inputs = step.action.input_model.model_validate(preview.inputs)
        except ValidationError as exc:
            err = exc.errors()[0]
            preview.status, preview.note = "failed", f"invalid input {'.'.join(map(str, err['loc']))}: {err['msg']}"
            break
        if not send:
            continue
        call = ActionCall(run_id=run_id, step_id=step.id, idempotency_key=f"{run_id}:{step.id}", event=ctx)
        try:
            preview.output = registry.instance(step.connector).run(step.action.name, inputs, call)
        except StepError as exc:
            preview.status, preview.note = "failed", exc.message
            if step.spec.on_error == "stop":
                break
            continue
        preview.status = "sent"
        ctx["steps"][step.id] = {"output": preview.output}
    return result
