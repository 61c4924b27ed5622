"""Node steps of a rollout: the re-plan before each one, surge workers and holds.

Nomad replaces one allocation at a time (max_parallel 1) and takes the next one out the moment
the previous replacement is healthy. To decide *before* each next worker goes out, nomadscale
pauses the zone's deployment while a replacement is in flight and, once it is healthy,
re-reads demand (``replan.check_step``) and then either resumes the deployment, adds a surge
worker in the zone (``surge``), or holds (status ``held``, the deployment stays paused, every
worker serves). It takes each step itself whenever it re-plans or prefetches: nodes that
joined the zone since get the image right before the step (``nodes``). The deployment id
nomadscale paused is in the KV record (``replan.paused``) so a resumed process knows the pause
is its own.

Holds (and their limit) are ``holds``; a surge worker or canary that Nomad can't place is
watched by ``blocked``.
"""

from __future__ import annotations

import logging
from functools import partial

from nomadscale.core.ports import DeploymentGroup, DeploymentInfo
from nomadscale.deploy.replan import (
    GO,
    HOLD,
    SURGE,
    StepCheck,
    check_step,
    current_demand,
    serving_workers,
    surge_blocker,
)
from nomadscale.deploy.surge import SurgeWorkers

log = logging.getLogger(__name__)


class StepGate(SurgeWorkers):
    # --- the re-plan ------------------------------------------------------------------------

    def _replan(self, group: str, *, canaries: int = 0, zone_start: bool = False) -> StepCheck:
        """Re-read demand and the job's serving workers; decide the next node step.
        ``canaries``: healthy canaries of ``group`` that the step (a promotion) turns into
        ordinary workers. ``zone_start``: before the zone's deployment (a surge must cover)."""
        st = self._st()
        status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
        groups = {n: g for n, g in status.groups.items() if n in st.zones} or status.groups
        serving = dict(self._call(lambda: self.nomad.serving_counts(self.job_id,
                                                                    namespace=self.ns)))  # fmt: skip
        if canaries and group in groups:
            serving[group] = serving.get(group, 0) + canaries
        desired = {n: g.desired for n, g in status.groups.items()}
        now = self.clock.now()

        def blocked() -> str | None:
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            return self._call(lambda: surge_blocker(self.policy, self.nomad, spec=job.spec,
                              group=group, desired=desired, surge=st.surge))  # fmt: skip

        chk = check_step(
            group=group, at=now, serving=serving_workers(groups, serving),
            rpm_per_worker=self.policy.capacity.rpm_per_worker,
            demand_rpm=current_demand(self.demand, now=now, step_s=self.demand_step_s),
            planned_upper=st.plan.get("forecast_upper"), surge_blocked=blocked,
            surge_must_cover=zone_start,
        )  # fmt: skip
        prev = st.replan.get("last") or {}
        st.replan["last"] = chk.to_dict()
        same = all(prev.get(k) == st.replan["last"][k] for k in ("action", "need_workers"))
        (log.debug if st.status == "held" and same else log.info)(
            "deploy %s: re-plan before the next node step: %s", st.policy, chk.explain()
        )
        return chk

    def _zone_gate(self, group: str) -> bool:
        """Before a zone's first node step (no deployment yet): True when the zone's job
        version must carry a surge worker; holds (every worker serves) while the step would
        leave too little capacity and no surge fits, or one would not be enough (a hold
        inside the deployment would be bounded by its progress deadline)."""
        while True:
            chk = self._replan(group, zone_start=True)
            if chk.action != HOLD:
                self._unhold(chk.explain())
                if chk.action == SURGE:
                    self._save(f"re-plan: {chk.explain()}")
                return chk.action == SURGE
            self._hold(chk)
            self.clock.sleep(self.poll_s)

    def _zone_surge(self, group: str) -> int | None:
        """The count of ``group`` in the zone's new job version when it carries a surge worker
        (None: no surge). The re-plan decides it (the planned upper bound is part of it, so a
        surge the preflight planned is decided here too, with a free node checked now)."""
        st = self._st()
        s = st.surge
        if s and s.get("group") == group and not s.get("released"):
            return int(s["to"])  # recorded before a crash: the zone's version carries it
        if not self._zone_gate(group):
            return None
        status = self._call(lambda: self.nomad.job_status(self.job_id, namespace=self.ns))
        cur = status.groups[group].desired
        st.surge = {"group": group, "from": cur, "to": cur + 1, "released": False}
        self._save(f"surge: {group} {cur} -> {cur + 1} in the zone's new job version (the "
                   f"surge worker runs {st.image})")  # fmt: skip
        return cur + 1

    def _step_gate(self, dep: DeploymentInfo, group: str, *, canaries: int = 0) -> bool:
        """Before a node step inside the zone's deployment: True when it may go. A surge
        supersedes the deployment (``state.deployment_id`` changes); a hold waits."""
        chk = self._replan(group, canaries=canaries)
        if chk.action == GO:
            self._unhold(chk.explain())
            self._stepped()  # the caller takes the step (resumes, promotes)
            return True
        if chk.action == SURGE:
            self._save(f"re-plan: {chk.explain()}")
            self._surge_during(dep, group)
        else:
            self._hold(chk, paused=dep.status == "paused")
        return False

    def _between_steps(self, dep: DeploymentInfo, g: DeploymentGroup, group: str) -> None:
        """Pause the deployment while a replacement is in flight (so Nomad does not take the
        next worker out on its own); once it is healthy, re-plan, top the zone's nodes up and
        resume."""
        st = self._st()
        in_flight = g.placed_allocs > g.healthy_allocs + g.unhealthy_allocs
        more = g.placed_allocs < g.desired_total
        ours = st.replan.get("paused") == dep.id
        if dep.status == "running" and in_flight and more and self._takes_steps():
            self._stepped()  # a worker was placed: progress
            st.replan["paused"] = dep.id  # recorded first: a resumed process knows it is ours
            self._persist()
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=True))
        elif dep.status == "paused" and ours and not in_flight:
            if more:
                if self._replans() and not self._step_gate(dep, group):
                    return
                self._top_up_in_zone(group)  # the next replacement may land on a new node
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=False))
            st.replan["paused"] = None
            self._persist()

    def _replans(self) -> bool:
        """False when there is no demand figure to re-plan with (no demand source, nothing
        planned): every step would go."""
        return self.demand is not None or self._st().plan.get("forecast_upper") is not None

    def _takes_steps(self) -> bool:
        """True when nomadscale takes each next node step itself (pauses the deployment while
        a replacement is in flight, resumes it for the next): to re-plan before it, or to
        prefetch nodes that joined the zone since (the rollout prefetches). Otherwise Nomad
        goes on alone."""
        return self._replans() or bool(self._st().prefetch.get("wanted"))
