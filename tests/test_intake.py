"""The intake contract (SPEC §4) over real HTTP: every answer, and what the store keeps for it.

Requests go through uvicorn to the real intake, with real Redis and a real SQLite store behind it.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.harness import SIGNING_KEY, Vivoflow, fixture_body, wait_until
from workers.broker import EmbeddedRedis
from workers.config import SIGNING_KEY_FILE
from workers.schema import deliveries
from workers.signing import sign

VIVO_HEADER = "Vivocalendar-Webhook-Signature"
CALENDLY_HEADER = "Calendly-Webhook-Signature"
#: A small body limit for the 413 tests; the shipped samples fit under it.
SMALL_LIMIT = 4096


@pytest.fixture
def intake(start_intake: Callable[..., Vivoflow]) -> Vivoflow:
    return start_intake()


def stored_deliveries(flow: Vivoflow) -> int:
    with flow.store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar_one()


def send(flow: Vivoflow, body: bytes | Iterator[bytes], headers: dict[str, str]) -> httpx.Response:
    """POST ``body`` with exactly ``headers`` (no signature added)."""
    return flow.http.post(flow.webhook_url, content=body, headers={"Content-Type": "application/json", **headers})


def padded_body(size: int) -> bytes:
    """A valid envelope of exactly ``size`` bytes (an extra top-level key, which the intake tolerates)."""
    base = fixture_body("invitee.created", padding="")
    body = fixture_body("invitee.created", padding="x" * (size - len(base)))
    assert len(body) == size
    return body


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error


# -- accepted and duplicate deliveries ------------------------------------------------------------


def test_new_delivery_is_answered_202_stored_and_enqueued(vivoflow: Vivoflow) -> None:
    response = vivoflow.post(fixture_body("invitee.canceled"))

    assert response.status_code == 202
    delivery_id = response.json()["delivery_id"]
    assert response.json() == {"delivery_id": delivery_id, "duplicate": False}
    assert stored_deliveries(vivoflow) == 1
    assert vivoflow.store.get_delivery(delivery_id)["event"] == "invitee.canceled"
    # Enqueued: the worker picks it up.
    vivoflow.wait_processed(delivery_id)


def test_same_delivery_again_is_200_duplicate_with_the_first_id(intake: Vivoflow) -> None:
    body = fixture_body("invitee.canceled")

    first = intake.post(body)
    again = intake.post(body)
    # The sender may re-serialise a retry: the key is event + payload uri + envelope created_at, not the bytes.
    reformatted = intake.post(json.dumps(json.loads(body), indent=2).encode())

    assert first.status_code == 202
    first_id = first.json()["delivery_id"]
    for response in (again, reformatted):
        assert response.status_code == 200
        assert response.json() == {"delivery_id": first_id, "duplicate": True}
    assert stored_deliveries(intake) == 1


def test_same_event_and_uri_with_another_created_at_is_a_new_delivery(intake: Vivoflow) -> None:
    first = intake.post(fixture_body("invitee.canceled", created_at="2027-02-02T09:00:00.000000Z"))
    second = intake.post(fixture_body("invitee.canceled", created_at="2027-02-02T09:05:00.000000Z"))

    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json()["duplicate"] is False
    assert second.json()["delivery_id"] != first.json()["delivery_id"]
    assert stored_deliveries(intake) == 2


def test_event_no_recipe_knows_is_stored_but_runs_nothing(vivoflow: Vivoflow) -> None:
    response = vivoflow.post(fixture_body("invitee.created", event="invitee.teleported"))

    assert response.status_code == 202
    delivery_id = response.json()["delivery_id"]
    assert response.json() == {"delivery_id": delivery_id, "duplicate": False}
    vivoflow.wait_processed(delivery_id)
    assert vivoflow.runs(delivery_id) == []
    assert stored_deliveries(vivoflow) == 1


# -- signatures (401) -------------------------------------------------------------------------------

#: Each case turns a valid body into (headers, body sent) that must be refused.
BadSignature = Callable[[bytes], tuple[dict[str, str], bytes]]
BAD_SIGNATURES: dict[str, BadSignature] = {
    "missing-header": lambda body: ({}, body),
    "empty-header": lambda body: ({VIVO_HEADER: ""}, body),
    "not-the-t-v1-format": lambda body: ({VIVO_HEADER: "sha256=abcdef"}, body),
    "no-v1-entry": lambda body: ({VIVO_HEADER: f"t={int(time.time())}"}, body),
    "no-t-entry": lambda body: ({VIVO_HEADER: sign(body, SIGNING_KEY).split(",", 1)[1]}, body),
    "t-not-an-integer": lambda body: ({VIVO_HEADER: "t=soon," + sign(body, SIGNING_KEY).split(",", 1)[1]}, body),
    "t-with-a-sign-or-spaces-int-would-take": lambda body: (
        {VIVO_HEADER: sign(body, SIGNING_KEY).replace("t=", "t=+")}, body),
    "wrong-key": lambda body: ({VIVO_HEADER: sign(body, "not-the-key")}, body),
    "body-altered-after-signing": lambda body: (
        {VIVO_HEADER: sign(body, SIGNING_KEY)}, body.replace(b"Jamie", b"James")),
    "timestamp-older-than-the-tolerance": lambda body: (
        {VIVO_HEADER: sign(body, SIGNING_KEY, int(time.time()) - 1000)}, body),
    "timestamp-far-in-the-future": lambda body: (
        {VIVO_HEADER: sign(body, SIGNING_KEY, int(time.time()) + 1000)}, body),
    "calendly-header-with-the-wrong-key": lambda body: ({CALENDLY_HEADER: sign(body, "not-the-key")}, body),
}


@pytest.mark.parametrize("make_request", BAD_SIGNATURES.values(), ids=BAD_SIGNATURES.keys())
def test_bad_signature_is_401_and_nothing_is_stored(intake: Vivoflow, make_request: BadSignature) -> None:
    headers, body = make_request(fixture_body("invitee.canceled"))

    response = send(intake, body, headers)

    assert_error(response, 401)
    assert stored_deliveries(intake) == 0


def _several_v1_one_matching(body: bytes) -> dict[str, str]:
    timestamp, good = sign(body, SIGNING_KEY).split(",")
    return {VIVO_HEADER: f"{timestamp},v1={'0' * 64},{good},v1={sign(body, 'old-key').split('=')[-1]}"}


GOOD_SIGNATURES: dict[str, Callable[[bytes], dict[str, str]]] = {
    "calendly-header": lambda body: {CALENDLY_HEADER: sign(body, SIGNING_KEY)},
    "several-v1-entries-one-matching": _several_v1_one_matching,
    "timestamp-inside-the-tolerance": lambda body: {VIVO_HEADER: sign(body, SIGNING_KEY, int(time.time()) - 100)},
}


@pytest.mark.parametrize("make_headers", GOOD_SIGNATURES.values(), ids=GOOD_SIGNATURES.keys())
def test_signature_variants_are_accepted(intake: Vivoflow, make_headers: Callable[[bytes], dict[str, str]]) -> None:
    body = fixture_body("invitee.canceled")

    response = send(intake, body, make_headers(body))

    assert response.status_code == 202, response.text
    assert stored_deliveries(intake) == 1


def test_extra_signing_keys_are_accepted_alongside_the_main_one(start_intake: Callable[..., Vivoflow]) -> None:
    flow = start_intake(intake={"signing_keys": ["second-key"]})

    with_second = flow.post(fixture_body("invitee.canceled"), key="second-key")
    with_main = flow.post(fixture_body("invitee.created"))
    with_unknown = flow.post(fixture_body("invitee_no_show.created"), key="third-key")

    assert (with_second.status_code, with_main.status_code) == (202, 202)
    assert_error(with_unknown, 401)
    assert stored_deliveries(flow) == 2


def test_the_key_vivoflow_subscribe_stored_is_accepted(start_intake: Callable[..., Vivoflow]) -> None:
    flow = start_intake()
    assert_error(flow.post(fixture_body("invitee.canceled"), key="subscribed-key"), 401)

    # Where `vivoflow subscribe` keeps the key it generated; the running intake picks it up
    # (it looks at the file at most once a second).
    (flow.config.broker.data_dir / SIGNING_KEY_FILE).write_text("subscribed-key\n")

    wait_until(lambda: flow.post(fixture_body("invitee.canceled"), key="subscribed-key").status_code == 202,
               timeout=5, interval=0.2)
    assert flow.post(fixture_body("invitee.created")).status_code == 202


# -- body size (413) --------------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted_and_one_byte_over_is_413(start_intake: Callable[..., Vivoflow]) -> None:
    flow = start_intake(intake={"max_body_bytes": SMALL_LIMIT})

    over = flow.post(padded_body(SMALL_LIMIT + 1))
    at_limit = flow.post(padded_body(SMALL_LIMIT))

    assert_error(over, 413)
    assert at_limit.status_code == 202, at_limit.text
    assert stored_deliveries(flow) == 1


def test_chunked_body_past_the_limit_is_413_and_one_within_is_accepted(
    start_intake: Callable[..., Vivoflow],
) -> None:
    flow = start_intake(intake={"max_body_bytes": SMALL_LIMIT})

    def chunked(body: bytes) -> Iterator[bytes]:  # a generator: httpx sends no Content-Length
        yield from (body[i:i + 500] for i in range(0, len(body), 500))

    big, small = padded_body(SMALL_LIMIT + 1), fixture_body("invitee.canceled")
    over = send(flow, chunked(big), {VIVO_HEADER: sign(big, SIGNING_KEY)})
    assert "content-length" not in over.request.headers
    assert_error(over, 413)
    assert stored_deliveries(flow) == 0

    within = send(flow, chunked(small), {VIVO_HEADER: sign(small, SIGNING_KEY)})
    assert within.status_code == 202, within.text
    assert stored_deliveries(flow) == 1


def test_huge_chunked_stream_is_refused_while_it_is_still_arriving(start_intake: Callable[..., Vivoflow]) -> None:
    """200 MB offered in 64 KiB chunks: the 413 comes long before the sender runs out.

    httpx writes a whole body before it reads the answer, so this speaks HTTP/1.1 on a raw
    socket and stops sending as soon as the answer is there.
    """
    flow = start_intake(intake={"max_body_bytes": SMALL_LIMIT})
    total_chunks = 200 * 1024 * 1024 // 65536
    taken = 0

    def chunks() -> Iterator[bytes]:
        nonlocal taken
        for _ in range(total_chunks):
            taken += 1
            yield b"x" * 65536

    signature = sign(b"", SIGNING_KEY)  # the size is checked first, as the body is read
    with socket.create_connection(("127.0.0.1", flow.config.intake.port), timeout=5) as sock:
        sock.sendall((
            f"POST {flow.config.intake.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n{VIVO_HEADER}: {signature}\r\n\r\n"
        ).encode())
        for chunk in chunks():
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is in
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed, or stopped reading and the buffers are full
                break
        status, body = read_response(sock)

    assert status == 413
    assert json.loads(body)["error"]
    assert taken < total_chunks // 10
    assert stored_deliveries(flow) == 0


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and body of one HTTP/1.1 response with a Content-Length."""
    stream = sock.makefile("rb")
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


# -- content (400) ----------------------------------------------------------------------------------

BAD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not-json": b"event=invitee.created",
    "invalid-utf-8": b'{"event": "invitee.created", "payload": {"name": "\xff\xfe"}}',
    "json-array": b'[{"event": "invitee.created", "payload": {}}]',
    "json-string": b'"invitee.created"',
    "no-event": b'{"created_at": "2027-02-02T09:00:00Z", "payload": {"uri": "https://x"}}',
    "no-payload": b'{"created_at": "2027-02-02T09:00:00Z", "event": "invitee.created"}',
    "event-not-a-string": b'{"event": 42, "payload": {}}',
    "payload-not-an-object": b'{"event": "invitee.created", "payload": "https://x"}',
    "deeply-nested-unterminated": b"[" * 100_000,
    "deeply-nested-payload": b'{"event": "invitee.created", "payload": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_signed_body_that_is_not_an_envelope_is_400_and_nothing_is_stored(intake: Vivoflow, body: bytes) -> None:
    response = intake.post(body)

    assert_error(response, 400)
    assert stored_deliveries(intake) == 0


# -- broker or store down (503) ---------------------------------------------------------------------


def test_broker_down_is_503_with_nothing_stored_and_readyz_names_the_broker(
    make_config: Callable[..., Path], tmp_path: Path,
) -> None:
    broker = EmbeddedRedis(tmp_path / "broker")
    try:
        url = broker.start()
        with Vivoflow(make_config(broker={"url": url}), worker=False) as flow:
            broker.stop()
            body = fixture_body("invitee.canceled")

            response = flow.post(body)
            retry = flow.post(body)  # still down: a 503 again, not a "duplicate" of a withdrawn delivery
            ready = flow.http.get(flow.url + "/readyz")
            health = flow.http.get(flow.url + "/healthz")

            assert_error(response, 503)
            assert_error(retry, 503)
            assert stored_deliveries(flow) == 0
            assert ready.status_code == 503
            assert ready.json()["status"] != "ok"
            assert ready.json()["broker"].startswith("unavailable")
            assert ready.json()["store"] == "ok"
            assert health.status_code == 200
    finally:
        broker.stop()


class UnreadableStore:
    """The intake's SQLite files overwritten in place with garbage, and put back afterwards.

    In place, because open connections keep reading a replaced or moved file; garbage over
    the database, its WAL and its shared-memory index makes the next statement raise
    ``DatabaseError: file is not a database``, as a damaged disk would.
    """

    def __init__(self, flow: Vivoflow) -> None:
        database = Path(flow.store.engine.url.database)
        self.files = [p for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
        self.saved: dict[Path, bytes] = {}

    def __enter__(self) -> UnreadableStore:
        for path in self.files:
            self.saved[path] = path.read_bytes()
            with path.open("r+b") as file:
                file.write(bytes(range(256)) * (max(len(self.saved[path]), 4096) // 256))
        return self

    def __exit__(self, *exc: object) -> None:
        for path, content in self.saved.items():
            with path.open("r+b") as file:
                file.write(content)
                file.truncate()


def test_unreadable_store_is_503_and_the_senders_retry_is_accepted_once_it_is_back(intake: Vivoflow) -> None:
    body = fixture_body("invitee.canceled")

    with UnreadableStore(intake):
        response = intake.post(body)
        health = intake.http.get(intake.url + "/healthz")
    retry = intake.post(body)

    assert_error(response, 503)
    assert health.status_code == 200
    # Nothing was half-written: the retry is a new delivery, not a duplicate.
    assert retry.status_code == 202, retry.text
    assert retry.json()["duplicate"] is False
    assert stored_deliveries(intake) == 1


def test_readyz_names_the_store_when_it_cannot_be_read(intake: Vivoflow) -> None:
    with UnreadableStore(intake):
        ready = intake.http.get(intake.url + "/readyz")

    assert ready.status_code == 503
    assert ready.json()["store"].startswith("unavailable")
    assert ready.json()["broker"] == "ok"


# -- probes and methods -----------------------------------------------------------------------------


def test_healthz_and_readyz_answer_ok_when_store_and_broker_are_up(intake: Vivoflow) -> None:
    health = intake.http.get(intake.url + "/healthz")
    ready = intake.http.get(intake.url + "/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ok", "store": "ok", "broker": "ok"})


def test_get_on_the_webhook_path_is_405(intake: Vivoflow) -> None:
    response = intake.http.get(intake.webhook_url)

    assert response.status_code == 405
    assert stored_deliveries(intake) == 0
