"""Prometheus metrics: what happened (counters, histograms) and what is waiting (read at scrape).

Counters and histograms live in each process; under ``vivoflow run`` the worker
processes write them to ``<broker.data_dir>/metrics`` (prometheus-client's
multiprocess mode) and the intake's ``/metrics`` adds them up, so one scrape
sees every process on the machine. Queue depth and scheduled steps are read
from Redis and the store at scrape time, so they are right across hosts too.

The metric objects are per process by nature (that is how Prometheus counts),
hence the one lazily built ``process_metrics()``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

#: Set by ``vivoflow run`` (workers/cli.py) before prometheus-client is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: End-to-end lag spans milliseconds (a live webhook) to a day (a delayed step, a long retry).
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "process_metrics", "exposition"]


class Metrics:
    """The counters and histograms one process records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.webhooks = Counter("vivoflow_webhooks", "Webhook requests by outcome (accepted, duplicate, "
                                "unauthorized, too_large, bad_request, timeout, unavailable).", ["outcome"], registry=r)
        self.runs = Counter("vivoflow_runs_finished", "Runs finished, by recipe and status.", ["recipe", "status"],
                            registry=r)
        self.steps = Counter("vivoflow_steps_finished", "Steps finished, by connector and status.",
                             ["connector", "status"], registry=r)
        self.retries = Counter("vivoflow_step_retries", "Retryable step failures scheduled for another attempt.",
                               ["connector"], registry=r)
        self.step_seconds = Histogram("vivoflow_step_duration_seconds", "Time a connector took for one step.",
                                      ["connector"], buckets=LATENCY_BUCKETS, registry=r)
        self.lag_seconds = Histogram(
            "vivoflow_end_to_end_lag_seconds",
            "From the sender's envelope created_at to the completion of a step (by recipe).",
            ["recipe"], buckets=LAG_BUCKETS, registry=r,
        )
        # The labelled children the engine counts into, each looked up once: ``labels()`` checks
        # its arguments, builds a key and takes a lock per call, seven times a run.
        self.runs_of = cache(self.runs.labels)
        self.steps_of = cache(self.steps.labels)
        self.retries_of = cache(self.retries.labels)
        self.step_seconds_of = cache(self.step_seconds.labels)
        self.lag_seconds_of = cache(self.lag_seconds.labels)


_process: Metrics | None = None


def process_metrics() -> Metrics:
    """This process's metrics, built on first use."""
    global _process
    if _process is None:
        _process = Metrics()
    return _process


class _Waiting(Collector):
    """Gauges read at scrape time: the queue in Redis and the scheduled steps in the store."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("vivoflow_queue_depth", "Messages waiting in the queue (ready, and delayed "
                                  "ones not yet taken by a worker).", labels=["queue"])
        try:
            for kind, count in self.app.queue.depth().items():
                depth.add_metric([kind], count)
        except Exception:  # noqa: BLE001 - a broker that does not answer shows as a missing sample
            pass
        yield depth
        scheduled, oldest = self.app.store.scheduled_steps()
        yield GaugeMetricFamily("vivoflow_scheduled_steps", "Steps waiting for a delay or a retry.", value=scheduled)
        overdue = max(0.0, time.time() - oldest) if oldest else 0.0
        yield GaugeMetricFamily("vivoflow_scheduled_step_overdue_seconds",
                                "How long the most overdue scheduled step has been due (0: none late).",
                                value=overdue)


def exposition(app: Any) -> bytes:
    """The Prometheus text for ``/metrics``: every local process's counters, plus the waiting gauges."""
    registry = CollectorRegistry(auto_describe=True)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(process_metrics().registry))
    registry.register(_Waiting(app))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        yield from self.source.collect()
