"""Template filters and time zone names, exercised through a real sandboxed Jinja environment.

Each case renders a template string against a context shaped like SPEC §5's, as recipes will.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jinja2
import pytest
from jinja2.exceptions import TemplateRuntimeError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers.filters import FILTERS, booking_link, format_datetime, humanize_delta
from workers.timezones import ACCOUNT_TIME_ZONES, resolve_timezone

UTC = dt.UTC
START = dt.datetime(2027, 3, 4, 15, 0, tzinfo=UTC)  # before US DST (starts 2027-03-14): EST, -05:00
SUMMER = dt.datetime(2027, 7, 1, 15, 0, tzinfo=UTC)  # EDT, -04:00
NOW = dt.datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
SCHEDULING_URL = "https://vivocalendar.com/acme/intro-call"


@pytest.fixture(scope="module")
def env() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    environment.filters.update(FILTERS)
    return environment


def make_context(**overrides: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "event": "invitee.created",
        "invitee": {
            "name": "Ann Lee",
            "first_name": "Ann",
            "email": "ann@example.com",
            "timezone": "Europe/Berlin",
        },
        "meeting": {"name": "Intro call", "start_time": START, "end_time": None},
        "payload": {"scheduled_event": {"start_time": "2027-03-04T15:00:00.000000Z"}},
        "now": NOW,
    }
    context.update(overrides)
    return context


def render(env: ImmutableSandboxedEnvironment, source: str, **overrides: Any) -> str:
    return env.from_string(source).render(make_context(**overrides))


# --- the filter set -----------------------------------------------------------------------------


def test_filters_registers_the_three_spec_names() -> None:
    assert FILTERS == {
        "datetime": format_datetime,
        "humanize_delta": humanize_delta,
        "booking_link": booking_link,
    }


# --- datetime -----------------------------------------------------------------------------------

DATETIME_CASES = [
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 'Eastern Time (US & Canada)') }}", {}, "10:00",
        id="account-name",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z', 'America/New_York') }}", {}, "10:00 EST", id="iana",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z', 'Eastern Time (US & Canada)') }}",
        {"meeting": {"start_time": SUMMER}},
        "11:00 EDT",
        id="account-name-follows-dst",
    ),
    pytest.param("{{ meeting.start_time | datetime('%H:%M', 'Arizona') }}", {}, "08:00", id="arizona-no-dst"),
    pytest.param(
        "{{ meeting.start_time | datetime('%Y-%m-%d %H:%M', 'Tokyo') }}", {}, "2027-03-05 00:00",
        id="crosses-midnight",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 'Kathmandu') }}", {}, "20:45", id="quarter-hour-offset",
    ),
    pytest.param("{{ meeting.start_time | datetime('%H:%M %Z') }}", {}, "16:00 CET", id="invitee-timezone"),
    pytest.param("{{ meeting.start_time | datetime }}", {}, "2027-03-04 16:00 CET", id="default-format"),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z') }}",
        {"invitee": {"name": "Ann", "timezone": "Pacific Time (US & Canada)"}},
        "07:00 PST",
        id="invitee-timezone-as-account-name",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z', 'London') }}", {}, "15:00 GMT",
        id="explicit-tz-beats-invitee",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime(tz='Berlin', fmt='%H:%M') }}", {}, "16:00", id="keyword-arguments",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z') }}", {"invitee": None}, "15:00 UTC", id="no-invitee",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z') }}",
        {"invitee": {"name": "Ann"}},
        "15:00 UTC",
        id="invitee-without-timezone",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M %Z') }}",
        {"invitee": {"name": "Ann", "timezone": None}},
        "15:00 UTC",
        id="invitee-timezone-none",
    ),
    pytest.param(
        "{{ payload.scheduled_event.start_time | datetime('%Y-%m-%d %H:%M', 'Tokyo') }}",
        {},
        "2027-03-05 00:00",
        id="iso-string-z-fractional",
    ),
    pytest.param(
        "{{ '2027-03-04T15:00:00Z' | datetime('%H:%M', 'UTC') }}", {}, "15:00", id="iso-string-z",
    ),
    pytest.param(
        "{{ '2027-03-04T10:00:00-05:00' | datetime('%H:%M %Z', 'Etc/UTC') }}", {}, "15:00 UTC",
        id="iso-string-offset",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 'UTC') }}",
        {"meeting": {"start_time": dt.datetime(2027, 3, 4, 15, 0)}},
        "15:00",
        id="naive-datetime-is-utc",
    ),
    pytest.param(
        "{{ '2027-03-04T15:00:00' | datetime('%H:%M', 'Berlin') }}", {}, "16:00", id="naive-string-is-utc",
    ),
    pytest.param("[{{ meeting.end_time | datetime }}]", {}, "[]", id="none-renders-empty"),
    pytest.param("[{{ '' | datetime }}]", {}, "[]", id="empty-string-renders-empty"),
]


@pytest.mark.parametrize(("source", "overrides", "expected"), DATETIME_CASES)
def test_datetime_formats_in_the_right_zone(
    env: ImmutableSandboxedEnvironment, source: str, overrides: dict[str, Any], expected: str
) -> None:
    assert render(env, source, **overrides) == expected


DATETIME_ERRORS = [
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 'Mars/Olympus_Mons') }}", {},
        r"datetime: tz: unknown time zone 'Mars/Olympus_Mons': use an IANA name such as 'America/New_York'",
        id="unknown-tz",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 'America') }}", {}, "unknown time zone 'America'",
        id="tz-is-a-tzdata-directory",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', '../../etc/passwd') }}", {}, "unknown time zone",
        id="tz-path-traversal",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M', 5) }}", {}, "tz must be a time zone name",
        id="tz-not-a-string",
    ),
    pytest.param(
        "{{ meeting.start_time | datetime('%H:%M') }}",
        {"invitee": {"timezone": "Nowhere/Special"}},
        "invitee.timezone: unknown time zone 'Nowhere/Special'",
        id="bad-invitee-timezone",
    ),
    pytest.param(
        "{{ 'next tuesday' | datetime }}", {}, "cannot read 'next tuesday' as an ISO-8601",
        id="unparseable-string",
    ),
    pytest.param(
        "{{ 42 | datetime }}", {}, "expected a datetime or an ISO-8601 string, got int", id="not-a-time",
    ),
]


@pytest.mark.parametrize(("source", "overrides", "message"), DATETIME_ERRORS)
def test_datetime_misuse_raises_a_template_error(
    env: ImmutableSandboxedEnvironment, source: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateRuntimeError, match=message) as raised:
        render(env, source, **overrides)
    assert not isinstance(raised.value, ValueError)
    assert "\n" not in str(raised.value)


def test_datetime_keeps_strict_undefined_loud(env: ImmutableSandboxedEnvironment) -> None:
    # A typo in a recipe must not render as "" the way a genuinely missing (None) value does.
    with pytest.raises(UndefinedError, match="start_tme"):
        render(env, "{{ meeting.start_tme | datetime }}")


# --- humanize_delta -----------------------------------------------------------------------------

HUMANIZE_TIME_CASES = [
    pytest.param(NOW + dt.timedelta(days=3), "in 3 days", id="in-days"),
    pytest.param(NOW - dt.timedelta(hours=2), "2 hours ago", id="hours-ago"),
    pytest.param(NOW + dt.timedelta(minutes=45), "in 45 minutes", id="in-minutes"),
    pytest.param(NOW + dt.timedelta(days=1), "in 1 day", id="singular"),
    pytest.param(NOW - dt.timedelta(minutes=1), "1 minute ago", id="singular-ago"),
    pytest.param(NOW + dt.timedelta(seconds=30), "just now", id="under-a-minute-ahead"),
    pytest.param(NOW - dt.timedelta(seconds=59), "just now", id="under-a-minute-behind"),
    pytest.param(NOW, "just now", id="same-instant"),
    pytest.param(
        NOW + dt.timedelta(hours=23, minutes=59, seconds=50), "in 1 day", id="late-reminder-rounds-up",
    ),
    pytest.param(NOW + dt.timedelta(days=10), "in 10 days", id="days-below-two-weeks"),
    pytest.param(NOW + dt.timedelta(days=21), "in 3 weeks", id="weeks"),
    pytest.param("2027-03-04T12:00:00.000000Z", "in 3 days", id="iso-string"),
]


@pytest.mark.parametrize(("value", "expected"), HUMANIZE_TIME_CASES)
def test_humanize_delta_says_when_relative_to_other(
    env: ImmutableSandboxedEnvironment, value: dt.datetime | str, expected: str
) -> None:
    source = "{{ meeting.start_time | humanize_delta(now) }}"
    assert render(env, source, meeting={"start_time": value}) == expected


def test_humanize_delta_reads_other_as_iso_string(env: ImmutableSandboxedEnvironment) -> None:
    source = "{{ meeting.start_time | humanize_delta('2027-03-04T17:00:00Z') }}"
    assert render(env, source) == "2 hours ago"


def test_humanize_delta_defaults_to_now(env: ImmutableSandboxedEnvironment) -> None:
    soon = dt.datetime.now(UTC) + dt.timedelta(days=3, minutes=5)
    source = "{{ meeting.start_time | humanize_delta }}"
    assert render(env, source, meeting={"start_time": soon}) == "in 3 days"


HUMANIZE_SPAN_CASES = [
    pytest.param(dt.timedelta(days=3), "3 days", id="days"),
    pytest.param(dt.timedelta(hours=1), "1 hour", id="one-hour"),
    pytest.param(dt.timedelta(minutes=30), "30 minutes", id="minutes"),
    pytest.param(dt.timedelta(seconds=1), "1 second", id="one-second"),
    pytest.param(dt.timedelta(seconds=42), "42 seconds", id="seconds"),
    pytest.param(dt.timedelta(0), "0 seconds", id="zero"),
    pytest.param(dt.timedelta(hours=2, minutes=30), "3 hours", id="rounds-half-up"),
    pytest.param(dt.timedelta(hours=3, minutes=10), "3 hours", id="rounds-down"),
    pytest.param(dt.timedelta(seconds=59.6), "1 minute", id="rounding-promotes-unit"),
    pytest.param(dt.timedelta(days=14), "2 weeks", id="two-weeks"),
    pytest.param(dt.timedelta(hours=-2), "2 hours", id="negative-says-its-size"),
]


@pytest.mark.parametrize(("span", "expected"), HUMANIZE_SPAN_CASES)
def test_humanize_delta_says_a_timedelta_as_a_duration(
    env: ImmutableSandboxedEnvironment, span: dt.timedelta, expected: str
) -> None:
    assert render(env, "{{ span | humanize_delta }}", span=span) == expected


def test_humanize_delta_of_none_is_empty(env: ImmutableSandboxedEnvironment) -> None:
    assert render(env, "[{{ meeting.end_time | humanize_delta(now) }}]") == "[]"


def test_humanize_delta_rejects_an_unreadable_time(env: ImmutableSandboxedEnvironment) -> None:
    with pytest.raises(TemplateRuntimeError, match="humanize_delta: cannot read 'soon'"):
        render(env, "{{ 'soon' | humanize_delta(now) }}")


# --- booking_link -------------------------------------------------------------------------------

BOOKING_CASES = [
    pytest.param(
        "{{ url | booking_link(name=invitee.name, email=invitee.email) }}",
        {"invitee": {"name": "Ann & Bob + Co", "email": "ann+vip@example.com"}},
        SCHEDULING_URL + "?name=Ann%20%26%20Bob%20%2B%20Co&email=ann%2Bvip%40example.com",
        id="encodes-space-ampersand-plus",
    ),
    pytest.param(
        "{{ url | booking_link(utm_source='newsletter', utm_medium='email', utm_campaign='spring sale',"
        " utm_content='cta', utm_term='demo') }}",
        {},
        SCHEDULING_URL
        + "?utm_source=newsletter&utm_medium=email&utm_campaign=spring%20sale&utm_content=cta&utm_term=demo",
        id="all-utm",
    ),
    pytest.param(
        "{{ url | booking_link(utm_source='vivoflow', name='Ann') }}",
        {"url": SCHEDULING_URL + "?hide_gdpr_banner=1&utm_source=old"},
        SCHEDULING_URL + "?hide_gdpr_banner=1&utm_source=vivoflow&name=Ann",
        id="keeps-existing-query-given-wins",
    ),
    pytest.param(
        "{{ url | booking_link(name=none, email='', utm_source=invitee.missing_is_none) }}",
        {"invitee": {"missing_is_none": None}},
        SCHEDULING_URL,
        id="skips-none-and-empty",
    ),
    pytest.param(
        "{{ url | booking_link(a1='Budget: 5k €', a2='yes', month='2027-03', date='2027-03-04') }}",
        {},
        SCHEDULING_URL + "?a1=Budget%3A%205k%20%E2%82%AC&a2=yes&month=2027-03&date=2027-03-04",
        id="custom-answers-month-date",
    ),
    pytest.param(
        "{{ url | booking_link(date=meeting.start_time, month=meeting.start_time) }}",
        {},
        SCHEDULING_URL + "?month=2027-03&date=2027-03-04",
        id="dates-as-month-and-date",
    ),
    pytest.param(
        "{{ url | booking_link(name='Ann') }}",
        {"url": SCHEDULING_URL + "#top"},
        SCHEDULING_URL + "?name=Ann#top",
        id="keeps-fragment",
    ),
    pytest.param(
        "{{ url | booking_link(name='Ann') }}",
        {"url": "http://localhost:8080/acme"},
        "http://localhost:8080/acme?name=Ann",
        id="plain-http",
    ),
    pytest.param("[{{ none | booking_link(name='Ann') }}]", {}, "[]", id="none-url-is-empty"),
]


@pytest.mark.parametrize(("source", "overrides", "expected"), BOOKING_CASES)
def test_booking_link_prefills_query(
    env: ImmutableSandboxedEnvironment, source: str, overrides: dict[str, Any], expected: str
) -> None:
    assert render(env, source, **{"url": SCHEDULING_URL, **overrides}) == expected


def test_booking_link_values_decode_back_exactly(env: ImmutableSandboxedEnvironment) -> None:
    # Whatever the encoding, the scheduling page must read back the very strings the invitee gave.
    name, email = "Zoë O'Brien & Partners + 1 = 2?", "zoe+calendar@example.co.uk"
    link = render(
        env,
        "{{ url | booking_link(name=invitee.name, email=invitee.email) }}",
        url=SCHEDULING_URL,
        invitee={"name": name, "email": email},
    )
    assert parse_qs(urlsplit(link).query) == {"name": [name], "email": [email]}


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "ftp://vivocalendar.com/acme",
        "mailto:ann@example.com",
        "vivocalendar.com/acme",
        "//vivocalendar.com/acme",
        "https://",
    ],
)
def test_booking_link_rejects_non_http_urls(env: ImmutableSandboxedEnvironment, url: str) -> None:
    with pytest.raises(TemplateRuntimeError, match="expected an http\\(s\\) scheduling URL"):
        render(env, "{{ url | booking_link(name='Ann') }}", url=url)


def test_booking_link_rejects_unknown_parameters_naming_the_allowed_ones(
    env: ImmutableSandboxedEnvironment,
) -> None:
    message = "unknown parameter\\(s\\) emial; allowed: name, email"
    with pytest.raises(TemplateRuntimeError, match=message) as raised:
        render(env, "{{ url | booking_link(emial='ann@example.com') }}", url=SCHEDULING_URL)
    assert "a10" in str(raised.value) and "month" in str(raised.value)


# --- time zone names ----------------------------------------------------------------------------


def test_account_time_zones_is_the_full_rails_mapping() -> None:
    # ActiveSupport::TimeZone::MAPPING: 151 names over 134 distinct zones.
    assert len(ACCOUNT_TIME_ZONES) == 151
    assert len(set(ACCOUNT_TIME_ZONES.values())) == 134
    for name in ("Eastern Time (US & Canada)", "International Date Line West", "Samoa", "Kyiv", "Nuku'alofa"):
        assert name in ACCOUNT_TIME_ZONES


@pytest.mark.parametrize("iana", sorted(set(ACCOUNT_TIME_ZONES.values())))
def test_every_mapped_iana_zone_loads(iana: str) -> None:
    assert zoneinfo.ZoneInfo(iana).key == iana


@pytest.mark.parametrize(("name", "iana"), sorted(ACCOUNT_TIME_ZONES.items()))
def test_every_account_name_resolves(name: str, iana: str) -> None:
    assert resolve_timezone(name).key == iana


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("America/New_York", "America/New_York"),
        ("Eastern Time (US & Canada)", "America/New_York"),
        ("  eastern time (us & canada) ", "America/New_York"),
        ("UTC", "Etc/UTC"),
        ("Etc/UTC", "Etc/UTC"),
        ("Kyev", "Europe/Kiev"),
        ("Asia/Kolkata", "Asia/Kolkata"),
    ],
)
def test_resolve_timezone_accepts_iana_and_account_names(name: str, key: str) -> None:
    assert resolve_timezone(name).key == key


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "America", "/etc/localtime", "Eastern Time"])
def test_resolve_timezone_rejects_unknown_names(name: str) -> None:
    expected = (
        f"unknown time zone {name!r}: use an IANA name such as 'America/New_York' "
        f"or an account time zone name such as 'Eastern Time (US & Canada)'"
    )
    with pytest.raises(ValueError) as raised:
        resolve_timezone(name)
    assert str(raised.value) == expected


def test_resolve_timezone_is_cached() -> None:
    assert resolve_timezone("Tokyo") is resolve_timezone("Tokyo")
    assert resolve_timezone.cache_info().hits >= 1
