"""An httpx transport on the standard library's ``http.client``: the same exchange for a third of the CPU.

httpx's default transport (httpcore + h11, pure Python) cost ~240 µs of CPU for one small POST
on loopback; ``http.client`` does the same exchange in ~95 µs, and the outgoing call was the
largest piece of a worker's run. Connectors keep httpx's API (``Request``, ``Response``, its
errors, content decoding, timeouts); only the wire part changes. Proxies set in the environment
are still served by httpx's own transports (``Client`` mounts them before this one is asked).

Idle connections are kept per (scheme, host, port). One that has sat idle longer than
``KEEPALIVE_SECONDS``, or whose socket has something to read (the server closed it, or sent
bytes nobody asked for), is closed instead of reused: a request is never written to a
connection the server is known to have given up, and none is ever sent twice by this layer.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx

#: An idle connection older than this is not reused (httpcore's default expiry; servers often close at 5-60 s).
KEEPALIVE_SECONDS = 5.0
#: Idle connections kept per host; more are closed when handed back.
MAX_IDLE_PER_HOST = 16
#: What one read of the answer's body asks for.
CHUNK = 64 * 1024

_Key = tuple[str, str, int]
T = TypeVar("T")


class StdlibTransport(httpx.BaseTransport):
    """``httpx.BaseTransport`` over pooled ``http.client`` connections (HTTP/1.1, TLS by ``ssl_context``)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._idle: dict[_Key, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        key = (scheme, url.raw_host.decode("ascii"), url.port or (443 if scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        body = request.read()
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        connection = self._checkout(key)
        try:
            if connection.sock is None:
                connection.timeout = timeouts.get("connect")
                _timed(timeouts.get("connect"), httpx.ConnectTimeout, httpx.ConnectError,
                       connection.connect)
            connection.sock.settimeout(timeouts.get("write"))
            try:
                connection.putrequest(request.method, url.raw_path.decode("ascii"),
                                      skip_host=True, skip_accept_encoding=True)
                for name, value in request.headers.raw:
                    connection.putheader(name, value)
            except ValueError:  # a header http.client refuses (a line break, say), as h11 would
                # Not quoted: the header may be the Authorization header.
                raise httpx.LocalProtocolError("a header name or value is not valid HTTP") from None
            _timed(timeouts.get("write"), httpx.WriteTimeout, httpx.WriteError,
                   lambda: connection.endheaders(body or None, encode_chunked=chunked))
            connection.sock.settimeout(timeouts.get("read"))
            answer = _timed(timeouts.get("read"), httpx.ReadTimeout, httpx.ReadError,
                            connection.getresponse)
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            status_code=answer.status,
            headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.getheaders()],
            stream=_Body(self, key, connection, answer),
            extensions={"http_version": b"HTTP/1.1" if answer.version == 11 else b"HTTP/1.0",
                        "reason_phrase": answer.reason.encode("latin-1", "replace")},
        )

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, connection in connections:
                connection.close()

    def _checkout(self, key: _Key) -> http.client.HTTPConnection:
        """A live idle connection to ``key``, else a new (unconnected) one."""
        now = time.monotonic()
        while True:
            with self._lock:
                pool = self._idle.get(key)
                if not pool:
                    break
                since, connection = pool.pop()
            if now - since < KEEPALIVE_SECONDS and not _readable(connection.sock):
                return connection
            connection.close()
        scheme, host, port = key
        connection = (http.client.HTTPSConnection(host, port, context=self._ssl) if scheme == "https"
                      else http.client.HTTPConnection(host, port))
        connection.response_class = _Answer
        return connection

    def _checkin(self, key: _Key, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            pool = self._idle.setdefault(key, [])
            if len(pool) < MAX_IDLE_PER_HOST:
                pool.append((time.monotonic(), connection))
                return
        connection.close()


class _Answer(http.client.HTTPResponse):
    """``http.client``'s response, its header block parsed here instead of by the ``email`` package.

    ``http.client`` hands the header lines to ``email.parser``, a whole MIME parser: 70 µs of a
    worker's CPU for a three-header answer, a twentieth of a run of the bench recipe. The lines are
    read by ``http.client`` as before (its limits on their length and number stay); what follows is
    its own ``begin`` with that one step replaced.
    """

    def begin(self) -> None:
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        while status == http.client.CONTINUE:  # an interim 100 answer: its header block is skipped
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]
            version, status, reason = self._read_status()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.headers = self.msg = _header_block(http.client._read_headers(self.fp))  # type: ignore[attr-defined]
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            if self.length is not None and self.length < 0:
                self.length = None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 \
                or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # no length and no chunks: the body ends when the server closes


def _header_block(lines: list[bytes]) -> http.client.HTTPMessage:
    """Header lines as the ``HTTPMessage`` ``email.parser`` would make of them (compat32): names as
    sent, values with leading blanks and the line break removed; a folded line continues the value
    before it (joined by a space, as RFC 9110 says to read it); a line with no colon is dropped."""
    pairs: list[list[str]] = []
    for raw in lines:
        line = raw.decode("iso-8859-1").rstrip("\r\n")
        if line[:1] in (" ", "\t"):
            if pairs:
                pairs[-1][1] += " " + line.strip(" \t")
            continue
        name, colon, value = line.partition(":")
        if colon:
            pairs.append([name, value.lstrip(" \t")])
    message = http.client.HTTPMessage()
    for name, value in pairs:
        message[name] = value  # appended: a repeated header (Set-Cookie) keeps every value
    return message


class _Body(httpx.SyncByteStream):
    """The answer's body as http.client reads it (length, chunked or to close); the connection
    goes back to the pool only when the body was read to its end and the server keeps it open."""

    def __init__(self, transport: StdlibTransport, key: _Key, connection: http.client.HTTPConnection,
                 answer: http.client.HTTPResponse) -> None:
        self._transport, self._key, self._connection, self._answer = transport, key, connection, answer

    def __iter__(self) -> Iterator[bytes]:
        while chunk := _read(self._answer):
            yield chunk

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        finished = self._answer.isclosed()  # http.client closes the answer once its body is read to the end
        self._answer.close()
        if finished and not self._answer.will_close:
            self._transport._checkin(self._key, connection)
        else:
            connection.close()


def _read(answer: http.client.HTTPResponse) -> bytes:
    try:
        # read(), not read1(): read() marks the answer closed as its last byte comes in, which is
        # what says the connection may carry the next request.
        return answer.read(CHUNK) if not answer.isclosed() else b""
    except TimeoutError:
        raise httpx.ReadTimeout("timed out reading the answer") from None
    except (http.client.HTTPException, OSError) as exc:
        raise httpx.RemoteProtocolError(f"answer cut short: {type(exc).__name__}: {exc}") from None


def _timed(timeout: float | None, on_timeout: type[httpx.TimeoutException], on_error: type[httpx.TransportError],
           step: Callable[[], T]) -> T:
    """Run one phase of the exchange, its failures as the httpx errors its phase would raise."""
    try:
        return step()
    except TimeoutError:
        raise on_timeout(f"timed out after {timeout}s") from None
    except http.client.RemoteDisconnected:
        raise httpx.RemoteProtocolError("the server closed the connection without answering") from None
    except http.client.HTTPException as exc:
        raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:  # refused, reset, unreachable, DNS (gaierror), TLS (SSLError)
        raise on_error(f"{type(exc).__name__}: {exc}") from None


def _readable(sock: socket.socket | None) -> bool:
    """Whether an idle connection's socket has something to read: EOF (closed), or bytes unasked for."""
    if sock is None:
        return True
    poller = select.poll()  # not select(): a worker may hold sockets numbered past 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
