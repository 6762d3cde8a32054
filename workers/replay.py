"""Replays: a stored delivery against today's recipes, or a failed run resumed where it failed.

Every replay is recorded (who, when, which mode) before anything is enqueued;
the work itself is the workers', on the queue, like any delivery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from workers.app import App
from workers.errors import VivoflowError


@dataclass(frozen=True)
class Replayed:
    replay_id: str
    message: str

    def __str__(self) -> str:
        return self.message


class Replayer:
    def __init__(self, app: App, *, who: str) -> None:
        self.app = app
        self.store = app.store
        self.who = who

    def delivery(self, delivery_id: str, *, recipe: str | None = None) -> Replayed:
        """New runs of the delivery's matching recipes (or one), linked to its earlier runs."""
        if self.store.get_delivery(delivery_id) is None:
            raise VivoflowError(f"no delivery {delivery_id!r} (see `vivoflow runs`)")
        replay_id = self.store.record_replay(who=self.who, mode="delivery", target=delivery_id, note=recipe)
        self.app.queue.replay(delivery_id, replay_id, recipe)
        return Replayed(replay_id, f"replay {replay_id} of {delivery_id} queued: new runs linked to the old ones")

    def run(self, run_id: str, *, force: bool = False) -> Replayed:
        """Resume a failed run's unfinished steps, or (``force``) run all its steps again as a new run."""
        run = self.store.get_run(run_id)
        if run is None:
            raise VivoflowError(f"no run {run_id!r} (see `vivoflow runs`)")
        if force:
            replay_id = self.store.record_replay(who=self.who, mode="force", target=run_id)
            self.app.queue.replay(run["delivery_id"], replay_id, run["recipe"])
            again = f"{run['recipe']} runs again on {run['delivery_id']}, every step"
            return Replayed(replay_id, f"replay {replay_id}: {again}")
        if run["status"] != "failed":
            raise VivoflowError(f"run {run_id} is {run['status']}, not failed: only a failed run resumes "
                                "(--force runs it again from the start)")
        replay_id = self.store.record_replay(who=self.who, mode="resume", target=run_id)
        redo = self.store.reset_unfinished_steps(run_id)
        self.app.queue.resume(run_id, 0)
        resumes = f"run {run_id} resumes ({redo} step(s) to redo, succeeded steps kept)"
        return Replayed(replay_id, f"replay {replay_id}: {resumes}")

    def failed(self, since: timedelta, *, rate: float, recipe: str | None = None) -> Iterator[Replayed]:
        """Resume every failed run of the window, at most ``rate`` a second (not to flood a service)."""
        interval = 1.0 / rate
        for run in self.store.failed_runs_since(time.time() - since.total_seconds()):
            if (recipe and run["recipe"] != recipe) or run["recipe"] == "(delivery)":
                continue
            started = time.monotonic()
            yield self.run(run["id"])
            time.sleep(max(0.0, interval - (time.monotonic() - started)))  # the rate cap itself
