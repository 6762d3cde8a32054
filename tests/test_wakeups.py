"""Consumers woken by a publish: a message enqueued while a consumer waits on an empty queue is
fetched then, not at the consumer's next idle poll.

Every consumer here has an idle timeout of a minute: a consumer that only polled would still be
asleep when the test gives up waiting (a generous 20 s, for a loaded machine), so each test fails
if the wake-up does not come. Real Redis, Dramatiq's own message encoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dramatiq import Message

from workers.actors import PROCESS_DELIVERY, Queue
from workers.broker import make_broker
from workers.wakeups import WakingRedisBroker

IDLE_TIMEOUT_MS = 60_000
GIVE_UP_S = 20


@pytest.fixture
def queue(redis_url: str, namespace: str) -> Iterator[Queue]:
    broker = make_broker(redis_url, namespace=namespace)
    assert isinstance(broker, WakingRedisBroker)
    yield Queue(broker, "wakeups")
    broker.close()


def next_message_in_thread(consumer: Any) -> tuple[threading.Thread, list[Any]]:
    """Iterate ``consumer`` in a thread until it yields a message (None means it waited)."""
    got: list[Any] = []

    def fetch() -> None:
        for message in consumer:
            if message is not None:
                got.append(message)
                return

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread, got


def entered(obj: Any, method: str, calls: int = 1) -> threading.Event:
    """An event set when ``obj.method`` is called for the ``calls``-th time (it is called through,
    unchanged): to enqueue only once the consumer waits, which is the case a wake-up is for."""
    event = threading.Event()
    original = getattr(obj, method)
    made = 0

    def observed(*args: Any, **kwargs: Any) -> Any:
        nonlocal made
        made += 1
        if made >= calls:
            event.set()
        return original(*args, **kwargs)

    setattr(obj, method, observed)
    return event


def waits_idle(consumer: Any) -> threading.Event:
    """Set once ``consumer`` waits for a publish. Its first wait returns at once, with the
    subscription's confirmation; the second is the idle one."""
    return entered(consumer._wake, "get_message", calls=2)


def enqueue_by_intake(queue: Queue, delivery_id: str) -> None:
    queue.deliveries([delivery_id])


def enqueue_by_dramatiq(queue: Queue, delivery_id: str) -> None:
    queue.delivery(delivery_id)  # RedisBroker.enqueue, as the CLI, reconcile and retries do


@pytest.mark.parametrize("enqueue", [enqueue_by_intake, enqueue_by_dramatiq], ids=["intake-batch", "broker-enqueue"])
def test_a_waiting_consumer_fetches_a_message_as_soon_as_it_is_enqueued(
        queue: Queue, enqueue: Callable[[Queue, str], None]) -> None:
    consumer = queue.broker.consume(queue.name, prefetch=2, timeout=IDLE_TIMEOUT_MS)
    try:
        waiting = waits_idle(consumer)
        thread, got = next_message_in_thread(consumer)
        assert waiting.wait(GIVE_UP_S)
        enqueue(queue, "dlv_1")
        thread.join(GIVE_UP_S)
        assert not thread.is_alive(), "the consumer slept through the enqueue"
        assert [m.actor_name for m in got] == [PROCESS_DELIVERY]
        assert got[0].args == ("dlv_1",)
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_a_consumer_with_its_prefetch_full_takes_the_next_message_once_one_is_acknowledged(queue: Queue) -> None:
    queue.deliveries(["dlv_1", "dlv_2"])
    consumer = queue.broker.consume(queue.name, prefetch=1, timeout=IDLE_TIMEOUT_MS)
    try:
        first = next(consumer)
        assert first.args == ("dlv_1",)
        waiting = entered(consumer._room, "wait")
        thread, got = next_message_in_thread(consumer)  # full: waits for an acknowledgement
        assert waiting.wait(GIVE_UP_S)
        consumer.ack(first)
        thread.join(GIVE_UP_S)
        assert not thread.is_alive(), "the acknowledgement did not make room"
        assert got[0].args == ("dlv_2",)
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_a_busy_consumer_refills_half_its_prefetch_at_a_time(queue: Queue) -> None:
    """Not a fetch per acknowledgement (a Lua call and a thread hand-off each): a drain's cost."""
    queue.deliveries([f"dlv_{n}" for n in range(8)])
    consumer = queue.broker.consume(queue.name, prefetch=4, timeout=IDLE_TIMEOUT_MS)
    fetched: list[int] = []
    fetch = queue.broker.do_fetch

    def counted(queue_name: str, count: int) -> list[bytes]:
        got = fetch(queue_name, count)
        fetched.append(len(got))
        return got

    queue.broker.do_fetch = counted  # observed, not replaced
    try:
        first = [next(consumer) for _ in range(4)]
        assert fetched == [4]
        waiting = entered(consumer._room, "wait")
        thread, got = next_message_in_thread(consumer)
        assert waiting.wait(GIVE_UP_S)
        consumer.ack(first[0])  # one free slot: not yet worth a fetch
        consumer.ack(first[1])  # two, half the prefetch: refill
        thread.join(GIVE_UP_S)
        assert not thread.is_alive()
        assert fetched == [4, 2] and got[0].args == ("dlv_4",)
    finally:
        consumer.close()


def test_a_delay_queue_consumer_fetches_whenever_it_has_room(queue: Queue) -> None:
    """Its prefetch holds delayed messages until they fall due: a new one is fetched at once."""
    for n in range(3):
        queue.resume(f"run_{n}", delay_ms=3_600_000)
    consumer = queue.broker.consume(f"{queue.name}.DQ", prefetch=4, timeout=IDLE_TIMEOUT_MS)
    try:
        held = [next(consumer) for _ in range(3)]  # an hour away each; one slot of four left
        queue.resume("run_soon", delay_ms=1_000)
        thread, got = next_message_in_thread(consumer)
        thread.join(GIVE_UP_S)
        assert not thread.is_alive(), "the delay queue waited for half its prefetch to fall due"
        assert got[0].args == ("run_soon",)
        for message in [*held, *got]:
            consumer.ack(message)
    finally:
        consumer.close()


def test_a_publish_before_the_wait_is_not_lost(queue: Queue) -> None:
    """A message enqueued between a fetch that found nothing and the wait still wakes the consumer."""
    consumer = queue.broker.consume(queue.name, prefetch=2, timeout=IDLE_TIMEOUT_MS)
    try:
        consumer._wait_idle()  # reads the subscription's confirmation, which returns at once
        queue.deliveries(["dlv_1"])  # published while nobody waits: the subscription keeps it
        waiting = threading.Thread(target=consumer._wait_idle, daemon=True)
        waiting.start()
        waiting.join(GIVE_UP_S)
        assert not waiting.is_alive(), "the publish made before the wait was lost"
        assert next(consumer).args == ("dlv_1",)
    finally:
        consumer.close()


def test_delayed_messages_wake_the_delay_queue_consumer(queue: Queue) -> None:
    consumer = queue.broker.consume(f"{queue.name}.DQ", prefetch=2, timeout=IDLE_TIMEOUT_MS)
    try:
        waiting = waits_idle(consumer)
        thread, got = next_message_in_thread(consumer)
        assert waiting.wait(GIVE_UP_S)
        queue.resume("run_1", delay_ms=50)
        thread.join(GIVE_UP_S)
        assert not thread.is_alive()
        assert got[0].args == ("run_1",) and got[0].options["eta"] > 0
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_a_plain_dramatiq_message_on_the_queue_is_found_by_the_idle_poll(queue: Queue, redis_url: str) -> None:
    """Nothing depends on the publish: a message a plain RedisBroker enqueued is fetched all the same."""
    from dramatiq.brokers.redis import RedisBroker

    plain = RedisBroker(url=redis_url, namespace=queue.broker.namespace)
    plain.declare_queue(queue.name)
    plain.enqueue(Message(queue_name=queue.name, actor_name=PROCESS_DELIVERY, args=("dlv_9",), kwargs={},
                          options={}))
    consumer = queue.broker.consume(queue.name, prefetch=2, timeout=200)
    try:
        message = next(m for m in consumer if m is not None)
        assert message.args == ("dlv_9",)
        consumer.ack(message)
    finally:
        consumer.close()
        plain.close()


def unacknowledged(queue: Queue) -> set[bytes]:
    """The message ids Redis holds as fetched by this broker and not yet acknowledged."""
    broker = queue.broker
    return broker.client.smembers(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue.name}")


def stored(queue: Queue) -> set[bytes]:
    broker = queue.broker
    return set(broker.client.hkeys(f"{broker.namespace}:{queue.name}.msgs"))


def ids(*messages: Any) -> set[bytes]:
    return {m.options["redis_message_id"].encode() for m in messages}


def test_a_busy_consumer_sends_its_acknowledgements_with_its_next_fetch_in_one_call(queue: Queue) -> None:
    """Not a round trip per message (Dramatiq's ack): those made since the last call go just before the fetch."""
    queue.deliveries([f"dlv_{n}" for n in range(6)])
    consumer = queue.broker.consume(queue.name, prefetch=4, timeout=IDLE_TIMEOUT_MS)
    calls: list[list[Any]] = []
    send = consumer._ack_many

    def counted(*, keys: list[str], args: list[Any]) -> Any:
        calls.append(args[2:])
        return send(keys=keys, args=args)

    consumer._ack_many = counted  # observed, not replaced
    try:
        first = [next(consumer) for _ in range(4)]
        consumer.ack(first[0])
        consumer.ack(first[1])
        assert calls == [] and ids(first[0], first[1]) <= unacknowledged(queue)  # not yet: no fetch was due
        assert next(consumer).args == ("dlv_4",)  # the refill: acknowledgements, then the fetch
        assert calls == [[m.options["redis_message_id"] for m in first[:2]]]
        assert not ids(first[0], first[1]) & (unacknowledged(queue) | stored(queue))
        assert ids(first[2], first[3]) <= unacknowledged(queue)
    finally:
        consumer.close()


def test_an_acknowledgement_made_while_the_consumer_waits_idle_is_sent_at_once(queue: Queue) -> None:
    queue.deliveries(["dlv_1"])
    consumer = queue.broker.consume(queue.name, prefetch=2, timeout=IDLE_TIMEOUT_MS)
    try:
        message = next(consumer)
        waiting = waits_idle(consumer)
        thread, _ = next_message_in_thread(consumer)  # the queue is empty: it waits a minute
        assert waiting.wait(GIVE_UP_S)
        set_heartbeat(queue, 0)  # the empty fetch before the wait beat it; no fetch comes after
        consumer.ack(message)
        assert not ids(message) & (unacknowledged(queue) | stored(queue))
        assert heartbeat(queue) > 0  # the batch beats this worker's heartbeat, as Dramatiq's ack does
        queue.deliveries(["dlv_2"])  # lets the waiting thread finish
        thread.join(GIVE_UP_S)
    finally:
        consumer.close()


def test_acknowledgements_still_unsent_when_the_consumer_closes_are_sent(queue: Queue) -> None:
    queue.deliveries(["dlv_1", "dlv_2"])
    consumer = queue.broker.consume(queue.name, prefetch=2, timeout=IDLE_TIMEOUT_MS)
    messages = [next(consumer), next(consumer)]
    for message in messages:
        consumer.ack(message)
    assert ids(*messages) <= unacknowledged(queue)
    consumer.close()
    assert not ids(*messages) & (unacknowledged(queue) | stored(queue))


def test_a_consumer_that_replaces_one_sends_the_acknowledgements_it_left_unsent(queue: Queue) -> None:
    """Dramatiq replaces a consumer whose connection failed: the new one sends what the old one could not."""
    queue.deliveries(["dlv_1", "dlv_2"])
    failed = queue.broker.consume(queue.name, prefetch=1, timeout=IDLE_TIMEOUT_MS)
    replacement = None
    try:
        message = next(failed)
        failed.ack(message)  # not sent: no fetch came after it, and the consumer never went idle
        assert ids(message) <= unacknowledged(queue)
        replacement = queue.broker.consume(queue.name, prefetch=1, timeout=IDLE_TIMEOUT_MS)
        assert next(replacement).args == ("dlv_2",)
        assert not ids(message) & (unacknowledged(queue) | stored(queue))
    finally:
        failed.close()
        if replacement is not None:
            replacement.close()


def heartbeat(queue: Queue) -> float:
    broker = queue.broker
    return float(broker.client.zscore(f"{broker.namespace}:__heartbeats__", broker.broker_id) or 0)


def set_heartbeat(queue: Queue, value: float) -> None:
    broker = queue.broker
    broker.client.zadd(f"{broker.namespace}:__heartbeats__", {broker.broker_id: value})
