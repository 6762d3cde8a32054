"""Dramatiq's Redis broker, with consumers woken by a publish instead of polling with backoff.

Dramatiq's Redis consumer finds an empty queue and sleeps, 5 ms the first time, then twice
as long each time up to the worker's idle timeout (100 ms), before it looks again. A message
that arrives in a quiet moment waits out that sleep (at 20 webhooks/s: end-to-end p50 20 ms,
p99 64-71 ms; woken, 8 and 19-26 ms), and a shorter timeout costs an idle worker more CPU.

Here whoever enqueues also publishes on ``<namespace>:<queue>.wake`` (a batch inside the
same MULTI/EXEC as its messages), and a consumer that found nothing waits on that channel:
it looks again as soon as something arrives, and otherwise once per idle timeout, as before
(so messages enqueued by anything that does not publish are still found). The subscription
lasts as long as the consumer, so a publish between a fetch that found nothing and the wait
is not missed: it waits in the socket. A consumer whose prefetch is (half) full waits for
acknowledgements to make room for half a prefetch, then fetches them in one call.

Acknowledgements are sent in batches too. Dramatiq sends each one as a Lua call of its own, a
round trip per message (~0.19 ms of a worker thread's CPU with the hand-offs around it); here a
busy consumer sends those that came in since its last call just before its next fetch, in one
call, or when its wait for room times out (long steps do not hold back finished ones). A
consumer about to wait idle sends them first, and one made while it waits goes at once, so none
waits for work to arrive. A message acknowledged here but not yet in Redis when the process dies
is delivered again, as one the worker died processing is: the engine makes a second delivery of
the same message a no-op.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import uuid4

import redis
from dramatiq import Broker, Message, Middleware
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed

#: Dramatiq's ``ack`` (brokers/redis/dispatch.lua) for many messages: the heartbeat, then each
#: message's data dropped once it is taken out of this worker's unacknowledged set.
ACK_MANY = """
redis.call("zadd", KEYS[1], ARGV[1], ARGV[2])
for i = 3, #ARGV do
    if redis.call("srem", KEYS[2], ARGV[i]) > 0 then
        redis.call("hdel", KEYS[3], ARGV[i])
    end
end
"""


def wake_channel(namespace: str, queue_name: str) -> str:
    """The channel a publish on wakes the consumers of ``queue_name`` (delay queues included)."""
    return f"{namespace}:{queue_name}.wake"


class WakingRedisBroker(RedisBroker):
    """A ``RedisBroker`` whose enqueues wake the consumers that wait on an empty queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsent_acks: dict[str, _UnsentAcks] = {}

    def unsent_acks(self, queue_name: str) -> _UnsentAcks:
        """The acknowledgements made on ``queue_name`` that are not in Redis yet."""
        return self._unsent_acks.setdefault(queue_name, _UnsentAcks())

    @property
    def consumer_class(self) -> type[Consumer]:
        return _WakingConsumer

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        enqueued = super().enqueue(message, delay=delay)
        try:
            self.client.publish(wake_channel(self.namespace, enqueued.queue_name), b"")
        except redis.RedisError:
            pass  # the message is queued: a consumer finds it at its next idle poll
        return enqueued

    def enqueue_batch(self, queue_name: str, actor_name: str, args: list[tuple[Any, ...]]) -> None:
        """One ready message per ``args`` on ``queue_name``, in one round trip, consumers woken.

        ``enqueue`` costs a round trip and a Lua script per message (the script also beats the
        sender's heartbeat, which only consumers need). The intake's group commit hands over a
        batch at a time, so the batch is written as the script writes a message, in one
        MULTI/EXEC: data into ``<ns>:<queue>.msgs``, ids onto ``<ns>:<queue>`` (the layout
        documented at the top of dramatiq's ``brokers/redis/dispatch.lua``; the end-to-end tests
        consume these messages with Dramatiq's own worker), and the publish. The middleware's
        enqueue hooks run as they would.
        """
        if not args:
            return
        messages = []
        for message_args in args:
            # The message's own new id doubles as its Redis id (a retry is enqueued afresh, with a new one).
            message_id = str(uuid4())
            messages.append(Message(queue_name=queue_name, actor_name=actor_name, args=message_args, kwargs={},
                                    options={"redis_message_id": message_id}, message_id=message_id))
        hooks = _enqueue_hooks(self)
        for message in messages if hooks else ():
            self.emit_before("enqueue", message, None)
        queue_key = f"{self.namespace}:{queue_name}"
        pipeline = self.client.pipeline(transaction=True)
        pipeline.hset(f"{queue_key}.msgs", mapping={m.message_id: m.encode() for m in messages})
        pipeline.rpush(queue_key, *(m.message_id for m in messages))
        pipeline.publish(wake_channel(self.namespace, queue_name), b"")
        pipeline.execute()
        for message in messages if hooks else ():
            self.emit_after("enqueue", message, None)


def _enqueue_hooks(broker: Broker) -> bool:
    """Whether any middleware on ``broker`` has enqueue hooks (Dramatiq's defaults have none)."""
    return any(type(m).before_enqueue is not Middleware.before_enqueue
               or type(m).after_enqueue is not Middleware.after_enqueue for m in broker.middleware)


class _UnsentAcks:
    """Acknowledgements made and not yet sent, for one queue of one broker.

    Kept by the broker, not by a consumer: Dramatiq replaces a consumer whose connection failed,
    and the new one sends what the old one could not. Otherwise those messages would stay
    fetched-but-unacknowledged in Redis until the process ends, then run again (as no-ops).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []
        self.idle = False  # the consumer waits with no fetch to come: an acknowledgement is sent at once


class _WakingConsumer(_RedisConsumer):  # type: ignore[misc]  # Dramatiq's own consumer, waiting differently
    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        # Refilled half a prefetch at a time: a fetch per acknowledged message cost a Lua call
        # and a thread hand-off each (a drain's CPU per run rose by half). Not a delay queue's:
        # its prefetch is thousands of messages held until their time, and a retry due in a
        # second must not wait for half of them to fall due before it is even fetched.
        self._refill = 1 if queue_name == dq_name(q_name(queue_name)) else max(1, prefetch // 2)
        self._room = threading.Event()  # set when acknowledgements make room for a refill
        self._unsent = broker.unsent_acks(queue_name)
        with self._unsent.lock:
            self._unsent.idle = False
        self._ack_many = broker.client.register_script(ACK_MANY)
        namespace = broker.namespace
        self._ack_keys = [f"{namespace}:__heartbeats__", f"{namespace}:__acks__.{broker.broker_id}.{queue_name}",
                          f"{namespace}:{queue_name}.msgs"]
        self._wake = broker.client.pubsub(ignore_subscribe_messages=True)
        try:
            self._wake.subscribe(wake_channel(broker.namespace, queue_name))
        except redis.ConnectionError as exc:
            self._wake.close()
            raise ConnectionClosed(exc) from None

    def ack(self, message: MessageProxy) -> None:
        """Sent with the next fetch, or now if the consumer waits idle (see the module's docstring)."""
        with self._unsent.lock:
            self._unsent.ids.append(message.options["redis_message_id"])
            now = self._unsent.idle
        self.queued_message_ids.discard(message.message_id)
        if now:
            self._send_acks(raise_on_error=False)
        self._made_room()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        finally:
            self._made_room()

    def _made_room(self) -> None:
        if self.prefetch - self.outstanding_message_count >= self._refill:
            self._room.set()

    def __next__(self) -> MessageProxy | None:
        """The next message; None after waiting, so the worker's consumer thread can see to its chores."""
        try:
            if not self.message_cache:
                room = self.prefetch - self.outstanding_message_count
                if room < self._refill:
                    self._room.clear()
                    if self.prefetch - self.outstanding_message_count < self._refill:  # not acknowledged meanwhile
                        if not self._room.wait(self.timeout / 1000):
                            self._send_acks()  # long-running work: those already done go now
                    return None
                self._send_acks()
                # Dramatiq's own consumer skips a None too (a message whose data is gone).
                self.message_cache = [data for data in self.broker.do_fetch(self.queue_name, room) if data is not None]
                if not self.message_cache:
                    self._wait_idle()
                    return None
            message = Message.decode(self.message_cache.pop(0))
            self.queued_message_ids.add(message.message_id)
            return MessageProxy(message)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def _send_acks(self, *, raise_on_error: bool = True) -> None:
        """Send the acknowledgements made since the last call, in one round trip.

        Ones that could not be sent stay for the next call (sending one twice is harmless).
        """
        unsent = self._unsent
        with unsent.lock:
            acks, unsent.ids = unsent.ids, []
        if not acks:
            return
        try:
            self._ack_many(keys=self._ack_keys, args=[current_millis(), self.broker.broker_id, *acks])
        except redis.RedisError:
            with unsent.lock:
                unsent.ids[:0] = acks
            if raise_on_error:
                raise

    def _wait_idle(self) -> None:
        """Until something is published on our channel, or the idle timeout; earlier publishes
        still unread count too (they may be for messages the fetch did not see yet)."""
        with self._unsent.lock:
            self._unsent.idle = True
        try:
            self._send_acks()
            woken: Any = self._wake.get_message(timeout=self.timeout / 1000)
            while woken is not None:  # read the rest, so that the next empty fetch waits again
                woken = self._wake.get_message(timeout=0)
        finally:
            with self._unsent.lock:
                self._unsent.idle = False

    def close(self) -> None:
        try:
            self._send_acks(raise_on_error=False)
            self._wake.close()
        finally:
            super().close()
