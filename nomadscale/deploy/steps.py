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

A surge worker that Nomad can't place (another job took the free node after the re-plan) is
seen at once: the rollout goes on without it when the step is safe now, else holds with the
deployment paused until a node is free again (``_watch_surge``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
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

HEARTBEAT_S = 60.0  # while held; a record older than 120 s may be resumed by the service


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

    def _watch_surge(self, dep: DeploymentInfo, g: DeploymentGroup, group: str) -> bool:
        """While ``group``'s surge worker is not placed: when Nomad can't place it (another
        job took the free node after the re-plan: a blocked evaluation), act at once instead
        of waiting for the progress deadline. Nothing was taken out for it (the pending
        placement uses max_parallel). Re-plan without it: when the step is safe now, go on
        without it (``_drop_surge``; not for the canary zone's own canary, which needs a node
        anyway); else hold with the deployment paused (Nomad places nothing for a paused
        deployment, so nothing lands on a node that joins meanwhile) until a node is free
        again (top up, resume: Nomad places it), and pause the rollout past the hold limit.
        True when it held or dropped the surge (no node step this round)."""
        st = self._st()
        s = st.surge
        if s is None or not self._surge_waits(group):
            return False
        why = self._unplaced_surge(group)
        ours = dep.status == "paused" and st.replan.get("paused") == dep.id
        if s.get("placed"):
            if s.pop("blocked", None) is not None:  # placed while held
                if ours:
                    self._call(partial(self.nomad.pause_deployment, dep.id, pause=False))
                    st.replan["paused"] = None
                self._persist()
                self._unhold(f"the surge worker of {group} is placed")
            return False
        if why is None and not s.get("blocked"):
            return False  # pending, or not evaluated yet
        s["blocked"] = why = why or s["blocked"]
        chk = self._replan(group)
        zone_canary = g.desired_canaries > 0 and not g.promoted and not s.get("superseded")
        if chk.action == GO and not zone_canary:
            s.pop("blocked", None)
            self._unhold(chk.explain())
            self._drop_surge(dep, group, f"surge worker of {group} not placed ({why}); "
                             f"going on without it ({chk.explain()})")  # fmt: skip
            return True
        if ours and self._free_node(group):
            self._top_up_in_zone(group)  # a node that joined may be the free one
            s.pop("blocked", None)
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=False))
            st.replan["paused"] = None
            self._persist()
            self._unhold(f"a node is free for the surge worker of {group}: resumed")
            return True
        if dep.status == "running":
            st.replan["paused"] = dep.id  # recorded first: a resumed process knows it is ours
            self._persist()
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=True))
        what = "surge worker (the zone's canary)" if zone_canary else "surge worker"
        self._hold(replace(chk, action=HOLD, why_not_surge=f"its {what} can't be placed: {why}"),
                   paused=True)  # fmt: skip
        return True

    def _hold(self, chk: StepCheck, *, paused: bool = False) -> None:
        """Capacity would be short and no surge is possible: wait (every worker serves) with
        status ``held``; past the hold limit pause the rollout and alert. ``paused``: the zone's
        deployment waits paused. Nomad before the fix of hashicorp/nomad#27804 (2.0.x, 2026)
        fails a deployment (auto-revert) that makes no progress for its progress_deadline even
        while paused; later versions (and the twin) don't. Either way the hold ends a minute
        before the deadline."""
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

    def _unhold(self, why: str) -> None:
        st = self._st()
        if st.status != "held":
            return
        since = st.replan.pop("held_since", None)
        st.status = st.replan.pop("resume_status", None) or "rolling"
        held = (self.clock.now() - datetime.fromisoformat(since)).total_seconds() if since else 0
        st.reason = f"hold ended after {held:.0f}s: {why}"
        self._save(st.reason)
