"""``/metrics``: valid Prometheus text whose counters move when a webhook is processed."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Vivoflow, fixture_body, wait_until


def scrape(vivoflow: Vivoflow) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = vivoflow.http.get(vivoflow.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_when_a_webhook_is_processed(vivoflow: Vivoflow) -> None:
    before = scrape(vivoflow)

    delivery_id = vivoflow.post(fixture_body("invitee.canceled")).json()["delivery_id"]
    vivoflow.wait_for_runs(delivery_id)
    vivoflow.post(fixture_body("invitee.canceled"))  # the same again: a duplicate
    vivoflow.post(b"{}", key="wrong-key")

    after = wait_until(lambda: (s := scrape(vivoflow)) and value(
        s, "vivoflow_runs_finished_total", recipe="cancel-followup", status="succeeded") > value(
        before, "vivoflow_runs_finished_total", recipe="cancel-followup", status="succeeded") and s)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("vivoflow_webhooks_total", outcome="accepted") == 1
    assert moved("vivoflow_webhooks_total", outcome="duplicate") == 1
    assert moved("vivoflow_webhooks_total", outcome="unauthorized") == 1
    assert moved("vivoflow_runs_finished_total", recipe="cancel-followup", status="succeeded") == 1
    assert moved("vivoflow_steps_finished_total", connector="email", status="succeeded") == 2
    assert moved("vivoflow_step_duration_seconds_count", connector="email") == 2
    assert moved("vivoflow_end_to_end_lag_seconds_count", recipe="cancel-followup") == 2
    assert ("vivoflow_queue_depth", (("queue", "ready"),)) in after
    assert ("vivoflow_scheduled_steps", ()) in after
    assert ("vivoflow_scheduled_step_overdue_seconds", ()) in after
