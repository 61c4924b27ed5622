"""Node steps of a rollout: the re-plan before each one, surge workers and holds.

Nomad replaces one allocation at a time (max_parallel 1) and takes the next one out the moment
the previous replacement is healthy. To re-plan *before* each next worker goes out, nomadscale
pauses the zone's deployment while a replacement is in flight and, once it is healthy,
re-reads demand (``replan.check_step``) and then either resumes the deployment, adds a surge
worker in the zone, or holds (status ``held``, the deployment stays paused, every worker
serves). The deployment id nomadscale paused is in the KV record (``replan.paused``) so a
resumed process knows the pause is its own.

A surge worker is always a worker of the new image: at a zone's start it is part of the zone's
own new job version (the group's count + 1; Nomad places it before it replaces anything, and
in the canary zone the canary is that extra worker), during a zone it is a new job version
with the count + 1 (Nomad refuses the Scale API during a deployment; it supersedes the
deployment). A surge on the old version would run the old image, pull it on a node the
prefetch filled with the new one, and then be replaced itself. Either way the surge is
released when the zone is done. Before a zone starts and before a surge, nodes that joined the
zone since the prefetch get the image first (``_top_up``): nothing the rollout places pulls it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

from nomadscale.core.errors import DeploymentActiveError
from nomadscale.core.ports import DeploymentGroup, DeploymentInfo
from nomadscale.deploy import spec as jobspec
from nomadscale.deploy.base import RolloutBase
from nomadscale.deploy.prefetch import has_image, prefetch
from nomadscale.deploy.replan import (
    GO,
    HOLD,
    SURGE,
    StepCheck,
    check_step,
    current_demand,
    serving_workers,
    surge_blocker,
    zone_nodes,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0  # while held; a record older than 120 s may be resumed by the service


class StepGate(RolloutBase):
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
                self._unhold(chk)
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

    def _surge_during(self, dep: DeploymentInfo, group: str) -> None:
        """One more worker in ``group`` while its deployment runs: a new job version with the
        group's count + 1 (Nomad refuses the Scale API during a deployment). Its update block
        asks for one canary: the surge worker, placed before anything else is replaced and
        promoted by the gate once it is healthy and the re-plan agrees. When the zone's own
        canary still waits for promotion, that canary already is the extra worker: no canary
        then (Nomad adopts or replaces it and places before it replaces)."""
        st = self._st()
        # a bounded pull: the zone's deployment waits meanwhile, against its progress deadline
        self._top_up(group, timeout_s=self.d.progress_deadline.total_seconds() / 2, retries=0)
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
            self._scale_when_idle(s["group"], target, f"nomadscale deploy {st.id}: release surge")
        s["released"] = True
        st.note(self.clock.now(), f"surge released: {s['group']} -> {target}")

    def _scale_when_idle(self, group: str, count: int, message: str) -> None:
        """The Scale API once no deployment of the job is active: Nomad refuses it meanwhile,
        and every count change starts one for about min_healthy_time (a runbook's surge may
        have slipped in after the zone's deployment). One retry when one started since."""
        for attempt in (1, 2):
            self._settle()
            try:
                self._call(lambda: self.nomad.scale(self.job_id, group, count,
                                                    namespace=self.ns, message=message))  # fmt: skip
                return
            except DeploymentActiveError as e:
                if attempt == 2:
                    raise
                log.info("deploy %s: %s; waiting for that deployment", self.policy.name, e)

    # --- nodes that joined since the prefetch -----------------------------------------------

    def _top_up(self, group: str, *, timeout_s: float = 1800.0, retries: int | None = None) -> None:
        """Prefetch the image on the nodes of ``group``'s zone that the rollout's prefetch did
        not cover (joined, or eligible again, since): a surge worker or a replacement placed
        there would pull the ~7 GB image first. A node whose pull fails is made ineligible
        whatever ``on_prefetch_failure`` says: the rollout is under way, and it places nothing
        on a node without the image."""
        st = self._st()
        if not st.prefetch.get("wanted"):
            return  # the operator rolls out without prefetch
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        nodes = self._call(lambda: zone_nodes(self.policy, self.nomad, spec=job.spec,
                                              group=group))  # fmt: skip
        ok = set(st.prefetch.get("ok") or [])
        fresh = [
            n for n in nodes
            if n.id not in ok and not self._call(partial(has_image, self.nomad, n.id, st.image))
        ]  # fmt: skip
        ok |= {n.id for n in nodes} - {n.id for n in fresh}  # holding it already (warm-up)
        st.prefetch["ok"] = sorted(ok)
        if not fresh:
            return
        names = {n.id: n.name for n in fresh}
        log.info("deploy %s: zone %s: %s node(s) joined since the prefetch: pulling %s on %s",
                 st.policy, group, len(fresh), st.image,
                 ", ".join(sorted(names.values())))  # fmt: skip
        res = self._call(lambda: prefetch(
            self.nomad, image=st.image, nodes=fresh, job_id=self.prefetch_job, namespace=self.ns,
            clock=self.clock, timeout_s=timeout_s, poll_s=self.poll_s,
            retries=self.d.prefetch_retries if retries is None else retries,
        ))  # fmt: skip
        st.prefetch["ok"] = sorted(ok | set(res.ok))
        note = (f"zone {group}: prefetched {st.image} on {len(res.ok)}/{len(fresh)} node(s) "
                "that joined since")  # fmt: skip
        if res.ok:
            note += ": " + ", ".join(sorted(names[i] for i in res.ok))
        if res.failed:
            for node_id in res.failed:
                self._call(partial(self.nomad.set_eligibility, node_id, False))
            st.prefetch["failed"] = {**(st.prefetch.get("failed") or {}), **res.failed}
            ineligible = set(st.prefetch.get("ineligible") or []) | set(res.failed)
            st.prefetch["ineligible"] = sorted(ineligible)
            bad = ", ".join(f"{names[i]} ({r})" for i, r in sorted(res.failed.items()))
            note += f"; failed on {bad}: made ineligible"
        self._save(note)
