"""Webhook signatures: ``t=<unix seconds>,v1=<hex>`` with HMAC-SHA256 over ``"<t>.<raw body>"``.

Shared by the intake (verify) and ``vivoflow simulate`` (sign), so both follow
one reading of the format.
"""

from __future__ import annotations

import hashlib
import hmac
import time

#: Vivocalendar's header, and Calendly's, which the same intake serves.
SIGNATURE_HEADERS = ("vivocalendar-webhook-signature", "calendly-webhook-signature")


class SignatureError(ValueError):
    """Why a signature was refused, in words safe to send back to the caller."""


def sign(body: bytes, key: str | bytes, timestamp: int | None = None) -> str:
    """The header value for ``body`` signed with ``key`` at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    secret = key.encode() if isinstance(key, str) else key
    digest = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(header: str | None, body: bytes, keys: list[bytes], *, tolerance: int, now: float | None = None) -> None:
    """Raise ``SignatureError`` unless one ``v1`` matches one key, within ``tolerance`` seconds.

    Several ``v1`` entries (and several keys) are allowed so a signing key can be
    rotated without downtime; every comparison is constant-time.
    """
    if not header:
        raise SignatureError("missing signature header (Vivocalendar-Webhook-Signature)")
    if not keys:
        raise SignatureError("no signing key is configured (intake.signing_key)")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(",")[:32]:  # a bounded number of entries: no work amplification
        name, _, value = part.strip().partition("=")
        if name == "t":
            # Digits only: int() would also take " 17…", "+17…" or "1_7…", none of them the format.
            if not (value.isascii() and value.isdigit()):
                raise SignatureError("signature timestamp is not an integer")
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value.strip())
    if timestamp is None or not candidates:
        raise SignatureError("malformed signature header: expected t=<unix seconds>,v1=<hex>")
    current = time.time() if now is None else now
    # Compared, not subtracted: an int too large for a float (t=10**400) must be refused, not crash.
    if not current - tolerance <= timestamp <= current + tolerance:
        raise SignatureError("signature timestamp outside the tolerance (replayed or clock skew)")
    signed = f"{timestamp}.".encode() + body
    expected = [hmac.new(key, signed, hashlib.sha256).hexdigest() for key in keys]
    matched = False
    for candidate in candidates:
        for digest in expected:
            # No early exit: the time taken does not depend on which entry matched.
            matched |= hmac.compare_digest(candidate.encode(), digest.encode())
    if not matched:
        raise SignatureError("signature does not match")
