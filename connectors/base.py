"""The connector interface every service follows, and the registry that finds them.

A connector declares a pydantic config model and, per action, an input model;
the engine validates rendered inputs against that model before the call, and
``vivoflow validate`` uses the same models to check recipes without running them.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationInfo
from pydantic.fields import FieldInfo

from workers.errors import ConfigError, PermanentStepError

ENTRY_POINT_GROUP = "vivoflow.connectors"


class RenderAs(enum.Enum):
    """How values from the event are escaped when rendered into an input field.

    Declared on the input model's field (``Annotated[str, RenderAs.HTML]``), so
    escaping happens once, in the rendering layer, never by hand in a connector.
    """

    TEXT = "text"  # as is
    HTML = "html"  # event values HTML-escaped, the recipe's own markup kept
    SLACK = "slack"  # event values get Slack's & < > escaping; <!here> written by the author stays
    HEADER = "header"  # CR/LF folded to spaces: nothing from an invitee can start a new header
    URL = "url"  # event values percent-encoded: they cannot change a URL's scheme, host or path


HeaderText = Annotated[str, RenderAs.HEADER]
HtmlText = Annotated[str, RenderAs.HTML]
SlackText = Annotated[str, RenderAs.SLACK]
#: A URL whose scheme and host come from the recipe's literal text; a value from the
#: event is percent-encoded, unless the author marks it ``|safe`` on purpose.
UrlText = Annotated[str, RenderAs.URL]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


#: A path in config.yaml: relative paths are relative to the config file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` calls per ``window_seconds``, across every worker (``100/10s``)."""

    limit: int
    window_seconds: float


def _rate_limit(value: Any) -> Any:
    if value is None or isinstance(value, RateLimit):
        return value
    from workers.durations import parse_duration  # durations read the same everywhere

    count, _, window = str(value).partition("/")
    try:
        limit, seconds = int(count), parse_duration(window or "1s").total_seconds()
    except ValueError:
        raise ValueError(f"{value!r} is not a rate: write calls/duration, e.g. 100/10s") from None
    if limit < 1 or seconds <= 0:
        raise ValueError(f"{value!r}: the count and the duration must be positive")
    return RateLimit(limit, seconds)


class ConnectorConfig(BaseModel):
    """Base of every connector's config section (``connectors.<name>`` in config.yaml)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    #: Calls allowed across all workers, e.g. ``100/10s``, so a burst does not get a token banned.
    rate_limit: Annotated[RateLimit | None, BeforeValidator(_rate_limit)] = None


class ActionInput(BaseModel):
    """Base of every action's inputs: unknown inputs are a recipe error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ActionCall:
    """What a connector may know about the step it runs, beyond its inputs."""

    run_id: str
    step_id: str
    #: Stable for one step of one run: pass it to services that deduplicate calls.
    idempotency_key: str
    #: The event's plain data (``invitee``, ``meeting``…), for actions that attach it (an .ics).
    event: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpec:
    """One action of a connector: its name, input model and the method that runs it."""

    name: str
    input_model: type[ActionInput]
    method: Callable[..., Any]
    description: str = ""

    def inputs(self) -> dict[str, FieldInfo]:
        """The input fields by the name a recipe writes (the alias: ``json`` for ``json_``)."""
        return {info.alias or name: info for name, info in self.input_model.model_fields.items()}

    def render_kinds(self) -> dict[str, RenderAs]:
        """The escaping of each input, from the ``RenderAs`` marker on its annotation."""
        kinds: dict[str, RenderAs] = {}
        for name, info in self.inputs().items():
            found = [m for m in info.metadata if isinstance(m, RenderAs)] + _markers(info.annotation)
            kinds[name] = found[0] if found else RenderAs.TEXT
        return kinds


def _markers(annotation: Any) -> list[RenderAs]:
    """``RenderAs`` markers anywhere in a type, so ``HtmlText | None`` is still HTML."""
    found = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, RenderAs)]
    for arg in get_args(annotation):
        found += _markers(arg)
    return found


F = TypeVar("F", bound=Callable[..., Any])


def action(name: str, *, input: type[ActionInput]) -> Callable[[F], F]:  # noqa: A002 - reads well at the call site
    """Mark a connector method as the action ``name`` taking ``input``."""

    def mark(method: F) -> F:
        method.__vivoflow_action__ = (name, input)  # type: ignore[attr-defined]
        return method

    return mark


class Connector:
    """Base of every connector; one instance per worker process, built from its config.

    Subclasses set ``name`` and ``config_model`` and decorate methods with
    ``@action``. A method takes ``(inputs, call)`` and returns a pydantic model,
    a dict or ``None``; it raises ``RetryableStepError`` or ``PermanentStepError``
    carrying the remote service's own message.
    """

    name: ClassVar[str]
    config_model: ClassVar[type[ConnectorConfig]]
    #: Attempts of a step before it fails, when the recipe does not say.
    default_max_attempts: ClassVar[int] = 5
    actions: ClassVar[dict[str, ActionSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, ActionSpec] = {}
        for attr in vars(cls).values():
            marker = getattr(attr, "__vivoflow_action__", None)
            if marker:
                action_name, input_model = marker
                doc = (attr.__doc__ or "").strip().splitlines()
                found[action_name] = ActionSpec(action_name, input_model, attr, doc[0] if doc else "")
        cls.actions = {**cls.actions, **found}

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.log = logging.getLogger(f"vivoflow.connectors.{self.name}")

    def run(self, action_name: str, inputs: ActionInput, call: ActionCall) -> dict[str, Any] | None:
        """Run one action and return its output as plain JSON-able data."""
        result = self.actions[action_name].method(self, inputs, call)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result

    def close(self) -> None:
        """Release pooled clients; called once when the worker stops."""

    def not_configured(self, *keys: str) -> PermanentStepError:
        """The error for a connector used by a recipe but missing its settings."""
        where = " or ".join(f"connectors.{self.name}.{key}" for key in keys)
        return PermanentStepError(f"{self.name} is not configured: set {where} in config.yaml")


class ConnectorRegistry:
    """The connectors installed (entry points) and, per process, their live instances."""

    def __init__(self, classes: Mapping[str, type[Connector]]) -> None:
        self.classes = dict(classes)
        self._instances: dict[str, Connector] = {}
        self._lock = threading.Lock()
        self._configs: dict[str, ConnectorConfig] = {}

    @classmethod
    def discover(cls) -> ConnectorRegistry:
        """Every connector registered under the ``vivoflow.connectors`` entry point group."""
        classes: dict[str, type[Connector]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            connector_cls = ep.load()
            classes[ep.name] = connector_cls
        return cls(classes)

    def configure(self, sections: Mapping[str, Any], *, base_dir: Path) -> None:
        """Validate each connector's config section; errors name the key path (exit 2)."""
        unknown = sorted(set(sections) - set(self.classes))
        if unknown:
            raise ConfigError(
                f"connectors.{unknown[0]}: unknown connector (installed: {', '.join(sorted(self.classes))})"
            )
        from workers.config import validation_message  # one formatting of pydantic errors

        for name, connector_cls in self.classes.items():
            raw = sections.get(name) or {}
            try:
                self._configs[name] = connector_cls.config_model.model_validate(
                    raw, context={"base_dir": base_dir}
                )
            except ValueError as exc:
                raise ConfigError(validation_message(exc, prefix=f"connectors.{name}")) from None

    def config_of(self, name: str) -> ConnectorConfig | None:
        """A connector's validated config section (None if that connector is not installed)."""
        if name not in self.classes:
            return None
        return self._configs.get(name) or self.classes[name].config_model.model_validate({})

    def find(self, use: str) -> tuple[type[Connector], ActionSpec] | None:
        """The connector class and action for ``connector.action``, or None."""
        connector_name, _, action_name = use.partition(".")
        connector_cls = self.classes.get(connector_name)
        if connector_cls is None or action_name not in connector_cls.actions:
            return None
        return connector_cls, connector_cls.actions[action_name]

    def instance(self, name: str) -> Connector:
        """This process's instance of a connector, built on first use (clients are pooled in it)."""
        instance = self._instances.get(name)
        if instance is None:
            with self._lock:  # worker threads start at once: build one client, not one per thread
                if name not in self._instances:
                    self._instances[name] = self.classes[name](self.config_of(name))
                instance = self._instances[name]
        return instance

    def secrets(self) -> list[str]:
        """Secret values of every configured connector, for redaction in logs and history."""
        return [secret for config in self._configs.values() for secret in _secret_values(config)]

    def close(self) -> None:
        for connector in self._instances.values():
            connector.close()
        self._instances.clear()


def _secret_values(value: Any) -> list[str]:
    """Every ``SecretStr`` value in a config, however deeply nested (``http.auth.crm.token``)."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return [secret] if secret else []
    if isinstance(value, BaseModel):
        value = list(value.__dict__.values())
    elif isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [secret for item in value for secret in _secret_values(item)]
    return []
