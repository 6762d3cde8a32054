"""Replayed webhooks (SPEC §4): a captured request sent again runs nothing a second time.

Already proven in tests/test_intake.py: a timestamp older (or newer) than ``tolerance_seconds`` is
refused, a body changed after signing is refused, the same event re-sent (even re-serialised) is a
duplicate; tests/test_pipeline.py: a duplicate runs once. Here: the attacker's view, who holds one
captured request, byte for byte, and tries it again, or tries its signature elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness import SIGNING_KEY, Vivoflow, fixture_body
from tests.security.inprocess import InProcessIntake
from workers.signing import sign

RECIPE = """
on: invitee.created
steps:
  - id: note
    use: log.write
    with: {message: "booked: {{ invitee.email }}"}
"""


def test_a_captured_request_replayed_byte_for_byte_is_a_duplicate_and_runs_once(
    make_config: Callable[..., Path], recipes_dir: Path,
) -> None:
    (recipes_dir / "note.yaml").write_text(RECIPE)
    body = fixture_body("invitee.created")
    captured = {"Content-Type": "application/json", "Vivocalendar-Webhook-Signature": sign(body, SIGNING_KEY)}

    with Vivoflow(make_config()) as flow:
        first = flow.http.post(flow.webhook_url, content=body, headers=captured)
        assert first.status_code == 202, first.text
        delivery_id = first.json()["delivery_id"]
        flow.wait_for_runs(delivery_id)
        flow.wait_processed(delivery_id)
        replays = [flow.http.post(flow.webhook_url, content=body, headers=captured) for _ in range(3)]
        runs = flow.store.page_runs()

    assert [(r.status_code, r.json()) for r in replays] == [(200, {"delivery_id": delivery_id, "duplicate": True})] * 3
    assert [(r["delivery_id"], r["status"]) for r in runs] == [(delivery_id, "succeeded")]


def test_a_captured_signature_cannot_be_moved_to_a_fresh_timestamp_or_another_body(
    make_config: Callable[..., Path],
) -> None:
    intake = InProcessIntake(make_config())
    body = fixture_body("invitee.created")
    t, v1 = sign(body, SIGNING_KEY).split(",")
    other = json.loads(body)
    other["payload"]["email"] = "attacker@example.com"
    other_body = json.dumps(other).encode()
    content_type = (b"content-type", b"application/json")
    try:
        fresh_t = intake.post(body, [content_type, (b"vivocalendar-webhook-signature",
                                                    f"t={int(time.time()) + 1},{v1}".encode())])
        elsewhere = intake.post(other_body, [content_type, (b"vivocalendar-webhook-signature", f"{t},{v1}".encode())])
        both_headers = intake.post(other_body, [content_type, (b"vivocalendar-webhook-signature", f"{t},{v1}".encode()),
                                                (b"calendly-webhook-signature", f"{t},{v1}".encode())])

        assert (fresh_t.status, elsewhere.status, both_headers.status) == (401, 401, 401)
        assert intake.stored() == 0
    finally:
        intake.close()
