"""Durations as recipes and config write them: ``30s``, ``15m``, ``24h``, ``2d``, ``1w`` (``-24h`` for offsets)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(-?)(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str | int | timedelta) -> timedelta:
    """A duration as a timedelta; a bare number is seconds."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int):
        return timedelta(seconds=text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30s, 15m, 24h or 2d")
    sign, amount, unit = match.groups()
    delta = timedelta(**{_UNITS[unit]: int(amount)})
    return -delta if sign else delta


def _parse(value: Any) -> Any:
    # Empty (``every: ${RECONCILE_EVERY:-}``) means none, so an environment variable can turn a duration off.
    return None if value is None or value == "" else parse_duration(value)


#: A pydantic field type reading ``15m`` and friends.
Duration = Annotated[timedelta, BeforeValidator(_parse)]
