"""Hostile requests at the intake (SPEC §4): random and mutated bodies, headers and signatures.

Whatever arrives, the answer is a 4xx or a 2xx, never a 5xx and never a traceback in the log,
and a delivery is stored only for a correctly signed envelope that the workers can read back.
The properties run in-process (``InProcessIntake``: the real app, store and Redis, no socket);
the cases that are about the connection itself (slow senders, huge headers) go over real HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import SIGNING_KEY, Vivoflow, fixture_body
from tests.security.conftest import assert_no_traceback
from tests.security.inprocess import Answer, InProcessIntake
from tests.test_intake import read_response
from workers.events import Envelope
from workers.schema import deliveries
from workers.signing import sign

VIVO = b"vivocalendar-webhook-signature"
CALENDLY = b"calendly-webhook-signature"
JSON_TYPE = (b"content-type", b"application/json")
#: A small body limit, so that random bodies reach it too.
LIMIT = 4096
#: Enough examples to shake out the common mistakes, few enough for `make test` (seconds each).
FUZZ = settings(max_examples=150, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
SAMPLES = ("invitee.created", "invitee.canceled", "routing_form_submission.created", "invitee_no_show.created")


def signed(body: bytes, *, key: str = SIGNING_KEY, timestamp: int | None = None) -> list[tuple[bytes, bytes]]:
    return [JSON_TYPE, (VIVO, sign(body, key, timestamp).encode())]


def assert_refused(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]


# -- strategies -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
#: Envelope-shaped JSON with wrong types in the right places, and right types with odd values.
envelopes = st.fixed_dictionaries(
    {},
    optional={"event": json_values | st.sampled_from(["invitee.created", "invitee.canceled", ""]),
              "payload": json_values | st.dictionaries(st.text(max_size=10), json_values, max_size=4),
              "created_at": json_values | st.just("2027-02-02T09:00:00.000000Z"),
              "created_by": json_values},
)
bodies = (
    st.binary(max_size=2 * LIMIT)
    | json_values.map(lambda v: json.dumps(v).encode())
    | envelopes.map(lambda v: json.dumps(v).encode())
    | st.sampled_from(SAMPLES).map(fixture_body)
)
#: Header values as a socket could carry them: any byte but CR and LF.
header_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
other_headers = st.lists(st.tuples(
    st.sampled_from([b"x-forwarded-for", b"user-agent", b"content-type", b"accept", b"x-random",
                     b"vivocalendar-webhook-signature-v2", b"authorization"]),
    header_bytes,
), max_size=4)
hex_digests = st.text("0123456789abcdef", min_size=0, max_size=70)
#: ``t=…,v1=…`` shaped, with every part free to go wrong.
structured_signatures = st.lists(
    st.one_of(
        st.integers(min_value=-2**70, max_value=2**70).map(lambda t: f"t={t}"),
        st.just(f"t={int(time.time())}"),
        hex_digests.map(lambda h: f"v1={h}"),
        st.text(max_size=12).map(lambda s: f"v0={s}"),
        st.text(max_size=20),
    ),
    max_size=40,
).map(lambda parts: ",".join(parts).encode("utf-8", "surrogatepass"))
signature_values = structured_signatures | header_bytes


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few byte-level edits: flips, cuts, insertions, repeats."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate", "token"]))
        if edit == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "cut":
            del data[at:at + draw(st.integers(1, 16))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 40))
        elif edit == "truncate":
            del data[at:]
        else:  # JSON tokens that parsers disagree about
            data[at:at] = draw(st.sampled_from([b"NaN", b"-Infinity", b"1e999999", b'"\\ud800"', b"[[[[[[[[",
                                                b'"\\u0000"', b"\xff", b"\xc3", b'"a":1,"a":2,', b"{}", b"null"]))
    return bytes(data)


# -- properties -------------------------------------------------------------------------------------


def test_unsigned_and_badly_signed_requests_are_refused_and_nothing_is_stored(
    inprocess: Callable[..., InProcessIntake], caplog: pytest.LogCaptureFixture,
) -> None:
    intake = inprocess(intake={"max_body_bytes": LIMIT})

    @FUZZ
    @given(body=bodies, headers=other_headers,
           signature=st.none() | st.tuples(st.sampled_from([VIVO, CALENDLY]), signature_values))
    def refused(body: bytes, headers: list[tuple[bytes, bytes]], signature: tuple[bytes, bytes] | None) -> None:
        sent = [*headers, *([signature] if signature else [])]
        answer = intake.post(body, sent)
        # Too large is said before anything else, as the body is read; then the signature.
        assert_refused(answer, 413 if len(body) > LIMIT else 401)

    refused()
    assert intake.stored() == 0
    assert_no_traceback(caplog)


def test_a_valid_signature_mutated_is_refused_unless_the_true_digest_is_still_in_it(
    inprocess: Callable[..., InProcessIntake], caplog: pytest.LogCaptureFixture,
) -> None:
    intake = inprocess()
    body = fixture_body("invitee.canceled")
    now = int(time.time())
    header = sign(body, SIGNING_KEY, now).encode()
    digest = header.split(b"v1=")[1]

    @FUZZ
    @given(header=mutated(header) | st.lists(signature_values, max_size=3).map(lambda extra: b",".join(
        [*extra, header]) if extra else header))
    def check(header: bytes) -> None:
        before = intake.stored()
        answer = intake.post(body, [JSON_TYPE, (VIVO, header)])
        assert answer.status in (200, 202, 401), (answer.status, answer.body)
        if answer.status == 401:
            assert intake.stored() == before
            return
        # Accepted: only possible with the true digest, for this body at the time signed.
        entries = [part.strip() for part in header.decode("latin-1").split(",")][:32]
        assert f"v1={digest.decode()}" in entries
        assert any(e.partition("=")[0] == "t" and e.partition("=")[2] == str(now) for e in entries)

    check()
    assert intake.stored() <= 1
    assert_no_traceback(caplog)


def test_a_signed_body_changed_after_signing_is_refused(
    inprocess: Callable[..., InProcessIntake], caplog: pytest.LogCaptureFixture,
) -> None:
    intake = inprocess()
    original = fixture_body("invitee.created")
    headers = signed(original)

    @FUZZ
    @given(body=mutated(original))
    def check(body: bytes) -> None:
        answer = intake.post(body, headers)
        if body == original:
            assert answer.status in (200, 202)
        else:
            assert_refused(answer, 401)

    check()
    assert intake.stored() <= 1
    assert_no_traceback(caplog)


def test_any_signed_body_is_answered_and_stored_only_as_an_envelope_the_workers_can_read(
    inprocess: Callable[..., InProcessIntake], caplog: pytest.LogCaptureFixture,
) -> None:
    intake = inprocess(intake={"max_body_bytes": LIMIT})

    @FUZZ
    @given(body=bodies | st.sampled_from(SAMPLES).map(fixture_body).flatmap(mutated),
           chunk=st.none() | st.integers(1, 700))
    def check(body: bytes, chunk: int | None) -> None:
        before = intake.stored()
        answer = intake.post(body, signed(body), chunk=chunk)
        assert answer.status in (200, 202, 400, 413), (answer.status, answer.body)
        if answer.status != 202:
            assert intake.stored() == before
            if answer.status != 200:
                assert answer.json()["error"]
            return
        assert intake.stored() == before + 1
        delivery = intake.app.store.get_delivery(answer.json()["delivery_id"])
        assert delivery["body"].encode() == body
        # What the workers will do with it (engine.run_delivery): it must parse, as the intake said.
        envelope = Envelope.model_validate_json(delivery["body"])
        assert delivery["event"] == envelope.event

    check()
    assert_no_traceback(caplog)


# -- the explicit cases -----------------------------------------------------------------------------

HUGE_INTEGER = b"1" + b"0" * 5000  # 10**5000: more digits than Python reads from text (4300)
EXPLICIT: dict[str, tuple[bytes, int]] = {
    # name: (body, expected status); signed correctly, so only the content decides.
    "deeply-nested-arrays": (b'{"event": "invitee.created", "payload": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
                             400),
    "deeply-nested-objects": (b'{"event": "invitee.created", "payload": ' + b'{"a": ' * 3000 + b"1"
                              + b"}" * 3000 + b"}", 400),
    "nested-deeper-than-the-workers-read": (
        b'{"event": "invitee.created", "payload": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}", 400),
    "exponent-past-any-float": (b'{"event": "invitee.created", "payload": {"n": 1e999999}}', 202),
    "integer-of-5001-digits": (b'{"event": "invitee.created", "payload": {"n": ' + HUGE_INTEGER + b"}}", 400),
    "lone-surrogate-escape": (b'{"event": "invitee.created", "payload": {"name": "\\ud800"}}', 400),
    "invalid-utf-8-in-a-string": (b'{"event": "invitee.created", "payload": {"name": "\xc3\x28"}}', 400),
    "utf-8-byte-order-mark": (b"\xef\xbb\xbf" + fixture_body("invitee.created"), 400),
    "nan-and-infinity": (b'{"event": "invitee.created", "payload": {"a": NaN, "b": -Infinity}}', 202),
}


@pytest.mark.parametrize(("body", "status"), EXPLICIT.values(), ids=EXPLICIT.keys())
def test_hostile_json_is_answered_and_only_readable_envelopes_are_kept(
    inprocess: Callable[..., InProcessIntake], caplog: pytest.LogCaptureFixture, body: bytes, status: int,
) -> None:
    intake = inprocess()

    answer = intake.post(body, signed(body))

    assert answer.status == status, answer.body
    assert intake.stored() == (1 if status == 202 else 0)
    if status == 202:
        stored = intake.app.store.get_delivery(answer.json()["delivery_id"])
        Envelope.model_validate_json(stored["body"])  # the workers read it as the intake did
    else:
        assert answer.json()["error"]
    assert_no_traceback(caplog)


def test_duplicate_keys_mean_the_same_to_the_intake_and_the_workers(
    inprocess: Callable[..., InProcessIntake],
) -> None:
    """Both parsers keep the last of repeated keys: the event stored is the event the workers run."""
    intake = inprocess()
    # The first "event" says created, the envelope's own (later) one says canceled.
    body = b'{"event": "invitee.created", ' + fixture_body("invitee.canceled")[1:]
    assert json.loads(body)["event"] == "invitee.canceled"

    answer = intake.post(body, signed(body))

    assert answer.status == 202, answer.body
    delivery = intake.app.store.get_delivery(answer.json()["delivery_id"])
    assert delivery["event"] == "invitee.canceled"
    assert Envelope.model_validate_json(delivery["body"]).event == "invitee.canceled"


def test_a_body_sent_in_many_small_chunks_past_the_limit_is_413(
    inprocess: Callable[..., InProcessIntake],
) -> None:
    """In-process twin of test_intake's chunked tests: one-byte chunks, no Content-Length."""
    intake = inprocess(intake={"max_body_bytes": LIMIT})
    body = fixture_body("invitee.created", padding="x" * LIMIT)

    assert_refused(intake.post(body, signed(body), chunk=1), 413)
    assert intake.stored() == 0


def entries_header(body: bytes, count: int, *, match_at: int | None) -> str:
    """``t=…`` then ``count`` ``v1=`` entries, the true digest at ``match_at`` (or nowhere)."""
    now = int(time.time())
    digest = hmac.new(SIGNING_KEY.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    wrong = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]
    if match_at is not None:
        wrong[match_at] = digest
    return ",".join([f"t={now}", *(f"v1={d}" for d in wrong)])


def test_several_v1_entries_with_one_matching_are_accepted(inprocess: Callable[..., InProcessIntake]) -> None:
    intake = inprocess()
    body = fixture_body("invitee.created")

    answer = intake.post(body, [JSON_TYPE, (VIVO, entries_header(body, 30, match_at=29).encode())])

    assert answer.status == 202, answer.body


def test_ten_thousand_v1_entries_are_refused_quickly_without_checking_each(
    inprocess: Callable[..., InProcessIntake],
) -> None:
    """Only the first 32 entries are read: 10,000 cost no more HMAC work than 32 would.

    The true digest placed past them is not found, which shows the rest were never compared.
    """
    intake = inprocess()
    body = fixture_body("invitee.created")
    flood = entries_header(body, 10_000, match_at=None).encode()
    late_match = entries_header(body, 10_000, match_at=5_000).encode()

    started = time.perf_counter()
    refused = intake.post(body, [JSON_TYPE, (VIVO, flood)])
    late = intake.post(body, [JSON_TYPE, (VIVO, late_match)])
    took = time.perf_counter() - started

    assert_refused(refused, 401)
    assert_refused(late, 401)
    assert took < 1.0
    assert intake.stored() == 0


def test_ten_thousand_v1_entries_over_http_are_refused_and_nothing_is_stored(
    start_intake: Callable[..., Vivoflow], all_logs: pytest.LogCaptureFixture,
) -> None:
    """Over a socket, uvicorn refuses a 700 kB header itself (400, then it hangs up): never a 2xx or a 5xx."""
    flow = start_intake()
    body = fixture_body("invitee.created")
    request = (f"POST {flow.config.intake.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nVivocalendar-Webhook-Signature: "
               f"{entries_header(body, 10_000, match_at=None)}\r\n\r\n").encode() + body

    with socket.create_connection(("127.0.0.1", flow.config.intake.port), timeout=5) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server stopped reading and hung up: refused before the end
            pass
        try:
            status_line = sock.makefile("rb").readline()
        except OSError:
            status_line = b""

    if status_line:
        assert 400 <= int(status_line.split()[1]) < 500, status_line
    assert flow.post(fixture_body("invitee.canceled")).status_code == 202  # and it still serves others
    with flow.store.engine.connect() as conn:
        assert conn.execute(sa.select(deliveries.c.event)).scalars().all() == ["invitee.canceled"]
    assert_no_traceback(all_logs)


# -- a slow sender ----------------------------------------------------------------------------------


def test_a_body_trickled_slower_than_the_read_timeout_is_408_and_the_connection_is_closed(
    start_intake: Callable[..., Vivoflow], all_logs: pytest.LogCaptureFixture,
) -> None:
    """Slow-loris: headers at once, then a byte every 0.2 s of a 1000-byte body, against a 1 s timeout."""
    flow = start_intake(intake={"read_timeout_seconds": 1})
    body = fixture_body("invitee.created")
    head = (f"POST {flow.config.intake.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nVivocalendar-Webhook-Signature: {sign(body, SIGNING_KEY)}\r\n\r\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", flow.config.intake.port), timeout=5) as sock:
        sock.sendall(head.encode())
        sent = 0
        while sent < len(body) and not _readable(sock, 0.2):
            sock.sendall(body[sent:sent + 1])
            sent += 1
        # Meanwhile the intake still serves everyone else.
        assert flow.post(fixture_body("invitee.canceled")).status_code == 202
        status, answer = read_response(sock)
        took = time.monotonic() - started
        closed = _hung_up(sock)  # the connection is not held any longer

    assert status == 408
    assert json.loads(answer)["error"]
    assert 1 <= took < 5
    assert sent < len(body)
    assert closed
    with flow.store.engine.connect() as conn:
        assert conn.execute(sa.select(deliveries.c.event)).scalars().all() == ["invitee.canceled"]
    assert_no_traceback(all_logs)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the server closed the connection (a FIN, or a reset for the bytes it left unread)."""
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _readable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def test_read_timeout_defaults_to_30_seconds(make_config: Callable[..., Any]) -> None:
    from workers.config import load_config

    assert load_config(make_config()).intake.read_timeout_seconds == 30
