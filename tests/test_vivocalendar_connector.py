"""vivocalendar.get_invitee and vivocalendar.available_times against a fake Vivocalendar API over real HTTP.

Also the API client the CLI shares: pagination, error classes, and the token staying on the API's host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from connectors.base import ActionCall
from connectors.vivocalendar import (
    ApiError,
    AvailableTimesInput,
    GetInviteeInput,
    VivocalendarApi,
    VivocalendarConfig,
    VivocalendarConnector,
    booking_window,
)
from tests.fake_service import FakeService
from tests.fake_vivocalendar import TOKEN, FakeVivocalendar
from tests.harness import Vivoflow, fixture_body
from tests.smtp_server import free_port
from workers.errors import PermanentStepError, RetryableStepError

CALL = ActionCall(run_id="r1", step_id="s1", idempotency_key="r1:s1", event={})
OLD_INVITEE = "/scheduled_events/AAAAAAAAAAAAAAA1/invitees/AAAAAAAAAAAAAAA3"
EVENT_TYPE = "/event_types/AAAAAAAAAAAAAAA2"


@pytest.fixture
def fake() -> Iterator[FakeVivocalendar]:
    with FakeVivocalendar() as running:
        yield running


def connector(tmp_path: Path, base_url: str, token: str = TOKEN) -> VivocalendarConnector:
    config = VivocalendarConfig.model_validate({"base_url": base_url, "token": token}, context={"base_dir": tmp_path})
    return VivocalendarConnector(config)


@pytest.fixture
def vivocalendar(tmp_path: Path, fake: FakeVivocalendar) -> Iterator[VivocalendarConnector]:
    conn = connector(tmp_path, fake.url)
    yield conn
    conn.close()


def times(conn: VivocalendarConnector, **inputs: Any) -> Any:
    return conn.run("available_times", AvailableTimesInput(**inputs), CALL)


def asked_window(fake: FakeVivocalendar) -> tuple[datetime, datetime]:
    query = fake.received("GET", "/event_type_available_times")[-1].query
    params = {k: v[0] for k, v in parse_qs(query).items()}
    return (datetime.fromisoformat(params["start_time"].replace("Z", "+00:00")),
            datetime.fromisoformat(params["end_time"].replace("Z", "+00:00")))


# --- get_invitee ---------------------------------------------------------------------------


def test_get_invitee_returns_the_invitee_resource_with_its_answers(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    output = vivocalendar.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE)), CALL)

    assert output["uri"] == fake.uri(OLD_INVITEE)
    assert output["email"] == "jamie.rivera@example.com"
    assert [qa["question"] for qa in output["questions_and_answers"]] == [
        "Company", "What would you like to discuss?",
    ]
    [request] = fake.received("GET", OLD_INVITEE)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_get_invitee_refuses_a_uri_on_another_host_and_sends_it_nothing(tmp_path: Path) -> None:
    with FakeVivocalendar() as fake, FakeService(Starlette()) as elsewhere:
        conn = connector(tmp_path, fake.url)
        for uri in (elsewhere.url + OLD_INVITEE, fake.url.replace("127.0.0.1", "127.0.0.1.evil.example") + OLD_INVITEE,
                    f"http://user@{fake.url[len('http://'):]}{OLD_INVITEE}", OLD_INVITEE.lstrip("/")):
            with pytest.raises(PermanentStepError, match="is not a Vivocalendar API URI") as caught:
                conn.run("get_invitee", GetInviteeInput(uri=uri), CALL)
            assert TOKEN not in caught.value.message
        conn.close()
        assert elsewhere.received() == []
        assert fake.received() == []


def test_an_unknown_invitee_is_a_permanent_error_with_the_api_message(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    with pytest.raises(PermanentStepError) as caught:
        vivocalendar.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE + "X")), CALL)

    assert caught.value.message == (
        "Vivocalendar answered 404: The server could not find the requested resource."
    )


def test_a_refused_token_is_permanent_names_the_config_key_and_is_not_repeated(
    tmp_path: Path, fake: FakeVivocalendar
) -> None:
    conn = connector(tmp_path, fake.url, token="wrong-token-value")

    with pytest.raises(PermanentStepError) as caught:
        conn.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE)), CALL)

    assert caught.value.message == (
        "Vivocalendar answered 401: The access token is invalid (check connectors.vivocalendar.token)"
    )
    conn.close()


def test_without_a_token_the_step_fails_naming_the_key(tmp_path: Path, fake: FakeVivocalendar) -> None:
    conn = connector(tmp_path, fake.url, token="")

    with pytest.raises(PermanentStepError, match=r"set connectors\.vivocalendar\.token in config\.yaml"):
        conn.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE)), CALL)
    assert fake.received() == []


def test_the_token_is_in_no_repr(vivocalendar: VivocalendarConnector) -> None:
    assert TOKEN not in repr(vivocalendar.config)
    assert TOKEN not in repr(vivocalendar.api())


# --- available_times -----------------------------------------------------------------------


def test_available_times_defaults_to_the_next_seven_days_and_three_slots(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    before = datetime.now(UTC)

    output = times(vivocalendar, event_type=fake.uri(EVENT_TYPE))

    start, end = asked_window(fake)
    assert before + timedelta(seconds=59) <= start <= datetime.now(UTC) + timedelta(minutes=1)
    assert end - start == timedelta(days=7)
    assert len(output["times"]) == 3
    first = output["times"][0]
    assert set(first) == {"start_time", "scheduling_url"}
    assert first["scheduling_url"].startswith("https://vivocalendar.com/morgan-lee/discovery-call/")
    assert datetime.fromisoformat(first["start_time"].replace("Z", "+00:00")) >= start


def test_available_times_moves_a_past_start_to_now_and_cuts_the_window_to_seven_days(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    now = datetime.now(UTC)

    output = times(vivocalendar, event_type=fake.uri(EVENT_TYPE),
                   start=now - timedelta(days=2), end=now + timedelta(days=30))

    start, end = asked_window(fake)
    assert now < start <= datetime.now(UTC) + timedelta(minutes=1)
    assert end - start == timedelta(days=7)
    assert len(output["times"]) == 3


def test_available_times_keeps_a_future_window_inside_seven_days(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    start = datetime(2099, 3, 4, 15, 30, tzinfo=UTC)

    output = times(vivocalendar, event_type=fake.uri(EVENT_TYPE), start="2099-03-04 15:30:00+00:00",
                   end="2099-03-05T12:00:00Z", limit="2")

    assert asked_window(fake) == (start, datetime(2099, 3, 5, 12, tzinfo=UTC))
    assert [t["start_time"] for t in output["times"]] == ["2099-03-04T16:00:00.000000Z", "2099-03-04T17:00:00.000000Z"]


def test_available_times_lists_only_available_slots_up_to_the_limit(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    fake.busy_times = {"2099-03-04T16:00:00.000000Z", "2099-03-04T18:00:00.000000Z"}

    output = times(vivocalendar, event_type=fake.uri(EVENT_TYPE), start="2099-03-04T15:30:00Z", limit=4)

    assert [t["start_time"][11:16] for t in output["times"]] == ["17:00", "19:00", "20:00", "21:00"]


def test_a_naive_start_is_read_as_utc(vivocalendar: VivocalendarConnector, fake: FakeVivocalendar) -> None:
    times(vivocalendar, event_type=fake.uri(EVENT_TYPE), start="2099-03-04T15:30:00")

    assert asked_window(fake)[0] == datetime(2099, 3, 4, 15, 30, tzinfo=UTC)


def test_a_blank_start_or_end_means_the_default(vivocalendar: VivocalendarConnector, fake: FakeVivocalendar) -> None:
    times(vivocalendar, event_type=fake.uri(EVENT_TYPE), start="", end=" ")

    start, end = asked_window(fake)
    assert end - start == timedelta(days=7)


def test_a_window_entirely_in_the_past_has_no_times_and_asks_nothing(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    output = times(vivocalendar, event_type=fake.uri(EVENT_TYPE), start="2020-01-01T00:00:00Z",
                   end="2020-01-02T00:00:00Z")

    assert output == {"times": []}
    assert fake.received() == []


def test_an_end_before_the_start_is_a_permanent_error(vivocalendar: VivocalendarConnector) -> None:
    with pytest.raises(PermanentStepError, match="is not after start"):
        times(vivocalendar, event_type="x", start="2099-03-05T00:00:00Z", end="2099-03-04T00:00:00Z")


def test_a_limit_below_one_is_invalid_input() -> None:
    with pytest.raises(ValueError, match="limit"):
        AvailableTimesInput(event_type="x", limit=0)


def test_an_unknown_event_type_fails_the_step_with_the_api_message(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    with pytest.raises(PermanentStepError, match="answered 404: The server could not find"):
        times(vivocalendar, event_type=fake.uri("/event_types/NOPE"))


def test_booking_window_clamps_to_a_future_window_of_seven_days() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    soon = now + timedelta(minutes=1)

    assert booking_window(None, None, now) == (soon, soon + timedelta(days=7))
    assert booking_window(now - timedelta(days=1), now + timedelta(days=1), now) == (soon, now + timedelta(days=1))
    assert booking_window(now + timedelta(days=2), now + timedelta(days=20), now) == (
        now + timedelta(days=2), now + timedelta(days=9))
    assert booking_window(None, now - timedelta(hours=1), now) is None


# --- the client's errors and pagination ----------------------------------------------------


def test_rate_limiting_is_retryable_after_the_servers_delay(
    vivocalendar: VivocalendarConnector, fake: FakeVivocalendar
) -> None:
    fake.rate_limit(retry_after=7)

    with pytest.raises(RetryableStepError) as caught:
        vivocalendar.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE)), CALL)

    assert caught.value.retry_after == 7
    assert caught.value.message == "Vivocalendar answered 429: Rate limit exceeded"
    # The next attempt goes through.
    assert vivocalendar.run("get_invitee", GetInviteeInput(uri=fake.uri(OLD_INVITEE)), CALL)["status"] == "canceled"


def test_a_server_error_is_retryable(vivocalendar: VivocalendarConnector, fake: FakeVivocalendar) -> None:
    fake.fail_next(503, {"title": "Service Unavailable", "message": "Try again later"})

    with pytest.raises(RetryableStepError, match="answered 503: Try again later"):
        times(vivocalendar, event_type=fake.uri(EVENT_TYPE))


def test_an_unreachable_api_is_retryable(tmp_path: Path) -> None:
    conn = connector(tmp_path, f"http://127.0.0.1:{free_port()}")

    with pytest.raises(RetryableStepError, match="cannot reach Vivocalendar") as caught:
        conn.run("get_invitee", GetInviteeInput(uri=conn.config.base_url + OLD_INVITEE), CALL)
    assert TOKEN not in caught.value.message
    conn.close()


def test_api_errors_carry_the_details_and_the_status(fake: FakeVivocalendar) -> None:
    now = datetime.now(UTC)
    with VivocalendarApi(fake.url, TOKEN) as api, pytest.raises(ApiError) as caught:
        api.available_times(fake.uri(EVENT_TYPE), now - timedelta(days=1), now + timedelta(days=1))

    assert caught.value.status == 400
    assert caught.value.remote == "The supplied parameters are invalid."
    assert caught.value.message == (
        "Vivocalendar answered 400: The supplied parameters are invalid. (start_time: must be in the future)"
    )


def test_paginate_follows_the_next_page_token_with_pages_of_at_most_100(fake: FakeVivocalendar) -> None:
    for n in range(205):
        fake.add_subscription(f"https://hooks.example.com/{n}", ["invitee.created"])

    with VivocalendarApi(fake.url, TOKEN) as api:
        found = api.list_webhook_subscriptions(fake.organization, "organization")

    assert [s["callback_url"] for s in found] == [f"https://hooks.example.com/{n}" for n in range(205)]
    requests = fake.received("GET", "/webhook_subscriptions")
    assert len(requests) == 3
    assert all("count=100" in r.query for r in requests)
    assert "page_token" not in requests[0].query and "page_token=" in requests[1].query


def test_scheduled_events_and_their_invitees(fake: FakeVivocalendar) -> None:
    with VivocalendarApi(fake.url, TOKEN) as api:
        active = list(api.scheduled_events(organization=fake.organization, status="active"))
        since = list(api.scheduled_events(user=fake.user["uri"],
                                          min_start_time=datetime(2027, 3, 5, tzinfo=UTC)))
        invitees = list(api.event_invitees(active[0]["uri"]))

    assert [e["uri"] for e in active] == [fake.uri("/scheduled_events/AAAAAAAAAAAAAAA6")]
    assert [e["uri"] for e in since] == [fake.uri("/scheduled_events/AAAAAAAAAAAAAAA6")]
    assert [(i["email"], i["old_invitee"]) for i in invitees] == [
        ("jamie.rivera@example.com", fake.uri(OLD_INVITEE)),
    ]


def test_a_paginating_server_that_repeats_its_token_does_not_loop_forever() -> None:
    page = {"collection": [{"n": 1}], "pagination": {"next_page_token": "same"}}
    app = Starlette(routes=[Route("/things", lambda request: JSONResponse(page))])
    with FakeService(app) as looping, VivocalendarApi(looping.url, TOKEN) as api:
        assert list(api.paginate("/things")) == [{"n": 1}, {"n": 1}]
    assert len(looping.received()) == 2


# --- through a recipe, end to end ----------------------------------------------------------

RECIPE = """\
on: invitee.created
steps:
  - id: invitee
    use: vivocalendar.get_invitee
    with:
      uri: "{{ invitee.uri }}"
  - id: slots
    use: vivocalendar.available_times
    with:
      event_type: "{{ payload.scheduled_event.event_type }}"
      limit: 2
"""


def test_a_recipe_looks_up_the_invitee_and_the_next_slots(
    make_config: Callable[..., Path], recipes_dir: Path
) -> None:
    (recipes_dir / "lookup.yaml").write_text(RECIPE)
    with FakeVivocalendar(samples=["invitee.created"]) as fake:
        config = make_config(connectors={"vivocalendar": {"base_url": fake.url, "token": TOKEN}})
        with Vivoflow(config) as vivoflow:
            # The webhook names the API the connector talks to, as Vivocalendar's own webhooks do.
            body = json.dumps(fake.rebase(json.loads(fixture_body("invitee.created")))).encode()
            response = vivoflow.post(body)
            [run] = vivoflow.wait_for_runs(response.json()["delivery_id"])
            steps = {s["step_id"]: s for s in vivoflow.store.steps_of(run["id"])}

    assert run["status"] == "succeeded", steps
    assert steps["invitee"]["output"]["questions_and_answers"][1]["answer"] == "Pricing for 20 seats"
    assert len(steps["slots"]["output"]["times"]) == 2
    assert [r.path for r in fake.received()] == [
        "/scheduled_events/AAAAAAAAAAAAAAA1/invitees/AAAAAAAAAAAAAAA3", "/event_type_available_times",
    ]
    assert TOKEN not in json.dumps([s["input"] for s in steps.values()])
