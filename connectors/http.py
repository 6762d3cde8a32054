"""The ``http`` connector: ``http.request``, any HTTP API a recipe needs to call.

Another CRM, a Google Apps Script, a Zapier catch hook: one request per step, credentials from config.

The URL rule: ``url`` is rendered with ``RenderAs.URL``, so a value from the event is percent-encoded
where it lands (``/``, ``?``, ``#`` and ``@`` included, so ``..`` climbs nowhere) and only the recipe's
literal text sets the scheme, host and path. An invitee whose email is ``x@evil.com/../../admin?`` reaches the path
segment ``x%40evil.com%2F..%2F..%2Fadmin%3F`` of the host the author wrote, never another path or
host. An author who means to take a whole URL from a trusted value (an earlier step's output) marks
it ``|safe``. Whatever was rendered must then be an ``http``/``https`` URL with a host, and no
``user:password@``: credentials live in ``connectors.http.auth``, never in a recipe or run history.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors import httpcalls
from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, HeaderText, UrlText, action
from workers.errors import PermanentStepError, StepError

#: Most of a response body kept: the output goes into run history and later steps' context.
BODY_LIMIT = 64 * 1024
#: Response headers worth a later step's attention; the rest stay out of history.
KEPT_HEADERS = ("content-type", "location")
#: A header name as RFC 9110 defines a token; httpx would otherwise fail late, as a transport error.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Control characters (tab aside): a CR/LF would start a new header, others are refused on the wire.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@functools.lru_cache(maxsize=512)
def _parsed(url: str) -> httpx.URL:
    """``httpx.URL(url)``, parsed once per distinct text (URLs are immutable): recipes call the same few
    endpoints, and a parse costs 22 µs, twice a call (checking the input, then sending)."""
    return httpx.URL(url)

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


class BearerAuth(BaseModel):
    """``Authorization: Bearer <token>``, the usual API token."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["bearer"]
    token: SecretStr

    def header(self) -> str:
        return f"Bearer {self.token.get_secret_value()}"

    def secrets(self) -> list[str]:
        """What must never be shown, in every form it is sent."""
        return [self.token.get_secret_value()]


class BasicAuth(BaseModel):
    """``Authorization: Basic …`` (RFC 7617), user and password UTF-8 encoded."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["basic"]
    username: str
    password: SecretStr

    def header(self) -> str:
        return f"Basic {self._encoded()}"

    def secrets(self) -> list[str]:
        """What must never be shown, in every form it is sent."""
        return [self._encoded(), self.password.get_secret_value()]

    def _encoded(self) -> str:
        pair = f"{self.username}:{self.password.get_secret_value()}".encode()
        return base64.b64encode(pair).decode("ascii")


#: Named credentials, picked by ``type``: a recipe says ``auth: crm``, config.yaml holds the secret.
HttpAuth = Annotated[BearerAuth | BasicAuth, Field(discriminator="type")]


class HttpConfig(ConnectorConfig):
    """``connectors.http``: e.g. ``auth: {crm: {type: bearer, token: "${CRM_TOKEN}"}}``."""

    timeout_seconds: float = Field(10, gt=0)
    auth: dict[str, HttpAuth] = {}


def _as_text(value: Any) -> Any:
    """YAML's ``limit: 10`` or ``debug: true`` as the text they stand for (booleans as JSON spells them)."""
    if not isinstance(value, dict):
        return value
    return {key: json.dumps(item) if isinstance(item, bool | int | float) else item for key, item in value.items()}


class RequestInput(ActionInput):
    """Inputs of ``http.request``; ``json`` is written ``json`` in recipes (``json_`` here, off BaseModel's name)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Method = "POST"
    url: UrlText
    # HeaderText: a line break from the event is folded to a space before it gets here.
    headers: dict[str, HeaderText] = {}
    #: Added to the URL's own query string.
    query: dict[str, str] = {}
    json_: Any = Field(None, alias="json")
    body: str | None = None
    #: Statuses that count as success; by default any 2xx.
    expect: list[int] | None = None
    #: A name under ``connectors.http.auth``.
    auth: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _web_url(cls, value: str) -> str:
        value = value.strip()
        try:
            url = _parsed(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"must be an http:// or https:// URL with a host, got {value[:100]!r} "
                "(a whole URL from the event is percent-encoded: mark a trusted one |safe)"
            )
        if url.userinfo:
            raise ValueError("no user:password@ in the URL: name credentials in connectors.http.auth")
        return value

    @field_validator("headers", "query", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> Any:
        return _as_text(value)

    @field_validator("headers")
    @classmethod
    def _header_lines(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if _CONTROL.search(text):
                raise ValueError(f"header {name}: the value contains a line break or control character")
        return value

    @field_validator("expect")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        for status in value or ():
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value

    @model_validator(mode="after")
    def _one_body(self) -> RequestInput:
        if self.json_ is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        if self.auth and any(name.lower() == "authorization" for name in self.headers):
            raise ValueError("give auth or an Authorization header, not both")
        return self


class HttpConnector(Connector):
    """One pooled client for every URL; redirects are never followed (see ``request``)."""

    name = "http"
    config_model = HttpConfig

    config: HttpConfig

    def __init__(self, config: HttpConfig) -> None:
        super().__init__(config)
        self.client = httpcalls.make_client(timeout=config.timeout_seconds)

    def close(self) -> None:
        self.client.close()

    @action("request", input=RequestInput)
    def request(self, inputs: RequestInput, call: ActionCall) -> dict[str, Any]:
        """Call any HTTP API; the status, JSON answer and a few headers become the step's output."""
        url = _parsed(inputs.url)
        if inputs.query:  # merged, not replacing: httpx's params= would drop the URL's own query
            url = url.copy_merge_params(inputs.query)
        headers = _encoded(inputs.headers)
        if not any(name.lower() == "idempotency-key" for name in headers):
            # Many APIs (Stripe-style) dedupe on it; a retried step sends the same key.
            headers["Idempotency-Key"] = call.idempotency_key
        secrets: list[str] = []
        if inputs.auth:
            credentials = self.config.auth.get(inputs.auth)
            if credentials is None:
                raise self.not_configured(f"auth.{inputs.auth}")
            headers["Authorization"] = credentials.header()
            secrets = credentials.secrets()
        # Redirects are not followed: a 3xx could move the request, Authorization and body
        # included, to a host the author never wrote. The status comes back; `expect` may accept it.
        request = self.client.build_request(
            inputs.method, url, headers=headers, json=inputs.json_, content=inputs.body,
        )
        where = f"{url.host}:{url.port}" if url.port else url.host
        try:
            response = httpcalls.send(lambda: self._exchange(request, where), where)
            self._check(response, inputs.expect, where)
        except StepError as exc:
            if not secrets:
                raise
            # A server that echoes the request back could quote the credentials in its error.
            raise type(exc)(_scrub(exc.message, secrets), retry_after=exc.retry_after) from None
        self.log.info("http %s %s answered %s", inputs.method, where, response.status_code)
        return _scrub(_output(response), secrets)

    def _exchange(self, request: httpx.Request, where: str) -> httpx.Response:
        """Send, and read at most ``BODY_LIMIT`` + 1 bytes of the answer: a huge body is not held in memory.

        Returned as a fully read response carrying only the headers we use, so ``httpcalls`` can read it.
        """
        response = self.client.send(request, stream=True, follow_redirects=False)
        body = bytearray()
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > BODY_LIMIT:
                    break
        except httpx.DecodingError:  # not a transport failure: the same bytes would come again
            status = response.status_code
            raise PermanentStepError(f"{where} answered {status} with a body that cannot be decoded") from None
        finally:
            response.close()
        # Content-Encoding is dropped along the rest: iter_bytes already decoded the body.
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() in (*KEPT_HEADERS, "retry-after")]
        return httpx.Response(response.status_code, headers=kept, content=bytes(body), request=request)

    def _check(self, response: httpx.Response, expect: list[int] | None, where: str) -> None:
        """Raise unless the status is expected: 408/429/5xx retryable, the rest permanent."""
        status = response.status_code
        accepted = status in expect if expect else 200 <= status < 300
        if accepted:
            return
        httpcalls.raise_for_status(response, where)
        detail = httpcalls.remote_message(response)
        if 300 <= status < 400:
            location = response.headers.get("location", "")[:200] or "no Location"
            detail = f"redirects are not followed (to {location}): fix the URL, or add {status} to expect"
        wanted = ", ".join(map(str, expect)) if expect else "a 2xx"
        raise PermanentStepError(f"{where} answered {status} (expected {wanted}): {detail}")


def _encoded(headers: dict[str, str]) -> dict[str, str | bytes]:
    """Headers for httpx, which takes only ASCII text: an invitee's "Zoé" goes as UTF-8 bytes."""
    return {name: value if value.isascii() else value.encode() for name, value in headers.items()}


def _scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret sent replaced by ``********`` (the run history's mark)."""
    secrets = sorted((s for s in secrets if s), key=len, reverse=True)
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "********")
        return value
    text = json.dumps(value)
    for secret in secrets:
        text = text.replace(json.dumps(secret)[1:-1], "********")
    return json.loads(text)


def _output(response: httpx.Response) -> dict[str, Any]:
    """``status``, ``json`` (or None) and kept ``headers``; a body that is not JSON comes as ``text``."""
    headers = {name: response.headers.get(name) for name in KEPT_HEADERS}
    output: dict[str, Any] = {"status": response.status_code, "json": None, "headers": headers}
    content = response.content
    if len(content) > BODY_LIMIT:  # cut JSON does not parse: keep its start as text, and say so
        output["text"] = content[:BODY_LIMIT].decode(response.encoding or "utf-8", "replace")
        output["truncated"] = True
        return output
    if not content.strip():
        return output
    try:  # whatever the Content-Type says: Apps Script and many hooks send JSON as text/plain
        output["json"] = json.loads(content)
    except ValueError:
        output["text"] = response.text
    return output
