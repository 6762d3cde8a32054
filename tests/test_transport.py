"""``StdlibTransport`` on the wire: keep-alive, connections the server gave up, TLS, proxies, errors.

The server here is a raw socket server that answers as each test scripts it, so a test sees how
many connections were opened and every request that arrived (a request sent twice would show).
"""

from __future__ import annotations

import gzip
import http.client
import io
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import trustme

from connectors import httpcalls
from connectors.transport import StdlibTransport, _header_block

#: One scripted answer: the raw bytes to send back, and whether to close the connection afterwards.
Answer = tuple[bytes, bool]


def answer(body: bytes = b'{"ok":true}', *, headers: str = "", close: bool = False) -> Answer:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body, close


@dataclass
class RawServer:
    """Answers each request with ``script(n)`` (n counts requests from 0); records what came in."""

    script: Callable[[int], Answer] = lambda _n: answer()
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)  # set each time the server closes one
    release: threading.Event = field(default_factory=threading.Event)  # a script may wait on it

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            reader = conn.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                with self._lock:
                    number = len(self.requests)
                    self.requests.append(head + reader.read(length))
                raw, close = self.script(number)
                conn.sendall(raw)
                if close:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()
            self.closed.set()

    def stop(self) -> None:
        self.release.set()
        self._listener.close()


@pytest.fixture
def server() -> Iterator[RawServer]:
    raw = RawServer()
    yield raw
    raw.stop()


def client(**kwargs: object) -> httpx.Client:
    return httpx.Client(transport=StdlibTransport(**kwargs), timeout=5)  # type: ignore[arg-type]


def test_requests_to_one_host_share_a_kept_alive_connection(server: RawServer) -> None:
    with client() as http:
        answers = [http.post(f"{server.url}/hook", json={"n": n}) for n in range(3)]
    assert [a.json() for a in answers] == [{"ok": True}] * 3
    assert server.connections == 1
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']


def test_a_connection_the_server_closed_while_idle_is_not_written_to(server: RawServer) -> None:
    # The server answers without saying so, then hangs up: the next request goes on a new
    # connection, and arrives once.
    server.script = lambda n: answer(close=n == 0)
    with client() as http:
        assert http.post(f"{server.url}/a", content=b"first").status_code == 200
        assert server.closed.wait(10)
        assert http.post(f"{server.url}/b", content=b"second").status_code == 200
    assert server.connections == 2
    assert [r.split(b" ")[1] for r in server.requests] == [b"/a", b"/b"]


def test_an_answer_with_connection_close_is_not_kept(server: RawServer) -> None:
    server.script = lambda n: answer(headers="Connection: close\r\n", close=True)
    with client() as http:
        for _ in range(2):
            assert http.get(f"{server.url}/x").json() == {"ok": True}
    assert server.connections == 2


def test_an_answer_left_unread_closes_its_connection_and_the_next_request_gets_a_fresh_one(
        server: RawServer) -> None:
    server.script = lambda n: answer(b"x" * 300_000 if n == 0 else b'{"ok":true}')
    with client() as http:
        with http.stream("GET", f"{server.url}/big") as big:
            first = next(big.iter_raw())
        assert 0 < len(first) < 300_000
        assert http.get(f"{server.url}/small").json() == {"ok": True}
    assert server.connections == 2


def test_a_chunked_gzipped_answer_is_read_whole_and_decoded(server: RawServer) -> None:
    packed = gzip.compress(b'{"name": "Zo\xc3\xa9"}')
    halves = (packed[:10], packed[10:])
    body = b"".join(f"{len(h):x}\r\n".encode() + h + b"\r\n" for h in halves) + b"0\r\n\r\n"
    server.script = lambda n: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + body, False)
    with client() as http:
        assert http.get(f"{server.url}/z").json() == {"name": "Zoé"}
        assert http.get(f"{server.url}/z").json() == {"name": "Zoé"}
    assert server.connections == 1  # read to its last chunk: kept


def test_a_head_request_reads_no_body_and_keeps_the_connection(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", False)
    with client() as http:
        assert http.head(f"{server.url}/h").headers["content-length"] == "9"
        assert http.head(f"{server.url}/h").status_code == 200
    assert server.connections == 1


@pytest.mark.parametrize("block", [
    b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n",
    b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\nX-Spaces:  \tpadded  \r\n\r\n",
    b"X-Colons: a:b: c\r\nX-Latin: Zo\xe9\r\n\r\n",
])
def test_the_header_block_is_read_as_the_email_parser_reads_it(block: bytes) -> None:
    lines = http.client._read_headers(io.BytesIO(block))  # type: ignore[attr-defined]
    assert _header_block(lines).items() == http.client.parse_headers(io.BytesIO(block)).items()


def test_a_folded_header_continues_its_value_and_a_line_without_colon_is_dropped(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n\ttwo\r\nnot a header\r\nX-Tag: a\r\n"
                               b"X-Tag: b\r\nContent-Length: 2\r\n\r\nok", False)
    with client() as http:
        got = http.get(f"{server.url}/h")
    assert got.headers["x-folded"] == "one two"
    assert got.headers.get_list("x-tag") == ["a", "b"]
    assert got.text == "ok"


def test_an_interim_100_answer_is_skipped_for_the_real_one(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n"
                               b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi", False)
    with client() as http:
        got = http.post(f"{server.url}/c", content=b"x")
        assert (got.status_code, got.text, "x-interim" in got.headers) == (201, "hi", False)
        assert http.post(f"{server.url}/c", content=b"y").status_code == 201
    assert server.connections == 1


def test_a_body_without_length_ends_with_the_connection_which_is_not_kept(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end", True)
    with client() as http:
        assert http.get(f"{server.url}/a").text == "to the end"
        assert http.get(f"{server.url}/b").text == "to the end"
    assert server.connections == 2


def test_a_204_has_no_body_and_keeps_the_connection(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/1.1 204 No Content\r\n\r\n", False)
    with client() as http:
        assert [http.delete(f"{server.url}/d").status_code for _ in range(2)] == [204, 204]
    assert server.connections == 1


def test_an_unknown_protocol_version_is_a_protocol_error(server: RawServer) -> None:
    server.script = lambda n: (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", True)
    with client() as http, pytest.raises(httpx.RemoteProtocolError):
        http.get(f"{server.url}/v")


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(server: RawServer) -> None:
    with client() as http, pytest.raises(httpx.LocalProtocolError) as refused:
        http.get(f"{server.url}/x", headers={"X-Note": "a\r\nInjected: yes"})
    assert "Injected" not in str(refused.value)
    assert server.requests == []


def test_a_server_that_does_not_answer_in_time_is_a_read_timeout(server: RawServer) -> None:
    def slow(_n: int) -> Answer:
        server.release.wait(30)
        return answer()

    server.script = slow
    with httpx.Client(transport=StdlibTransport(), timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.get(f"{server.url}/slow")


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with client() as http, pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/")


def test_a_server_that_hangs_up_without_answering_is_a_protocol_error(server: RawServer) -> None:
    server.script = lambda n: (b"", True)
    with client() as http, pytest.raises(httpx.RemoteProtocolError):
        http.post(f"{server.url}/x", content=b"once")
    assert len(server.requests) == 1


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


def test_tls_to_a_server_whose_certificate_is_trusted(authority: trustme.CA) -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(served)
    raw = RawServer(tls=served)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    try:
        with client(ssl_context=trusting) as http:
            assert [http.get(f"{raw.url}/s").json() for _ in range(2)] == [{"ok": True}] * 2
        assert raw.connections == 1
    finally:
        raw.stop()


def test_tls_to_a_server_whose_certificate_is_not_trusted_fails_to_connect(authority: trustme.CA) -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(served)
    raw = RawServer(tls=served)
    try:
        with client() as http, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            http.get(f"{raw.url}/s")
        assert raw.requests == []
    finally:
        raw.stop()


def test_a_proxy_named_in_the_environment_still_carries_connector_calls(
        server: RawServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with httpcalls.make_client() as http:
        assert http.get("http://crm.example.invalid/contacts?q=1").json() == {"ok": True}
    assert server.requests[0].startswith(b"GET http://crm.example.invalid/contacts?q=1 HTTP/1.1\r\n")
