"""The scheduler: reconciles a job's allocations with its spec (service rolling updates and
canaries, batch, sysbatch/system one-per-node), places allocations and records evaluations."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from nomadscale.sim import deploy
from nomadscale.sim.model import NS, Alloc, Deployment, new_uuid
from nomadscale.sim.placement import Placer, group_gpus

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import JobRecord

DEFAULT_IMAGE_GB = 7.0
_NAME_IDX = re.compile(r"\[(\d+)\]$")
# Group and task fields Nomad's tasksUpdated does not compare: a change confined to them (the
# update block, count, scaling, migrate/reschedule/restart policies, kill/shutdown timing) is
# applied to running allocations in place, with no stop and no replacement.
_NON_DESTRUCTIVE = frozenset(
    {
        "Count",
        "Scaling",
        "Update",
        "Migrate",
        "Reschedule",
        "ReschedulePolicy",
        "RestartPolicy",
        "ShutdownDelay",
        "StopAfterClientDisconnect",
        "MaxClientDisconnect",
        "Name",
    }
)
_TASK_NON_DESTRUCTIVE = frozenset({"RestartPolicy", "KillTimeout", "KillSignal", "ShutdownDelay"})


def spec_hash(job: dict[str, Any], tg: dict[str, Any]) -> str:
    """Identity of what a group runs (its tasks: driver, config, env, meta, resources... and the
    job fields that place it); allocations with another hash need a destructive update."""
    body = {k: v for k, v in tg.items() if k not in _NON_DESTRUCTIVE}
    body["Tasks"] = [
        {k: v for k, v in t.items() if k not in _TASK_NON_DESTRUCTIVE} if isinstance(t, dict) else t
        for t in tg.get("Tasks") or []
    ]
    body["_job"] = {k: job.get(k) for k in ("Datacenters", "Constraints", "NodePool", "Meta")}
    raw = json.dumps(body, sort_keys=True, default=str).encode()
    return hashlib.sha1(raw).hexdigest()[:16]


def image_of(
    tg: dict[str, Any], job: dict[str, Any] | None = None, default_gb: float = DEFAULT_IMAGE_GB
) -> tuple[str, float]:
    """(image, size in GB) of a group's first docker task. The size comes from an
    ``image_size_gb`` key in the task meta, task config, group meta or job meta."""
    image, size = "", default_gb
    job_meta = (job or {}).get("Meta") or {}
    for task in tg.get("Tasks") or []:
        cfg = task.get("Config") or {}
        if not image and cfg.get("image"):
            image = str(cfg["image"])
        for src in (task.get("Meta") or {}, cfg, tg.get("Meta") or {}, job_meta):
            if src.get("image_size_gb") is not None:
                with contextlib.suppress(TypeError, ValueError):
                    size = float(src["image_size_gb"])
                break
    return image, size


def _interp_image(image: str, job: dict[str, Any]) -> str:
    meta = job.get("Meta") or {}
    return re.sub(
        r"\$\{NOMAD_META_([A-Za-z0-9_.-]+)\}", lambda m: str(meta.get(m.group(1), "")), image
    )


def stop_alloc(c: Cluster, a: Alloc, description: str, *, client_status: str = "complete") -> None:
    if not a.live:
        return
    from nomadscale.sim import lifecycle

    lifecycle.terminate(c, a, desired="stop", client_status=client_status, description=description)


class IndexPool(set[int]):
    """Name indexes in use; ``take`` hands out the lowest free one."""

    cursor = 0

    def take(self) -> int:
        while self.cursor in self:
            self.cursor += 1
        self.add(self.cursor)
        return self.cursor


def used_indexes(c: Cluster, job: JobRecord, group: str) -> IndexPool:
    used = IndexPool()
    for a in c.job_allocs((job.namespace, job.id)):
        if a.task_group == group and a.live:
            m = _NAME_IDX.search(a.name)
            if m:
                used.add(int(m.group(1)))
    return used


def create_alloc(
    c: Cluster,
    job: JobRecord,
    tg: dict[str, Any],
    node_id: str,
    *,
    eval_id: str,
    dep: Deployment | None,
    canary: bool = False,
    previous: Alloc | None = None,
    used: IndexPool | None = None,
    hash_: str = "",
) -> Alloc:
    """Place one allocation of ``tg`` on ``node_id``. ``used``: the group's name indexes in
    use (pass one set for many placements in one evaluation)."""
    from nomadscale.sim import lifecycle

    if used is None:
        used = used_indexes(c, job, tg["Name"])
    node = c.nodes[node_id]
    image, size = image_of(tg, job.spec, c.default_image_gb)
    image = _interp_image(image, job.spec)
    now = c.now_s()
    idx = c.bump("allocs")
    a = Alloc(
        id=new_uuid(),
        eval_id=eval_id,
        name=f"{job.id}.{tg['Name']}[{used.take()}]",
        namespace=job.namespace,
        node_id=node.id,
        node_name=node.name,
        job_id=job.id,
        job_version=job.version,
        task_group=tg["Name"],
        job=job.spec,
        create_index=idx,
        create_time=now,
        image=image,
        image_size_gb=size,
        gpus=group_gpus(tg),
        spec_hash=hash_ or spec_hash(job.spec, tg),
        deployment_id=dep.id if dep else "",
        canary=canary,
        modify_index=idx,
        modify_time=now,
        task_names=tuple(t.get("Name", "task") for t in tg.get("Tasks") or []) or ("task",),
    )
    if previous is not None:
        a.previous_allocation = previous.id
        previous.next_allocation = a.id
    c.allocs[a.id] = a
    c.allocs_by_job[(job.namespace, job.id)].append(a)
    c.allocs_by_node[node.id].append(a)
    node.track(a, +1)
    if dep is not None and tg["Name"] in dep.groups:
        gs = dep.groups[tg["Name"]]
        gs.placed_allocs += 1
        if canary:
            gs.placed_canaries.append(a.id)
        dep.modify_index = c.bump("deployments")
    c.emit(
        "alloc_placed",
        alloc_id=a.id,
        job_id=job.id,
        group=a.task_group,
        node_id=node.id,
        canary=canary,
        version=job.version,
    )
    lifecycle.alloc_placed(c, a, node)
    return a


def reconcile(
    c: Cluster,
    job: JobRecord,
    *,
    triggered_by: str,
    node_id: str = "",
    deployment_id: str = "",
) -> dict[str, Any] | None:
    """Run one evaluation for ``job``; returns the evaluation (None for parameterized or
    periodic parents, which never get allocations)."""
    if job.parameterized or job.periodic:
        return None
    key = (job.namespace, job.id)
    ev = c.new_eval(job, triggered_by=triggered_by, node_id=node_id, deployment_id=deployment_id)
    failed: dict[str, Any] = {}
    queued: dict[str, int] = {}
    if job.stopped:
        for a in list(c.job_allocs(key)):
            stop_alloc(c, a, "alloc not needed due to job update")
        dep = c.active_deployment(key)
        if dep is not None:
            deploy.set_status(c, dep, "cancelled", deploy.DESC_STOPPED_JOB)
    elif job.type in ("sysbatch", "system"):
        _reconcile_per_node(c, job, ev, failed, queued)
    else:
        _reconcile_counted(c, job, ev, failed, queued)
    ev["QueuedAllocations"] = queued
    for g, n in queued.items():
        c.queued[(key, g)] = n
    if failed:
        ev["FailedTGAllocs"] = failed
        blocked = c.new_eval(job, triggered_by="queued-allocs", status="blocked", previous=ev["ID"])
        blocked["StatusDescription"] = "created to place remaining allocations"
        ev["BlockedEval"] = blocked["ID"]
        old = c.blocked.get(key)
        if old and old in c.evals and c.evals[old]["Status"] == "blocked":
            c.evals[old]["Status"] = "canceled"
        c.blocked[key] = blocked["ID"]
    ev["ModifyIndex"] = c.bump("evals", "jobs")
    job.spec["Status"] = job_status(c, job)
    dep = c.active_deployment(key)
    if dep is not None:
        deploy.check(c, dep)
    return ev


def _reconcile_per_node(
    c: Cluster, job: JobRecord, ev: dict[str, Any], failed: dict[str, Any], queued: dict[str, int]
) -> None:
    key = (job.namespace, job.id)
    for tg in job.spec.get("TaskGroups") or []:
        placer = Placer(c, job, tg)
        have: set[str] = set()
        for a in c.job_allocs(key):
            if a.task_group != tg["Name"]:
                continue
            if a.live or (job.type == "sysbatch" and a.client_status == "complete"):
                have.add(a.node_id)
        missing = 0
        used = used_indexes(c, job, tg["Name"])
        for node in placer.candidates:
            if node.id in have:
                continue
            if placer.fits(node):
                create_alloc(c, job, tg, node.id, eval_id=ev["ID"], dep=None, used=used)
            else:
                missing += 1
        queued[tg["Name"]] = 0
        if missing:
            failed[tg["Name"]] = placer.failure(missing)


def _reconcile_counted(
    c: Cluster, job: JobRecord, ev: dict[str, Any], failed: dict[str, Any], queued: dict[str, int]
) -> None:
    key = (job.namespace, job.id)
    allocs = c.job_allocs(key)
    dep = c.active_deployment(key)
    if dep is not None and dep.job_version != job.version:
        deploy.set_status(c, dep, "cancelled", deploy.DESC_NEWER_JOB)
        dep = None
    deploy.stop_unneeded_canaries(c, job)
    groups = job.spec.get("TaskGroups") or []
    plans: list[dict[str, Any]] = []
    updating = False
    had_running = any(a.job_version == job.version for a in allocs)
    for tg in groups:
        name = tg["Name"]
        h = spec_hash(job.spec, tg)
        mine = [a for a in allocs if a.task_group == name]
        live = [a for a in mine if a.live and not a.migrating]
        if job.type == "batch":
            live += [a for a in mine if a.client_status == "complete"]
        if dep is not None:  # failed allocs of the running deployment keep their slot
            live += [
                a
                for a in mine
                if a.client_status == "failed" and a.deployment_id == dep.id and a not in live
            ]
        new = [a for a in live if a.spec_hash == h]
        old = [a for a in live if a.spec_hash != h]
        inplace = [a for a in new if a.job_version != job.version and a.live]
        if old or inplace:
            updating = True
        plans.append({"tg": tg, "new": new, "old": old, "inplace": inplace, "mine": mine})
    history = c.deployments_by_job.get(key, [])
    failed_here = bool(
        history and history[-1].job_version == job.version and history[-1].status == "failed"
    )
    if (
        job.type == "service"
        and dep is None
        and not failed_here  # a failed version gets no new deployment (register a fix)
        and (not had_running or updating)
        and any(deploy.strategy(p["tg"]) for p in plans)
        and sum(int(p["tg"].get("Count", 0)) for p in plans) > 0
    ):
        dep = deploy.create(c, job, plans)
        ev["DeploymentID"] = dep.id
    for p in plans:
        if failed_here and dep is None:
            p["old_frozen"] = True  # no further destructive updates of a failed version
        _apply_group(c, job, p, ev, dep, failed, queued)


def _newest_first(allocs: list[Alloc]) -> list[Alloc]:
    return sorted(allocs, key=lambda a: a.create_index, reverse=True)


def _apply_group(
    c: Cluster,
    job: JobRecord,
    p: dict[str, Any],
    ev: dict[str, Any],
    dep: Deployment | None,
    failed: dict[str, Any],
    queued: dict[str, int],
) -> None:
    from nomadscale.sim import lifecycle

    tg: dict[str, Any] = p["tg"]
    name = tg["Name"]
    new: list[Alloc] = p["new"]
    old: list[Alloc] = p["old"]
    count = int(tg.get("Count", 0))
    strat = deploy.strategy(tg)
    gs = dep.groups.get(name) if dep is not None else None
    canaries_pending = (
        bool(old)
        and not p.get("old_frozen")
        and strat is not None
        and strat["Canary"] > 0
        and not (gs is not None and gs.promoted)
    )
    # Nomad stops a count decrease's excess before it updates the rest in place
    # (scheduler/reconcile.go computeGroup: computeStop, then computeUpdates)
    excess = 0 if canaries_pending else len(new) + len(old) - count
    stopping = {a.id for a in (_newest_first(old) + _newest_first(new))[: max(0, excess)]}
    for a in p["inplace"]:
        if a.id in stopping:
            continue
        a.job_version = job.version
        a.job = job.spec
        a.modify_index = c.bump("allocs")
        if dep is not None and gs is not None and a.deployment_id != dep.id:
            # Nomad's scheduler (generic_sched.go computeJobAllocs, in-place updates) moves
            # it into the new deployment with DeploymentStatus nil; the state store counts
            # it as placed (updateDeploymentWithAlloc). The client's health hook then sees
            # the DeploymentID change, clears its health, healthy or not
            # (client/allocrunner/health_hook.go Update: "Deployment has changed, reset
            # status" -> ClearHealth) and watches it again with this update block: healthy
            # min_healthy_time later, unhealthy at healthy_deadline. So every count change
            # (Scale API) keeps a deployment active for about min_healthy_time.
            a.deployment_id = dep.id
            gs.placed_allocs += 1
            lifecycle.restart_health(c, a)
    # drained allocations waiting for a replacement
    waiting = [
        a
        for a in p["mine"]
        if a.live
        and a.migrating
        and (not a.next_allocation or not c.allocs[a.next_allocation].live)
    ]
    placer: Placer | None = None
    missing = 0

    def place(n: int, *, canary: bool = False, previous: list[Alloc] | None = None) -> None:
        nonlocal placer, missing
        placer = placer or Placer(c, job, tg)
        used = used_indexes(c, job, name) if n else IndexPool()
        h = spec_hash(job.spec, tg) if n else ""
        for i in range(n):
            prev = previous[i] if previous and i < len(previous) else None
            node = placer.choose(exclude=prev.node_id if prev else "")
            if node is None:
                missing += n - i
                return
            create_alloc(
                c,
                job,
                tg,
                node.id,
                eval_id=ev["ID"],
                dep=dep,
                canary=canary,
                previous=prev,
                used=used,
                hash_=h,
            )

    if canaries_pending:
        have = [a for a in new if a.canary]
        if len(old) > count:
            for a in _newest_first(old)[: len(old) - count]:
                stop_alloc(c, a, "alloc not needed due to job update")
        place(max(0, strat["Canary"] - len(have)) if strat else 0, canary=True)
    else:
        diff = count - len(new) - len(old)
        placed = 0  # placements that share max_parallel with the destructive updates
        if diff > 0:
            place(diff, previous=waiting)
            placed = max(0, diff - len(waiting))  # migrations do not count against it
        elif diff < 0:
            excess = -diff
            for a in (_newest_first(old) + _newest_first(new))[:excess]:
                if a.live:
                    stop_alloc(c, a, "alloc not needed due to job update")
                if a in old:
                    old.remove(a)
            old = [a for a in old if a.live]
        if old and not p.get("old_frozen"):
            if strat is None or strat["MaxParallel"] <= 0:
                budget = len(old)
            else:
                # Nomad's reconciler (computeUnderProvisionedBy, then computeReplacements):
                # what the deployment's in-flight and unhealthy allocs leave of max_parallel,
                # minus this evaluation's placements (count increase, lost or failed
                # replacements); destructive updates get the rest
                left = deploy.max_parallel_left(dep, strat["MaxParallel"], p["new"] + p["old"])
                budget = max(0, left - placed)
            for a in sorted(old, key=lambda x: x.name)[:budget]:
                stop_alloc(c, a, "alloc is being updated due to job update")
                place(1)
    queued[name] = missing
    if missing:
        failed[name] = (placer or Placer(c, job, tg)).failure(missing)


def job_status(c: Cluster, job: JobRecord) -> str:
    if job.parameterized or job.periodic:
        return "dead" if job.stopped else "running"
    allocs = c.job_allocs((job.namespace, job.id))
    if any(a.live for a in allocs):
        return "running"
    if job.stopped:
        return "dead"
    if job.type in ("batch", "sysbatch") and allocs and all(a.terminal for a in allocs):
        return "dead"
    return "pending"


# a job summary's per-group counters, and the client status each alloc counts under
_SUMMARY_FIELDS = ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown")
_SUMMARY_OF_STATUS = {
    "pending": "Starting",
    "running": "Running",
    "complete": "Complete",
    "failed": "Failed",
    "lost": "Lost",
}


def summary(c: Cluster, job: JobRecord) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    key = (job.namespace, job.id)
    for tg in job.spec.get("TaskGroups") or []:
        out[tg["Name"]] = dict.fromkeys(_SUMMARY_FIELDS, 0)
        out[tg["Name"]]["Queued"] = c.queued.get((key, tg["Name"]), 0)
    for a in c.job_allocs(key):
        s = out.setdefault(a.task_group, dict.fromkeys(_SUMMARY_FIELDS, 0))
        s[_SUMMARY_OF_STATUS.get(a.client_status, "Unknown")] += 1
    return out


def duration_s(v: Any, default: float) -> float:
    if v is None:
        return default
    return float(v) / NS
