"""Workers of a zone's deployment that Nomad can't place: a surge worker, or the canary zone's
canary when the zone has no surge (then the canary is the extra worker).

Another job can take the node such a worker was meant for (the re-plan found one free, the
preflight counted one). Nomad reports it the way ``nomad job status`` shows a placement
failure: an evaluation with ``FailedTGAllocs`` for the group and a ``blocked`` evaluation that
waits for capacity (``surge.placement_failure``). Nothing was taken out for it, but the
deployment would wait for its progress deadline and fail (auto-revert). The rollout sees it
within one poll instead: a surge worker is dropped when the step is safe without it;
otherwise (and always for a canary) the rollout holds with the deployment paused (Nomad places
nothing for a paused deployment, so nothing lands on a node that joins meanwhile, before the
top-up) until a node is free again (top up, resume: Nomad places it) or the worker is placed,
and pauses for the operator past the hold limit (``holds``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from nomadscale.core.ports import DeploymentGroup, DeploymentInfo
from nomadscale.deploy.replan import GO, HOLD
from nomadscale.deploy.steps import StepGate
from nomadscale.deploy.surge import placement_failure

log = logging.getLogger(__name__)


class BlockedWatch(StepGate):
    def _resume_held(self, dep: DeploymentInfo, why: str) -> None:
        """End a hold for an unplaced worker: resume the deployment if we paused it."""
        st = self._st()
        if dep.status == "paused" and st.replan.get("paused") == dep.id:
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=False))
            st.replan["paused"] = None
        self._persist()
        self._unhold(why)

    def _pause_for_hold(self, dep: DeploymentInfo) -> None:
        st = self._st()
        if dep.status == "running":
            st.replan["paused"] = dep.id  # recorded first: a resumed process knows it is ours
            self._persist()
            self._call(partial(self.nomad.pause_deployment, dep.id, pause=True))

    def _watch_surge(self, dep: DeploymentInfo, g: DeploymentGroup, group: str) -> bool:
        """While ``group``'s surge worker is not placed: when Nomad can't place it, act at
        once. Re-plan without it: when the step is safe now, go on without it
        (``_drop_surge``; not for the canary zone's own canary, which needs a node anyway);
        else hold with the deployment paused until a node is free again. True when it held,
        resumed or dropped the surge (no node step this round)."""
        st = self._st()
        s = st.surge
        if s is None or not self._surge_waits(group):
            return False
        why = self._unplaced_surge(group)
        ours = dep.status == "paused" and st.replan.get("paused") == dep.id
        if s.get("placed"):
            self._stepped()  # the worker is placed: progress
            if s.pop("blocked", None) is not None:  # placed while held
                self._resume_held(dep, f"the surge worker of {group} is placed")
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
            self._resume_held(dep, f"a node is free for the surge worker of {group}: resumed")
            return True
        self._pause_for_hold(dep)
        what = "surge worker (the zone's canary)" if zone_canary else "surge worker"
        self._hold(replace(chk, action=HOLD, why_not_surge=f"its {what} can't be placed: {why}"),
                   paused=True)  # fmt: skip
        return True

    def _watch_canary(self, dep: DeploymentInfo, g: DeploymentGroup, group: str) -> bool:
        """While the zone's canary (no surge: ``_watch_surge`` covers a surge worker, which
        in the canary zone is the canary) is not placed: when Nomad can't place it, hold at
        once with the deployment paused (the canary needs a node whatever demand is) until a
        node is free (top up, resume) or it is placed. ``replan.canary`` keeps the
        deployment, its job version's JobModifyIndex and the placement failure. True when it
        held or resumed (no node step this round)."""
        st = self._st()
        c = st.replan.get("canary")
        if c is not None and c.get("deployment") != dep.id:
            st.replan.pop("canary")  # a newer deployment (a surge version: no canary)
            c = None
        waiting = (g.desired_canaries > 0 and not g.promoted
                   and len(g.placed_canaries) < g.desired_canaries)  # fmt: skip
        if not waiting:
            if c is not None:
                st.replan.pop("canary")
                self._stepped()  # the canary is placed: progress
                if c.get("blocked"):  # placed while held
                    self._resume_held(dep, f"the canary of {group} is placed")
            return False
        if self._surge_waits(group):
            return False
        if c is None:
            job = self._call(lambda: self.nomad.get_job(self.job_id, namespace=self.ns))
            if job.version != dep.job_version:
                return False  # the job changed since: this deployment is being superseded
            c = st.replan["canary"] = {"deployment": dep.id, "index": job.job_modify_index}
        evals = self._call(lambda: self.nomad.job_evaluations(self.job_id, namespace=self.ns))
        failure = placement_failure(evals, group=group, since_index=int(c["index"]))
        if failure is None and not c.get("blocked"):
            return False  # pending, or not evaluated yet
        why = c["blocked"] = failure.explain() if failure is not None else c["blocked"]
        if dep.status == "paused" and st.replan.get("paused") == dep.id and self._free_node(group):
            self._top_up_in_zone(group)  # a node that joined may be the free one
            c.pop("blocked", None)
            self._resume_held(dep, f"a node is free for the canary of {group}: resumed")
            return True
        self._pause_for_hold(dep)
        self._hold_on(f"held: the canary of {group} can't be placed ({why}); every worker "
                      "serves until a node is free",
                      still=f"the canary of {group} still can't be placed ({why})",
                      paused=True)  # fmt: skip
        return True
