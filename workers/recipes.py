"""Recipes: YAML files of trigger + condition + steps, validated and compiled at load.

Every problem is a ``RecipeError`` naming ``file:line``; a bad recipe is left
out while the others run. Recipes are indexed by event, so matching a delivery
costs the same however many unrelated recipes there are.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateSyntaxError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.base import ActionSpec, ConnectorRegistry, RenderAs
from workers.durations import Duration
from workers.errors import RecipeError
from workers.events import EVENTS
from workers.templating import Templates
from workers.yamlsource import YamlError, line_of, load_with_lines

log = logging.getLogger("vivoflow.recipes")

class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetrySpec(_Spec):
    max_attempts: int = Field(ge=1, le=100)


class StepSpec(_Spec):
    id: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    use: str
    if_: str | None = Field(None, alias="if")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    delay: Duration | None = None
    at: str | None = None
    offset: Duration | None = None
    retry: RetrySpec | None = None
    on_error: Literal["stop", "continue"] = "stop"
    skip_if_canceled: bool = True


class RecipeSpec(_Spec):
    name: str | None = None
    description: str = ""
    on: str | list[str]
    if_: str | None = Field(None, alias="if")
    steps: list[StepSpec] = Field(min_length=1)


Renderer = Callable[[dict[str, Any]], Any]


@dataclass
class Step:
    """One compiled step: its spec, the action it calls and its input templates."""

    spec: StepSpec
    position: int
    connector: str
    action: ActionSpec
    condition: Callable[[dict[str, Any]], Any] | None
    inputs: Renderer
    at: Renderer | None
    max_attempts: int

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass
class Recipe:
    name: str
    description: str
    events: tuple[str, ...]
    condition: Callable[[dict[str, Any]], Any] | None
    condition_source: str | None
    steps: list[Step]
    file: Path
    #: Line of ``name:`` (or of the recipe's first key when the name is the file's), for errors.
    name_line: int | None = None
    #: The YAML it was compiled from, kept with each run so a delayed step runs this version.
    source: str = ""


@dataclass
class RecipeBook:
    """The recipes of one folder, by event, with the errors of those that did not load."""

    recipes: dict[str, Recipe] = field(default_factory=dict)
    errors: list[RecipeError] = field(default_factory=list)
    by_event: dict[str, list[Recipe]] = field(default_factory=dict)

    def matching(self, event: str) -> list[Recipe]:
        return self.by_event.get(event, [])


#: What makes a file in the recipes folder a recipe (hidden files, e.g. an editor's, are not).
RECIPE_SUFFIXES = (".yaml", ".yml")


def _recipe_entries(folder: Path) -> list[os.DirEntry[str]]:
    """The recipe files in ``folder``, by name, from one ``scandir`` (no folder: none)."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or os.path.splitext(entry.name)[1] not in RECIPE_SUFFIXES:
                    continue
                try:
                    if entry.is_file():
                        found.append(entry)
                except OSError:
                    continue
    except OSError:
        return []
    return sorted(found, key=lambda entry: entry.name)


def recipe_files(folder: Path) -> list[Path]:
    return [Path(entry.path) for entry in _recipe_entries(folder)]


def load_book(folder: Path, registry: ConnectorRegistry, templates: Templates) -> RecipeBook:
    """Load every recipe in ``folder``; one bad file never stops the others."""
    book = RecipeBook()
    if not folder.is_dir():
        book.errors.append(RecipeError("recipes folder not found (recipes.dir in config.yaml)", file=str(folder)))
        return book
    for path in recipe_files(folder):
        recipe, errors = load_recipe(path, registry, templates)
        if recipe and recipe.name in book.recipes:
            other = book.recipes[recipe.name].file.name
            errors.append(RecipeError(f"name: {recipe.name!r} is already used by {other}", file=str(path),
                                      line=recipe.name_line))
            recipe = None
        book.errors.extend(errors)
        if recipe:
            book.recipes[recipe.name] = recipe
            for event in recipe.events:
                book.by_event.setdefault(event, []).append(recipe)
    return book


def load_recipe(
    path: Path, registry: ConnectorRegistry, templates: Templates
) -> tuple[Recipe | None, list[RecipeError]]:
    """Parse, validate and compile one recipe file; returns it or its errors (never both)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [RecipeError(f"cannot read: {exc}", file=str(path))]
    return parse_recipe(text, path, registry, templates)


def parse_recipe(
    text: str, path: Path, registry: ConnectorRegistry, templates: Templates
) -> tuple[Recipe | None, list[RecipeError]]:
    """Compile a recipe from its YAML text (``path`` names it in errors and gives its default name)."""
    file = str(path)
    try:
        data, lines = load_with_lines(text)
    except YamlError as exc:
        return None, [RecipeError(str(exc), file=file, line=exc.line)]
    if not isinstance(data, dict):
        return None, [RecipeError("a recipe is a mapping with at least 'on' and 'steps'", file=file, line=1)]
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        return None, [_pydantic_error(err, file, lines) for err in exc.errors()]
    recipe, errors = _compile(spec, path, lines, registry, templates)
    if recipe:
        recipe.source = text
    return recipe, errors


def _pydantic_error(err: Any, file: str, lines: dict[Any, int]) -> RecipeError:
    loc = tuple("if" if p == "if_" else "with" if p == "with_" else p for p in err["loc"])
    key = ".".join(str(p) for p in loc)
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    if err["type"] == "value_error":  # our own validator's message, without pydantic's "Value error, "
        msg = str(err["ctx"]["error"])
    if err["type"] == "missing":
        msg = "required key is missing"
    return RecipeError(f"{key}: {msg}" if key else msg, file=file, line=line_of(lines, loc))


def _compile(
    spec: RecipeSpec, path: Path, lines: dict[Any, int], registry: ConnectorRegistry, templates: Templates
) -> tuple[Recipe | None, list[RecipeError]]:
    file = str(path)
    errors: list[RecipeError] = []

    def error(loc: tuple[Any, ...], message: str) -> None:
        errors.append(RecipeError(message, file=file, line=line_of(lines, loc)))

    events = (spec.on,) if isinstance(spec.on, str) else tuple(spec.on)
    for i, event in enumerate(events):
        if event not in EVENTS:
            error(("on", i) if isinstance(spec.on, list) else ("on",),
                  f"on: unknown event {event!r} (events: {', '.join(EVENTS)})")

    condition = _condition(spec.if_, ("if",), templates, (), error)
    steps: list[Step] = []
    seen: set[str] = set()
    for position, step_spec in enumerate(spec.steps):
        loc = ("steps", position)
        if step_spec.id in seen:
            error((*loc, "id"), f"steps[{position}].id: {step_spec.id!r} is used by an earlier step")
        found = registry.find(step_spec.use)
        if found is None:
            known = ", ".join(_all_actions(registry))
            error((*loc, "use"), f"use: unknown action {step_spec.use!r} (actions: {known})")
            seen.add(step_spec.id)
            continue
        connector_cls, action_spec = found
        step = _compile_step(step_spec, position, connector_cls.name, connector_cls.default_max_attempts,
                             action_spec, templates, seen, error)
        seen.add(step_spec.id)
        if step:
            steps.append(step)
    if errors:
        return None, errors
    recipe = Recipe(
        name=spec.name or path.stem, description=spec.description, events=events, condition=condition,
        condition_source=spec.if_, steps=steps, file=path, name_line=line_of(lines, ("name",)),
    )
    return recipe, []


def _all_actions(registry: ConnectorRegistry) -> list[str]:
    return sorted(f"{name}.{action}" for name, cls in registry.classes.items() for action in cls.actions)


def _condition(
    source: str | None, loc: tuple[Any, ...], templates: Templates, steps: Any, error: Callable[..., None]
) -> Callable[[dict[str, Any]], Any] | None:
    if source is None:
        return None
    try:
        compiled = templates.compile_condition(source)
    except TemplateSyntaxError as exc:
        error(loc, f"{'.'.join(map(str, loc))}: template syntax error: {exc.message}")
        return None
    for problem in templates.unknown_names(source, expression=True, steps=steps):
        error(loc, f"{'.'.join(map(str, loc))}: {problem}")
    return compiled


def _compile_step(
    spec: StepSpec,
    position: int,
    connector: str,
    default_attempts: int,
    action: ActionSpec,
    templates: Templates,
    earlier: set[str],
    error: Callable[..., None],
) -> Step | None:
    loc = ("steps", position)
    report = _ErrorCount(error)
    if spec.delay is not None and spec.at is not None:
        report(loc, f"steps.{spec.id}: use either delay or at, not both")
    if spec.offset is not None and spec.at is None:
        report((*loc, "offset"), f"steps.{spec.id}.offset: only goes with at")
    condition = _condition(spec.if_, (*loc, "if"), templates, earlier, report)

    fields = action.inputs()
    kinds = action.render_kinds()
    for name, info in fields.items():
        if info.is_required() and name not in spec.with_:
            report((*loc, "with"), f"steps.{spec.id}.with: {spec.use} needs input {name!r}")
    for name in spec.with_:
        if name not in fields:
            report((*loc, "with", name),
                       f"steps.{spec.id}.with.{name}: {spec.use} has no input {name!r} (inputs: {', '.join(fields)})")

    def compile_value(value: Any, kind: RenderAs, where: tuple[Any, ...]) -> Renderer:
        if isinstance(value, str):
            try:
                render = templates.compile(value, kind)
            except TemplateSyntaxError as exc:
                report(where, f"steps.{spec.id}.{'.'.join(map(str, where[2:]))}: template syntax error: {exc.message}")
                return lambda ctx: value
            for problem in templates.unknown_names(value, steps=earlier):
                report(where, f"steps.{spec.id}.{'.'.join(map(str, where[2:]))}: {problem}")
            return render
        if isinstance(value, dict):
            parts = {k: compile_value(v, kind, (*where, k)) for k, v in value.items()}
            return lambda ctx: {k: r(ctx) for k, r in parts.items()}
        if isinstance(value, list):
            items = [compile_value(v, kind, (*where, i)) for i, v in enumerate(value)]
            return lambda ctx: [r(ctx) for r in items]
        return lambda ctx: value

    inputs = {name: compile_value(value, kinds.get(name, RenderAs.TEXT), (*loc, "with", name))
              for name, value in spec.with_.items()}
    at = compile_value(spec.at, RenderAs.TEXT, (*loc, "at")) if spec.at is not None else None
    if report.count:
        return None
    return Step(
        spec=spec, position=position, connector=connector, action=action, condition=condition,
        inputs=lambda ctx: {name: r(ctx) for name, r in inputs.items()}, at=at,
        max_attempts=spec.retry.max_attempts if spec.retry else default_attempts,
    )


class _ErrorCount:
    """Counts the errors one step reports, so a step with any is left uncompiled."""

    def __init__(self, error: Callable[..., None]) -> None:
        self.error = error
        self.count = 0

    def __call__(self, loc: tuple[Any, ...], message: str) -> None:
        self.count += 1
        self.error(loc, message)


class RecipeFolder:
    """The recipes of ``recipes.dir``, reloaded when a file changes (checked at most once a second)."""

    def __init__(self, folder: Path, registry: ConnectorRegistry, templates: Templates) -> None:
        self.folder = folder
        self.registry = registry
        self.templates = templates
        self._signature: tuple[Any, ...] | None = None
        self._checked = 0.0
        self._lock = threading.RLock()
        self._pinned: dict[str, Recipe | None] = {}
        self.book = RecipeBook()
        self.current()

    def _files_signature(self) -> tuple[Any, ...]:
        """Name, mtime and size of every recipe file: one ``scandir`` pass, as this runs each second
        in every worker (``glob`` plus a ``stat`` per path took ~20 ms for 1,000 recipes)."""
        out = []
        for entry in _recipe_entries(self.folder):
            try:
                st = entry.stat()
            except OSError:
                continue
            out.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def pinned(self, name: str, source: str | None) -> Recipe | None:
        """The recipe as a run recorded it (``source``), or today's if the run kept none.

        Compiled once per distinct source: resuming a thousand delayed runs compiles one recipe.
        """
        if not source:
            return self.current().recipes.get(name)
        current = self.current().recipes.get(name)
        if current is not None and current.source == source:
            return current
        with self._lock:
            if source not in self._pinned:
                file = current.file if current else self.folder / f"{name}.yaml"
                recipe, errors = parse_recipe(source, file, self.registry, self.templates)
                if errors:  # it compiled when the run began; a connector since removed can break it
                    log.error("recipe %s as scheduled no longer compiles: %s", name, errors[0])
                self._pinned[source] = recipe
            return self._pinned[source]

    def current(self) -> RecipeBook:
        """The recipes as they are on disk now (at most a second stale)."""
        now = time.monotonic()
        if now - self._checked < 1.0 and self._signature is not None:
            return self.book
        # One thread looks; the others go on with the book they have rather than queue behind it
        # (with 1,000 recipes and eight threads the look took long enough to stall them all).
        # Until a first book is loaded, everyone waits for it.
        if not self._lock.acquire(blocking=self._signature is None):
            return self.book
        try:
            if now - self._checked < 1.0 and self._signature is not None:
                return self.book
            signature = self._files_signature()
            if signature != self._signature:
                book = load_book(self.folder, self.registry, self.templates)
                for err in book.errors:
                    log.error("recipe not loaded: %s", err)
                log.info("recipes loaded: %s", ", ".join(book.recipes) or "none")
                self.book, self._signature = book, signature  # swapped whole: in-flight work keeps its recipe
            self._checked = time.monotonic()
        finally:
            self._lock.release()
        return self.book
