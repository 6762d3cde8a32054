"""One reading of "a secret": configured values replaced by ``********`` before anything keeps them.

Used on what the store records (rendered inputs, outputs, errors) and on every log line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MASK = "********"


class Redactor:
    """Replaces configured secrets in text, or anywhere inside a JSON-able value as it is stored."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole; very short values
        # would blank ordinary words.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._in_json = [json.dumps(secret)[1:-1] for secret in self.secrets]  # as each reads inside JSON

    def text(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def json(self, value: Any) -> str | None:
        """``value`` as JSON text with every secret masked (None stays None): one encoding for the store."""
        if value is None:
            return None
        text = json.dumps(value, default=str)
        for secret in self._in_json:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
