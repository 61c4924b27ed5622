"""Preflight: the policy, the job and its zone groups, nodes per zone, and whether taking one
worker out at a time keeps capacity above the forecast's upper bound for the rollout.

A zone's free nodes are the ones Nomad would place one more worker of its group on, the way
the rollout decides it later (``room``): the devices a worker asks for (its GPU) held by no
allocation, whatever system or non-GPU jobs run there; a node with more GPUs than workers
counts. The group's extra allocations already placed (a canary, when a rollout resumes)
count too: they already have their node."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.core.errors import PermanentError, SafetyError
from nomadscale.core.ports import DemandSource, JobInfo, NodeInfo, pinned_datacenter
from nomadscale.deploy import room
from nomadscale.integrations.tracefile import read_time
from nomadscale.stages.decide import forecast_config_from, lookback_s
from nomadscale.stages.forecast import forecast

log = logging.getLogger(__name__)


@dataclass
class ZonePlan:
    group: str
    datacenter: str
    count: int
    nodes: list[NodeInfo] = field(default_factory=list)  # ready + eligible, not draining
    spare: int | None = None  # nodes with room for one more worker (``free_nodes``)

    @property
    def free(self) -> int:
        """Nodes that take one more worker each: ``spare`` once counted, else one worker per
        node and nothing else holding their GPU."""
        return self.spare if self.spare is not None else max(0, len(self.nodes) - self.count)


@dataclass
class Plan:
    job: JobInfo
    zones: list[ZonePlan]
    previous_image: str | None
    required_workers: int  # ceil(forecast upper / rpm_per_worker); 0 when unknown
    forecast_upper: float | None
    surge: bool
    estimate_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(z.count for z in self.zones)

    def explain(self) -> str:
        f = "no forecast" if self.forecast_upper is None else f"upper {self.forecast_upper:.0f} rpm"
        return (
            f"{self.total} workers in {len(self.zones)} zones, {f} -> need "
            f"{self.required_workers}, {'surge 1 per zone' if self.surge else 'no surge'}; "
            f"estimated {self.estimate_s / 60:.0f} min"
        ) + "".join(f"; {n}" for n in self.notes)


def task_images(spec: dict[str, Any], group: str) -> list[str]:
    for tg in spec.get("TaskGroups") or []:
        if tg.get("Name") == group:
            return [str((t.get("Config") or {}).get("image") or "") for t in tg.get("Tasks") or []]
    return []


def estimate_seconds(policy: Policy, workers: int, *, prefetched: bool) -> float:
    d = policy.deploy
    assert d is not None
    pull = 0.0 if prefetched else (d.image_size_bytes or 7e9) * 8 / 800e6
    per_node = pull + 10.0 + d.min_healthy_time.total_seconds()
    gate = d.sli.window_s if d.sli else 0.0
    return workers * per_node + gate + 120.0


def forecast_upper(
    policy: Policy, demand: DemandSource, *, now: datetime, horizon_s: float
) -> float | None:
    """Upper bound of demand (rpm) over ``horizon_s`` from now (rounded up to whole cycles):
    the live loop's forecast (its config, with headroom calibrated on whole workers, and its
    lookback), one cycle of it stretched to cover the rollout. None when the history has no
    recent data (a Prometheus gap, a wrong query): then nothing is known of demand. A trace
    that ends before ``now`` is read right after its last step (``tracefile.read_time``)."""
    now = read_time(demand, now)
    cfg = forecast_config_from(policy)
    n = max(1, math.ceil(horizon_s / policy.cycle_s))
    cfg = replace(cfg, cycle_s=policy.cycle_s * n, lead_s=policy.lead_time_s)
    series = demand.history(end=now, lookback_s=lookback_s(policy), step_s=policy.demand.step_s)
    fc = forecast(series, now=now, config=cfg)
    return float(fc.upper) if fc.data_ok else None


def free_nodes(nomad: Any, zp: ZonePlan, *, spec: Mapping[str, Any], job: JobInfo) -> int:
    """How many of ``zp.nodes`` have room for one more allocation of ``zp.group``
    (``room.has_room``; two calls per node: the node, its allocations), plus the allocations
    of the group placed on them beyond its count (a canary or surge worker already running)."""
    wants = room.device_requests(spec, zp.group)
    distinct = room.distinct_hosts(spec, zp.group)
    spare = placed = 0
    for n in zp.nodes:
        allocs = nomad.node_allocations(n.id)
        if room.has_room(nomad.node(n.id), allocs, wants=wants, job_id=job.job_id,
                         distinct=distinct):  # fmt: skip
            spare += 1
        placed += sum(1 for a in allocs
                      if not a.terminal and a.job_id == job.job_id and a.task_group == zp.group
                      and a.namespace in (job.namespace, ""))  # fmt: skip
    return spare + max(0, placed - zp.count)


def preflight(
    policy: Policy,
    nomad: Any,
    *,
    now: datetime,
    demand: DemandSource | None,
    prefetched: bool = True,
) -> Plan:
    """Check that the rollout can be made safe; SafetyError (one line) when it cannot."""
    if policy.deploy is None:
        raise PermanentError(f"policy {policy.name}: no 'deploy:' section")
    ns = policy.target.namespace
    job = nomad.get_job(policy.target.job, namespace=ns)
    if job.stopped:
        raise SafetyError(f"job {job.job_id} is stopped; nothing to roll out")
    zones: list[ZonePlan] = []
    pool_nodes: dict[str, list[NodeInfo]] = {}
    for z in policy.zones.items:
        if z.group not in job.groups:
            raise PermanentError(
                f"policy {policy.name}: zones: group {z.group!r} is not in job {job.job_id}"
            )
        if z.node_pool not in pool_nodes:
            pool_nodes[z.node_pool] = nomad.list_nodes(node_pool=z.node_pool)
        dc = pinned_datacenter(job.spec, z.group) or z.name
        usable = [
            n for n in pool_nodes[z.node_pool]
            if n.datacenter == dc and n.status == "ready" and n.eligibility == "eligible"
            and not n.draining
        ]  # fmt: skip
        zp = ZonePlan(group=z.group, datacenter=dc, count=job.groups[z.group], nodes=usable)
        zp.spare = free_nodes(nomad, zp, spec=job.spec, job=job)
        zones.append(zp)
    images = task_images(dict(job.spec), zones[0].group)
    previous = images[0] if images else None
    total = sum(z.count for z in zones)
    est = estimate_seconds(policy, total, prefetched=prefetched)
    upper = None
    required = 0
    notes: list[str] = []
    if demand is not None:
        upper = forecast_upper(policy, demand, now=now, horizon_s=est)
        if upper is None:
            # no recent demand data: assume the fleet is sized for it, as the live loop holds
            # its count on missing data; every node step then needs a surge worker
            upper = total * policy.capacity.rpm_per_worker
            notes.append(f"no recent demand data: planning for the {total} workers' capacity")
            log.warning("deploy %s preflight: %s", policy.name, notes[-1])
        required = math.ceil(upper / policy.capacity.rpm_per_worker - 1e-9)
    plan = Plan(job=job, zones=zones, previous_image=previous, required_workers=required,
                forecast_upper=upper, surge=False, estimate_s=est, notes=notes)  # fmt: skip
    if total - 1 < required:
        if total < required:
            raise SafetyError(
                f"deploy {policy.name}: {total} workers already serve less than the forecast "
                f"upper bound ({upper:.0f} rpm needs {required}); scale up before rolling out"
            )
        if total + 1 > policy.bounds.max:
            raise SafetyError(
                f"deploy {policy.name}: taking one worker out leaves {total - 1} < {required} "
                f"needed and a surge worker would pass bounds.max {policy.bounds.max}"
            )
        plan.surge = True
    canary = policy.deploy.canary
    for i, zp in enumerate(zones):
        if zp.count == 0:
            continue
        need = (1 if plan.surge else 0) + (canary if i == 0 else 0)
        if zp.free < need:
            what = "a surge worker" if plan.surge else ""
            what += (" and " if what and i == 0 and canary else "") + (
                f"{canary} canary" if i == 0 and canary else ""
            )
            gpu = room.device_requests(job.spec, zp.group)
            with_ = f" (with {room.wants_text(job.spec, zp.group)} free)" if gpu else ""
            raise SafetyError(
                f"deploy {policy.name}: zone {zp.datacenter} ({zp.group}) has {zp.free} free "
                f"node(s){with_}, {what} needs {need}"
            )
    log.info("deploy %s preflight: %s", policy.name, plan.explain())
    return plan
