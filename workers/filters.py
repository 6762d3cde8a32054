"""Template filters beyond Jinja's own: dates in the invitee's zone, relative times, booking links.

Register with ``env.filters.update(FILTERS)``; missing values render as "" and misuse raises
``TemplateRuntimeError``, which the engine reports as a failed step.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import jinja2
from jinja2.exceptions import TemplateRuntimeError

from workers.timezones import resolve_timezone

__all__ = ["FILTERS", "booking_link", "format_datetime", "humanize_delta"]

DEFAULT_DATETIME_FORMAT = "%Y-%m-%d %H:%M %Z"


def _is_missing(value: Any) -> bool:
    """Missing values are none or "", never an error (SPEC §5).

    ``str()`` on an Undefined either gives "" (lenient environments) or raises UndefinedError
    (StrictUndefined), so a recipe typo still fails loudly under the strict environment.
    """
    if value is None:
        return True
    if isinstance(value, jinja2.Undefined):
        return str(value) == ""
    return isinstance(value, str) and not value.strip()


def _to_aware_datetime(value: Any, *, filter_name: str) -> dt.datetime:
    """Accept a datetime or an ISO-8601 string (with "Z", fractional seconds); naive means UTC.

    Payload times arrive as strings when a template reads ``payload`` directly, and as datetimes
    from the parsed context, so both spellings must format the same.
    """
    if isinstance(value, str):
        try:
            # Python 3.11's fromisoformat reads "Z" and any number of fractional digits.
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise TemplateRuntimeError(
                f"{filter_name}: cannot read {value!r} as an ISO-8601 date and time"
            ) from None
    if not isinstance(value, dt.datetime):
        raise TemplateRuntimeError(
            f"{filter_name}: expected a datetime or an ISO-8601 string, got {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def _zone(name: Any, *, filter_name: str, source: str) -> dt.tzinfo:
    """Resolve a zone name, turning the ValueError into the template error callers catch."""
    if not isinstance(name, str):
        raise TemplateRuntimeError(f"{filter_name}: {source} must be a time zone name, got {name!r}")
    try:
        return resolve_timezone(name)
    except ValueError as exc:
        raise TemplateRuntimeError(f"{filter_name}: {source}: {exc}") from None


def _invitee_timezone(context: jinja2.runtime.Context) -> str | None:
    """The invitee's IANA zone when the context has one; routing-form events have no invitee."""
    invitee = context.get("invitee")
    if not isinstance(invitee, Mapping):
        return None
    tz = invitee.get("timezone")
    return None if _is_missing(tz) else tz


@jinja2.pass_context
def format_datetime(
    context: jinja2.runtime.Context,
    value: dt.datetime | str | None,
    fmt: str = DEFAULT_DATETIME_FORMAT,
    tz: str | None = None,
) -> str:
    """Format a time in a zone: ``tz`` if given, else the invitee's, else UTC (the ``datetime`` filter).

    The invitee's zone is the default because messages go to the invitee, who booked in that zone.
    A bad invitee zone raises instead of falling back to UTC: a silently shifted meeting time in an
    email is worse than a failed step that names the problem.
    """
    if _is_missing(value):
        return ""
    moment = _to_aware_datetime(value, filter_name="datetime")
    if not _is_missing(tz):
        zone = _zone(tz, filter_name="datetime", source="tz")
    elif (invitee_tz := _invitee_timezone(context)) is not None:
        zone = _zone(invitee_tz, filter_name="datetime", source="invitee.timezone")
    else:
        zone = dt.UTC
    if not isinstance(fmt, str):
        raise TemplateRuntimeError(f"datetime: the format must be a string, got {type(fmt).__name__}")
    try:
        return moment.astimezone(zone).strftime(fmt)
    except (ValueError, OverflowError) as exc:
        raise TemplateRuntimeError(
            f"datetime: cannot format {moment.isoformat()} with {fmt!r}: {exc}"
        ) from None


# (name, size in seconds, smallest span shown in this unit), largest first. Weeks start at 14 days
# because "1 week" for 10 days reads as a promise that is three days off.
_UNITS: tuple[tuple[str, int, int], ...] = (
    ("week", 7 * 86400, 14 * 86400),
    ("day", 86400, 86400),
    ("hour", 3600, 3600),
    ("minute", 60, 60),
    ("second", 1, 0),
)


def _round_half_up(x: float) -> int:
    # round() is banker's rounding: 2.5 hours would read "2 hours" but 3.5 hours "4 hours".
    return math.floor(x + 0.5)


def _span_in_words(seconds: float) -> str:
    """Say a non-negative span in its largest unit, rounded to the nearest whole one.

    Rounding (not truncation) matters for reminders: a job that runs a few seconds after
    "24 hours before" should still say "1 day", not "23 hours". When rounding reaches the next
    unit's threshold (23h59m → 24 hours) the next unit is used instead.
    """
    for index, (unit, size, threshold) in enumerate(_UNITS):
        if seconds < threshold:
            continue
        count = _round_half_up(seconds / size)
        if index > 0 and count * size >= _UNITS[index - 1][2]:
            unit, size, _ = _UNITS[index - 1]
            count = _round_half_up(seconds / size)
        return f"{count} {unit}" if count == 1 else f"{count} {unit}s"
    raise AssertionError("unreachable: the last unit has threshold 0")


def humanize_delta(
    value: dt.timedelta | dt.datetime | str | None,
    other: dt.datetime | str | None = None,
) -> str:
    """Say a span in English: a timedelta as "3 days", a time as "in 3 days" / "2 hours ago".

    A time is measured from ``other`` (default: now, UTC); under a minute is "just now" because
    seconds are noise once a message is queued. A negative timedelta is said by its size, as
    durations have no direction.
    """
    if _is_missing(value):
        return ""
    if isinstance(value, dt.timedelta):
        return _span_in_words(abs(value.total_seconds()))
    moment = _to_aware_datetime(value, filter_name="humanize_delta")
    reference = (
        dt.datetime.now(dt.UTC)
        if _is_missing(other)
        else _to_aware_datetime(other, filter_name="humanize_delta")
    )
    seconds = (moment - reference).total_seconds()
    if abs(seconds) < 60:
        return "just now"
    words = _span_in_words(abs(seconds))
    return f"in {words}" if seconds > 0 else f"{words} ago"


# Query parameters a scheduling URL understands besides name, email and utm_*: custom question
# answers a1..a10, and month (YYYY-MM) / date (YYYY-MM-DD) to open the calendar on a given day.
# Anything else is rejected so a typo ("emial=") fails at render instead of dropping data silently.
_EXTRA_BOOKING_KEYS: tuple[str, ...] = (*(f"a{i}" for i in range(1, 11)), "month", "date")


def _query_value(key: str, value: Any) -> str:
    """Render one query value; dates become the forms month/date expect rather than str(datetime)."""
    if isinstance(value, dt.date):
        if key == "month":
            return value.strftime("%Y-%m")
        if key == "date":
            return value.strftime("%Y-%m-%d")
    return str(value)


def booking_link(
    url: str | None,
    name: str | None = None,
    email: str | None = None,
    utm_source: str | None = None,
    utm_medium: str | None = None,
    utm_campaign: str | None = None,
    utm_content: str | None = None,
    utm_term: str | None = None,
    **extra: Any,
) -> str:
    """Return the scheduling URL with the invitee's details and UTM values pre-filled.

    Uses the query parameters Vivocalendar's (Calendly's) embeds read. Existing query parameters
    are kept and the ones given here win, so a recipe can override a link's stored utm_source.
    Empty values are skipped: an empty ``name=`` would blank a field the visitor could fill.
    Only http(s) is accepted because the result lands in emails and chat messages as a link.
    """
    if _is_missing(url):
        return ""
    if not isinstance(url, str):
        raise TemplateRuntimeError(f"booking_link: the URL must be a string, got {type(url).__name__}")
    unknown = sorted(set(extra) - set(_EXTRA_BOOKING_KEYS))
    if unknown:
        raise TemplateRuntimeError(
            f"booking_link: unknown parameter(s) {', '.join(unknown)}; allowed: name, email, "
            f"utm_source, utm_medium, utm_campaign, utm_content, utm_term, {', '.join(_EXTRA_BOOKING_KEYS)}"
        )
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise TemplateRuntimeError(f"booking_link: expected an http(s) scheduling URL, got {url!r}")

    given = {
        "name": name,
        "email": email,
        "utm_source": utm_source,
        "utm_medium": utm_medium,
        "utm_campaign": utm_campaign,
        "utm_content": utm_content,
        "utm_term": utm_term,
        **{key: extra[key] for key in _EXTRA_BOOKING_KEYS if key in extra},
    }
    # A dict keeps the URL's own parameter order and lets a given value replace an existing one.
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key, value in given.items():
        if not _is_missing(value):
            query[key] = _query_value(key, value)
    # quote (not quote_plus): "+" in an email must reach the form as "+", and %20 is unambiguous.
    encoded = urlencode(query, quote_via=quote)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, encoded, parts.fragment))


FILTERS: dict[str, Callable[..., str]] = {
    "datetime": format_datetime,
    "humanize_delta": humanize_delta,
    "booking_link": booking_link,
}
