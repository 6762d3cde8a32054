"""Background chores of a long-running process: a callable run now and then every interval.

A failed round is logged and the next one comes on time; ``stop`` ends the wait at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

log = logging.getLogger("vivoflow")


class Periodic(threading.Thread):
    def __init__(self, name: str, every: timedelta, chore: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.every, self.chore = every, chore
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.chore()
            except Exception as exc:  # noqa: BLE001 - one failed round must not end the chore
                log.error("%s failed: %s (next try in %s)", self.name, exc, self.every)
            self.stopping.wait(self.every.total_seconds())

    def stop(self) -> None:
        self.stopping.set()
