"""The sample webhook bodies shipped with vivoflow, for ``simulate`` and ``try``.

Copies of the documented fixtures; a sample named after an event is the plain
case, ``<event>.<variant>`` the others (``invitee.canceled.by_host``).
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from workers.errors import VivoflowError

#: The samples that make up each event name ``simulate`` accepts; a reschedule is two deliveries.
EVENT_SAMPLES = {
    "invitee.created": ["invitee.created"],
    "invitee.canceled": ["invitee.canceled"],
    "routing_form_submission.created": ["routing_form_submission.created"],
    "invitee_no_show.created": ["invitee_no_show.created"],
    "invitee_no_show.deleted": ["invitee_no_show.deleted"],
    "invitee.rescheduled": ["invitee.canceled.rescheduled", "invitee.created.rescheduled"],
}


def sample_names() -> list[str]:
    """Every shipped sample, by name."""
    return sorted(p.name[: -len(".json")] for p in (files("workers") / "samples").iterdir() if p.name.endswith(".json"))


def load_sample(name: str) -> dict[str, Any]:
    """A shipped sample body, parsed."""
    resource = files("workers") / "samples" / f"{name}.json"
    if not resource.is_file():
        raise VivoflowError(f"no sample named {name!r} (samples: {', '.join(sample_names())})")
    return json.loads(resource.read_text(encoding="utf-8"))


def samples_for(name: str) -> list[str]:
    """The samples to post for an event name or a sample name."""
    if name in EVENT_SAMPLES:
        return EVENT_SAMPLES[name]
    if name in sample_names():
        return [name]
    choices = sorted({*EVENT_SAMPLES, *sample_names()})
    raise VivoflowError(f"unknown event or sample {name!r} (choose one of: {', '.join(choices)})")
