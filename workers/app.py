"""The application object: config plus the store, broker, connectors and recipes built from it.

No hidden globals: everything a process needs hangs from one ``App``, so a
test can build two side by side.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path

import sqlalchemy.exc
from dramatiq import Broker

from connectors.base import ConnectorRegistry
from workers.actors import Queue, declare_actors
from workers.admission import DeliveryWriter
from workers.broker import make_broker, redis_url
from workers.config import SIGNING_KEY_FILE, Config
from workers.engine import Engine, RetryPolicy
from workers.recipes import RecipeFolder
from workers.redaction import Redactor
from workers.store import Store
from workers.templating import Templates

log = logging.getLogger("vivoflow")


class App:
    """One vivoflow process's parts, built lazily from config."""

    def __init__(self, config: Config, *, broker_url: str | None = None) -> None:
        self.config = config
        self._broker_url = broker_url
        self.registry = ConnectorRegistry.discover()
        self.registry.configure(config.connectors, base_dir=config.base_dir)
        self.templates = Templates()
        self._key_file_cache: tuple[int, bytes] = (0, b"")
        self._keys: list[bytes] = []
        self._keys_checked = float("-inf")
        self._actors_declared = False

    @cached_property
    def store(self) -> Store:
        store = Store(self.config.store_url())
        store.create_schema()
        return store

    @cached_property
    def broker(self) -> Broker:
        url = redis_url(self.config.broker, self._broker_url)
        return make_broker(url, namespace=self.config.broker.namespace,
                           heartbeat_timeout_seconds=self.config.broker.heartbeat_timeout_seconds)

    @cached_property
    def recipes(self) -> RecipeFolder:
        return RecipeFolder(self.config.recipes.dir, self.registry, self.templates)

    @property
    def signing_key_file(self) -> Path:
        """Where ``vivoflow subscribe`` keeps the key it generated; the intake accepts it too."""
        return self.config.broker.data_dir / SIGNING_KEY_FILE

    def signing_keys(self) -> list[bytes]:
        """The configured keys plus the subscribed one (re-read when ``subscribe`` rewrites it).

        The file is looked at most once a second: this runs on every webhook.
        """
        now = time.monotonic()
        if now - self._keys_checked >= 1.0:
            self._keys_checked = now
            self._keys = self.config.intake.keys()
            try:
                stat = self.signing_key_file.stat()
            except OSError:
                return self._keys
            if self._key_file_cache[0] != stat.st_mtime_ns:
                self._key_file_cache = (stat.st_mtime_ns, self.signing_key_file.read_text().strip().encode())
            stored = self._key_file_cache[1]
            if stored and stored not in self._keys:
                self._keys = [*self._keys, stored]
        return self._keys

    def secrets(self) -> list[str]:
        """Every configured secret, for redaction."""
        values = [*self.registry.secrets(), self.config.admin.token.get_secret_value()]
        values += [key.decode() for key in self.signing_keys()]
        return [v for v in values if v]

    @cached_property
    def engine(self) -> Engine:
        workers = self.config.workers
        return Engine(
            self.store, self.registry, self.recipes,
            schedule=self.queue.resume,
            redact=Redactor(self.secrets()),
            retry=RetryPolicy(workers.retry_min_backoff_seconds, workers.retry_max_backoff_seconds),
            lease_seconds=workers.step_lease_seconds,
        )

    @cached_property
    def queue(self) -> Queue:
        return Queue(self.broker, self.config.broker.queue)

    @cached_property
    def admission(self) -> DeliveryWriter:
        """The intake's group-committing writer."""
        return DeliveryWriter(self.store, self.queue)

    def declare_actors(self) -> None:
        """Declare the actors once per App (a worker stopped and started again reuses them)."""
        if not self._actors_declared:
            declare_actors(self.queue, self.engine)
            self._actors_declared = True

    def readiness(self) -> dict[str, str]:
        """``ok`` or the reason, for the broker and the store (``/readyz``)."""
        checks = {}
        try:
            self.store.ping()
            checks["store"] = "ok"
        except sqlalchemy.exc.SQLAlchemyError as exc:
            checks["store"] = f"unavailable: {type(exc).__name__}"
        try:
            self.queue.ping()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 - Redis, AMQP or socket errors alike: not ready
            checks["broker"] = f"unavailable: {type(exc).__name__}"
        return checks

    def close(self) -> None:
        if "admission" in self.__dict__:
            self.admission.close()
        self.registry.close()
        if "broker" in self.__dict__:
            self.broker.close()
        if "store" in self.__dict__:
            self.store.close()
