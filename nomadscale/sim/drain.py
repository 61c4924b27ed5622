"""Node drains: migrate allocations off a node (replacement first, then stop), force-stop
at the deadline, and mark the drain complete."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nomadscale.sim.model import NS, Node, rfc3339

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import Alloc


def _is_system(a: Alloc) -> bool:
    return a.job.get("Type") in ("system", "sysbatch")


def start(
    c: Cluster,
    node: Node,
    spec: Mapping[str, Any] | None,
    *,
    meta: Mapping[str, str] | None,
    mark_eligible: bool,
) -> list[str]:
    """Start, update or (``spec`` None) cancel a drain. Returns evaluation ids."""
    now = c.now_s()
    if spec is None:
        if node.drain_strategy is not None:
            node.drain_strategy = None
            if node.last_drain is not None:
                node.last_drain.update({"Status": "canceled", "UpdatedAt": rfc3339(now)})
            for a in c.allocs_by_node.get(node.id, ()):
                a.migrating = False
            c.emit("drain", node_id=node.id, phase="canceled")
        if mark_eligible:
            node.eligibility = "eligible"
            c.capacity_changed()
        node.modify_index = c.bump("nodes")
        return []
    deadline_ns = int(spec.get("Deadline") or 0)
    ignore_system = bool(spec.get("IgnoreSystemJobs"))
    force_at = now + deadline_ns / NS if deadline_ns > 0 else None
    node.drain_strategy = {
        "DrainSpec": {"Deadline": deadline_ns, "IgnoreSystemJobs": ignore_system},
        "ForceDeadline": rfc3339(force_at) if force_at else rfc3339(None),
        "StartedAt": rfc3339(now),
    }
    node.eligibility = "ineligible"
    node.last_drain = {
        "StartedAt": rfc3339(now),
        "UpdatedAt": rfc3339(now),
        "Status": "draining",
        "AccessorID": "",
        "Meta": dict(meta) if meta else None,
    }
    node.events.append(c._node_event("Node drain strategy set"))
    node.modify_index = c.bump("nodes")
    c.emit(
        "drain", node_id=node.id, phase="start", deadline_s=deadline_ns / NS, meta=dict(meta or {})
    )
    if deadline_ns < 0:
        return force(c, node.id)
    if force_at is not None:
        c.schedule(force_at, "drain_deadline", node.id)
    return step(c, node)


def _drainable(c: Cluster, node: Node) -> list[Alloc]:
    ignore = bool((node.drain_strategy or {}).get("DrainSpec", {}).get("IgnoreSystemJobs"))
    out = []
    for a in c.allocs_by_node.get(node.id, ()):
        if a.live and not (ignore and _is_system(a)):
            out.append(a)
    return out


def step(c: Cluster, node: Node) -> list[str]:
    """Mark the next allocations for migration (migrate.max_parallel per group)."""
    from nomadscale.sim import sched

    if node.drain_strategy is None:
        return []
    remaining = _drainable(c, node)
    if not remaining:
        _complete(c, node)
        return []
    service = [a for a in remaining if a.job.get("Type", "service") == "service"]
    if not service and all(_is_system(a) for a in remaining):
        for a in remaining:  # system jobs go last
            sched.stop_alloc(c, a, "alloc is being drained")
        _complete(c, node)
        return []
    touched: dict[tuple[str, str], bool] = {}
    by_group: dict[tuple[str, str, str], list[Alloc]] = {}
    for a in service:
        by_group.setdefault((a.namespace, a.job_id, a.task_group), []).append(a)
    for (ns, job_id, group), allocs in by_group.items():
        job = c.jobs.get((ns, job_id))
        tg = job.group(group) if job else None
        max_par = int(((tg or {}).get("Migrate") or {}).get("MaxParallel") or 1)
        in_flight = sum(1 for a in allocs if a.migrating)
        for a in sorted(allocs, key=lambda x: x.create_index):
            if in_flight >= max_par:
                break
            if not a.migrating:
                a.migrating = True
                a.modify_index = c.bump("allocs")
                in_flight += 1
                touched[(ns, job_id)] = True
    evals = []
    for key in touched:
        job = c.jobs.get(key)
        if job is not None:
            ev = sched.reconcile(c, job, triggered_by="node-drain", node_id=node.id)
            if ev is not None:
                evals.append(ev["ID"])
    return evals


def force(c: Cluster, node_id: str) -> list[str]:
    """The deadline passed: stop everything left on the node and reschedule it."""
    from nomadscale.sim import sched

    node = c.nodes.get(node_id)
    if node is None or node.drain_strategy is None:
        return []
    jobs: dict[tuple[str, str], bool] = {}
    left = _drainable(c, node)
    for a in left:
        a.migrating = False
        sched.stop_alloc(c, a, "alloc is being drained (deadline reached)")
        jobs[(a.namespace, a.job_id)] = True
    c.emit("drain", node_id=node.id, phase="deadline", stopped=len(left))
    evals = []
    for key in jobs:
        job = c.jobs.get(key)
        if job is not None:
            ev = sched.reconcile(c, job, triggered_by="node-drain", node_id=node.id)
            if ev is not None:
                evals.append(ev["ID"])
    _complete(c, node)
    return evals


def _complete(c: Cluster, node: Node) -> None:
    if node.drain_strategy is None:
        return
    node.drain_strategy = None
    if node.last_drain is not None:
        node.last_drain.update({"Status": "complete", "UpdatedAt": rfc3339(c.now_s())})
    node.events.append(c._node_event("Node drain complete"))
    node.modify_index = c.bump("nodes")
    c.emit("drain", node_id=node.id, phase="complete")
