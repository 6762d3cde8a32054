"""The ``email`` connector: ``email.send`` over SMTP, or into an outbox folder when no host is set.

Addresses and the subject are checked in the input model, so nothing from an invitee can add a header.
"""

from __future__ import annotations

import hashlib
import os
import re
import smtplib
import ssl
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any

import icalendar
from pydantic import ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from connectors.base import (
    ActionCall,
    ActionInput,
    ConfigPath,
    Connector,
    ConnectorConfig,
    HeaderText,
    HtmlText,
    action,
)
from workers.errors import PermanentStepError, RetryableStepError

#: Every character that some mail parser may read as the end of a header line.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def parse_addresses(value: str | list[str] | None) -> list[Address]:
    """Parse ``"Name <a@b>"``, bare or comma-separated addresses; anything doubtful is a ValueError.

    Rejected rather than repaired: a line break in an address is an injection attempt or a broken
    template, and mail sent to a guess of what was meant is worse than a failed step.
    """
    items = [value] if isinstance(value, str) else list(value or [])
    found: list[Address] = []
    for item in items:
        if _LINE_BREAKS.search(item):
            raise ValueError(f"address {item!r} contains a line break")
        text = item.strip().strip(",").strip()  # a trailing comma from a template loop is harmless
        if not text:
            continue
        for name, addr in getaddresses([text]):
            found.append(_address(name, addr, item))
    return found


def _address(name: str, addr: str, original: str) -> Address:
    try:
        local, _, domain = addr.rpartition("@")
        if not local or not domain:
            raise ValueError("no local part or domain")
        if not local.isascii():
            raise ValueError("non-ASCII local parts need SMTPUTF8, which is not supported")
        return Address(display_name=name, username=local, domain=domain.encode("idna").decode("ascii"))
    except (ValueError, IndexError, HeaderParseError, UnicodeError) as exc:
        raise ValueError(f"not a valid email address: {original!r} ({exc})") from None


class EmailConfig(ConnectorConfig):
    """``connectors.email``: with ``host`` empty, mail is written to ``outbox_dir`` instead of sent."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    host: str = ""
    port: int = 587
    from_: str = Field("vivoflow <noreply@localhost>", alias="from")
    username: str = ""
    password: SecretStr = SecretStr("")
    #: Upgrade the plain connection; ignored with ``ssl`` (already encrypted from the first byte).
    starttls: bool = True
    ssl: bool = False
    timeout_seconds: float = 10
    #: validate_default: the default too must hang from the config folder, not the working directory.
    outbox_dir: ConfigPath = Field(Path("data/outbox"), validate_default=True)

    @field_validator("from_")
    @classmethod
    def _one_sender(cls, value: str) -> str:
        # A bad sender is a config error at start-up, not a failure on every step.
        if len(parse_addresses(value)) != 1:
            raise ValueError("must be exactly one address, like 'Team <noreply@example.com>'")
        return value

    def sender(self) -> Address:
        return parse_addresses(self.from_)[0]


class SendInput(ActionInput):
    """Inputs of ``email.send``; after validation ``to``/``cc``/``bcc`` are lists of checked addresses."""

    to: str | list[str]
    cc: str | list[str] | None = None
    bcc: str | list[str] | None = None
    reply_to: str | None = None
    subject: HeaderText
    text: str | None = None
    html: HtmlText | None = None
    ics: bool = False

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _addresses(cls, value: str | list[str] | None, info: ValidationInfo) -> list[str]:
        found = [str(address) for address in parse_addresses(value)]
        if info.field_name == "to" and not found:
            raise ValueError("needs at least one address")
        return found

    @field_validator("reply_to")
    @classmethod
    def _reply_to(cls, value: str | None) -> str | None:
        return ", ".join(str(address) for address in parse_addresses(value)) or None

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # The rendering layer already folds event values; this also covers the recipe's own text.
        return _LINE_BREAKS.sub(" ", value).strip()

    @model_validator(mode="after")
    def _has_body(self) -> SendInput:
        if not self.text and not self.html:
            raise ValueError("email.send needs a body: give text or html (or both)")
        return self

    def envelope_recipients(self) -> list[str]:
        """Every address that gets a copy, Bcc included, bare as SMTP's RCPT TO wants them."""
        listed = [*self.to, *(self.cc or []), *(self.bcc or [])]
        return [address.addr_spec for address in parse_addresses(listed)]


def message_id(idempotency_key: str, sender: Address) -> str:
    """Derived from the step, so a retried or replayed send carries the same id (receivers dedupe)."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{sender.domain or 'vivoflow.local'}>"


def meeting_ics(event: Mapping[str, Any], key: str) -> str:
    """The event's meeting as an RFC 5545 calendar (METHOD:PUBLISH), times in UTC.

    UTC avoids shipping VTIMEZONE blocks; calendar apps show the time in the reader's own zone.
    """
    meeting = event.get("meeting")
    if not meeting:
        raise PermanentStepError("ics: this event has no meeting to attach")
    start, end = _instant(meeting.get("start_time"), "start_time"), meeting.get("end_time")
    invitee = event.get("invitee") or {}
    uri = meeting.get("uri") or key
    vevent = icalendar.Event()
    vevent.add("uid", f"{hashlib.sha256(str(uri).encode()).hexdigest()[:32]}@vivoflow")
    vevent.add("dtstamp", datetime.now(UTC))
    vevent.add("dtstart", start)
    vevent.add("dtend", _instant(end, "end_time") if end else start)
    vevent.add("summary", meeting.get("name") or "Meeting")
    location = meeting.get("location")
    if isinstance(location, Mapping):  # {"type": "zoom", "join_url": …} or {"location": "Room 4"}
        location = next((location[k] for k in ("location", "join_url", "url") if location.get(k)), None)
    if location:
        vevent.add("location", str(location))
    if invitee.get("email"):
        vevent.add("attendee", f"mailto:{invitee['email']}", parameters={"CN": invitee.get("name") or ""})
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//vivoflow//email.send//EN")
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    calendar.add_component(vevent)
    return calendar.to_ical().decode("utf-8")


def _instant(value: Any, name: str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise PermanentStepError(f"ics: meeting.{name} is not a timezone-aware time ({value!r})")
    return value.astimezone(UTC)


class EmailConnector(Connector):
    """Sends one message per step; one SMTP connection per send, since pooled ones go stale."""

    name = "email"
    config_model = EmailConfig

    config: EmailConfig

    @action("send", input=SendInput)
    def send(self, inputs: SendInput, call: ActionCall) -> dict[str, Any]:
        """Send an email (text, HTML or both), optionally with the meeting attached as an .ics."""
        sender = self.config.sender()
        msg = self._build(inputs, call, sender)
        everyone = inputs.envelope_recipients()
        if not self.config.host:
            path = self._write_outbox(msg, call.idempotency_key, inputs.bcc)
            where, subject = _display(path), _short(inputs.subject)
            line = 'email to %s "%s" written to %s (no SMTP host set)'
            self.log.info(line, ", ".join(everyone), subject, where)
            return {"message_id": msg["Message-ID"], "path": str(path)}
        refused = self._send_smtp(msg, sender.addr_spec, everyone)
        if refused:
            self.log.warning("email: some recipients refused: %s", refused)
            return {"message_id": msg["Message-ID"], "refused": refused}
        return {"message_id": msg["Message-ID"]}

    def _build(self, inputs: SendInput, call: ActionCall, sender: Address) -> EmailMessage:
        """The message as the recipients see it: no Bcc header, which only the envelope carries."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = sender
        msg["To"] = ", ".join(inputs.to)
        if inputs.cc:
            msg["Cc"] = ", ".join(inputs.cc)
        if inputs.reply_to:
            msg["Reply-To"] = inputs.reply_to
        msg["Subject"] = inputs.subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = message_id(call.idempotency_key, sender)
        if inputs.text and inputs.html:
            msg.set_content(inputs.text)
            msg.add_alternative(inputs.html, subtype="html")
        elif inputs.html:
            msg.set_content(inputs.html, subtype="html")
        else:
            msg.set_content(inputs.text or "")
        if inputs.ics:
            ics = meeting_ics(call.event, call.idempotency_key)
            msg.add_attachment(ics, subtype="calendar", filename="invite.ics", params={"method": "PUBLISH"})
        return msg

    def _write_outbox(self, msg: EmailMessage, key: str, bcc: list[str] | None) -> Path:
        """Atomically (temp file, then rename) write ``<key>.eml``: a retried step rewrites one file.

        The file is private to the user (mkstemp's 0600): it holds invitees' personal data.
        """
        outbox = Path(self.config.outbox_dir)
        path = outbox / f"{_safe_name(key)}.eml"
        if bcc:  # kept in the file, like a sent-mail copy, so the reader sees every recipient
            msg["Bcc"] = ", ".join(bcc)
        try:
            outbox.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=outbox, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(msg.as_bytes())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise RetryableStepError(f"email: cannot write {path}: {exc.strerror or exc}") from None
        return path

    def _send_smtp(self, msg: EmailMessage, mail_from: str, rcpt: list[str]) -> dict[str, str]:
        """One SMTP session; errors become retryable (4xx, network) or permanent (5xx, auth, TLS)."""
        cfg = self.config
        where = f"SMTP {cfg.host}:{cfg.port}"
        try:
            smtp_cls = smtplib.SMTP_SSL if cfg.ssl else smtplib.SMTP
            with smtp_cls(cfg.host, cfg.port, timeout=cfg.timeout_seconds) as smtp:
                if cfg.starttls and not cfg.ssl:
                    smtp.ehlo_or_helo_if_needed()
                    if not smtp.has_extn("starttls"):
                        raise PermanentStepError(
                            f"{where} does not offer STARTTLS: set connectors.email.starttls: false "
                            "(or ssl: true for port 465) in config.yaml"
                        )
                    smtp.starttls(context=ssl.create_default_context())
                if cfg.username:
                    smtp.login(cfg.username, cfg.password.get_secret_value())
                refused = smtp.send_message(msg, from_addr=mail_from, to_addrs=rcpt)
        except smtplib.SMTPRecipientsRefused as exc:
            detail = "; ".join(
                f"{addr}: {code} {_text(reply)}" for addr, (code, reply) in exc.recipients.items()
            )
            permanent = all(500 <= code < 600 for code, _ in exc.recipients.values())
            raise self._error(permanent, f"{where} refused every recipient: {detail}") from None
        except smtplib.SMTPResponseException as exc:
            # A greeting refused (SMTPConnectError) is a busy or starting server, whatever its code.
            permanent = 500 <= exc.smtp_code < 600 and not isinstance(exc, smtplib.SMTPConnectError)
            raise self._error(permanent, f"{where}: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except smtplib.SMTPServerDisconnected as exc:
            raise self._error(False, f"{where}: {exc}") from None
        except smtplib.SMTPException as exc:  # no AUTH offered, no usable AUTH mechanism…
            raise self._error(True, f"{where}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise self._error(True, f"{where}: TLS certificate rejected ({exc.verify_message})") from None
        except OSError as exc:  # refused, reset, DNS failure, timeout (TimeoutError is an OSError)
            raise self._error(False, f"{where}: {exc.strerror or str(exc) or type(exc).__name__}") from None
        return {addr: f"{code} {_text(reply)}" for addr, (code, reply) in refused.items()}

    def _error(self, permanent: bool, message: str) -> PermanentStepError | RetryableStepError:
        """The step error, with the password scrubbed in case a server echoed it back."""
        secret = self.config.password.get_secret_value()
        if secret:
            message = message.replace(secret, "***")
        return PermanentStepError(message) if permanent else RetryableStepError(message)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _safe_name(key: str) -> str:
    """A file name for the key; a hash suffix keeps two keys that differ in odd characters apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:120]
    if safe != key:
        safe += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return safe


def _short(subject: str, limit: int = 60) -> str:
    return subject if len(subject) <= limit else subject[: limit - 1] + "…"


def _display(path: Path) -> Path:
    """Relative to the working directory when below it: shorter, and what the user typed."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
