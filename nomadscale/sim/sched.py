"""The scheduler: reconciles a job's allocations with its spec (service and batch jobs in
``counted.py``: rolling updates, canaries, reschedules, migrations; sysbatch/system one per
node here), places allocations and records evaluations."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from nomadscale.sim import blocked, deploy, devices
from nomadscale.sim.model import NS, Alloc, Deployment, new_uuid, unix_ns
from nomadscale.sim.placement import GPU_DEVICE, Placer, group_gpus

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


def stop_alloc(c: Cluster, a: Alloc, description: str) -> None:
    """The server stops a live allocation; its client kills it (``lifecycle.stop``)."""
    if not a.live:
        return
    from nomadscale.sim import lifecycle

    lifecycle.stop(c, a, description)


def stop_any(c: Cluster, a: Alloc, description: str) -> None:
    """Stop ``a`` as a plan does (plan.AppendStoppedAlloc): a live allocation is killed; a
    failed one only gets DesiredStatus ``stop``, so it takes no slot any more."""
    if a.live:
        stop_alloc(c, a, description)
    elif a.desired_status == "run":
        a.desired_status = "stop"
        a.desired_description = description
        a.modify_time = c.now_s()
        a.modify_index = c.bump("allocs")


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
    name_index: int | None = None,
    version: int | None = None,
) -> Alloc:
    """Place one allocation of ``tg`` on ``node_id``. ``used``: the group's name indexes in
    use (pass one set for many placements in one evaluation); ``name_index``: the index to
    name it with (a replacement keeps its previous allocation's), else the lowest free one.
    ``version``: an older job version to place (``tg`` is then that version's group;
    generic_sched.go computePlacements, downgradedJobForPlacement)."""
    from nomadscale.sim import lifecycle

    if used is None:
        used = used_indexes(c, job, tg["Name"])
    if name_index is None:
        name_index = used.take()
    else:
        used.add(name_index)
    spec = job.spec if version is None else job.versions[version]
    node = c.nodes[node_id]
    image, size = image_of(tg, spec, c.default_image_gb)
    image = _interp_image(image, spec)
    now = c.now_s()
    idx = c.bump("allocs")
    a = Alloc(
        id=new_uuid(),
        eval_id=eval_id,
        name=f"{job.id}.{tg['Name']}[{name_index}]",
        namespace=job.namespace,
        node_id=node.id,
        node_name=node.name,
        job_id=job.id,
        job_version=job.version if version is None else version,
        task_group=tg["Name"],
        job=spec,
        create_index=idx,
        create_time=now,
        image=image,
        image_size_gb=size,
        gpus=group_gpus(tg),
        spec_hash=hash_ or spec_hash(spec, tg),
        deployment_id=dep.id if dep else "",
        canary=canary,
        modify_index=idx,
        modify_time=now,
        task_names=tuple(t.get("Name", "task") for t in tg.get("Tasks") or []) or ("task",),
    )
    if previous is not None:
        # state_store.go upsertAllocsImpl: the previous allocation gets NextAllocation at
        # the plan's index
        a.previous_allocation = previous.id
        previous.next_allocation = a.id
        previous.modify_index = idx
    a.devices = devices.assign(c, node, tg, GPU_DEVICE.match)
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
    lost: Collection[str] = (),
    blocked_eval: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run one evaluation for ``job``; returns the evaluation (None for parameterized or
    periodic parents, which never get allocations). ``lost``: ids of the allocations a node
    going down just lost (the reconciler's lost set: replaced under their names, whatever
    the deployment's state). ``blocked_eval``: a blocked evaluation run again (blocked.py):
    the placements carry its ID, and it completes or stays blocked."""
    if job.parameterized or job.periodic:
        return None
    key = (job.namespace, job.id)
    if blocked_eval is not None:
        ev = blocked_eval
    else:
        ev = c.new_eval(
            job, triggered_by=triggered_by, node_id=node_id, deployment_id=deployment_id
        )
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
        from nomadscale.sim import counted

        counted.reconcile(c, job, ev, failed, queued, lost=frozenset(lost))
    for g, n in queued.items():
        c.queued[(key, g)] = n  # the summary's Queued, less what the plan placed
    if blocked_eval is not None and failed:
        blocked.reblock(c, key, ev)
    else:
        ev["QueuedAllocations"] = queued
        if failed:
            ev["FailedTGAllocs"] = failed
            blocked.block(c, job, ev, failed)
        else:
            blocked.complete(c, key, ev)
    ev["ModifyTime"] = unix_ns(c.now_s())
    ev["ModifyIndex"] = c.bump("evals", "jobs")
    c.status_dirty.discard(key)
    sync_status(c, job)  # the plan's changes applied at once (no status flapping within)
    dep = c.active_deployment(key)
    if dep is not None:
        deploy.check(c, dep)
    return ev


def _reconcile_per_node(
    c: Cluster, job: JobRecord, ev: dict[str, Any], failed: dict[str, Any], queued: dict[str, int]
) -> None:
    key = (job.namespace, job.id)
    for tg in job.spec.get("TaskGroups") or []:
        if int(tg.get("Count", 1)) == 0:
            # scheduler/util.go materializeSystemTaskGroups: a group with count 0 wants no
            # allocation on any node (how a system job is scaled to 0)
            for a in list(c.job_allocs(key)):
                if a.task_group == tg["Name"] and a.live:
                    stop_alloc(c, a, "alloc not needed due to job update")
            queued[tg["Name"]] = 0
            continue
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


def job_status(c: Cluster, job: JobRecord) -> str:
    """nomad/state/state_store.go getJobStatus: ``running`` with a non-terminal allocation;
    else ``pending`` with a non-terminal evaluation (a blocked one, or a follow-up waiting to
    reschedule a failed allocation: createRescheduleLaterEvals); a system job is ``running``
    until stopped; else ``dead`` once it had evaluations or allocations; a periodic or
    parameterized job with neither is ``running`` until stopped; else ``pending``."""
    key = (job.namespace, job.id)
    allocs = c.job_allocs(key)
    if any(a.live for a in allocs):
        return "running"
    evals = c.evals_by_job.get(key, ())
    now = c.now_s()
    if any(e["Status"] in ("pending", "blocked") for e in evals) or any(
        a.followup_at is not None and a.followup_at >= now and not a.next_allocation for a in allocs
    ):
        return "pending"
    if job.type == "system":
        return "dead" if job.stopped else "running"
    if evals or allocs:
        return "dead"
    if job.parameterized or job.periodic:
        return "dead" if job.stopped else "running"
    return "pending"


def sync_status(c: Cluster, job: JobRecord) -> None:
    """Store the job's status; a change writes the job at a new ModifyIndex (state_store.go
    setJobStatus: ``updated.ModifyIndex = index``, the jobs table's index too; the job's
    versions and JobModifyIndex stay)."""
    status = job_status(c, job)
    if job.spec.get("Status") != status:
        job.spec["Status"] = status
        job.modify_index = c.bump("jobs")


def sync_dirty(c: Cluster) -> None:
    """Sync the status of every job an allocation or evaluation change marked."""
    while c.status_dirty:
        job = c.jobs.get(c.status_dirty.pop())
        if job is not None:
            sync_status(c, job)


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
