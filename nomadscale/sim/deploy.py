"""Deployments: creation from the update block, health accounting, progress deadlines,
canary promotion, pause, failure and auto-revert to the last stable job version."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nomadscale.sim.model import NS, ApiError, Deployment, GroupDeploy, new_uuid

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import Alloc, JobRecord

DESC_RUNNING = "Deployment is running"
DESC_NEEDS_PROMOTION = "Deployment is running but requires manual promotion"
DESC_AUTO_PROMOTION = "Deployment is running pending automatic promotion"
DESC_PAUSED = "Deployment is paused"
DESC_SUCCESSFUL = "Deployment completed successfully"
DESC_STOPPED_JOB = "Cancelled because job is stopped"
DESC_NEWER_JOB = "Cancelled due to newer version of job"
DESC_FAILED_ALLOCS = "Failed due to unhealthy allocations"
DESC_PROGRESS = "Failed due to progress deadline"
DESC_FAILED_BY_USER = "Deployment marked as failed"


def strategy(tg: dict[str, Any]) -> dict[str, Any] | None:
    """The group's update block in seconds, or None when it gets no deployments."""
    u = tg.get("Update")
    if not u or int(u.get("MaxParallel") or 0) <= 0:
        return None
    return {
        "MaxParallel": int(u.get("MaxParallel") or 1),
        "Canary": int(u.get("Canary") or 0),
        "AutoRevert": bool(u.get("AutoRevert")),
        "AutoPromote": bool(u.get("AutoPromote")),
        "MinHealthyTime": _s(u.get("MinHealthyTime"), 10.0),
        "HealthyDeadline": _s(u.get("HealthyDeadline"), 300.0),
        "ProgressDeadline": _s(u.get("ProgressDeadline"), 600.0),
    }


def group_of(a: Alloc) -> dict[str, Any]:
    """``a``'s task group in the job version it runs."""
    for tg in a.job.get("TaskGroups") or []:
        if tg.get("Name") == a.task_group:
            return tg  # type: ignore[no-any-return]
    return {}


def watch_times(a: Alloc) -> tuple[float, float] | None:
    """(min_healthy_time, healthy_deadline) the client watches a service allocation's health
    with, or None when it does not watch it (client/allocrunner/health_hook.go ``init`` and
    ``getHealthParams``): an allocation of a deployment (DeploymentID set) with its group's
    update block, and not at all when the group has none (max_parallel 0) or health_check
    "manual"; any other allocation with the group's migrate block."""
    tg = group_of(a)
    if a.deployment_id:
        st = strategy(tg)
        if st is None or (tg.get("Update") or {}).get("HealthCheck") == "manual":
            return None
        return st["MinHealthyTime"], st["HealthyDeadline"]
    m = tg.get("Migrate") or {}
    return _s(m.get("MinHealthyTime"), 10.0), _s(m.get("HealthyDeadline"), 300.0)


def _s(v: Any, default: float) -> float:
    return default if v is None else float(v) / NS


def create(c: Cluster, job: JobRecord, plans: list[dict[str, Any]]) -> Deployment:
    now = c.now_s()
    groups: dict[str, GroupDeploy] = {}
    for p in plans:
        st = strategy(p["tg"])
        if st is None:
            continue
        pd = st["ProgressDeadline"]
        groups[p["tg"]["Name"]] = GroupDeploy(
            auto_revert=st["AutoRevert"],
            auto_promote=st["AutoPromote"],
            progress_deadline_s=pd,
            desired_canaries=st["Canary"] if p["old"] else 0,
            desired_total=int(p["tg"].get("Count", 0)),
            require_progress_by=now + pd if pd > 0 else None,
        )
    idx = c.bump("deployments")
    dep = Deployment(
        id=new_uuid(),
        namespace=job.namespace,
        job_id=job.id,
        job_version=job.version,
        job_modify_index=int(job.spec.get("JobModifyIndex", 0)),
        job_create_index=job.create_index,
        groups=groups,
        create_index=idx,
        modify_index=idx,
        eval_priority=int(job.spec.get("Priority", 50)),
    )
    dep.destructive = any(p["old"] for p in plans)
    canary_groups = [g for g in groups.values() if g.desired_canaries]
    if canary_groups:
        auto = all(g.auto_promote for g in canary_groups)
        dep.description = DESC_AUTO_PROMOTION if auto else DESC_NEEDS_PROMOTION
    c.deployments[dep.id] = dep
    c.deployments_by_job[(job.namespace, job.id)].append(dep)
    for name, gs in groups.items():
        if gs.require_progress_by is not None:
            c.schedule(gs.require_progress_by, "deploy_deadline", f"{dep.id}|{name}")
    c.emit(
        "deployment",
        deployment_id=dep.id,
        job_id=job.id,
        status=dep.status,
        description=dep.description,
        version=job.version,
    )
    return dep


def set_status(c: Cluster, dep: Deployment, status: str, description: str) -> None:
    dep.status = status
    dep.description = description
    dep.modify_index = c.bump("deployments")
    c.emit(
        "deployment",
        deployment_id=dep.id,
        job_id=dep.job_id,
        status=status,
        description=description,
        version=dep.job_version,
    )


def max_parallel_left(dep: Deployment | None, max_parallel: int, allocs: Iterable[Alloc]) -> int:
    """How many destructive updates and placements a group's rollout may start now, before
    this evaluation's placements: Nomad's computeUnderProvisionedBy (scheduler/reconcile.go).
    No deployment: max_parallel; a paused deployment: none. Otherwise max_parallel minus the
    group's allocations *of this deployment* (by DeploymentID, not by job version or spec:
    allocations of a superseded deployment never count) whose health is not yet set, and none
    at all once one of them is unhealthy: the deployment then waits for healthy allocations
    and fails at its progress deadline (auto-reverting if set), or at once if that is 0.
    ``allocs``: the group's allocations the evaluation keeps (live, or failed ones of the
    running deployment)."""
    if dep is None:
        return max_parallel
    if dep.status != "running":
        return 0
    left = max_parallel
    for a in allocs:
        if a.deployment_id != dep.id or a.desired_status != "run":
            continue
        if a.healthy is False:
            return 0  # "An unhealthy allocation means nothing else should happen."
        if a.healthy is None:
            left -= 1
    return max(0, left)


def _group_allocs(c: Cluster, dep: Deployment, group: str) -> list[Alloc]:
    return [a for a in c.job_allocs((dep.namespace, dep.job_id)) if a.task_group == group]


def _healthy_canaries(c: Cluster, dep: Deployment, group: str) -> int:
    return sum(
        1
        for a in _group_allocs(c, dep, group)
        if a.canary and a.deployment_id == dep.id and a.healthy and a.live
    )


def _group_done(c: Cluster, dep: Deployment, job: JobRecord, group: str) -> bool:
    from nomadscale.sim.sched import spec_hash

    gs = dep.groups[group]
    tg = job.group(group)
    if tg is None:
        return True
    if gs.desired_canaries and not gs.promoted:
        return False
    if gs.healthy_allocs < gs.desired_total:
        return False  # cheap test first: the deployment has not seen enough healthy allocs
    h = spec_hash(job.spec, tg)
    allocs = [a for a in _group_allocs(c, dep, group) if a.live]
    healthy = sum(1 for a in allocs if a.spec_hash == h and a.healthy)
    old = any(a.spec_hash != h for a in allocs)
    return healthy >= gs.desired_total and not old


def check(c: Cluster, dep: Deployment) -> None:
    """Promote, complete or describe ``dep`` after any change."""
    if not dep.active or dep.status == "paused":
        return
    job = c.jobs.get((dep.namespace, dep.job_id))
    if job is None or job.version != dep.job_version:
        return
    waiting = [g for g, gs in dep.groups.items() if gs.desired_canaries and not gs.promoted]
    if waiting:
        ready = all(_healthy_canaries(c, dep, g) >= dep.groups[g].desired_canaries for g in waiting)
        if ready and all(dep.groups[g].auto_promote for g in waiting):
            promote(c, dep, groups=None)
        return
    if all(_group_done(c, dep, job, g) for g in dep.groups):
        set_status(c, dep, "successful", DESC_SUCCESSFUL)
        job.spec["Stable"] = True
        if job.version in job.versions:
            job.versions[job.version]["Stable"] = True
        job.modify_index = c.bump("jobs")
        job.spec["ModifyIndex"] = job.modify_index


def on_health(c: Cluster, a: Alloc, healthy: bool) -> None:
    """The client set ``a``'s health; the deployment watcher reacts."""
    a.healthy = healthy
    a.was_healthy = a.was_healthy or healthy
    a.health_time = c.now_s()
    a.modify_index = a.health_index = c.bump("allocs")
    c.emit(
        "alloc_healthy" if healthy else "alloc_unhealthy",
        alloc_id=a.id,
        job_id=a.job_id,
        group=a.task_group,
        node_id=a.node_id,
    )
    dep = c.deployments.get(a.deployment_id) if a.deployment_id else None
    if dep is None or not dep.active or a.task_group not in dep.groups:
        return
    gs = dep.groups[a.task_group]
    if healthy:
        gs.healthy_allocs += 1
        if gs.progress_deadline_s > 0:
            gs.require_progress_by = c.now_s() + gs.progress_deadline_s
            c.schedule(gs.require_progress_by, "deploy_deadline", f"{dep.id}|{a.task_group}")
    else:
        gs.unhealthy_allocs += 1
    dep.modify_index = c.bump("deployments")
    if not healthy:
        _on_unhealthy(c, dep, a, gs)
        return
    if healthy and dep.status == "running":
        from nomadscale.sim import sched

        job = c.jobs.get((dep.namespace, dep.job_id))
        if job is not None and (dep.destructive or a.canary):
            # the rollout can move on: evaluate the job (next batch, promotion)
            sched.reconcile(c, job, triggered_by="deployment-watcher", deployment_id=dep.id)
        else:
            check(c, dep)


def _on_unhealthy(c: Cluster, dep: Deployment, a: Alloc, gs: GroupDeploy) -> None:
    """nomad/deploymentwatcher/deployment_watcher.go handleAllocUpdate: without a progress
    deadline the first unhealthy allocation fails the deployment, and so does one whose
    reschedule policy has no attempt left (shouldFailEarly, Nomad 1.6+). Otherwise the
    allocation is marked DesiredTransition.Reschedule ("allowReplacements") and the job
    evaluated: a failed one is then replaced after its reschedule delay (reschedule.py), while
    the deployment waits for healthy allocations until its progress deadline."""
    from nomadscale.sim import reschedule, sched

    pol = reschedule.policy(c, a)
    if gs.progress_deadline_s <= 0 or not reschedule.eligible(a, pol, c.now_s()):
        fail(c, dep, DESC_FAILED_ALLOCS)
        return
    if a.reschedule_ok:
        return
    a.reschedule_ok = True
    a.modify_index = c.bump("allocs")
    job = c.jobs.get((dep.namespace, dep.job_id))
    if job is not None:
        sched.reconcile(c, job, triggered_by="deployment-watcher", deployment_id=dep.id)


def deadline(c: Cluster, key: str) -> None:
    dep_id, group = key.split("|", 1)
    dep = c.deployments.get(dep_id)
    if dep is None or not dep.active or dep.status == "paused":
        return  # paused: resuming restarts the deadline (see ``pause``)
    gs = dep.groups[group]
    if gs.require_progress_by is None or gs.require_progress_by > c.now_s() + 1e-6:
        return
    job = c.jobs.get((dep.namespace, dep.job_id))
    if job is None or _group_done(c, dep, job, group):
        return
    if (
        gs.desired_canaries
        and not gs.promoted
        and (_healthy_canaries(c, dep, group) >= gs.desired_canaries)
    ):
        return  # waiting for promotion does not count against progress
    fail(c, dep, DESC_PROGRESS)


def stop_unneeded_canaries(c: Cluster, job: JobRecord) -> None:
    """Stop the unpromoted canaries of the job's latest deployment once that deployment
    no longer runs the job: a newer job version (or a re-created job) superseded it, or it
    failed. Nomad's reconciler does this first in every evaluation (reconcile.go
    cancelUnneededDeployments makes it the ``oldDeployment``; cancelUnneededCanaries stops
    the PlacedCanaries of its groups that are not Promoted, and those of a failed current
    deployment, as "alloc not needed due to job update"; failed ones too, so they are not
    rescheduled)."""
    from nomadscale.sim.sched import stop_any

    history = c.deployments_by_job.get((job.namespace, job.id))
    if not history:
        return
    last = history[-1]
    superseded = last.job_version != job.version or last.job_create_index != job.create_index
    if not superseded and last.status not in ("failed", "successful"):
        return
    for gs in last.groups.values():
        if gs.promoted:
            continue
        for alloc_id in gs.placed_canaries:
            a = c.allocs.get(alloc_id)
            if a is not None:
                stop_any(c, a, "alloc not needed due to job update")


def fail(c: Cluster, dep: Deployment, description: str) -> int | None:
    """Fail ``dep``; with auto_revert, register the last stable version again. Returns the
    version rolled back to, if any."""
    from nomadscale.sim import jobs, sched

    if not dep.active:
        raise ApiError(500, "can't fail terminal deployment")
    job = c.jobs.get((dep.namespace, dep.job_id))
    revert_to: int | None = None
    if job is not None and any(gs.auto_revert for gs in dep.groups.values()):
        stable = [
            v
            for v, spec in sorted(job.versions.items(), reverse=True)
            if spec.get("Stable") and v != dep.job_version
        ]
        if not stable:
            description += " - no stable job version to auto revert to"
        else:
            v = stable[0]
            same = _same_groups(job.versions[v], job.spec)
            if same:
                description += (
                    f" - not rolling back to stable job version {v} as current job has same "
                    "specification"
                )
            else:
                description += f" - rolling back to job version {v}"
                revert_to = v
    set_status(c, dep, "failed", description)
    if job is not None:
        if revert_to is not None:
            jobs.revert(c, job, revert_to, triggered_by="deployment-watcher")
        else:
            sched.reconcile(c, job, triggered_by="deployment-watcher", deployment_id=dep.id)
    return revert_to


def _same_groups(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from nomadscale.sim.sched import spec_hash

    ga = {tg["Name"]: spec_hash(a, tg) for tg in a.get("TaskGroups") or []}
    gb = {tg["Name"]: spec_hash(b, tg) for tg in b.get("TaskGroups") or []}
    return ga == gb


def promote(c: Cluster, dep: Deployment, *, groups: list[str] | None) -> dict[str, Any] | None:
    from nomadscale.sim import sched

    if not dep.active:
        raise ApiError(500, "can't promote terminal deployment")
    targets = [g for g, gs in dep.groups.items() if gs.desired_canaries and not gs.promoted]
    if groups:
        targets = [g for g in targets if g in groups]
    for g in targets:
        h, n = _healthy_canaries(c, dep, g), dep.groups[g].desired_canaries
        if h < n:
            raise ApiError(500, f'Task group "{g}" has {h}/{n} healthy allocations')
    now = c.now_s()
    for g in targets:
        gs = dep.groups[g]
        gs.promoted = True
        for a in _group_allocs(c, dep, g):
            if a.canary and a.deployment_id == dep.id:
                a.canary = False  # promoted canaries count as ordinary allocations
                a.modify_index = c.bump("allocs")
        if gs.progress_deadline_s > 0:
            gs.require_progress_by = now + gs.progress_deadline_s
            c.schedule(gs.require_progress_by, "deploy_deadline", f"{dep.id}|{g}")
    set_status(c, dep, dep.status, DESC_RUNNING if dep.status == "running" else DESC_PAUSED)
    c.emit("promote", deployment_id=dep.id, job_id=dep.job_id, groups=targets)
    job = c.jobs.get((dep.namespace, dep.job_id))
    if job is None or dep.status != "running":
        return None
    return sched.reconcile(c, job, triggered_by="deployment-watcher", deployment_id=dep.id)


def pause(c: Cluster, dep: Deployment, *, paused: bool) -> dict[str, Any] | None:
    """Pause or resume ``dep``. A paused deployment never fails at its progress deadline
    (``deadline`` skips it), and both pausing and resuming restart every group's deadline
    from now, so a resumed deployment gets a whole progress_deadline again (Nomad 2.0.x,
    hashicorp/nomad#27804: deploymentwatcher shouldFail skips paused deployments;
    getDeploymentStatusUpdate stamps paused/running updates and the state store's
    updateDeploymentStatusImpl sets RequireProgressBy = that time + ProgressDeadline)."""
    from nomadscale.sim import sched

    if not dep.active:
        raise ApiError(500, f"can't {'pause' if paused else 'resume'} terminal deployment")
    now = c.now_s()
    for name, gs in dep.groups.items():
        if gs.progress_deadline_s > 0:
            gs.require_progress_by = now + gs.progress_deadline_s
            if not paused:
                c.schedule(gs.require_progress_by, "deploy_deadline", f"{dep.id}|{name}")
    if paused:
        set_status(c, dep, "paused", DESC_PAUSED)
        return None
    waiting = [g for g, gs in dep.groups.items() if gs.desired_canaries and not gs.promoted]
    desc = DESC_RUNNING
    if waiting:
        auto = all(dep.groups[g].auto_promote for g in waiting)
        desc = DESC_AUTO_PROMOTION if auto else DESC_NEEDS_PROMOTION
    set_status(c, dep, "running", desc)
    job = c.jobs.get((dep.namespace, dep.job_id))
    if job is None:
        return None
    return sched.reconcile(c, job, triggered_by="deployment-watcher", deployment_id=dep.id)
