"""Cycle records: Consul KV history, one log line, Prometheus metrics and alerts.

Each cycle of each policy yields one ``CycleRecord``, naming the host that ran it and what
triggered it (``TRIGGERS``). The leader stores it under
``<prefix>/decisions/<policy>/<UTC time>-<id>`` (the last ``keep`` per policy), logs it on one
line (JSON fields when ``log_json``), updates the metrics in its own ``CollectorRegistry`` and
raises an alert after ``failed_cycles_before_alert`` failures in a row, or when the forecast
demand exceeds what ``bounds.max`` workers can serve. Records stored before ``host`` and
``trigger`` existed read back with both ``None``.

A cycle that writes is journaled: before its first write its record is stored with outcome
``applying`` (and ``<prefix>/scaling/<policy>/applying`` points at it), and again after every
write with what was applied so far. When the process dies or loses the leader lock before
the record is final, the next leader's next cycle of the policy finds the journal and stores
that record as ``aborted`` with the reason ``interrupted: ...`` and the writes it made
(``finish_interrupted``), so the history tells what happened.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from nomadscale.core.errors import NomadscaleError
from nomadscale.core.logs import redact
from nomadscale.core.ports import AlertPort, KVPort
from nomadscale.service.ops_metrics import ProcessFamilies

log = logging.getLogger(__name__)

OUTCOMES = ("applied", "unchanged", "planned", "skipped", "failed", "aborted")
APPLYING = "applying"  # a journaled record whose cycle is still writing (KV only)
# what started a cycle: the policy's cron tick, an operator's apply-now kick (`scale --now`,
# `override set --now`), the first cycle after taking the leader lock, `run --once`, `plan`
SCHEDULED, APPLY_NOW, TAKEOVER, ONCE, PLAN = "scheduled", "apply-now", "takeover", "once", "plan"
TRIGGERS = (SCHEDULED, APPLY_NOW, TAKEOVER, ONCE, PLAN)


@dataclass
class CycleRecord:
    policy: str
    started_at: datetime
    outcome: str = "unchanged"  # one of OUTCOMES
    id: str = ""
    duration_s: float = 0.0
    dry_run: bool = False
    skipped: str | None = None  # reason kind: paused, deployment, deploy-rollout, job-missing...
    reason: str = ""  # one line
    decision: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    zones: dict[str, dict[str, int | None]] = field(default_factory=dict)  # desired/actual
    actions: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_kinds: list[str] = field(default_factory=list)
    host: str = ""  # the host whose process ran the cycle
    trigger: str = ""  # one of TRIGGERS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        return d

    def line(self) -> str:
        head = f"{self.policy} [{self.outcome}]"
        if self.trigger or self.host:
            head += f" ({self.trigger or '?'} on {self.host or '?'})"
        if self.decision is not None:
            head += f" {self.decision.get('explain', '')}"
        elif self.reason:
            head += f" {self.reason}"
        if self.skipped and self.decision is not None:
            head += f"; skipped: {self.reason}"
        if self.applied:
            head += f"; applied: {', '.join(self.applied)}"
        if self.errors:
            head += f"; errors: {' | '.join(self.errors)}"
        return head


class Metrics:
    """The service's Prometheus metrics, in their own registry, plus the ``nomadscale_*``
    families of the process registry (the healing engine's runbook metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.forecast = Gauge(
            "nomadscale_forecast_rpm", "Point forecast of peak demand (rpm)", ["policy"], registry=r
        )
        self.upper = Gauge(
            "nomadscale_forecast_upper_rpm", "Upper bound of demand (rpm)", ["policy"], registry=r
        )
        self.desired = Gauge(
            "nomadscale_workers_desired", "Workers decided", ["policy", "zone"], registry=r
        )
        self.actual = Gauge(
            "nomadscale_workers_actual", "Workers running", ["policy", "zone"], registry=r
        )
        self.duration = Histogram(
            "nomadscale_cycle_duration_seconds",
            "Cycle wall time",
            ["policy"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
            registry=r,
        )
        self.errors = Counter(
            "nomadscale_errors", "Cycle errors by kind", ["policy", "kind"], registry=r
        )
        self.cycles = Counter(
            "nomadscale_cycles", "Cycles by outcome", ["policy", "outcome"], registry=r
        )
        self.skipped = Counter(
            "nomadscale_cycles_skipped", "Skipped cycles by reason", ["policy", "reason"],
            registry=r,
        )  # fmt: skip
        self.is_leader = Gauge("nomadscale_is_leader", "1 when this process leads", registry=r)
        if r is not REGISTRY:
            r.register(ProcessFamilies(REGISTRY))

    def observe(self, rec: CycleRecord) -> None:
        p = rec.policy
        self.cycles.labels(p, rec.outcome).inc()
        self.duration.labels(p).observe(rec.duration_s)
        if rec.skipped:
            self.skipped.labels(p, rec.skipped).inc()
        for kind in rec.error_kinds:
            self.errors.labels(p, kind).inc()
        f = (rec.decision or {}).get("forecast")
        if f:
            self.forecast.labels(p).set(float(f["peak"]))
            self.upper.labels(p).set(float(f["upper"]))
        for zone, z in rec.zones.items():
            if z.get("desired") is not None:
                self.desired.labels(p, zone).set(float(z["desired"] or 0))
            if z.get("actual") is not None:
                self.actual.labels(p, zone).set(float(z["actual"] or 0))


class Recorder:
    """Stores, logs, measures and alerts on cycle records."""

    def __init__(
        self,
        *,
        kv: KVPort | None,
        prefix: str = "nomadscale",
        metrics: Metrics | None = None,
        alerts: AlertPort | None = None,
        keep: int = 100,
        log_json: bool = False,
        host: str | None = None,
    ) -> None:
        self.kv = kv
        self.host = host or socket.gethostname()  # named in every record
        self.prefix = prefix.strip("/")
        self.metrics = metrics or Metrics()
        self.alerts = alerts
        self.keep = keep
        self.log_json = log_json
        self.failures: dict[str, int] = {}
        self.last: dict[str, CycleRecord] = {}
        self.recent: deque[CycleRecord] = deque(maxlen=500)  # this process, newest last
        self._capacity_alerted: set[str] = set()
        self._journaled: set[str] = set()  # record ids this process journaled

    def key_prefix(self, policy: str) -> str:
        return f"{self.prefix}/decisions/{policy}/"

    def key_of(self, rec: CycleRecord) -> str:
        return f"{self.key_prefix(rec.policy)}{rec.started_at:%Y%m%dT%H%M%S}Z-{rec.id}"

    def journal_key(self, policy: str) -> str:
        return f"{self.prefix}/scaling/{policy}/applying"

    def journal(self, rec: CycleRecord) -> None:
        """Store ``rec`` as still applying (before the first write, then after each one); the
        first call also points the policy's journal key at it. Raises NomadscaleError."""
        if self.kv is None:
            return
        doc = rec.to_dict()
        doc["outcome"] = APPLYING
        doc["errors"] = [redact(e) for e in rec.errors]
        key = self.key_of(rec)
        self.kv.put(key, json.dumps(doc, default=str).encode())
        if rec.id not in self._journaled:
            pointer = {"key": key, "id": rec.id, "host": self.host}
            self.kv.put(self.journal_key(rec.policy), json.dumps(pointer).encode())
            self._journaled.add(rec.id)

    def finish_interrupted(self, policy: str, *, current_id: str) -> dict[str, Any] | None:
        """The journaled record of an earlier cycle of ``policy`` that never finished (its
        process died or lost the lock mid-apply), now stored as ``aborted`` with the reason;
        None when there is none. Raises NomadscaleError (Consul)."""
        if self.kv is None:
            return None
        entry = self.kv.get(self.journal_key(policy))
        if entry is None or not entry.value:
            return None
        try:
            pointer = json.loads(entry.value)
            key, rid = str(pointer["key"]), str(pointer["id"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            self.kv.delete(self.journal_key(policy), cas=entry.modify_index)
            return None
        if rid == current_id:
            return None
        stored = self.kv.get(key)
        doc: dict[str, Any] | None = None
        if stored is not None and stored.value:
            try:
                loaded = json.loads(stored.value)
            except (ValueError, UnicodeDecodeError):
                loaded = None
            doc = loaded if isinstance(loaded, dict) else None
        if doc is not None and doc.get("outcome") == APPLYING:
            applied = doc.get("applied") or []
            doc["outcome"] = "aborted"
            doc["reason"] = (
                f"interrupted: the cycle on {doc.get('host') or pointer.get('host') or '?'} "
                "ended before its record was final (the process died or lost the leader "
                f"lock mid-apply); applied before that: {', '.join(applied) or 'nothing'}; "
                "the next cycle reconciles from the actual state"
            )
            doc["error_kinds"] = [*(doc.get("error_kinds") or []), "interrupted"]
            self.kv.put(key, json.dumps(doc, default=str).encode())
            self.metrics.errors.labels(policy, "interrupted").inc()
            log.warning("%s: cycle %s %s", policy, rid, doc["reason"])
        self.kv.delete(self.journal_key(policy), cas=entry.modify_index)
        return doc

    def new(self, policy: str, *, started_at: datetime, trigger: str, **kw: Any) -> CycleRecord:
        """A record of a cycle this process runs (``host`` is this one)."""
        return CycleRecord(policy=policy, started_at=started_at, host=self.host,
                           trigger=trigger, **kw)  # fmt: skip

    def skipped(
        self, policy: str, *, started_at: datetime, trigger: str, kind: str, reason: str
    ) -> CycleRecord:
        """A cycle the service skipped before running it (not the leader, slot already run):
        measured, not stored nor logged (every standby would log one per cycle)."""
        rec = self.new(policy, started_at=started_at, trigger=trigger, outcome="skipped",
                       skipped=kind, reason=reason)  # fmt: skip
        self.metrics.observe(rec)
        return rec

    def record(
        self,
        rec: CycleRecord,
        *,
        store: bool = True,
        fail_threshold: int = 3,
        capacity_rpm: float | None = None,
    ) -> None:
        # errors quote client libraries, which may repeat a secret (a URL's password): a
        # record goes to the log, Consul KV, /status and the exit message of `run --once`
        rec.reason = redact(rec.reason)
        rec.errors = [redact(e) for e in rec.errors]
        self.last[rec.policy] = rec
        self.recent.append(rec)
        self.metrics.observe(rec)
        if self.log_json:
            log.info(rec.line(), extra={"fields": {"cycle": rec.to_dict()}})
        else:
            log.info("cycle %s", rec.line())
        if store and self.kv is not None:
            self._store(rec)
            if rec.id in self._journaled:
                self._journaled.discard(rec.id)
                self._end_journal(rec)
        else:  # not the leader any more: the next leader finishes the journal
            self._journaled.discard(rec.id)
        self._alerts(rec, fail_threshold=fail_threshold, capacity_rpm=capacity_rpm)

    def _end_journal(self, rec: CycleRecord) -> None:
        assert self.kv is not None
        try:
            entry = self.kv.get(self.journal_key(rec.policy))
            if entry is not None and entry.value and json.loads(entry.value).get("id") == rec.id:
                self.kv.delete(self.journal_key(rec.policy), cas=entry.modify_index)
        except (NomadscaleError, ValueError, AttributeError) as e:
            log.error("%s: clearing the cycle journal failed: %s", rec.policy, e)

    def _store(self, rec: CycleRecord) -> None:
        assert self.kv is not None
        key = self.key_of(rec)
        try:
            self.kv.put(key, json.dumps(rec.to_dict(), default=str).encode())
            entries = sorted(e.key for e in self.kv.list(self.key_prefix(rec.policy)))
            for old in entries[: max(0, len(entries) - self.keep)]:
                self.kv.delete(old)
        except NomadscaleError as e:
            log.error("%s: storing the cycle record failed: %s", rec.policy, e)
            self.metrics.errors.labels(rec.policy, "record").inc()

    def history(self, policy: str, *, limit: int = 10) -> list[dict[str, Any]]:
        """The newest ``limit`` stored records of ``policy``, newest first."""
        if self.kv is None:
            return []
        entries = sorted(self.kv.list(self.key_prefix(policy)), key=lambda e: e.key)
        out = []
        for e in reversed(entries[-limit:]):
            try:
                doc = json.loads(e.value)
            except ValueError:
                continue
            if isinstance(doc, dict):  # stored before these fields existed: unknown
                doc.setdefault("host", None)
                doc.setdefault("trigger", None)
            out.append(doc)
        return out

    def alert(self, key: str, *, on: bool, summary: str, details: dict[str, Any]) -> None:
        """Trigger (``on``) or resolve the alert ``key``; a failed send is logged, not raised."""
        self._alert(key, on=on, summary=summary, details=details)

    def _alert(self, key: str, *, on: bool, summary: str, details: dict[str, Any]) -> None:
        if self.alerts is None:
            return
        try:
            if on:
                self.alerts.trigger(
                    dedup_key=key, summary=summary, severity="error", details=details
                )
            else:
                self.alerts.resolve(dedup_key=key)
        except NomadscaleError as e:
            log.error("alert %s failed: %s", key, e)

    def _alerts(self, rec: CycleRecord, *, fail_threshold: int, capacity_rpm: float | None) -> None:
        p = rec.policy
        before = self.failures.get(p, 0)
        if rec.outcome == "failed":
            self.failures[p] = before + 1
            if self.failures[p] == fail_threshold:
                self._alert(
                    f"nomadscale/{p}/cycles-failing",
                    on=True,
                    summary=f"nomadscale {p}: {self.failures[p]} cycles in a row failed: "
                    f"{'; '.join(rec.errors)[:300]}",
                    details={"policy": p, "failures": self.failures[p], "errors": rec.errors},
                )
        elif rec.outcome in ("applied", "unchanged"):
            self.failures[p] = 0
            if before >= fail_threshold:
                self._alert(f"nomadscale/{p}/cycles-failing", on=False, summary="", details={})
        f = (rec.decision or {}).get("forecast")
        if f and capacity_rpm is not None:
            over = float(f["upper"]) > capacity_rpm
            if over == (p in self._capacity_alerted):
                return
            if over:
                self._capacity_alerted.add(p)
            else:
                self._capacity_alerted.discard(p)
            self._alert(
                f"nomadscale/{p}/capacity",
                on=over,
                summary=f"nomadscale {p}: forecast demand {float(f['upper']):.0f} rpm exceeds "
                f"the capacity of bounds.max workers ({capacity_rpm:.0f} rpm)",
                details={"policy": p, "upper": f["upper"], "capacity_rpm": capacity_rpm},
            )
