"""Scrape-time metrics next to the cycle metrics: runbook runs and rolling deployments.

* ``ProcessFamilies`` forwards the ``nomadscale_*`` families of prometheus_client's process
  registry into the service's own registry. The healing engine keeps its runbook metrics there
  (``healing.engine.RunbookMetrics``): the service must not import healing, and the CLI builds
  the engine inside the service's process, so webhook-triggered runs show on its /metrics.
* ``DeployCollector`` exports the rollouts' state, read from KV at scrape time: rollouts run
  from ``nomadscale deploy`` in another process and keep ``<prefix>/deploy/<policy>/state`` in
  KV (``deploy.state.RolloutState``; read here as plain JSON, the service must not import
  deploy). One recursive list per scrape, at most one in flight, the last answer reused for
  ``max_age_s``; a scrape waits at most ``timeout_s`` for it. When KV is unreachable or slow
  the scrape still succeeds: ``nomadscale_kv_up`` is 0 and no rollout series are exported.
* ``ReloadMetrics``: policy reloads (SIGHUP) by result, and the policies loaded and when.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from nomadscale.core.errors import NomadscaleError
from nomadscale.core.ports import KVPort

log = logging.getLogger(__name__)

# deploy.state.RUNNING_PHASES + TERMINAL (tests/service/test_ops_metrics.py keeps them equal)
DEPLOY_STATUSES = (
    "preflight", "prefetch", "canary", "rolling", "held", "rolling-back", "paused",
    "completed", "rolled_back", "aborted", "refused",
)  # fmt: skip
ROLLBACK_STATUSES = ("rolling-back", "rolled_back")


class ProcessFamilies:
    """Collector: the ``nomadscale_*`` families of ``source`` (the process registry)."""

    def __init__(self, source: CollectorRegistry = REGISTRY) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if family.name.startswith("nomadscale_"):
                yield family


class ReloadMetrics:
    """``nomadscale_reload_total{result="ok|failed"}`` (a failed reload keeps the previous
    policies running: alert on its increase), ``nomadscale_policies_loaded`` and
    ``nomadscale_policies_loaded_timestamp_seconds`` (the last successful load)."""

    RESULTS = ("ok", "failed")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "nomadscale_reload", "Policy reloads (SIGHUP) by result", ["result"],
            registry=registry,
        )  # fmt: skip
        for result in self.RESULTS:  # both series exist from the start: increase() works
            self.reloads.labels(result)
        self.loaded = Gauge(
            "nomadscale_policies_loaded", "Policies the service runs", registry=registry
        )
        self.loaded_at = Gauge(
            "nomadscale_policies_loaded_timestamp_seconds",
            "When the running policies were loaded (Unix time)", registry=registry,
        )  # fmt: skip

    def loaded_now(self, count: int, at: datetime) -> None:
        self.loaded.set(count)
        self.loaded_at.set(at.timestamp())


@dataclass(frozen=True)
class RolloutView:
    """What the metrics show of one policy's rollout record."""

    policy: str
    status: str
    rollout: str
    image: str
    previous_image: str
    zones_done: int
    zones_total: int
    prefetch_ok: int
    prefetch_failed: int
    surge_workers: int
    updated_epoch: float | None

    @classmethod
    def from_doc(cls, policy: str, doc: Mapping[str, Any]) -> RolloutView:
        pf_doc, surge = doc.get("prefetch"), doc.get("surge")
        pf: Mapping[str, Any] = pf_doc if isinstance(pf_doc, dict) else {}
        extra = 0
        if isinstance(surge, dict) and not surge.get("released"):
            try:
                extra = max(0, int(surge.get("to", 0)) - int(surge.get("from", 0)))
            except (TypeError, ValueError):
                extra = 0
        return cls(
            policy=policy,
            status=str(doc.get("status") or "unknown"),
            rollout=str(doc.get("id") or ""),
            image=str(doc.get("image") or ""),
            previous_image=str(doc.get("previous_image") or ""),
            zones_done=_count(doc.get("zones_done")),
            zones_total=_count(doc.get("zones")),
            prefetch_ok=_count(pf.get("ok")),
            prefetch_failed=_count(pf.get("failed")),
            surge_workers=extra,
            updated_epoch=_epoch(doc.get("updated_at")),
        )


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list | dict) else 0


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class _Read:
    ok: bool
    rollouts: tuple[RolloutView, ...]
    at: float  # monotonic


class DeployCollector:
    """Collector: rollout state from KV, plus ``nomadscale_kv_up``."""

    def __init__(
        self,
        kv: KVPort,
        *,
        prefix: str = "nomadscale",
        timeout_s: float = 2.0,
        max_age_s: float = 5.0,
    ) -> None:
        self.kv = kv
        self.base = f"{prefix.strip('/')}/deploy/"
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._mu = threading.Lock()
        self._pending: Future[_Read] | None = None
        self._last: _Read | None = None
        self._bad: set[tuple[str, int]] = set()  # unreadable records already logged
        self._was_ok = True

    def collect(self) -> Iterator[Metric]:
        read = self.read()
        yield GaugeMetricFamily(
            "nomadscale_kv_up", "1 when the last read of the rollout state from KV worked",
            value=1.0 if read.ok else 0.0,
        )  # fmt: skip
        yield from families(read.rollouts)

    def read(self) -> _Read:
        """The rollout state: a recent answer, else one read (shared by concurrent scrapes)."""
        with self._mu:
            last = self._last
            if last is not None and time.monotonic() - last.at < self.max_age_s:
                return last
            fut = self._pending
            if fut is None:
                fut = self._pending = Future()
                threading.Thread(
                    target=self._load, args=(fut,), name="deploy-metrics", daemon=True
                ).start()
        try:
            return fut.result(timeout=self.timeout_s)
        except TimeoutError:
            self._report(False, f"KV did not answer within {self.timeout_s:.1f}s")
            return _Read(ok=False, rollouts=(), at=time.monotonic())

    def _load(self, fut: Future[_Read]) -> None:
        try:
            read = _Read(ok=True, rollouts=tuple(self._rollouts()), at=time.monotonic())
            self._report(True, "")
        except NomadscaleError as exc:
            self._report(False, str(exc))
            read = _Read(ok=False, rollouts=(), at=time.monotonic())
        except Exception as exc:  # never leave a scrape waiting on a read that died
            log.exception("metrics: reading the rollout state crashed")
            read = _Read(ok=False, rollouts=(), at=time.monotonic())
            self._report(False, type(exc).__name__)
        with self._mu:
            self._pending, self._last = None, read
        fut.set_result(read)

    def _rollouts(self) -> Iterator[RolloutView]:
        for e in self.kv.list(self.base):
            policy, sep, leaf = e.key.lstrip("/").removeprefix(self.base).partition("/")
            if not sep or leaf != "state" or not policy or not e.value:
                continue
            try:
                doc = json.loads(e.value)
            except (ValueError, UnicodeDecodeError):
                doc = None
            if isinstance(doc, dict):
                yield RolloutView.from_doc(policy, doc)
            elif (e.key, e.modify_index) not in self._bad:
                if len(self._bad) >= 1000:
                    self._bad.clear()
                self._bad.add((e.key, e.modify_index))
                log.warning("metrics: rollout record %s is not a JSON object: skipped", e.key)

    def _report(self, ok: bool, why: str) -> None:
        """Log the changes only: one line when KV reads start failing, one when they recover."""
        with self._mu:
            was, self._was_ok = self._was_ok, ok
        if was and not ok:
            log.warning("metrics: cannot read the rollout state from KV: %s", why)
        elif ok and not was:
            log.info("metrics: reading the rollout state from KV works again")


def families(rollouts: Iterable[RolloutView]) -> Iterator[Metric]:
    """The rollout metric families (every family, even with no rollout recorded)."""
    by = ["policy"]
    info = GaugeMetricFamily(
        "nomadscale_deploy_info", "The policy's current or last rollout (value 1)",
        labels=["policy", "rollout", "image", "previous_image"],
    )  # fmt: skip
    status = GaugeMetricFamily(
        "nomadscale_deploy_status", "Rollout status: 1 for the current one, 0 for the others",
        labels=["policy", "status"],
    )  # fmt: skip
    done = GaugeMetricFamily(
        "nomadscale_deploy_zones_done", "Zone groups updated by the rollout", labels=by
    )
    total = GaugeMetricFamily(
        "nomadscale_deploy_zones", "Zone groups the rollout updates", labels=by
    )
    prefetch = GaugeMetricFamily(
        "nomadscale_deploy_prefetch_nodes", "Nodes the image was prefetched on, by result",
        labels=["policy", "result"],
    )  # fmt: skip
    surge = GaugeMetricFamily(
        "nomadscale_deploy_surge_workers", "Extra workers held for the rollout", labels=by
    )
    rollback = GaugeMetricFamily(
        "nomadscale_deploy_rollback", "1 while rolling back or when the rollout rolled back",
        labels=by,
    )  # fmt: skip
    progress = GaugeMetricFamily(
        "nomadscale_deploy_last_progress_timestamp_seconds",
        "When the rollout record last changed (Unix time)", labels=by,
    )  # fmt: skip
    for r in rollouts:
        p = r.policy
        info.add_metric([p, r.rollout, r.image, r.previous_image], 1.0)
        known = DEPLOY_STATUSES if r.status in DEPLOY_STATUSES else (*DEPLOY_STATUSES, r.status)
        for s in known:
            status.add_metric([p, s], 1.0 if s == r.status else 0.0)
        done.add_metric([p], float(r.zones_done))
        total.add_metric([p], float(r.zones_total))
        prefetch.add_metric([p, "ok"], float(r.prefetch_ok))
        prefetch.add_metric([p, "failed"], float(r.prefetch_failed))
        surge.add_metric([p], float(r.surge_workers))
        rollback.add_metric([p], 1.0 if r.status in ROLLBACK_STATUSES else 0.0)
        if r.updated_epoch is not None:
            progress.add_metric([p], r.updated_epoch)
    yield from (info, status, done, total, prefetch, surge, rollback, progress)
