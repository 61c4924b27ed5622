"""Prometheus metrics of runbook runs.

The default instance lives in prometheus_client's process registry, whose ``nomadscale_*``
families the service forwards to its ``/metrics`` (the service must not import healing, and
the CLI builds the engine in the service's process).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

TRIGGER_SOURCES = ("pagerduty", "maintenance", "manual")  # webhook, watcher report, CLI


class RunbookMetrics:
    """Prometheus metrics of runbook runs, in ``registry`` (default: the process registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.runs = Counter(
            "nomadscale_runbook_runs", "Finished runbook runs by outcome (succeeded, failed, "
            "refused)", ["runbook", "outcome", "dry_run"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "nomadscale_runbook_run_duration_seconds", "Runbook run time, submitted to finished",
            ["runbook"], buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
            registry=r,
        )  # fmt: skip
        self.triggers = Counter(
            "nomadscale_runbook_triggers", "Runbook triggers by source (pagerduty, maintenance, "
            "manual) and result (accepted, duplicate, escalated: passed on to the active run, "
            "refused)", ["runbook", "source", "result"],
            registry=r,
        )  # fmt: skip
        self.in_progress = Gauge(
            "nomadscale_runbook_runs_in_progress", "Runbook runs this process is driving",
            ["runbook"], registry=r,
        )  # fmt: skip

    def triggered(self, runbook: str, trigger: str, result: str) -> None:
        source = trigger.split(":", 1)[0]
        source = source if source in TRIGGER_SOURCES else "other"
        self.triggers.labels(runbook, source, result).inc()

    def finished(self, run: Mapping[str, Any], now: datetime) -> None:
        rb, status = str(run["runbook"]), str(run["status"])
        self.runs.labels(rb, status, "true" if run["dry_run"] else "false").inc()
        if status != "refused":
            took = (now - datetime.fromisoformat(run["created_at"])).total_seconds()
            self.duration.labels(rb).observe(max(0.0, took))


DEFAULT_METRICS = RunbookMetrics()
