"""The ~3 KB signed webhook bodies the load generators send: every one a distinct delivery.

The intake dedupes on (event, payload ``uri``, envelope ``created_at``) and the engine runs a booking
event once per invitee, so each body gets a uri of its own (``…/invitees/<tag>-<n>``); the sink reads
the same id back from the JSON the recipe posts, to count arrivals exactly once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

SIGNING_KEY = "bench-signing-key"
SIGNATURE_HEADER = "Vivocalendar-Webhook-Signature"
WEBHOOK_PATH = "/webhooks/vivocalendar"
URI_PREFIX = "https://api.vivocalendar.com/scheduled_events/BENCH/invitees/"
TARGET_BYTES = 3072
_ID, _CREATED = "@@ID@@", "@@CREATED@@"


def _template() -> tuple[bytes, bytes, bytes]:
    """The sample ``invitee.canceled`` as compact JSON, padded with answers to ~3 KB, split at the two holes."""
    from workers.samples import load_sample

    data = load_sample("invitee.canceled")
    data["created_at"] = _CREATED
    data["payload"]["uri"] = URI_PREFIX + _ID
    answers = data["payload"]["questions_and_answers"]
    while len(json.dumps(data, separators=(",", ":"))) < TARGET_BYTES - 40:
        answers.append({"question": f"Anything else we should know? ({len(answers)})",
                        "answer": "We run three teams across two time zones and want one booking page.",
                        "position": len(answers)})
    text = json.dumps(data, separators=(",", ":"))
    head, rest = text.split(_CREATED)
    middle, tail = rest.split(_ID)
    return head.encode(), middle.encode(), tail.encode()


class Bodies:
    """Body number ``i`` of a series ``tag``: same shape, unique uri and created_at."""

    def __init__(self, tag: str, key: str = SIGNING_KEY) -> None:
        self.tag = tag
        self.key = key.encode()
        self.head, self.middle, self.tail = _template()

    def uid(self, i: int) -> str:
        return f"{self.tag}-{i:07d}"

    def body(self, i: int) -> bytes:
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
        return self.head + created + self.middle + self.uid(i).encode() + self.tail

    def signature(self, body: bytes, t: int | None = None) -> str:
        t = int(time.time()) if t is None else t
        digest = hmac.new(self.key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        return f"t={t},v1={digest}"

    def request(self, i: int, host: str, path: str = WEBHOOK_PATH) -> bytes:
        """The whole HTTP/1.1 request (keep-alive) for body ``i``, signed now."""
        body = self.body(i)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{SIGNATURE_HEADER}: {self.signature(body)}\r\n\r\n")
        return head.encode() + body


def uid_of(uri: str) -> str:
    """The bench id at the end of an invitee uri (what the sink counts)."""
    return uri.rsplit("/", 1)[-1]
