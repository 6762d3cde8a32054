"""The config.yaml and recipe files each bench stage runs vivoflow with, in a folder of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.payloads import SIGNING_KEY
from bench.procs import free_port

#: Events the unrelated recipes listen to: anything but the one the bench sends.
OTHER_EVENTS = ("invitee.created", "routing_form_submission.created", "invitee_no_show.created",
                "invitee_no_show.deleted")

#: The peers' job (shared/research/peers.md): a condition, then a POST of a small rendered JSON;
#: plus a log line, a second step as in a real recipe.
E2E_RECIPE = """\
name: bench-e2e
on: invitee.canceled
if: canceler_type == "invitee" and not rescheduled
steps:
  - id: notify
    use: http.request
    with:
      url: "{sink}/sink"
      json:
        id: "{{{{ invitee.uri }}}}"
        name: "{{{{ invitee.name }}}}"
        email: "{{{{ invitee.email }}}}"
        utm_source: "{{{{ utm.source }}}}"
        reason: "{{{{ reason }}}}"
  - id: trace
    use: log.write
    with:
      message: "sink answered {{{{ steps.notify.output.status }}}} for {{{{ invitee.email }}}}"
"""

#: The worker-throughput recipe: a cheap step, so the engine's own cost per run shows.
NOOP_RECIPE = """\
name: bench-noop
on: invitee.canceled
if: canceler_type == "invitee"
steps:
  - id: note
    use: log.write
    with:
      message: "canceled: {{ invitee.email }} ({{ reason }})"
"""

UNRELATED_RECIPE = """\
name: unrelated-{n:04d}
on: {event}
if: utm.source == "campaign-{n}"
steps:
  - id: note
    use: log.write
    with:
      message: "{{{{ invitee.email }}}} from campaign {n}"
"""


def write_recipes(folder: Path, main: str, total: int) -> None:
    """``main`` plus ``total - 1`` recipes that listen to other events."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.yaml").write_text(main)
    for n in range(1, total):
        (folder / f"unrelated-{n:04d}.yaml").write_text(
            UNRELATED_RECIPE.format(n=n, event=OTHER_EVENTS[n % len(OTHER_EVENTS)]))


def write_config(folder: Path, *, broker_url: str, namespace: str = "vivoflow", processes: int = 1,
                 threads: int = 8) -> Path:
    """A config for one stage: SQLite and data in ``folder``, intake on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipes").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "intake": {"host": "127.0.0.1", "port": free_port(), "signing_key": SIGNING_KEY},
        "broker": {"url": broker_url, "namespace": namespace, "data_dir": "./data"},
        "store": {"url": "sqlite:///data/vivoflow.db"},
        "recipes": {"dir": "recipes"},
        "workers": {"processes": processes, "threads": threads},
        "connectors": {"email": {"host": ""}, "http": {"timeout_seconds": 10}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def intake_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["intake"]["port"])
