"""What every HTTP-speaking connector shares: one pooled client and one reading of failures.

Timeouts, connection errors, 429 (with its ``Retry-After``) and 5xx are
retryable; other 4xx are permanent. Either way the error carries the remote
service's own message, never a credential.
"""

from __future__ import annotations

import email.utils
import http.cookiejar
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx._utils import get_environment_proxies  # httpx's own reading of the proxy variables

from connectors.transport import StdlibTransport
from workers.errors import PermanentStepError, RetryableStepError

#: Longest a remote service's message is quoted in an error, so history stays readable.
MESSAGE_LIMIT = 500


def make_client(base_url: str = "", *, timeout: float = 10.0, headers: dict[str, str] | None = None) -> httpx.Client:
    """The one client a connector keeps per worker process (connections are pooled).

    Requests go out through ``StdlibTransport`` (``connectors.transport``), or through the proxy
    the environment names for their URL. Its cookie jar keeps nothing: the client serves every
    run, so a cookie one invitee's call received would otherwise ride along on the next invitee's.
    """
    client = httpx.Client(
        base_url=base_url, timeout=httpx.Timeout(timeout), headers=headers or {}, follow_redirects=False,
        transport=StdlibTransport(), mounts=_environment_proxies(),
    )
    # httpx has no public way to keep a Cookies of one's own (its setter copies into a plain one).
    # Were the attribute renamed, cookies would reach the jar below, which keeps none: slower, not wrong.
    client._cookies = _NoCookies(_NoCookieJar())
    return client


def _environment_proxies() -> dict[str, httpx.BaseTransport | None]:
    """``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` as httpx reads them.

    httpx leaves the environment's proxies out once a client is given its own transport; they
    are mounted here so that a worker behind a proxy still reaches the outside (httpx's own
    transport serves proxied URLs; ``None`` is a ``NO_PROXY`` entry, served by ours).
    """
    return {pattern: None if proxy is None else httpx.HTTPTransport(proxy=proxy)
            for pattern, proxy in get_environment_proxies().items()}


class _NoCookieJar(http.cookiejar.CookieJar):
    """A jar that neither reads ``Set-Cookie`` nor stores a cookie.

    A jar whose policy refuses every domain still parsed each response's cookies before
    refusing them, 85 µs a call.
    """

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """The client's cookies: none taken from an answer, none added to a request.

    httpx's own builds urllib adapters of the request and the answer before asking its jar
    anything: 37 µs a call, to hand them to a jar that keeps nothing.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds, from either form the header takes (seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def remote_message(response: httpx.Response) -> str:
    """The service's own words: a JSON ``message``/``error``/``title``, else the body's start.

    A server may quote the request back: the credentials it was sent are blanked from the quote.
    """
    try:
        data: Any = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("message", "error", "title", "detail", "error_description"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return _without_credentials(value, response)[:MESSAGE_LIMIT]
    text = _without_credentials(response.text.strip(), response)
    return text[:MESSAGE_LIMIT] or response.reason_phrase


def _without_credentials(text: str, response: httpx.Response) -> str:
    try:
        sent = response.request.headers.get("authorization", "")
    except RuntimeError:  # a response built without its request
        return text
    for secret in (sent, sent.partition(" ")[2]):  # "Bearer xyz", then "xyz" alone
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def raise_for_status(response: httpx.Response, service: str) -> None:
    """Raise the step error class a failed response deserves; return for 2xx/3xx."""
    status = response.status_code
    if status < 400:
        return
    message = f"{service} answered {status}: {remote_message(response)}"
    if status == 429 or status >= 500 or status == 408:
        raise RetryableStepError(message, retry_after=retry_after(response))
    raise PermanentStepError(message)


def send(call: Callable[[], httpx.Response], service: str) -> httpx.Response:
    """Run one request; transport failures become retryable step errors (no secret in them)."""
    try:
        return call()
    except httpx.TimeoutException:
        raise RetryableStepError(f"{service} did not answer in time") from None
    except httpx.LocalProtocolError:
        # Its text quotes the offending header, which may be the Authorization header.
        raise PermanentStepError(f"{service}: request not sent: a header is invalid (check the credentials)") from None
    except httpx.TransportError as exc:
        raise RetryableStepError(f"cannot reach {service}: {type(exc).__name__}: {exc}") from None
    except httpx.InvalidURL:
        # Not quoted: a URL can carry a credential (an incoming webhook's path).
        raise PermanentStepError(f"{service}: invalid URL") from None
