"""The same promises with RabbitMQ as the broker (``broker.url: amqp://…``).

The tests are the Redis ones, collected here again under a RabbitMQ marker:
end to end, duplicates, retries, delayed steps and their cancellation skip.
Everything beyond the queue (dedupe, locks, claims) lives in the store, so
RabbitMQ users need no Redis at all.
"""

from __future__ import annotations

import pytest

from tests.test_engine import (  # noqa: F401 - collected under this module's marker
    run_recipe,
    test_delayed_step_is_scheduled_then_sent,
    test_delayed_step_is_skipped_when_the_invitee_cancels_first,
    test_retryable_smtp_error_retries_the_step_without_repeating_earlier_ones,
)
from tests.test_pipeline import (  # noqa: F401
    test_cancellation_sends_the_followup_with_cancel_fields_and_utm,
    test_duplicate_delivery_runs_once,
)

pytestmark = pytest.mark.brokers("rabbitmq")
