"""End to end over real HTTP: signed webhook → intake → Redis → worker → recipe → SMTP server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import Vivoflow, fixture_body

#: These run on SQLite and, where one answers, PostgreSQL.
pytestmark = pytest.mark.stores("sqlite", "postgresql")


def test_cancellation_sends_the_followup_with_cancel_fields_and_utm(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    response = vivoflow.post(fixture_body("invitee.canceled"))

    assert response.status_code == 202
    delivery_id = response.json()["delivery_id"]
    assert response.json() == {"delivery_id": delivery_id, "duplicate": False}
    runs = vivoflow.wait_for_runs(delivery_id)
    assert [(r["recipe"], r["status"]) for r in runs] == [("cancel-followup", "succeeded")]

    messages = smtp_sink.wait_for(2)
    by_to = {m["To"]: m for m in messages}
    win_back = by_to["jamie.rivera@example.com"]
    assert win_back["Subject"] == "Sorry we missed you, Jamie"
    assert 'You told us: "I have a conflict that day"' in win_back.get_content()
    assert "https://vivocalendar.com/reschedulings/AAAAAAAAAAAAAAA5" in win_back.get_content()
    team = by_to["Team <team@example.com>"]
    assert team["Subject"] == "Discovery Call with Jamie Rivera canceled by Jamie Rivera"
    body = team.get_content()
    assert "Canceled by: Jamie Rivera (invitee)" in body
    assert "Came from: linkedin / spring-launch" in body
    assert messages[0].rcpt_tos and smtp_sink.messages[0].mail_from == "noreply@example.com"


def test_booking_runs_confirmation_and_utm_recipes(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    response = vivoflow.post(fixture_body("invitee.created"))

    runs = vivoflow.wait_for_runs(response.json()["delivery_id"], count=2)
    assert sorted((r["recipe"], r["status"]) for r in runs) == [
        ("booking-confirmation", "succeeded"), ("utm-campaign-leads", "succeeded"),
    ]
    by_to = {m["To"]: m for m in smtp_sink.wait_for(2)}
    confirmation = by_to["jamie.rivera@example.com"]
    # 15:00 UTC in the invitee's America/New_York.
    assert confirmation["Subject"] == "Confirmed: Discovery Call on Thursday 04 March at 10:00 EST"
    assert any(part.get_content_type() == "text/calendar" for part in confirmation.walk())
    lead = by_to["Sales <sales@example.com>"]
    assert lead["Reply-To"] == "jamie.rivera@example.com"
    text = lead.get_content()
    assert "Source / medium: linkedin / social" in text
    assert "Content: carousel-2   Term: scheduling" in text
    assert "utm_source=linkedin&utm_campaign=spring-launch" in text


def test_duplicate_delivery_runs_once(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    body = fixture_body("invitee.canceled")

    first = vivoflow.post(body)
    second = vivoflow.post(body)

    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json() == {"delivery_id": first.json()["delivery_id"], "duplicate": True}
    vivoflow.wait_for_runs(first.json()["delivery_id"])
    smtp_sink.wait_for(2)
    # A third post, after processing, is still the same delivery.
    assert vivoflow.post(body).json()["duplicate"] is True
    assert len(vivoflow.store.page_runs()) == 1
    assert len(smtp_sink.messages) == 2


def test_host_cancellation_skips_the_win_back_step(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    response = vivoflow.post(fixture_body("invitee.canceled.by_host"))

    run = vivoflow.wait_for_runs(response.json()["delivery_id"])[0]
    steps = {s["step_id"]: s for s in vivoflow.store.steps_of(run["id"])}
    assert steps["win_back"]["status"] == "skipped"
    assert 'canceler_type == "invitee"' in steps["win_back"]["error"]
    assert steps["tell_team"]["status"] == "succeeded"
    assert [m["To"] for m in smtp_sink.wait_for(1)] == ["Team <team@example.com>"]


def test_reschedule_cancellation_is_skipped_by_the_cancel_followup(vivoflow: Vivoflow) -> None:
    response = vivoflow.post(fixture_body("invitee.canceled.rescheduled"))

    run = vivoflow.wait_for_runs(response.json()["delivery_id"])[0]
    assert run["status"] == "skipped"
    assert run["reason"] == "if: not rescheduled was false"


def test_unknown_event_is_stored_without_a_run(vivoflow: Vivoflow) -> None:
    response = vivoflow.post(fixture_body("invitee.created", event="invitee.teleported"))

    assert response.status_code == 202
    delivery_id = response.json()["delivery_id"]
    delivery = vivoflow.wait_processed(delivery_id)
    assert delivery["event"] == "invitee.teleported"
    assert vivoflow.runs(delivery_id) == []
