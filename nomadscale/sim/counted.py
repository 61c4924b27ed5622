"""The reconciler of service and batch jobs (Nomad's scheduler/reconcile.go with the generic
scheduler's plan handling, scheduler/generic_sched.go): per group, stop the excess, update in
place, place canaries or the missing allocations, replace failed allocations per their
reschedule policy, migrate the allocations the node drainer marked, and make destructive
updates within what the deployment's max_parallel leaves."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from nomadscale.sim import deploy, reschedule
from nomadscale.sim.model import Alloc, Deployment
from nomadscale.sim.placement import Placer
from nomadscale.sim.sched import (
    IndexPool,
    create_alloc,
    spec_hash,
    stop_alloc,
    stop_any,
    used_indexes,
)

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import JobRecord

ALLOC_MIGRATING = "alloc is being migrated"
ALLOC_NOT_NEEDED = "alloc not needed due to job update"
ALLOC_UPDATING = "alloc is being updated due to job update"
_NAME_IDX = re.compile(r"\[(\d+)\]$")


def reconcile(
    c: Cluster, job: JobRecord, ev: dict[str, Any], failed: dict[str, Any], queued: dict[str, int]
) -> None:
    key = (job.namespace, job.id)
    allocs = c.job_allocs(key)
    dep = c.active_deployment(key)
    if dep is not None and dep.job_version != job.version:
        deploy.set_status(c, dep, "cancelled", deploy.DESC_NEWER_JOB)
        dep = None
    deploy.stop_unneeded_canaries(c, job)
    history = c.deployments_by_job.get(key, [])
    failed_dep = (
        history[-1]
        if history and history[-1].job_version == job.version and history[-1].status == "failed"
        else None
    )
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
        # failed allocations keep their slot until rescheduled (reschedule.classify)
        kept, due = reschedule.classify(
            c,
            [a for a in mine if a.client_status == "failed" and a.desired_status == "run"],
            deployment=dep,
            failed_deployment=failed_dep,
        )
        live += kept
        new = [a for a in live if a.spec_hash == h]
        old = [a for a in live if a.spec_hash != h]
        inplace = [a for a in new if a.job_version != job.version and a.live]
        if old or inplace:
            updating = True
        plans.append(
            {
                "tg": tg,
                "new": new,
                "old": old,
                "inplace": inplace,
                "migrate": [a for a in mine if a.live and a.migrating],
                "due": due,
            }
        )
    if (
        job.type == "service"
        and dep is None
        and failed_dep is None  # a failed version gets no new deployment (register a fix)
        and (not had_running or updating)
        and any(deploy.strategy(p["tg"]) for p in plans)
        and sum(int(p["tg"].get("Count", 0)) for p in plans) > 0
    ):
        dep = deploy.create(c, job, plans)
        ev["DeploymentID"] = dep.id
    # in-place updates join the job's latest deployment, whatever its status
    # (generic_sched.go computeJobAllocs: s.deployment is state.LatestDeploymentByJobID)
    history = c.deployments_by_job.get(key, [])
    latest = dep if dep is not None else (history[-1] if history else None)
    for p in plans:
        if failed_dep is not None and dep is None:
            p["old_frozen"] = True  # no further destructive updates of a failed version
        _Group(c, job, p, ev=ev, dep=dep, latest=latest).apply(failed, queued)


def _newest_first(allocs: list[Alloc]) -> list[Alloc]:
    return sorted(allocs, key=lambda a: a.create_index, reverse=True)


def _index(a: Alloc) -> int:
    m = _NAME_IDX.search(a.name)
    return int(m.group(1)) if m else 0


class _Group:
    """One task group's share of an evaluation."""

    def __init__(
        self,
        c: Cluster,
        job: JobRecord,
        p: dict[str, Any],
        *,
        ev: dict[str, Any],
        dep: Deployment | None,
        latest: Deployment | None,
    ) -> None:
        self.c, self.job, self.p, self.ev, self.dep, self.latest = c, job, p, ev, dep, latest
        self.tg: dict[str, Any] = p["tg"]
        self.placer: Placer | None = None
        self.missing = 0

    def place(
        self, n: int, *, canary: bool = False, previous: list[Alloc] | None = None
    ) -> list[Alloc]:
        """Place ``n`` allocations (the i-th replacing ``previous[i]``, if given)."""
        c, tg = self.c, self.tg
        self.placer = self.placer or Placer(c, self.job, tg)
        used = used_indexes(c, self.job, tg["Name"]) if n else IndexPool()
        h = spec_hash(self.job.spec, tg) if n else ""
        out: list[Alloc] = []
        for i in range(n):
            prev = previous[i] if previous and i < len(previous) else None
            node = self.placer.choose(exclude=prev.node_id if prev else "")
            if node is None and prev is not None and prev.node_id in c.nodes:
                node = self.placer.choose()  # the previous node is only penalised
            if node is None:
                self.missing += n - i
                return out
            out.append(
                create_alloc(
                    c,
                    self.job,
                    tg,
                    node.id,
                    eval_id=self.ev["ID"],
                    dep=self.dep,
                    canary=canary,
                    previous=prev,
                    used=used,
                    hash_=h,
                )
            )
        return out

    def _move_in_place(self, stopping: set[str]) -> None:
        """In-place updates: the new job version, and the latest deployment. A changed
        DeploymentID comes with DeploymentStatus nil (generic_sched.go computeJobAllocs:
        ``update.DeploymentID != s.deployment.GetID()``); the state store counts it placed
        in that deployment (updateDeploymentWithAlloc), and the client clears its health and
        watches it again (client/allocrunner/health_hook.go Update: "Deployment has changed,
        reset status" -> ClearHealth), as for a new allocation (``lifecycle.restart_health``).
        So every count change (Scale API) keeps a deployment active for about
        min_healthy_time; and an allocation moved into a deployment of a group without update
        block is never watched again."""
        from nomadscale.sim import lifecycle

        c, latest = self.c, self.latest
        target = latest.id if latest is not None else ""
        for a in self.p["inplace"]:
            if a.id in stopping:
                continue
            a.job_version = self.job.version
            a.job = self.job.spec
            a.modify_index = c.bump("allocs")
            if a.deployment_id == target:
                continue
            a.deployment_id = target
            a.canary = False
            gs = latest.groups.get(a.task_group) if latest is not None and latest.active else None
            if latest is not None and gs is not None:
                gs.placed_allocs += 1
                latest.modify_index = c.bump("deployments")
            lifecycle.restart_health(c, a)

    def _reschedule(self, due: list[Alloc]) -> None:
        """computeReplacements: stop each failed allocation due now and place its
        replacement (a canary stays one), carrying its RescheduleTracker
        (generic_sched.go updateRescheduleTracker)."""
        c = self.c
        for a in sorted(due, key=_index):
            events = reschedule.tracker_for(a, reschedule.policy(c, a), c.now_s())
            stop_any(c, a, reschedule.ALLOC_RESCHEDULED)
            for new in self.place(1, canary=a.canary, previous=[a]):
                new.reschedule_events = events

    def _migrate(self, migrate: list[Alloc]) -> None:
        """computeMigrations: stop each allocation the drainer marked and place its
        replacement in the same plan; the stop stands even when nothing fits (the
        replacement is then queued)."""
        for a in sorted(migrate, key=_index):
            stop_alloc(self.c, a, ALLOC_MIGRATING)
            self.place(1, canary=a.canary, previous=[a])

    def apply(self, failed: dict[str, Any], queued: dict[str, int]) -> None:
        c, p, tg, dep = self.c, self.p, self.tg, self.dep
        name = tg["Name"]
        new: list[Alloc] = p["new"]
        old: list[Alloc] = p["old"]
        migrate: list[Alloc] = p["migrate"]
        due: list[Alloc] = p["due"]
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
        # (scheduler/reconcile.go computeGroup: computeStop, then computeUpdates), the
        # migrating allocations first; failed ones due for rescheduling are not counted
        excess = 0 if canaries_pending else len(new) + len(old) + len(migrate) - count
        unneeded = sorted(migrate, key=_index, reverse=True)[: max(0, excess)]
        migrate = [a for a in migrate if a not in unneeded]
        excess -= len(unneeded)
        stopping = (_newest_first(old) + _newest_first(new))[: max(0, excess)]
        self._move_in_place({a.id for a in stopping})
        for a in unneeded + stopping:
            stop_any(c, a, ALLOC_NOT_NEEDED)
        old = [a for a in old if a not in stopping]
        new = [a for a in new if a not in stopping]

        if canaries_pending:
            # a failed canary keeps its place until rescheduled, as a canary again
            # (reconcile.go requiresCanaries counts every canary placed in the deployment)
            have = [a for a in new + due if a.canary]
            if len(old) > count:
                for a in _newest_first(old)[: len(old) - count]:
                    stop_any(c, a, ALLOC_NOT_NEEDED)
            self.place(max(0, strat["Canary"] - len(have)) if strat else 0, canary=True)
            self._reschedule(due)
        else:
            diff = max(0, count - len(new) - len(old) - len(migrate) - len(due))
            self._reschedule(due)
            self.place(diff)
            placed = len(due) + diff  # placements that share max_parallel with the updates
            if old and not p.get("old_frozen"):
                if strat is None or strat["MaxParallel"] <= 0:
                    budget = len(old)
                else:
                    # Nomad's reconciler (computeUnderProvisionedBy, then
                    # computeReplacements): what the deployment's in-flight and unhealthy
                    # allocs leave of max_parallel, minus this evaluation's placements
                    # (count increase, lost or rescheduled replacements); destructive
                    # updates get the rest
                    left = deploy.max_parallel_left(dep, strat["MaxParallel"], p["new"] + p["old"])
                    budget = max(0, left - placed)
                for a in sorted(old, key=lambda x: x.name)[:budget]:
                    stop_any(c, a, ALLOC_UPDATING)
                    self.place(1)
        self._migrate(migrate)
        queued[name] = self.missing
        if self.missing:
            failed[name] = (self.placer or Placer(c, self.job, tg)).failure(self.missing)
