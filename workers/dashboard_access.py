"""Who may use the dashboard and its API, and how a post proves it came from our own page.

Security decisions in one place, each with its reason: the admin token (a Bearer
header, or a login cookie derived from it) or, with no token, loopback clients
only; CSRF tokens for every post a browser makes with ambient credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.requests import Request

SESSION_COOKIE = "vivoflow_session"
#: A login lasts a working day; the cookie says when it was issued, under the token's HMAC.
SESSION_SECONDS = 12 * 3600
#: A form post is a few short fields; anything bigger is not ours.
MAX_FORM_BYTES = 16_384


class Problem(Exception):
    """An answer other than the page: ``status`` and one line saying what to do."""

    def __init__(self, status: int, message: str, *, login: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.login = status, message, login


@dataclass(frozen=True)
class Access:
    """How a request got in (``bearer``, ``session`` or ``loopback``) and the CSRF token its forms carry."""

    via: str
    csrf: str = ""


class Guard:
    """Who may see the dashboard and post to it; every rule has its reason beside it."""

    def __init__(self, token: str) -> None:
        self.token = token
        # Session cookies and CSRF tokens are HMACs keyed by the admin token: the cookie never holds
        # the token itself, and changing the token logs everyone out. With no token, a key of this
        # process signs the CSRF tokens (a page from before a restart must be reloaded).
        self._key = token.encode() if token else secrets.token_bytes(32)

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._mac('session:' + issued)}"

    def _session_ok(self, value: str) -> bool:
        issued, _, mac = value.partition(".")
        if not issued.isdigit() or not 0 <= time.time() - int(issued) < SESSION_SECONDS:
            return False
        return hmac.compare_digest(mac, self._mac("session:" + issued))

    def check(self, request: Request) -> Access:
        if not self.token:
            return self._loopback_only(request)
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not self.token_matches(given.strip()):
                raise Problem(401, "wrong admin token: send Authorization: Bearer <admin.token>")
            return Access("bearer")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and self._session_ok(cookie):
            return Access("session", self._mac("csrf:" + cookie))  # double-submit, bound to this session
        raise Problem(401, "log in with the admin token, or send Authorization: Bearer <admin.token>", login=True)

    def _loopback_only(self, request: Request) -> Access:
        client = request.client.host if request.client else ""
        # Behind a reverse proxy on the same host every visitor arrives from 127.0.0.1: a
        # forwarded request is someone else's, whatever its peer address says.
        if any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-real-ip")):
            raise Problem(401, "admin.token is not set, and this request came through a proxy: "
                               "set admin.token (VIVOFLOW_ADMIN_TOKEN) to use the dashboard from elsewhere")
        if not _loopback_address(client):
            raise Problem(401, "admin.token is not set, so the dashboard answers loopback clients only: "
                               "set admin.token (VIVOFLOW_ADMIN_TOKEN) to open it to this address")
        # DNS rebinding: a web page whose own host name resolves to 127.0.0.1 would otherwise be
        # same-origin with us and could read every page. Loopback mode answers loopback names only.
        host = request.headers.get("host", "")
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        if name != "localhost" and not _loopback_address(name):
            raise Problem(403, f"admin.token is not set: open the dashboard as http://127.0.0.1, not via {host!r}, "
                               "or set admin.token")
        return Access("loopback", self._mac("csrf:loopback"))

    def check_csrf(self, request: Request, access: Access, given: str) -> None:
        """Refuse a post that a page elsewhere could have made with the browser's ambient credentials."""
        if access.via == "bearer":
            return  # a header a cross-site page cannot set: not an ambient credential
        if given and hmac.compare_digest(given, access.csrf):
            return
        browser = "origin" in request.headers or "sec-fetch-site" in request.headers
        if access.via == "loopback" and request.url.path.startswith("/api/") and not browser:
            return  # curl on the machine itself: modern browsers always send Origin on a POST
        raise Problem(403, "missing or stale CSRF token: reload the page and try again")


def _loopback_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


async def read_fields(request: Request) -> dict[str, str]:
    """A posted form (urlencoded) or JSON object, as strings; python-multipart is not needed for either."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Problem(413, f"form larger than {MAX_FORM_BYTES} bytes")
    if not body:
        return {}
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body)
        except ValueError:
            raise Problem(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Problem(400, "body must be a JSON object")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

