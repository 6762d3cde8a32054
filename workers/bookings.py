"""What one booking's deliveries mean together: order, duplicates, supersession, reschedules.

Every decision is made through the store's atomic claims and locks, never
process memory, so two workers on different machines decide the same way. The
checks run in the caller's session (``workers.session``), inside the transaction
that also creates the delivery's runs and claims their first steps.

- **Order**: one invitee's deliveries are processed one at a time (a per-invitee
  lock), in the order the sender created them (envelope ``created_at``): a
  cancellation waits for the booking it cancels if that is still queued.
- **Duplicates**: an invitee is booked once and canceled at most once; a second
  delivery of either (a retry with a new timestamp, or one reconciliation found)
  is recorded as a duplicate and runs nothing.
- **Supersession**: a booking processed after its own cancellation is recorded,
  and its runs are ``skipped`` as superseded: confirming a meeting the invitee
  has already canceled would be wrong.
- **Reschedules**: the two halves (cancel with ``new_invitee``, created with
  ``old_invitee``) arrive in any order; whichever is processed second sees the
  other stored, and one claim per old invitee fires ``invitee.rescheduled`` once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from workers.errors import Busy
from workers.events import Envelope, reschedule_link
from workers.session import Session

BOOKING_EVENTS = ("invitee.created", "invitee.canceled")


@dataclass(frozen=True)
class ReschedulePair:
    old_uri: str
    canceled: dict[str, Any]  # the cancel half's delivery row
    created: dict[str, Any]  # the new booking's delivery row


class Bookings:
    def __init__(self, *, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        # Unique per process and thread: a lock's owner must be this very worker thread.
        self._owner_prefix = f"{os.uname().nodename}:{os.getpid()}"

    def _owner(self) -> str:
        return f"{self._owner_prefix}:{threading.get_ident()}"

    @contextmanager
    def in_order(self, db: Session, delivery: dict[str, Any]) -> Iterator[None]:
        """Hold the invitee's lock while its delivery is processed; ``Busy`` if another worker holds it.

        The lock is taken in the session's open transaction (``Busy`` rolls it back with the
        rest) and released in the delivery's last one. After an error the uncommitted work is
        rolled back and the release committed on its own.
        """
        uri = delivery.get("invitee_uri")
        if not uri:
            yield
            return
        key, owner = f"invitee:{uri}", self._owner()
        if not db.try_lock(key, owner, self.lease_seconds):
            raise Busy(f"invitee {uri} is being processed by another worker")
        # The sender's order, not arrival order: wait for an earlier delivery about this
        # invitee still on the queue, unless it has been waiting longer than a lease
        # (stuck somewhere: order then yields to progress).
        earlier = db.earlier_unprocessed(delivery, time.time() - self.lease_seconds)
        if earlier is not None:
            raise Busy(f"waiting for {earlier}, created earlier for the same invitee")
        try:
            yield
        except BaseException:
            db.rollback()
            db.unlock(key, owner)
            db.commit()
            raise
        db.unlock(key, owner)

    def duplicate_of(self, db: Session, delivery: dict[str, Any]) -> str | None:
        """The delivery this one repeats (same booking event of the same invitee), or None."""
        if delivery["event"] not in BOOKING_EVENTS or not delivery["invitee_uri"]:
            return None
        owner = db.claim(f"booking:{delivery['event']}:{delivery['invitee_uri']}", delivery["id"])
        return None if owner == delivery["id"] else owner

    def superseded_by(self, db: Session, delivery: dict[str, Any]) -> str | None:
        """For a booking: the cancellation of the same invitee processed before it, if any."""
        if delivery["event"] != "invitee.created" or not delivery["invitee_uri"]:
            return None
        canceled = db.find_delivery("invitee.canceled", delivery["invitee_uri"])
        if canceled and canceled["processed_at"] is not None:
            return canceled["id"]
        return None

    def reschedule_pair(self, db: Session, delivery: dict[str, Any], envelope: Envelope) -> ReschedulePair | None:
        """Both halves of the reschedule this delivery belongs to, once both are stored."""
        link = reschedule_link(envelope)
        if link is None:
            return None
        old_uri, new_uri = link
        if envelope.event == "invitee.canceled":
            other = db.find_delivery("invitee.created", new_uri)
            return ReschedulePair(old_uri, delivery, other) if other else None
        other = db.find_delivery("invitee.canceled", old_uri)
        return ReschedulePair(old_uri, other, delivery) if other else None

    def claim_reschedule(self, db: Session, pair: ReschedulePair, owner: str) -> bool:
        """True for exactly one delivery per reschedule (the one that fires ``invitee.rescheduled``)."""
        return db.claim(f"rescheduled:{pair.old_uri}", owner) == owner
