"""The one error hierarchy of vivoflow.

The CLI turns any ``VivoflowError`` into one line on stderr and an exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VivoflowError(Exception):
    """Root of every error vivoflow expects and reports to a user."""

    exit_code = 1


class ConfigError(VivoflowError):
    """The configuration is unusable: a bad key, value or missing env var."""

    exit_code = 2


class RecipeError(VivoflowError):
    """A recipe problem, located as ``file:line`` so an editor can jump to it."""

    def __init__(self, message: str, *, file: str, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class StepError(VivoflowError):
    """A step failed; subclasses say whether trying again can help."""

    retryable = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RetryableStepError(StepError):
    """Timeouts, connection errors, 429 and 5xx: the same call may succeed later."""

    retryable = True


class PermanentStepError(StepError):
    """Invalid input, other 4xx, a connector not configured: retrying cannot help."""


class ServiceUnavailable(VivoflowError):
    """The broker or the store does not answer; the intake says 503."""


class Busy(VivoflowError):
    """Another worker holds this invitee's deliveries right now; try the message again shortly."""

    def __init__(self, message: str, *, delay_ms: int = 250) -> None:
        super().__init__(message)
        self.delay_ms = delay_ms
