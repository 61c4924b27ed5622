"""Node drains: migrate allocations off draining nodes, migrate.max_parallel per group at a
time once the allocations' health is set (stopped and replaced together by the scheduler),
force-stop at the deadline, and mark the drain complete."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from nomadscale.sim.model import NS, TERMINAL_CLIENT, Node, rfc3339

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import Alloc, JobRecord


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
    """Start, update or (``spec`` None) cancel a drain. Returns evaluation ids.

    As nomad/node_endpoint.go UpdateDrain and nomad/state/state_store.go
    updateNodeDrainImpl: an update of a running drain keeps its StartedAt (the strategy's and
    LastDrain's), and LastDrain.Meta is replaced only by a non-empty Meta (an update or a
    cancel without one keeps the drainer's); the node event says set / updated / disabled.
    DrainStrategy is structs.DrainStrategy, whose embedded DrainSpec is inlined in its JSON
    (``Deadline``, ``IgnoreSystemJobs``, ``ForceDeadline``, ``StartedAt``)."""
    now = c.now_s()
    if spec is None:
        if node.drain_strategy is not None:
            node.drain_strategy = None
            node.drain_force_at = None
            c.draining.discard(node.id)
            if node.last_drain is not None:
                node.last_drain.update({"Status": "canceled", "UpdatedAt": rfc3339(now)})
                if meta:
                    node.last_drain["Meta"] = dict(meta)
            for a in c.allocs_by_node.get(node.id, ()):
                a.migrating = False
            node.events.append(c._node_event("Node drain disabled"))
            c.emit("drain", node_id=node.id, phase="canceled")
        if mark_eligible:
            node.eligibility = "eligible"
            c.capacity_changed()
        node.modify_index = c.bump("nodes")
        return []
    deadline_ns = int(spec.get("Deadline") or 0)
    ignore_system = bool(spec.get("IgnoreSystemJobs"))
    force_at = now + deadline_ns / NS if deadline_ns > 0 else None
    updating = node.drain_strategy is not None
    started = (node.drain_strategy or {}).get("StartedAt") or rfc3339(now)
    node.drain_strategy = {
        "Deadline": deadline_ns,
        "IgnoreSystemJobs": ignore_system,
        "ForceDeadline": rfc3339(force_at) if force_at else rfc3339(None),
        "StartedAt": started,
    }
    node.drain_force_at = force_at
    node.eligibility = "ineligible"
    c.draining.add(node.id)
    if updating and node.last_drain is not None:
        node.last_drain.update({"UpdatedAt": rfc3339(now), "Status": "draining"})
        if meta:
            node.last_drain["Meta"] = dict(meta)
    else:
        node.last_drain = {
            "StartedAt": rfc3339(now),
            "UpdatedAt": rfc3339(now),
            "Status": "draining",
            "AccessorID": "",
            "Meta": dict(meta) if meta else None,
        }
    node.events.append(
        c._node_event("Node drain strategy updated" if updating else "Node drain strategy set")
    )
    node.modify_index = c.bump("nodes")
    c.emit(
        "drain", node_id=node.id, phase="start", deadline_s=deadline_ns / NS, meta=dict(meta or {})
    )
    if deadline_ns < 0:
        return force(c, node.id)
    if force_at is not None:
        c.schedule(force_at, "drain_deadline", node.id)
    return step(c)


def _drainable(c: Cluster, node: Node) -> list[Alloc]:
    ignore = bool((node.drain_strategy or {}).get("IgnoreSystemJobs"))
    out = []
    for a in c.allocs_by_node.get(node.id, ()):
        if a.live and not (ignore and _is_system(a)):
            out.append(a)
    return out


def step(c: Cluster, *, jobs: Collection[tuple[str, str]] | None = None) -> list[str]:
    """The node drainer's pass over the draining nodes: mark allocations for migration,
    job-wide, as Nomad's job watcher does (nomad/drainer/watch_jobs.go handleTaskGroup), let
    the scheduler stop and replace them (scheduler/reconcile.go computeMigrations, in
    ``counted.py``), then complete the drains with nothing but system allocations left
    (draining_node.go IsDone; drainer.go handleMigratedAllocs stops those last). ``jobs``:
    only those jobs' allocations changed (a health set, an allocation finished). Returns
    evaluation ids."""
    from nomadscale.sim import sched

    nodes = [n for i in sorted(c.draining) if (n := c.nodes[i]).drain_strategy is not None]
    if not nodes:
        return []
    drainable: dict[tuple[str, str], dict[str, list[Alloc]]] = {}
    for n in nodes:
        for a in c.allocs_by_node.get(n.id, ()):
            key = (a.namespace, a.job_id)
            if a.live and not a.migrating and not _is_system(a) and (jobs is None or key in jobs):
                drainable.setdefault(key, {}).setdefault(a.task_group, []).append(a)
    evals = []
    for key, groups in drainable.items():
        job = c.jobs.get(key)
        if job is None or job.type != "service":
            continue  # batch allocations run on until the deadline; system ones go last
        marked = False
        for tg in job.spec.get("TaskGroups") or []:
            if tg.get("Name") in groups:
                marked = _mark_group(c, job, tg, groups[tg["Name"]]) or marked
        if marked:
            ev = sched.reconcile(c, job, triggered_by="node-drain")
            if ev is not None:
                evals.append(ev["ID"])
    for n in nodes:
        if n.drain_strategy is None or not _done(c, n):
            continue
        for a in _drainable(c, n):  # system jobs go last
            sched.stop_alloc(c, a, "alloc is being drained")
        _complete(c, n)
    return evals


def _done(c: Cluster, node: Node) -> bool:
    """draining_node.go IsDone: every allocation on the node but system ones is terminal on
    its client (a stopped one still being killed keeps the drain going)."""
    return all(
        _is_system(a) or a.client_status in TERMINAL_CLIENT
        for a in c.allocs_by_node.get(node.id, ())
    )


def _mark_group(c: Cluster, job: JobRecord, tg: dict[str, Any], drainable: list[Alloc]) -> bool:
    """handleTaskGroup: every allocation of the group whose health is set counts as healthy
    for the migration, healthy or not, on any node; the drain may take the group down to
    count - migrate.max_parallel of them. Marks that many of ``drainable`` (its unmarked
    allocations on draining nodes: DesiredTransition.Migrate) and says whether it marked
    any."""
    mig = tg.get("Migrate") or {}
    max_parallel = int(mig["MaxParallel"]) if mig.get("MaxParallel") is not None else 1
    threshold = int(tg.get("Count", 0)) - max_parallel
    healthy = sum(
        1
        for a in c.job_allocs((job.namespace, job.id))
        if a.task_group == tg.get("Name") and a.healthy is not None and a.live
    )
    n = min(len(drainable), healthy - threshold)
    for a in sorted(drainable, key=lambda x: x.create_index)[: max(0, n)]:
        a.migrating = True
        a.modify_index = c.bump("allocs")
    return n > 0


def force(c: Cluster, node_id: str) -> list[str]:
    """The deadline passed: stop everything left on the node and reschedule it."""
    from nomadscale.sim import sched

    node = c.nodes.get(node_id)
    if node is None or node.drain_strategy is None:
        return []
    if int(node.drain_strategy.get("Deadline") or 0) >= 0 and (
        node.drain_force_at is None or node.drain_force_at > c.now_s() + 1e-6
    ):
        return []  # the deadline of an earlier strategy: the drain was updated since
    jobs: dict[tuple[str, str], bool] = {}
    left = _drainable(c, node)
    for a in left:
        if _is_system(a):
            a.migrating = False
            sched.stop_alloc(c, a, "alloc is being drained (deadline reached)")
        else:
            # drainer.go handleDeadlinedNodes -> drainAllocs: DesiredTransition.Migrate for
            # everything left; the scheduler stops and replaces them (computeMigrations),
            # whatever the deployment's state
            a.migrating = True
            a.modify_index = c.bump("allocs")
        jobs[(a.namespace, a.job_id)] = True
    c.emit("drain", node_id=node.id, phase="deadline", stopped=len(left))
    evals = []
    for key in jobs:
        job = c.jobs.get(key)
        if job is not None:
            ev = sched.reconcile(c, job, triggered_by="node-drain", node_id=node.id)
            if ev is not None:
                evals.append(ev["ID"])
    for a in left:
        if a.live and a.migrating:  # no scheduler took it (the job is gone)
            sched.stop_alloc(c, a, "alloc is being migrated")
    _complete(c, node)
    return evals


def _complete(c: Cluster, node: Node) -> None:
    if node.drain_strategy is None:
        return
    node.drain_strategy = None
    node.drain_force_at = None
    c.draining.discard(node.id)
    if node.last_drain is not None:
        node.last_drain.update({"Status": "complete", "UpdatedAt": rfc3339(c.now_s())})
    node.events.append(c._node_event("Node drain complete"))
    node.modify_index = c.bump("nodes")
    c.emit("drain", node_id=node.id, phase="complete")
