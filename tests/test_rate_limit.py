"""Per-connector rate limits shared by every worker: a burst waits its turn instead of getting banned."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ConnectorRegistry, RateLimit
from tests.harness import FIXTURES, Vivoflow
from workers.errors import ConfigError

pytestmark = pytest.mark.stores("sqlite", "postgresql")

RECIPE = """
on: invitee.created
steps:
  - id: note
    use: log.write
    with: {message: "booked {{ invitee.email }}"}
"""


def booking(i: int) -> bytes:
    data: dict[str, Any] = json.loads((FIXTURES / "invitee.created.json").read_text())
    data["payload"]["uri"] += f"-{i}"
    data["created_at"] = f"2027-02-01T10:00:{i:02d}.000000Z"
    return json.dumps(data).encode()


def test_a_burst_is_spread_over_windows_of_the_limit(make_config: Callable[..., Path], recipes_dir: Path) -> None:
    (recipes_dir / "note.yaml").write_text(RECIPE)
    config = make_config(connectors={"email": {"host": ""}, "log": {"rate_limit": "3/2s"}})
    with Vivoflow(config, threads=4) as vivoflow:
        ids = [vivoflow.post(booking(i)).json()["delivery_id"] for i in range(7)]

        runs = [vivoflow.wait_for_runs(d, timeout=30)[0] for d in ids]

        assert {r["status"] for r in runs} == {"succeeded"}
        steps = [vivoflow.store.steps_of(r["id"])[0] for r in runs]
        per_window = Counter(int(s["finished_at"] // 2) for s in steps)
        assert max(per_window.values()) <= 3, per_window
        assert len(per_window) >= 3  # 7 calls at 3 per window need three windows
        assert all(s["attempts"] == 1 for s in steps)  # waiting for a window is not an attempt


@pytest.mark.parametrize("text, expected", [
    ("100/10s", RateLimit(100, 10.0)), ("5/1m", RateLimit(5, 60.0)), ("2", RateLimit(2, 1.0)),
])
def test_rate_limits_read_calls_per_duration(text: str, expected: RateLimit) -> None:
    registry = ConnectorRegistry.discover()
    registry.configure({"hubspot": {"rate_limit": text}}, base_dir=Path("."))

    assert registry.config_of("hubspot").rate_limit == expected  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["fast", "0/1s", "10/soon"])
def test_a_bad_rate_limit_is_a_config_error_naming_the_key(text: str) -> None:
    registry = ConnectorRegistry.discover()

    with pytest.raises(ConfigError, match=r"^connectors\.hubspot\.rate_limit: "):
        registry.configure({"hubspot": {"rate_limit": text}}, base_dir=Path("."))
