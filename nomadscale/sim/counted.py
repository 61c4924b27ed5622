"""The reconciler of service and batch jobs (Nomad's scheduler/reconcile.go with the generic
scheduler's plan handling, scheduler/generic_sched.go): per group, stop the excess, update in
place, place canaries or the missing allocations, replace failed allocations per their
reschedule policy, migrate the allocations the node drainer marked, and make destructive
updates within what the deployment's max_parallel leaves. New placements (count increases,
canaries, destructive updates) wait for a deployment that is neither paused, failed nor
canarying; replacements (lost, rescheduled, migrated) keep the replaced allocation's name and,
while canarying, the job version Nomad keeps for non-canaries."""

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
    c: Cluster,
    job: JobRecord,
    ev: dict[str, Any],
    failed: dict[str, Any],
    queued: dict[str, int],
    *,
    lost: frozenset[str] = frozenset(),
) -> None:
    """``lost``: ids of allocations a node going down just lost (sched.reconcile)."""
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
                "lost": [a for a in mine if a.id in lost],
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


def next_canaries(
    n: int, count: int, existing: set[int], destructive: list[Alloc], used: IndexPool
) -> list[int]:
    """Name indexes for ``n`` new canaries: reconcile allocNameIndex.NextCanaries. First
    those of the allocations the canaries will replace (destructive updates, below
    ``count``) that no existing canary has, then free indexes below ``count``, then
    ``count`` and up."""
    out: list[int] = []
    for idx in sorted({_index(a) for a in destructive if _index(a) < count}):
        if len(out) == n:
            return out
        if idx not in existing:
            out.append(idx)
            used.add(idx)
    for idx in range(count):
        if len(out) == n:
            return out
        if idx not in used and idx not in existing:
            out.append(idx)
            used.add(idx)
    out.extend(range(count, count + n - len(out)))
    return out


def downgraded_version(
    c: Cluster, job: JobRecord, group: str, min_version: int
) -> tuple[int, Deployment | None] | None:
    """The job version (and its deployment) that replaces a non-canary allocation while the
    group's canaries are unpromoted: generic_sched.go downgradedJobForPlacement. The latest
    deployment of this job (DeploymentsByJobID: same JobCreateIndex) whose group state is
    promoted or had no canaries gives its version; else ``min_version`` (the replaced
    allocation's) when that version's group has no update block. None: place the current
    version, as computePlacements does when the version found is older than ``min_version``,
    gone, or lacks the group."""
    found: tuple[int, Deployment | None] | None = None
    history = [
        d
        for d in c.deployments_by_job.get((job.namespace, job.id), [])
        if d.job_create_index == job.create_index
    ]
    for d in sorted(history, key=lambda d: (d.job_version, d.create_index), reverse=True):
        gs = d.groups.get(group)
        if gs is not None and (gs.promoted or gs.desired_canaries == 0):
            found = (d.job_version, d)
            break
    if found is None:
        spec = job.versions.get(min_version)
        if spec is not None and deploy.strategy(_group_in(spec, group)) is None:
            found = (min_version, None)
    if found is None or found[0] < min_version or found[0] not in job.versions:
        return None
    if not _group_in(job.versions[found[0]], group):
        return None
    return found


def _group_in(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for tg in spec.get("TaskGroups") or []:
        if tg.get("Name") == name:
            return tg  # type: ignore[no-any-return]
    return {}


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
        self.placers: dict[int, Placer] = {}
        self.missing = 0
        self.canarying = False  # isCanarying: unpromoted canaries (set by ``apply``)

    def _placer(self, version: int | None, tg: dict[str, Any]) -> Placer:
        v = self.job.version if version is None else version
        if v not in self.placers:
            spec = None if version is None else self.job.versions[version]
            self.placers[v] = Placer(self.c, self.job, tg, spec)
        return self.placers[v]

    def place(
        self,
        n: int,
        *,
        canary: bool = False,
        previous: list[Alloc] | None = None,
        stop_previous: str = "",
        names: list[int] | None = None,
    ) -> list[Alloc]:
        """Place ``n`` allocations, the i-th replacing ``previous[i]`` if given: under its
        name (reconcile.go computePlacements/computeMigrations/computeDestructiveUpdates:
        ``name: alloc.Name``), linked to it, avoiding the node it failed on (generic_sched.go
        getSelectOptions penalises only a failed allocation's node) and, while canarying, with
        the job version Nomad keeps for a non-canary (``downgradeNonCanary``). ``names``: the
        name indexes to use (canaries: ``next_canaries``), else the lowest free ones.

        ``stop_previous`` (a destructive update): the previous allocation is stopped with
        this description only if its replacement is placed. generic_sched.go
        computePlacements appends the stop to the plan before selecting a node (so its room
        is free for the replacement) and pops it when no node fits (``s.plan.PopUpdate``).
        Once a placement of the group failed, the evaluation's further placements of the
        group are not tried (``s.failedTGAllocs[tg.Name]``: ``CoalescedFailures += 1``)."""
        c = self.c
        used = used_indexes(c, self.job, self.tg["Name"]) if n else IndexPool()
        out: list[Alloc] = []
        for i in range(n):
            if self.missing:
                self.missing += n - i
                return out
            prev = previous[i] if previous and i < len(previous) else None
            is_canary = canary or (prev is not None and prev.canary)
            tg, version, dep = self.tg, None, self.dep
            if prev is not None and self.canarying and not prev.canary:
                down = downgraded_version(c, self.job, tg["Name"], prev.job_version)
                if down is not None and down[0] != self.job.version:
                    version, dep = down
                    tg = _group_in(self.job.versions[version], tg["Name"])
            placer = self._placer(version, tg)
            failed_on = prev.node_id if prev is not None and prev.client_status == "failed" else ""
            stopping = prev if stop_previous and prev is not None and prev.live else None
            freed = c.nodes.get(stopping.node_id) if stopping is not None else None
            if stopping is not None and freed is not None:
                freed.track(stopping, -1)
            try:
                node = placer.choose(exclude=failed_on)
                if node is None and failed_on and failed_on in c.nodes:
                    node = placer.choose()  # the previous node is only penalised
            finally:
                if stopping is not None and freed is not None:
                    freed.track(stopping, +1)
            if node is None:
                self.missing += n - i
                return out
            if stop_previous and prev is not None:
                stop_any(c, prev, stop_previous)
            out.append(
                create_alloc(
                    c,
                    self.job,
                    tg,
                    node.id,
                    eval_id=self.ev["ID"],
                    dep=dep,
                    canary=is_canary,
                    previous=prev,
                    used=used,
                    name_index=(
                        _index(prev)
                        if prev is not None
                        else (names[i] if names and i < len(names) else None)
                    ),
                    version=version,
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
            for new in self.place(1, previous=[a]):
                new.reschedule_events = events

    def _migrate(self, migrate: list[Alloc]) -> None:
        """computeMigrations: stop each allocation marked for migration (by the node drainer,
        or stopped through the API) and place its replacement in the same plan, whatever
        the deployment's state; the stop stands even when nothing fits (the replacement is
        then queued)."""
        for a in sorted(migrate, key=_index):
            stop_alloc(self.c, a, ALLOC_MIGRATING)
            self.place(1, previous=[a])

    def _lost_to_replace(self, lost: list[Alloc], existing: int, count: int) -> list[Alloc]:
        """computePlacements: lost allocations are replaced (under their names) while the
        group has fewer than ``count``; the current deployment's canaries are not
        (cancelUnneededCanaries stops them: new canaries take their place)."""
        dep_id = self.dep.id if self.dep is not None else None
        out = []
        for a in sorted(lost, key=_index):
            if existing >= count:
                break
            if a.canary and a.deployment_id == dep_id:
                continue
            existing += 1
            out.append(a)
        return out

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
        self.canarying = canaries_pending
        # reconcile.go computeGroup: ``deploymentPlaceReady := !paused && !failed &&
        # !isCanarying``. Without it nothing new is placed (no count increase, no destructive
        # update; computeCanaries places no canary while paused or failed): only lost
        # allocations, due reschedules (computeReplacements) and migrations.
        paused = dep is not None and dep.status in ("paused", "pending")
        dep_failed = bool(p.get("old_frozen"))  # this job version's deployment failed
        place_ready = not paused and not dep_failed and not canaries_pending
        # Nomad stops a count decrease's excess before it updates the rest in place
        # (scheduler/reconcile.go computeGroup: computeStop, then computeUpdates), the
        # migrating allocations first; failed ones due for rescheduling are not counted
        excess = 0 if canaries_pending else len(new) + len(old) + len(migrate) - count
        # computeStop: "Prefer stopping any alloc that has the same name as the canaries if
        # we are promoted" (the deployment's PlacedCanaries, cancelUnneededCanaries)
        canary_ids = set(gs.placed_canaries) if gs is not None else set()
        canary_names = {a.name for a in new if a.id in canary_ids}
        shadowed = [a for a in old + new if a.id not in canary_ids and a.name in canary_names]
        shadowed = shadowed[: max(0, excess)]
        excess -= len(shadowed)
        unneeded = sorted(migrate, key=_index, reverse=True)[: max(0, excess)]
        migrate = [a for a in migrate if a not in unneeded]
        excess -= len(unneeded)
        rest_old = [a for a in old if a not in shadowed]
        rest_new = [a for a in new if a not in shadowed]
        stopping = shadowed + (_newest_first(rest_old) + _newest_first(rest_new))[: max(0, excess)]
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
                old = [a for a in old if a.live]
            if strat is not None and not paused:
                want = max(0, strat["Canary"] - len(have))
                used = used_indexes(c, self.job, name)
                names = next_canaries(want, count, {_index(a) for a in have}, old, used)
                self.place(want, canary=True, names=names)
            self._reschedule(due)
            kept = [a for a in new + old if not a.canary]
            lost = self._lost_to_replace(p["lost"], len(kept) + len(migrate) + len(due), count)
            self.place(len(lost), previous=lost)
        else:
            diff = max(0, count - len(new) - len(old) - len(migrate) - len(due))
            lost = self._lost_to_replace(p["lost"], count - diff, count)
            placed = len(due) + diff  # placements that share max_parallel with the updates
            if old and place_ready:
                if strat is None or strat["MaxParallel"] <= 0:
                    budget = len(old)
                else:
                    # Nomad's reconciler (computeUnderProvisionedBy, then
                    # computeReplacements): what the deployment's in-flight and unhealthy
                    # allocs leave of max_parallel, minus this evaluation's placements
                    # (count increase, lost or rescheduled replacements); destructive
                    # updates get the rest, each under the name of the allocation it
                    # replaces (computeDestructiveUpdates: placeName alloc.Name,
                    # PreviousAllocation the stopped one)
                    left = deploy.max_parallel_left(dep, strat["MaxParallel"], p["new"] + p["old"])
                    budget = max(0, left - placed)
                # generic_sched.go computePlacements places the destructive updates first
                # ("we need to discount their resources"), then the other placements
                for a in sorted(old, key=lambda x: x.name)[:budget]:
                    self.place(1, previous=[a], stop_previous=ALLOC_UPDATING)
            self._reschedule(due)
            self.place(len(lost), previous=lost)
            if place_ready:
                self.place(diff - len(lost))
        self._migrate(migrate)
        queued[name] = self.missing
        if self.missing:
            placer = next(iter(self.placers.values()), None) or Placer(c, self.job, tg)
            failed[name] = placer.failure(self.missing)
