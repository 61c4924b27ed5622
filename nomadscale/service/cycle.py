"""One cycle of one policy: read, decide, plan, apply (when leading), record.

Order: pause state and overrides (KV) -> deploy rollout record (KV) -> target status (skip
while a Nomad deployment is active or the job is missing) -> demand history -> cooldown from
the target's newest scale event (whoever made it) -> ``stages.decide`` -> plan from actual
state -> apply through the actuator (fenced) -> record. Any ``NomadscaleError`` ends the cycle
as ``failed`` with a recorded reason; nothing else is caught here.

A leader's cycle first finishes the journal of an earlier cycle that was interrupted mid-apply
(``Recorder.finish_interrupted``: the process died or lost the lock); when that cycle's count
change left a Nomad deployment running, this cycle waits for it (bounded) instead of
skipping, so a takeover completes the interrupted decision at once. Before its first write a
cycle journals its record, and again after every write.

Before deciding, a cycle that manages nodes asks the pool how much of each zone's instance
group the cloud failed to create (``fulfilment``: stockout, quota). Such a zone counts as
able to host only its created instances (``zone_capacity``: the split moves the rest to the
other zones and says so), the record carries one line per zone (``inputs.fulfilment`` and the
decision's reason), and when a zone is still short at the next cycle the alert port gets
``nomadscale/<policy>/zone-short/<zone>`` (resolved once the zone is filled).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from nomadscale.config.policy import Policy
from nomadscale.core.clock import Clock
from nomadscale.core.errors import ExternalError, NomadscaleError, NotFoundError
from nomadscale.core.ports import (
    AlertPort,
    DemandSeries,
    DemandSource,
    JobStatus,
    KVPort,
    LockPort,
    NodeInfo,
    NodePoolPort,
    NomadPort,
    pinned_datacenter,
)
from nomadscale.core.values import Decision, new_id
from nomadscale.integrations.consul import update_json
from nomadscale.service.actuator import (
    Action,
    Actuator,
    NodeRef,
    ZoneView,
    plan_actions,
    short_zones,
    zone_capacity,
)
from nomadscale.service.control import Control
from nomadscale.service.forecasts import LiveForecaster
from nomadscale.service.records import SCHEDULED, CycleRecord, Recorder
from nomadscale.stages.decide import decide

log = logging.getLogger(__name__)

_NO_STEPS = np.empty(0)  # decide() gets the forecast precomputed; the series is not re-read


@dataclass
class Ports:
    """What a cycle talks to. ``pool_for``/``demand_for`` build per-policy adapters."""

    nomad: NomadPort
    kv: KVPort
    lock: LockPort
    demand_for: Callable[[Policy], DemandSource]
    pool_for: Callable[[Policy], NodePoolPort | None] = lambda _p: None
    alerts: AlertPort | None = None
    lock_watch: Any = None  # service.leaderwatch.LockWatch: a standby blocks on the lock key
    _demand: dict[str, DemandSource] = field(default_factory=dict)
    _pools: dict[str, NodePoolPort | None] = field(default_factory=dict)

    def demand(self, policy: Policy) -> DemandSource:
        if policy.name not in self._demand:
            self._demand[policy.name] = self.demand_for(policy)
        return self._demand[policy.name]

    def pool(self, policy: Policy) -> NodePoolPort | None:
        if policy.name not in self._pools:
            self._pools[policy.name] = self.pool_for(policy)
        return self._pools[policy.name]

    def forget(self, name: str) -> None:
        """Drop the demand source and node pool built for policy ``name`` (a reload changed
        or removed it): the next cycle builds them from its new settings."""
        self._demand.pop(name, None)
        self._pools.pop(name, None)


def last_scale_time(status: JobStatus) -> datetime | None:
    """Newest successful count change of any group (whoever made it)."""
    times = [
        e.time
        for g in status.groups.values()
        for e in g.events
        if not e.error and e.count is not None
    ]
    return max(times) if times else None


def _error_kind(e: NomadscaleError) -> str:
    if isinstance(e, ExternalError):
        return f"{e.system}_{'temporary' if not e.permanent else 'permanent'}"
    return type(e).__name__


@dataclass
class CycleResult:
    record: CycleRecord
    decision: Decision | None = None
    actions: tuple[Action, ...] = ()


class CycleRunner:
    """Runs cycles of one policy. ``leader`` and ``dry_run`` decide whether it writes."""

    def __init__(
        self,
        *,
        policy: Policy,
        ports: Ports,
        control: Control,
        recorder: Recorder,
        clock: Clock,
        stop: threading.Event | None = None,
        poll_s: float = 5.0,
        drain_grace_s: float = 60.0,
        incremental: bool = True,
        deployment_wait_s: float = 900.0,
    ) -> None:
        self.policy = policy
        self.ports = ports
        self.control = control
        self.recorder = recorder
        self.clock = clock
        self.stop = stop or threading.Event()
        self.poll_s = poll_s
        self.drain_grace_s = drain_grace_s
        self.deployment_wait_s = deployment_wait_s
        self.removals_key = f"{control.prefix}/scaling/{policy.name}/removals"
        self._short: dict[str, Any] = {}  # zone -> the pool's Fulfilment, this cycle
        self._short_cycles: dict[str, int] | None = None  # zone -> cycles in a row short
        self.forecaster = LiveForecaster(policy)
        # False: forecast from the whole lookback every cycle (for demand sources that rewrite
        # their history between calls, e.g. test doubles)
        self.incremental = incremental

    def warm(self, *, slot: datetime) -> None:
        """Bring the forecaster up to the cycle slot ``slot`` without deciding anything: a
        warm start from the lookback the first time, the new steps after that. The service
        runs it at start-up and on standbys every cycle, so that the first cycle after a
        start or a takeover reads only new steps. Errors are logged, never raised: the
        cycle itself retries and reports them."""
        if not self.incremental:
            return
        try:
            _fc, how = self.forecaster.forecast(self.ports.demand(self.policy), now=slot)
        except NomadscaleError as e:
            log.warning("%s: forecaster warm-up failed: %s", self.policy.name, e)
            return
        log.debug("%s: forecaster %s to %s", self.policy.name, how.mode, how.history_end)

    @property
    def manages_nodes(self) -> bool:
        return self.policy.target.node_pool is not None and any(
            z.instance_group for z in self.policy.zones.items
        )

    # --- reading ------------------------------------------------------------------------

    def _pending(self) -> dict[str, dict[str, str]]:
        from nomadscale.service.control import _get_json

        doc = _get_json(self.ports.kv, self.removals_key)
        return doc if isinstance(doc, dict) else {}

    def _on_removing(self, zone: str, nodes: Sequence[NodeRef], started: bool) -> None:
        def fn(old: Any) -> Any:
            doc = dict(old or {})
            zone_doc = dict(doc.get(zone) or {})
            for n in nodes:
                if started:
                    zone_doc[n.id] = n.name
                else:
                    zone_doc.pop(n.id, None)
            doc[zone] = zone_doc
            return {z: v for z, v in doc.items() if v}

        update_json(self.ports.kv, self.removals_key, fn, default={})

    def _zone_of_datacenter(self) -> dict[str, str]:
        """Nomad datacenter -> policy zone. A zone's nodes are those of the datacenter named
        like it or, when the zones are named after the cloud's (``asia-southeast2-a``) and the
        Nomad datacenters otherwise (``zone-a``), of the datacenter its group is pinned to."""
        zones = self.policy.zones.items
        out = {z.name: z.name for z in zones}
        t = self.policy.target
        try:
            spec = self.ports.nomad.get_job(t.job, namespace=t.namespace).spec
        except NomadscaleError as e:
            log.warning("%s: job spec unreadable, zones matched to datacenters by name: %s",
                        self.policy.name, e)  # fmt: skip
            return out
        for z in zones:
            dc = pinned_datacenter(spec, z.group)
            if dc and dc not in out:
                out[dc] = z.name
        return out

    def _nodes(self, *, with_allocs: bool) -> dict[str, list[NodeInfo]]:
        """The pools' nodes by policy zone."""
        zone_of = self._zone_of_datacenter()
        by_zone: dict[str, list[NodeInfo]] = {}
        for pool in sorted({z.node_pool for z in self.policy.zones.items}):
            if with_allocs:
                try:
                    nodes = self.ports.nomad.list_nodes(node_pool=pool, with_allocs=True)  # type: ignore[call-arg]
                except TypeError:
                    nodes = self.ports.nomad.list_nodes(node_pool=pool)
            else:
                nodes = self.ports.nomad.list_nodes(node_pool=pool)
            for n in nodes:
                if n.datacenter in zone_of:
                    by_zone.setdefault(zone_of[n.datacenter], []).append(n)
        return by_zone

    def _views(self, *, with_allocs: bool, pending: dict[str, dict[str, str]]) -> list[ZoneView]:
        manage = self.manages_nodes
        pool = self.ports.pool(self.policy) if manage else None
        nodes = self._nodes(with_allocs=with_allocs) if manage else {}
        views = []
        for z in self.policy.zones.items:
            size = None
            if pool is not None and z.instance_group:
                size = pool.size(z.instance_group, zone=z.name)
            views.append(
                ZoneView(
                    zone=z.name,
                    group=z.group,
                    instance_group=z.instance_group if manage else None,
                    nodes=tuple(n for n in nodes.get(z.name, []) if n.node_pool == z.node_pool),
                    mig_size=size,
                    pending=tuple((pending.get(z.name) or {}).keys()),
                    not_created=getattr(self._short.get(z.name), "not_created", 0),
                )
            )
        return views

    def _plan(self, decision: Decision, status: JobStatus) -> tuple[Action, ...]:
        np_ = self.policy.target.node_pool
        kw: dict[str, Any] = {"manage_nodes": self.manages_nodes}
        if np_ is not None:
            kw.update(
                workers_per_node=np_.workers_per_node,
                drain_deadline_s=np_.drain_deadline_s,
                scale_in_order=np_.scale_in_order,
            )
        pending = self._pending() if self.manages_nodes else {}
        actions = plan_actions(
            decision, status, self._views(with_allocs=False, pending=pending), **kw
        )
        if any(a.kind == "drain" for a in actions):  # empty-first needs allocation counts
            views = self._views(with_allocs=True, pending=pending)
            actions = plan_actions(decision, status, views, **kw)
        return actions

    def _journal(self, rec: CycleRecord, applied: Sequence[str]) -> None:
        rec.applied = list(applied)
        try:
            self.recorder.journal(rec)
        except NomadscaleError as e:  # the write is made; the final record says it
            log.warning("%s: journaling the cycle failed: %s", self.policy.name, e)

    def _await_deployment(self, status: JobStatus) -> JobStatus:
        """Wait (bounded, on the clock) until no deployment of the job is active."""
        t = self.policy.target
        started = self.clock.monotonic()
        if status.active_deployment:
            log.info("%s: waiting for deployment %s (likely started by the interrupted cycle)",
                     self.policy.name, status.active_deployment)  # fmt: skip
        while status.active_deployment and not self.stop.is_set():
            if self.clock.monotonic() - started >= self.deployment_wait_s:
                break
            self.clock.sleep(self.poll_s)
            status = self.ports.nomad.job_status(t.job, namespace=t.namespace)
        return status

    def _track_short(self, short: dict[str, Any]) -> None:
        """Alert on a zone still short at the next cycle; resolve once it is filled. The
        count starts from the stored history, so a new leader keeps it."""
        p = self.policy.name
        if self._short_cycles is None:
            self._short_cycles = {}
            try:
                docs = self.recorder.history(p, limit=10)
            except NomadscaleError as e:
                log.warning("%s: reading the decision history failed: %s", p, e)
                docs = []
            read = [d["inputs"]["fulfilment"] for d in docs
                    if isinstance(d.get("inputs"), dict) and "fulfilment" in d["inputs"]]  # fmt: skip
            for zone in read[0] if read and isinstance(read[0], dict) else {}:
                self._short_cycles[zone] = 1
        for z in self.policy.zones.items:
            seen = self._short_cycles.get(z.name, 0)
            f = short.get(z.name)
            key = f"nomadscale/{p}/zone-short/{z.name}"
            if f is None:
                self._short_cycles.pop(z.name, None)
                if seen:
                    self.recorder.alert(key, on=False, summary="", details={})
                continue
            self._short_cycles[z.name] = seen + 1
            if seen + 1 == 2:
                summary = (f"nomadscale {p}: {f.line()}; still short a cycle later (the "
                           "workers it cannot host go to the other zones)")  # fmt: skip
                details = {"policy": p, "zone": z.name, "instance_group": f.group,
                           "target": f.target, "not_created": f.not_created,
                           "errors": dict(f.errors)}  # fmt: skip
                self.recorder.alert(key, on=True, summary=summary[:1000], details=details)

    # --- the cycle ----------------------------------------------------------------------

    def run(
        self,
        *,
        leader: bool,
        dry_run: bool = False,
        now: datetime | None = None,
        meta: dict[str, Any] | None = None,
        trigger: str = SCHEDULED,
        store_skip: bool = True,
    ) -> CycleResult:
        """One cycle; ``trigger`` (``records.TRIGGERS``) says what started it. With
        ``store_skip`` False a skipped cycle is logged but not stored (a kick's retries)."""
        p = self.policy
        now = now or self.clock.now()
        rec = self.recorder.new(p.name, started_at=now, trigger=trigger, id=new_id(),
                                dry_run=dry_run)  # fmt: skip
        res = CycleResult(record=rec)
        t0 = time.perf_counter()
        interrupted = None
        if leader and not dry_run:
            try:
                interrupted = self.recorder.finish_interrupted(p.name, current_id=rec.id)
            except NomadscaleError as e:
                log.warning("%s: reading the cycle journal failed: %s", p.name, e)
        try:
            self._run(rec, res, now=now, leader=leader, dry_run=dry_run, meta=meta or {},
                      interrupted=interrupted)  # fmt: skip
        except NomadscaleError as e:
            rec.outcome = "failed"
            rec.errors.append(str(e))
            rec.error_kinds.append(_error_kind(e))
            rec.reason = str(e)
        rec.duration_s = time.perf_counter() - t0
        threshold = p.alerting.failed_cycles_before_alert
        store = leader and not dry_run and self.ports.lock.held()
        store = store and (store_skip or rec.outcome != "skipped")
        self.recorder.record(
            rec,
            store=store,
            fail_threshold=threshold,
            capacity_rpm=p.bounds.max * p.capacity.rpm_per_worker,
        )
        return res

    def _skip(self, rec: CycleRecord, kind: str, reason: str) -> None:
        rec.outcome = "skipped"
        rec.skipped = kind
        rec.reason = reason

    def _run(
        self,
        rec: CycleRecord,
        res: CycleResult,
        *,
        now: datetime,
        leader: bool,
        dry_run: bool,
        meta: dict[str, Any],
        interrupted: dict[str, Any] | None = None,
    ) -> None:
        p = self.policy
        if self.stop.is_set():
            self._skip(rec, "shutdown", "shutting down")
            return
        pause = self.control.paused(p.name, now=now)
        if pause is not None:
            self._skip(rec, "paused", f"paused by {pause.who}: {pause.reason}")
            return
        overrides = [o for o in self.control.overrides(p.name, now=now) if o.kind != "pause"]
        rollout = self.control.deploy_active(p.name)
        if rollout:
            self._skip(rec, "deploy-rollout", rollout)
            return
        try:
            status = self.ports.nomad.job_status(p.target.job, namespace=p.target.namespace)
        except NotFoundError:
            self._skip(rec, "job-missing", f"job {p.target.namespace}/{p.target.job} not found")
            return
        if status.stopped:
            self._skip(rec, "job-stopped", f"job {p.target.job} is stopped")
            return
        if status.active_deployment and interrupted is not None:
            # most likely the count change of the interrupted cycle: finish its decision
            status = self._await_deployment(status)
        if status.active_deployment:
            self._skip(rec, "deployment", f"deployment {status.active_deployment} is active")
            return
        if not self.incremental:
            self.forecaster.reset()
        fc, how = self.forecaster.forecast(self.ports.demand(p), now=now)
        series = DemandSeries(start=how.history_end, step_s=p.demand.step_s, values=_NO_STEPS)
        groups = {z.name: status.groups.get(z.group) for z in p.zones.items}
        missing = [z.group for z in p.zones.items if groups[z.name] is None]
        if missing:
            self._skip(rec, "group-missing", f"job {p.target.job} has no group {missing[0]}")
            return
        current_zones = {zone: g.desired for zone, g in groups.items() if g is not None}
        current = sum(current_zones.values())
        last = last_scale_time(status)
        pool = self.ports.pool(p) if self.manages_nodes else None
        self._short, read = short_zones(pool, p.zones.items, policy=p.name)
        np_ = p.target.node_pool
        caps = zone_capacity(
            {z: (f.target, f.not_created) for z, f in self._short.items()},
            workers_per_node=np_.workers_per_node if np_ is not None else 1,
        )
        decision = decide(
            policy=p,
            series=series,
            now=now,
            current=current,
            current_zones=current_zones,
            last_scale_at=last,
            overrides=overrides,
            zone_capacity=caps or None,
            precomputed=fc,
        )
        if self._short:
            lines = "; ".join(f.line() for f in self._short.values())
            decision = replace(decision, reason=f"{decision.reason}; {lines}")
        if leader and not dry_run and read:
            self._track_short(self._short)
        res.decision = decision
        rec.decision = decision.to_dict()
        rec.inputs = {
            "history_steps": how.history_steps,
            "history_end": how.history_end.isoformat(),
            "forecast": f"{how.mode} ({how.steps} steps read, {how.seconds * 1000:.0f} ms)",
            "last_scale_at": last.isoformat() if last else None,
            "overrides": [o.label() for o in overrides],
            "current": current,
        }
        if read:
            rec.inputs["fulfilment"] = {zone: f.line() for zone, f in self._short.items()}
        if interrupted is not None:
            rec.inputs["interrupted"] = interrupted.get("id")
        wanted = {z.zone: z.count for z in decision.zones}
        rec.zones = {
            zone: {"desired": wanted.get(zone), "actual": g.running if g else None}
            for zone, g in groups.items()
        }
        actions = self._plan(decision, status)
        res.actions = actions
        rec.actions = [a.describe() for a in actions]
        if dry_run or not leader:
            rec.outcome = "planned"
            return
        if not actions:
            rec.outcome = "unchanged"
            return
        act = Actuator(
            nomad=self.ports.nomad,
            pool=self.ports.pool(p),
            lock=self.ports.lock,
            clock=self.clock,
            stop=self.stop,
            alerts=self.ports.alerts,
            poll_s=self.poll_s,
            drain_grace_s=self.drain_grace_s,
            on_removing=self._on_removing,
            on_applied=lambda done: self._journal(rec, done),
        )
        self.recorder.journal(rec)  # before the first write: raises, and nothing is written
        out = act.apply(
            actions, decision=decision, job=p.target.job, namespace=p.target.namespace, meta=meta
        )
        rec.applied = out.applied
        rec.errors.extend(out.errors)
        if out.aborted:
            rec.outcome = "aborted"
            rec.reason = out.aborted
            rec.error_kinds.append("aborted")
        elif out.errors:
            rec.outcome = "failed"
            rec.error_kinds.extend("apply" for _ in out.errors)
        else:
            rec.outcome = "applied"
