"""Node steps of a rollout: the re-plan before each one, surge workers and holds.

Nomad replaces one allocation at a time (max_parallel 1) and takes the next one out the moment
the previous replacement is healthy. To re-plan *before* each next worker goes out, nomadscale
pauses the zone's deployment while a replacement is in flight and, once it is healthy,
re-reads demand (``replan.check_step``) and then either resumes the deployment, adds a surge
worker in the zone, or holds (status ``held``, the deployment stays paused, every worker
serves). The deployment id nomadscale paused is in the KV record (``replan.paused``) so a
resumed process knows the pause is its own. While a deployment runs Nomad refuses the Scale
API, so a surge during a zone is a new job version with the zone group's count + 1 (nothing
an allocation runs changes; Nomad supersedes the deployment and places the surge worker
before replacing anything else); at a zone's start it is the Scale API as before. Either way
the surge is released when the zone is done.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from functools import partial

from nomadscale.core.ports import DeploymentGroup, DeploymentInfo
from nomadscale.deploy import spec as jobspec
from nomadscale.deploy.base import RolloutBase
from nomadscale.deploy.replan import (
    GO,
    SURGE,
    StepCheck,
    check_step,
    current_demand,
    serving_workers,
    surge_blocker,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0  # while held; a record older than 120 s may be resumed by the service


class StepGate(RolloutBase):
    # --- the re-plan ------------------------------------------------------------------------

    def _replan(self, group: str, *, canaries: int = 0) -> StepCheck:
        """Re-read demand and the job's serving workers; decide the next node step.
        ``canaries``: healthy canaries of ``group`` that the step (a promotion) turns into
        ordinary workers."""
        st = self._st()
        status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
        groups = {n: g for n, g in status.groups.items() if n in st.zones} or status.groups
        if canaries and group in groups:
            g = groups[group]
            groups = {**groups, group: replace(g, healthy=g.healthy + canaries)}
        desired = {n: g.desired for n, g in status.groups.items()}
        now = self.clock.now()

        def blocked() -> str | None:
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            return self._call(lambda: surge_blocker(self.policy, self.nomad, spec=job.spec,
                              group=group, desired=desired, surge=st.surge))  # fmt: skip

        chk = check_step(
            group=group, at=now, serving=serving_workers(groups),
            rpm_per_worker=self.policy.capacity.rpm_per_worker,
            demand_rpm=current_demand(self.demand, now=now, step_s=self.demand_step_s),
            planned_upper=st.plan.get("forecast_upper"), surge_blocked=blocked,
        )  # fmt: skip
        prev = st.replan.get("last") or {}
        st.replan["last"] = chk.to_dict()
        same = all(prev.get(k) == st.replan["last"][k] for k in ("action", "need_workers"))
        (log.debug if st.status == "held" and same else log.info)(
            "deploy %s: re-plan before the next node step: %s", st.policy, chk.explain()
        )
        return chk

    def _zone_gate(self, group: str) -> None:
        """Before a zone's first node step (no deployment yet): surge with the Scale API or
        hold until the step is safe."""
        while True:
            chk = self._replan(group)
            if chk.action == GO:
                self._unhold(chk)
                return
            if chk.action == SURGE:
                self._save(f"re-plan: {chk.explain()}")
                self._surge(group)
                continue
            self._hold(chk)
            self.clock.sleep(self.poll_s)

    def _step_gate(self, dep: DeploymentInfo, group: str, *, canaries: int = 0) -> bool:
        """Before a node step inside the zone's deployment: True when it may go. A surge
        supersedes the deployment (``state.deployment_id`` changes); a hold waits."""
        chk = self._replan(group, canaries=canaries)
        if chk.action == GO:
            self._unhold(chk)
            return True
        if chk.action == SURGE:
            self._save(f"re-plan: {chk.explain()}")
            self._surge_during(dep, group)
        else:
            self._hold(chk, paused=dep.status == "paused")
        return False

    def _between_steps(self, dep: DeploymentInfo, g: DeploymentGroup, group: str) -> None:
        """Pause the deployment while a replacement is in flight (so Nomad does not take the
        next worker out on its own); once it is healthy, re-plan and resume."""
        st = self._st()
        in_flight = g.placed_allocs > g.healthy_allocs + g.unhealthy_allocs
        more = g.placed_allocs < g.desired_total
        ours = st.replan.get("paused") == dep.id
        if dep.status == "running" and in_flight and more and self._replans():
            st.replan["paused"] = dep.id  # recorded first: a resumed process knows it is ours
            self._persist()
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=True))
        elif dep.status == "paused" and ours and not in_flight:
            if more and not self._step_gate(dep, group):
                return
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=False))
            st.replan["paused"] = None
            self._persist()

    def _replans(self) -> bool:
        """False when there is no demand figure to re-plan with (no demand source, nothing
        planned): every step would go, so the deployment is not paused between them."""
        return self.demand is not None or self._st().plan.get("forecast_upper") is not None

    def _hold(self, chk: StepCheck, *, paused: bool = False) -> None:
        """Capacity would be short and no surge is possible: wait (every worker serves) with
        status ``held``; past the hold limit pause the rollout and alert. ``paused``: the zone's
        deployment waits paused, and Nomad fails a deployment (auto-revert) that makes no
        progress for its progress_deadline even while paused: the hold ends a minute before."""
        st = self._st()
        now = self.clock.now()
        reason = f"held before the next node step: {chk.explain()}"
        if st.status != "held":
            st.replan["held_since"] = now.isoformat()
            st.replan["resume_status"] = st.status
            st.status, st.reason = "held", reason
            self._alert(f"rollout of {st.image} {reason}", "warning")
            self._save(reason)
            return
        limit = self.hold_limit_s
        if paused:
            limit = min(limit, max(0.0, self.d.progress_deadline.total_seconds() - 60.0))
        since = datetime.fromisoformat(st.replan.get("held_since") or now.isoformat())
        if (now - since).total_seconds() > limit:
            st.replan.pop("held_since", None)
            why = " (Nomad's progress deadline is near)" if limit < self.hold_limit_s else ""
            self._pause(f"held for {limit / 60:.0f} min{why} and capacity is still short: "
                        f"{chk.explain()}; resume or abort")  # fmt: skip
        st.reason = reason
        last = datetime.fromisoformat(st.updated_at) if st.updated_at else since
        if (now - last).total_seconds() >= HEARTBEAT_S:
            self._persist()  # the record's heartbeat: no other process takes the rollout over

    def _unhold(self, chk: StepCheck) -> None:
        st = self._st()
        if st.status != "held":
            return
        since = st.replan.pop("held_since", None)
        st.status = st.replan.pop("resume_status", None) or "rolling"
        held = (self.clock.now() - datetime.fromisoformat(since)).total_seconds() if since else 0
        st.reason = f"hold ended after {held:.0f}s: {chk.explain()}"
        self._save(st.reason)

    # --- surge workers ----------------------------------------------------------------------

    def _surge(self, group: str) -> None:
        """One more worker in ``group`` with the Scale API (no deployment running); wait until
        it is healthy."""
        st = self._st()
        status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
        cur = status.groups[group].desired
        st.surge = {"group": group, "from": cur, "to": cur + 1, "released": False}
        self._save(f"surge: {group} {cur} -> {cur + 1}")  # recorded first: released after a crash
        self._call(lambda: self.nomad.scale(self.job_id, group, cur + 1, namespace=self.ns,
                   message=f"nomadscale deploy {st.id}: surge for rollout"))  # fmt: skip
        for _ in range(240):  # wait until the surge worker is healthy
            g = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
            if g.groups[group].healthy >= cur + 1:
                return
            self.clock.sleep(self.poll_s)
        self._pause(f"surge worker in {group} not healthy")

    def _surge_during(self, dep: DeploymentInfo, group: str) -> None:
        """One more worker in ``group`` while its deployment runs: a new job version with the
        group's count + 1 (Nomad refuses the Scale API during a deployment). Its update block
        asks for one canary: the surge worker, placed before anything else is replaced and
        promoted by the gate once it is healthy and the re-plan agrees. When the zone's own
        canary still waits for promotion, that canary already is the extra worker: no canary
        then (Nomad adopts or replaces it and places before it replaces)."""
        st = self._st()
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

    def _adopt(self, dep: DeploymentInfo, note: str) -> None:
        st = self._st()
        st.deployment_id = dep.id
        st.replan["paused"] = None
        if st.status in ("canary", "held"):
            st.status = "rolling"  # the surge version has no canaries: the canary passed
        st.replan.pop("held_since", None)
        st.replan.pop("resume_status", None)
        self._save(note)

    def _adopt_newer(self, dep: DeploymentInfo) -> bool:
        """``dep`` was cancelled: when our own surge version superseded it (a process that
        crashed before recording the new deployment), follow the newer deployment."""
        st = self._st()
        s = st.surge or {}
        if s.get("superseded") != dep.id or s.get("released"):
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
            self._call(lambda: self.nomad.scale(self.job_id, s["group"], target,
                       namespace=self.ns, message=f"nomadscale deploy {st.id}: release surge"))  # fmt: skip
        s["released"] = True
        st.note(self.clock.now(), f"surge released: {s['group']} -> {target}")
