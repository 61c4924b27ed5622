"""Rolling golden-image deployments: preflight -> prefetch -> canary -> one node at a time.

Zones roll one after another (``policy.zones`` order): each zone is one Nomad job version
whose zone group gets the new image and the rollout's update block (max_parallel 1,
auto_revert, manual promotion; the first zone gets ``deploy.canary`` canaries). The rollout
state lives in KV (``state.StateStore``, CAS) so ``resume`` reattaches after a crash and the
autoscaler holds the policy meanwhile. Every outcome is one of: completed, rolled_back,
aborted (nothing changed or stopped on request) or paused (with a reason; ``resume`` goes on).
Before every node step the rollout re-plans against current demand and surges or holds
(``steps.StepGate``); ``held`` is the status while it waits (``holds``), also while a surge
worker or the canary can't be placed (``blocked``).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from functools import partial
from typing import Any

from nomadscale.core.errors import ConflictError, TemporaryError
from nomadscale.core.ports import DeploymentInfo
from nomadscale.deploy import spec as jobspec
from nomadscale.deploy.base import NothingToDo, Reporter, _Stop, driver
from nomadscale.deploy.ending import Ending
from nomadscale.deploy.gate import GateResult
from nomadscale.deploy.image import parse_image
from nomadscale.deploy.prefetch import ensure_prefetch_job, prefetch
from nomadscale.deploy.preflight import Plan, preflight, task_images
from nomadscale.deploy.state import RolloutState, phase_text

log = logging.getLogger(__name__)

__all__ = ["NothingToDo", "Reporter", "Rollout"]


class Rollout(Ending):
    """``Rollout(policy=, nomad=, kv=, clock=, demand=, ...)`` (see ``base.RolloutBase``):
    ``plan``, ``start``, ``status``, ``resume``, ``abort``."""

    # --- public ----------------------------------------------------------------------------

    def status(self) -> RolloutState | None:
        return self.store.load(self.policy.name)[0]

    def plan(self, image: str, *, prefetch: bool = True) -> Plan:
        parse_image(image)
        return preflight(self.policy, self.nomad, now=self.clock.now(), demand=self.demand,
                         prefetched=prefetch)  # fmt: skip

    def runs_already(self, image: str) -> bool:
        """Every zone group of the job already runs ``image``: a rollout has nothing to do."""
        ref = parse_image(image).ref
        spec = dict(self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns)).spec)
        images = [i for z in self.policy.zones.items for i in task_images(spec, z.group)]
        return bool(images) and all(i == ref for i in images)

    def start(self, image: str, *, prefetch: bool = True) -> RolloutState:
        """Roll ``image`` out; ``NothingToDo`` (nothing changed, no record written) when every
        zone group already runs it."""
        ref = parse_image(image).ref
        old = self.status()
        if old is not None and old.active:
            raise ConflictError(
                f"deploy {self.policy.name}: rollout {old.id} of {old.image} is "
                f"{phase_text(old.status)}; use 'deploy resume' or 'deploy abort'",
                system="kv",
            )
        if self.runs_already(ref):
            raise NothingToDo(f"deploy {self.policy.name}: every zone group already runs {ref}: "
                              "nothing to do")  # fmt: skip
        plan = preflight(self.policy, self.nomad, now=self.clock.now(), demand=self.demand,
                         prefetched=prefetch)  # fmt: skip
        now = self.clock.now()
        st = RolloutState(
            policy=self.policy.name, image=ref, job_id=self.job_id, namespace=self.ns,
            status="prefetch" if prefetch else "rolling",
            previous_image=plan.previous_image, previous_version=plan.job.version,
            zones=[z.group for z in plan.zones], started_at=now.isoformat(),
            updated_at=now.isoformat(), reason=plan.explain(),
        )  # fmt: skip
        st.owner = driver()
        st.prefetch = {"wanted": prefetch}
        st.update_blocks = jobspec.update_blocks(dict(plan.job.spec))
        st.sli = {"surge_needed": plan.surge, "required_workers": plan.required_workers}
        st.plan = {"forecast_upper": plan.forecast_upper, "required_workers": plan.required_workers,
                   "rpm_per_worker": self.policy.capacity.rpm_per_worker}  # fmt: skip
        st.note(now, f"started: {plan.explain()}")
        self._index = self.store.create(st)
        self.state = st
        log.info("deploy %s: rollout %s of %s started (%s)", st.policy, st.id, ref, plan.explain())
        return self._drive(plan)

    def resume(self) -> RolloutState | None:
        """Reattach to the rollout recorded in KV and finish it (or roll it back)."""
        st, index = self.store.load(self.policy.name)
        if st is None or not st.active:
            return st
        self.state, self._index = st, index
        st.owner = driver()
        if st.ending:  # stopped while rolling back: finish that, never roll forward again
            with contextlib.suppress(_Stop):
                self._rollback(str(st.ending.get("reason") or "rollback resumed"),
                               status=str(st.ending.get("status") or "rolled_back"))  # fmt: skip
            return self.state
        if st.status == "paused":
            started = st.zones_done or st.deployment_id or st.current_zone
            st.status = "rolling" if started else "prefetch"
            if st.deployment_id and st.replan.get("paused") != st.deployment_id:
                dep_id = st.deployment_id  # paused outside nomadscale (ours: the gate resumes)
                if st.current_zone:
                    self._top_up_in_zone(st.current_zone)  # nodes that joined meanwhile
                self._call(lambda: self._resume_nomad_deployment(dep_id))
        self._save(f"resumed by a new process at {st.status}")
        plan = preflight(self.policy, self.nomad, now=self.clock.now(), demand=None)
        return self._drive(plan)

    def abort(self, *, reason: str = "aborted by operator") -> RolloutState | None:
        st, index = self.store.load(self.policy.name)
        if st is None or not st.active:
            return st
        self.state, self._index = st, index
        st.owner = driver()
        with contextlib.suppress(_Stop):
            self._rollback(reason, status="aborted")
        return self.state

    # --- the state machine -----------------------------------------------------------------

    def _drive(self, plan: Plan) -> RolloutState:
        st = self.state
        assert st is not None
        try:
            if st.status == "prefetch":
                self._prefetch(plan)
            for group in st.zones:
                if group in st.zones_done:
                    continue
                self._roll_zone(plan, group)
            if self.store.golden_image(self.policy.name) != st.image:  # not prefetched
                self.store.set_golden_image(self.policy.name, st.image)
            self._restore_update_blocks()
            self._finish("completed", f"{st.image} runs on every zone group")
        except _Stop:
            return st  # stopped on purpose: the state already says why (paused, aborted, ...)
        return st

    def _prefetch(self, plan: Plan) -> None:
        st = self.state
        assert st is not None
        nodes = [n for z in plan.zones for n in z.nodes]
        pools = [z.node_pool for z in self.policy.zones.items]  # every zone's, not the first's
        self._call(lambda: ensure_prefetch_job(self.nomad, job_id=self.prefetch_job,
                   namespace=self.ns, node_pools=pools, hcl_path=self.prefetch_hcl))  # fmt: skip
        t0 = self.clock.now()

        def progress(res: Any, total: int) -> None:
            self._report({"phase": "prefetch", "ok": len(res.ok), "failed": len(res.failed),
                          "total": total})  # fmt: skip

        res = prefetch(
            self.nomad, image=st.image, nodes=nodes, job_id=self.prefetch_job, namespace=self.ns,
            clock=self.clock, retries=self.d.prefetch_retries, poll_s=self.poll_s,
            on_progress=progress,
        )  # fmt: skip
        st.prefetch.update(res.to_dict())
        st.timings["prefetch_s"] = (self.clock.now() - t0).total_seconds()
        names = {n.id: n.name for n in nodes}
        if res.failed:
            bad = ", ".join(f"{names.get(i, i)} ({r})" for i, r in sorted(res.failed.items()))
            if self.d.on_prefetch_failure == "block":
                self._alert(f"prefetch of {st.image} failed on {bad}", "error")
                self._finish("aborted", f"prefetch failed on {bad}; policy blocks the rollout")
            for node_id in res.failed:
                self._call(partial(self.nomad.set_eligibility, node_id, False))
            st.prefetch["ineligible"] = sorted(res.failed)
            st.note(self.clock.now(), f"prefetch failed on {bad}: made ineligible")
        st.status = "rolling"
        self._save(f"prefetched {st.image} on {len(res.ok)}/{len(nodes)} nodes")
        # after the CAS write: a rollout aborted meanwhile (by another process) keeps the
        # previous golden image
        self.store.set_golden_image(self.policy.name, st.image)

    def _roll_zone(self, plan: Plan, group: str) -> None:
        st = self.state
        assert st is not None
        first = not st.zones_done
        if st.current_zone != group or not st.deployment_id:
            st.current_zone, st.deployment_id = group, None
            if self._registered_zone_version(group, canary=first):
                return
            reverted = self._reverted_zone(group)
            if reverted is not None:  # never register the image again over Nomad's revert
                self._rollback(reverted, status="rolled_back", failed=True)
            st.timings[f"{group}_start"] = self._elapsed()
            # a count change (the autoscaler's, scale --now, a runbook's surge) still in its
            # deployment: let it end rather than cancel it, so its version is stable and an
            # auto-revert of this zone goes back to that count (see _scale_when_idle)
            self._settle()
            self._top_up(group)  # nodes that joined the zone since the prefetch
            # re-plan against current demand (and the planned bound): surge or hold first; a
            # surge worker is part of this zone's new version, so it runs the new image
            surge_to = self._zone_surge(group)
            self._top_up(group)  # nodes that joined while the re-plan held
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            empty = [z.group for z in plan.zones if z.count == 0]
            canary = self.d.canary if first else 0
            spec = jobspec.with_image(
                dict(job.spec), image=st.image, groups=[*st.zones_done, group, *empty],
                update=jobspec.update_block(self.d, canary=canary), update_group=group,
            )  # fmt: skip
            if surge_to is not None:
                spec = jobspec.with_count(spec, group=group, count=surge_to, update=None)
            self._call(lambda: self.nomad.register_job(spec, enforce_index=job.job_modify_index,
                                                       namespace=self.ns))  # fmt: skip
            dep = self._wait_new_deployment(job.version)
            if dep is None:  # nothing to replace in this zone
                self._zone_done(group)
                return
            st.deployment_id = dep.id
            st.status = "canary" if canary else "rolling"
            self._save(f"zone {group}: deployment {dep.id[:8]} (canary {canary})")
        self._follow(group)

    def _registered_zone_version(self, group: str, *, canary: bool) -> bool:
        """When the job already runs this rollout's version of ``group`` (its image, a version
        newer than the rollout's start) whose deployment was never recorded (the process
        stopped between registering it and saving the deployment id: a crash, a Nomad
        outage), follow that deployment (or the zone is done: nothing to replace) and return
        True. Registering again would change nothing, so no new deployment would come."""
        st = self._st()
        job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
        images = task_images(dict(job.spec), group)
        if not images or any(i != st.image for i in images):
            return False
        if st.previous_version is None or job.version <= st.previous_version:
            return False
        dep = self._wait_new_deployment(job.version - 1)
        st.timings.setdefault(f"{group}_start", self._elapsed())
        if dep is None:
            self._zone_done(group)
            return True
        g = dep.groups.get(group)
        waits = canary and g is not None and g.desired_canaries > 0 and not g.promoted
        st.deployment_id = dep.id
        st.status = "canary" if waits else "rolling"
        self._save(f"zone {group}: following deployment {dep.id[:8]} of the version registered "
                   "before the rollout stopped")  # fmt: skip
        self._follow(group)
        return True

    def _follow(self, group: str) -> None:
        st = self._st()
        assert st.deployment_id is not None
        index, healthy_seen, outage_since = 0, -1, None
        gate_since: datetime | None = None
        last_gate = self.clock.now()
        while True:
            dep_id = st.deployment_id
            try:
                dep, new_index = self.nomad.watch_deployment(
                    dep_id, index=index, wait_s=self.watch_wait_s
                )
                outage_since = None
            except TemporaryError as e:
                now = self.clock.now()
                outage_since = outage_since or now
                if (now - outage_since).total_seconds() > self.outage_limit_s:
                    self._pause(f"nomad unavailable for {self.outage_limit_s:.0f}s: {e}")
                log.warning("deploy %s: watching deployment: %s", st.policy, e)
                self.clock.sleep(max(self.poll_s, e.retry_after))
                continue
            g = dep.groups.get(group)
            self._report(
                {
                    "phase": st.status,
                    "deployment": dep.status,
                    "group": group,
                    "healthy": g.healthy_allocs if g else 0,
                    "total": g.desired_total if g else 0,
                    "sli": st.sli.get("last"),
                }
            )
            if dep.status == "successful":
                if self.gate.enabled:
                    self._gate(dep, self.clock.now(), canary=False, final=True)
                self._zone_done(group)
                return
            if dep.status == "failed":
                self._rollback(f"deployment {dep.id[:8]} failed: {dep.status_description}",
                               status="rolled_back", failed=True)  # fmt: skip
            if dep.status == "cancelled":
                if self._adopt_newer(dep):  # superseded by our own surge job version
                    index = 0
                    continue
                self._pause(f"deployment {dep.id[:8]} cancelled: {dep.status_description}")
            if dep.status == "paused" and st.replan.get("paused") != dep.id:
                self._pause(f"deployment {dep.id[:8]} was paused outside nomadscale")
            if g is not None and g.unhealthy_allocs > 0:
                what = "canary" if g.desired_canaries and not g.promoted else "allocation"
                self._rollback(f"{what} of {st.image} unhealthy in {group}",
                               status="rolled_back", failed=True)  # fmt: skip
            if g is not None and (
                self._watch_surge(dep, g, group) or self._watch_canary(dep, g, group)
            ):
                pass  # its surge worker or canary can't be placed: held, or surge dropped
            elif (
                dep.needs_promotion
                and g is not None
                and (
                    len(g.placed_canaries) >= g.desired_canaries
                    and g.healthy_allocs >= g.desired_canaries
                    and g.healthy_allocs >= g.placed_allocs  # nothing in flight
                )
            ):
                gate_since = gate_since or self.clock.now()
                # the promotion is the zone's first node step: re-plan before it too
                if self._gate(dep, gate_since, canary=True) and self._step_gate(
                    dep, group, canaries=g.desired_canaries
                ):
                    self._top_up_in_zone(group)  # the promotion places the next replacement
                    self._call(partial(self.nomad.promote, dep.id, groups=[group]))
                    st.timings.setdefault(
                        "canary_s", self._elapsed() - st.timings.get(f"{group}_start", 0)
                    )
                    st.status = "rolling"
                    gated = " and SLI gate passed" if self.gate.enabled else ""
                    self._save(f"canary healthy{gated}: promoted {dep.id[:8]}")
                    gate_since = None
            else:
                if (
                    g is not None
                    and self.gate.enabled
                    and (
                        g.healthy_allocs > healthy_seen
                        or (self.clock.now() - last_gate).total_seconds() >= self.gate_every_s
                    )
                ):
                    self._gate(dep, self.clock.now(), canary=False, final=True)
                    healthy_seen, last_gate = g.healthy_allocs, self.clock.now()
                if g is not None:
                    self._between_steps(dep, g, group)
            if st.deployment_id != dep_id:  # a surge superseded the deployment
                index, healthy_seen = 0, -1
                continue
            if new_index == index or self.watch_wait_s <= 0:
                self.clock.sleep(self.poll_s)
            index = new_index

    def _gate(
        self, dep: DeploymentInfo, since: datetime, *, canary: bool, final: bool = False
    ) -> bool:
        """True when the SLI gate passed; a breach (or, for the canary, no data until the
        healthy deadline) pauses and fails the deployment and rolls back. With ``final`` only
        a breach counts (no data between nodes is not a reason to stop)."""
        st = self.state
        assert st is not None
        if not self.gate.enabled:
            return True
        res: GateResult = self.gate.check(st.image, at=self.clock.now())
        st.sli["last"] = res.to_dict()
        self._report({"phase": "gate", "sli": res.to_dict()})
        if res.verdict == "pass":
            return True
        waited = (self.clock.now() - since).total_seconds()
        limit = self.d.healthy_deadline.total_seconds()
        if res.verdict == "breach" or (not final and waited >= limit):
            reason = res.reason if res.verdict == "breach" else f"no SLI data for {limit:.0f}s"
            self._save(f"SLI gate failed: {reason}")
            self._rollback(f"SLI gate: {reason}", status="rolled_back", failed=True)
        return False

    # --- helpers -------------------------------------------------------------------------

    def _zone_done(self, group: str) -> None:
        st = self.state
        assert st is not None
        st.zones_done.append(group)
        st.timings[f"{group}_s"] = self._elapsed() - st.timings.get(f"{group}_start", 0)
        st.deployment_id = None
        st.replan.pop("canary", None)
        self._stepped()
        self._release_surge()
        self._save(f"zone {group} done")

    def _resume_nomad_deployment(self, dep_id: str) -> None:
        dep = self.nomad.deployment(dep_id)
        if dep.status == "paused":
            self.nomad.pause_deployment(dep_id, pause=False)
