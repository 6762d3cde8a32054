"""One reading of "a secret": configured values replaced by ``********`` before anything keeps them.

Used on what the store records (rendered inputs, outputs, errors) and on every log line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MASK = "********"


class Redactor:
    """Replaces configured secrets in text, or anywhere inside a JSON-able value."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole; very short values
        # would blank ordinary words.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def __call__(self, value: Any) -> Any:
        if not self.secrets or value is None:
            return value
        text = json.dumps(value, default=str)
        if not any(secret in text for secret in self.secrets):
            return value
        for secret in self.secrets:
            text = text.replace(json.dumps(secret)[1:-1], MASK)  # as the secret reads inside JSON
        return json.loads(text)
