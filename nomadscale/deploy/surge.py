"""Surge workers of a rollout: added, watched until Nomad placed them, dropped or released.

A surge worker is always a worker of the new image: at a zone's start it is part of the zone's
own new job version (the group's count + 1; Nomad places it before it replaces anything, and
in the canary zone the canary is that extra worker), during a zone it is a new job version
with the count + 1 (Nomad refuses the Scale API during a deployment; it supersedes the
deployment). A surge on the old version would run the old image, pull it on a node the
prefetch filled with the new one, and then be replaced itself. Either way the surge is
released when the zone is done. Before a zone starts and before a surge, nodes that joined the
zone since the prefetch get the image first (``nodes``): nothing the rollout places pulls it.

The re-plan checks that a node is free for the surge worker, but another job can take that
node before Nomad places the worker. Nomad then reports it the way ``nomad job status`` shows
a placement failure: an evaluation with ``FailedTGAllocs`` for the group and a ``blocked``
evaluation that waits for capacity. Nothing is taken out meanwhile (the pending placement uses
the deployment's max_parallel), but the deployment would wait for its progress deadline; the
rollout sees it at once (``unplaced_surge``) and ``steps`` decides: go on without the surge
(``_drop_surge``) or hold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nomadscale.core.errors import DeploymentActiveError
from nomadscale.core.ports import DeploymentInfo, EvalInfo, PlacementFailure
from nomadscale.deploy import room
from nomadscale.deploy import spec as jobspec
from nomadscale.deploy.holds import Holds
from nomadscale.deploy.replan import zone_nodes

log = logging.getLogger(__name__)


def placement_failure(
    evals: Sequence[EvalInfo], *, group: str, since_index: int
) -> PlacementFailure | None:
    """Why Nomad could not place allocations of ``group`` (None when nothing is pending), as
    ``nomad job status`` tells it: the newest evaluation (of a job version from
    ``since_index``, its JobModifyIndex) with a placement failure for the group, while a
    blocked evaluation created with or after it still waits (Nomad copies the failures onto
    the blocked evaluation itself)."""
    failing = [e for e in evals if group in e.failed and e.job_modify_index >= since_index]
    if not failing:
        return None
    last = max(failing, key=lambda e: e.create_index)
    waiting = any(e.status == "blocked" and e.create_index >= last.create_index for e in evals)
    return last.failed[group] if waiting else None


class SurgeWorkers(Holds):
    def _surge_waits(self, group: str) -> bool:
        """``group`` has a surge worker that Nomad has not placed yet (as far as we know)."""
        s = self._st().surge
        return bool(s and s.get("group") == group and not s.get("released")
                    and not s.get("placed"))  # fmt: skip

    def _unplaced_surge(self, group: str) -> str | None:
        """While ``group``'s surge worker waits: why Nomad can't place it (a blocked
        evaluation), or None (placed, recorded as such; or not decided yet)."""
        s = self._st().surge
        if s is None or not self._surge_waits(group):
            return None
        allocs = self._call(lambda: self.nomad.job_allocations(self.job_id, namespace=self.ns))
        if sum(1 for a in allocs if a.task_group == group and not a.terminal) >= int(s["to"]):
            s["placed"] = True
            return None
        if "index" not in s:  # the surge's job version is the job's current version
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            s["index"] = job.job_modify_index
        evals = self._call(lambda: self.nomad.job_evaluations(self.job_id, namespace=self.ns))
        failure = placement_failure(evals, group=group, since_index=int(s["index"]))
        return None if failure is None else failure.explain()

    def _free_node(self, group: str) -> bool:
        """A node of ``group``'s zone could take a worker now: ready, eligible, not draining,
        with the devices a worker asks for (its GPU) held by no allocation, whatever non-GPU
        or system allocations run there (``room``)."""
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        nodes = self._call(lambda: zone_nodes(self.policy, self.nomad, spec=job.spec,
                                              group=group))  # fmt: skip
        free = self._call(lambda: room.free_node(self.nomad, nodes, spec=job.spec, group=group))
        return free is not None

    def _surge_during(self, dep: DeploymentInfo, group: str) -> None:
        """One more worker in ``group`` while its deployment runs: a new job version with the
        group's count + 1 (Nomad refuses the Scale API during a deployment). Its update block
        asks for one canary: the surge worker, placed before anything else is replaced and
        promoted by the gate once it is healthy and the re-plan agrees. When the zone's own
        canary still waits for promotion, that canary already is the extra worker: no canary
        then (Nomad adopts or replaces it and places before it replaces)."""
        st = self._st()
        # a bounded pull: the zone's deployment waits meanwhile, against its progress deadline
        self._top_up_in_zone(group)
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        cur = int(job.groups[group])
        canary = 0 if dep.needs_promotion else 1
        spec = jobspec.with_count(dict(job.spec), group=group, count=cur + 1,
                                  update=jobspec.update_block(self.d, canary=canary))  # fmt: skip
        st.surge = {"group": group, "from": cur, "to": cur + 1, "released": False,
                    "superseded": dep.id}  # fmt: skip
        self._save(f"surge: {group} {cur} -> {cur + 1} with a new job version (the Scale API "
                   f"is refused while deployment {dep.id[:8]} runs)")  # fmt: skip
        self._call(lambda: self.nomad.register_job(spec, enforce_index=job.job_modify_index,
                                                   namespace=self.ns))  # fmt: skip
        new = self._wait_new_deployment(job.version)
        if new is None:
            self._pause(f"the surge job version of {group} got no deployment")
            return
        self._adopt(new, f"zone {group}: deployment {new.id[:8]} with the surge worker")

    def _drop_surge(self, dep: DeploymentInfo, group: str, note: str) -> None:
        """Go on without ``group``'s surge worker, which Nomad can't place (the re-plan let
        the step go without it): a new job version with the group's count back (the Scale
        API is refused during a deployment; it supersedes ``dep``). A surge added during the
        zone came as a canary: the new version has none. Its deployment replaces the next
        worker at once, so the zone's nodes are topped up first."""
        st = self._st()
        s = st.surge
        assert s is not None
        self._top_up_in_zone(group)
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        update = jobspec.update_block(self.d, canary=0) if s.get("superseded") else None
        spec = jobspec.with_count(dict(job.spec), group=group, count=int(s["from"]),
                                  update=update)  # fmt: skip
        s.update(released=True, dropped=dep.id)  # recorded first: a resumed process follows
        self._save(note)
        self._call(lambda: self.nomad.register_job(spec, enforce_index=job.job_modify_index,
                                                   namespace=self.ns))  # fmt: skip
        new = self._wait_new_deployment(job.version)
        if new is None:
            self._pause(f"the job version of {group} without its surge worker got no deployment")
            return
        self._stepped()  # its deployment replaces the next worker at once
        self._adopt(new, f"zone {group}: deployment {new.id[:8]} without the surge worker")

    def _adopt(self, dep: DeploymentInfo, note: str) -> None:
        st = self._st()
        st.deployment_id = dep.id
        st.replan["paused"] = None
        if st.status == "held":
            self._end_hold()  # the step is still to go: its held time counts on
        if st.status in ("canary", "held"):
            st.status = "rolling"  # the surge version has no canaries: the canary passed
        st.replan.pop("resume_status", None)
        self._save(note)

    def _adopt_newer(self, dep: DeploymentInfo) -> bool:
        """``dep`` was cancelled: when our own surge version (or the version that dropped an
        unplaceable surge worker) superseded it (a process that crashed before recording the
        new deployment), follow the newer deployment."""
        st = self._st()
        s = st.surge or {}
        surged = s.get("superseded") == dep.id and not s.get("released")
        if not surged and s.get("dropped") != dep.id:
            return False
        latest = self._call(lambda: self.nomad.latest_deployment(self.job_id, namespace=self.ns))
        if latest is None or not latest.active or latest.job_version <= dep.job_version:
            return False
        self._adopt(latest, f"following deployment {latest.id[:8]} of the surge job version")
        return True

    def _release_surge(self) -> None:
        st = self._st()
        s = st.surge
        if not s or s.get("released"):
            return
        status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
        cur = status.groups[s["group"]].desired
        target = max(int(s["from"]), cur - 1)
        if target != cur:
            self._scale_when_idle(s["group"], target, f"nomadscale deploy {st.id}: release surge")
        s["released"] = True
        st.note(self.clock.now(), f"surge released: {s['group']} -> {target}")

    def _scale_when_idle(self, group: str, count: int, message: str) -> None:
        """The Scale API once no deployment of the job is active: Nomad refuses it meanwhile,
        and every count change starts one for about min_healthy_time (a runbook's surge may
        have slipped in after the zone's deployment). One retry when one started since.
        Then waits for the count change's own deployment: a job version becomes stable only
        when its deployment succeeds (hashicorp/nomad nomad/state/state_store.go
        ``upsertDeploymentImpl``: "If the deployment is being marked as complete, set the job
        to stable"), and the next zone's version would cancel it ("Cancelled due to newer
        version of job"): a failure there would auto-revert to the last stable version,
        the surge worker's, and bring the released worker back."""
        for attempt in (1, 2):
            self._settle()
            try:
                self._call(lambda: self.nomad.scale(self.job_id, group, count,
                                                    namespace=self.ns, message=message))  # fmt: skip
                self._settle()
                return
            except DeploymentActiveError as e:
                if attempt == 2:
                    raise
                log.info("deploy %s: %s; waiting for that deployment", self.policy.name, e)
