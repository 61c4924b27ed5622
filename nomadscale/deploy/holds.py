"""Holds of a rollout: status ``held`` (every worker serves) while the next node step would
leave too little capacity, or while a worker it needs (a surge worker, the canary) can't be
placed; past the hold limit the rollout pauses and alerts.

The hold limit counts the time held *for the same step*, over every hold until the rollout
makes progress: a node step goes (a replacement placed, a promotion, a step without the
surge), the worker a hold waited for is placed, or the zone is done. A step whose holds keep
ending (a node came free) and starting again (it was taken again before Nomad placed the
worker) still pauses and alerts once it has been held for the hold limit in all; the time
between such holds is a poll or two. ``replan.held_s`` keeps the seconds of the step's
earlier holds, ``replan.held_since`` the start of the current one.
"""

from __future__ import annotations

import logging
from datetime import datetime

from nomadscale.deploy.nodes import NodeTopUp
from nomadscale.deploy.replan import StepCheck

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0  # while held; a record older than 120 s may be resumed by the service


class Holds(NodeTopUp):
    def _hold(self, chk: StepCheck, *, paused: bool = False) -> None:
        """Capacity would be short and no surge is possible: hold before the next node step
        (``_hold_on``)."""
        self._hold_on(f"held before the next node step: {chk.explain()}",
                      still=f"capacity is still short: {chk.explain()}", paused=paused)  # fmt: skip

    def _hold_on(self, reason: str, *, still: str, paused: bool = False) -> None:
        """Wait (every worker serves) with status ``held`` and ``reason``; once the step has
        been held for the hold limit in all, pause the rollout and alert (``still``: what
        still keeps it). ``paused``: the zone's deployment waits paused. Nomad before the
        fix of hashicorp/nomad#27804 (2.0.x, 2026) fails a deployment (auto-revert) that
        makes no progress for its progress_deadline even while paused; later versions (and
        the twin) don't. Either way the hold ends a minute before the deadline."""
        st = self._st()
        now = self.clock.now()
        if st.status != "held":
            if st.replan.get("held_step") != st.current_zone:
                st.replan["held_s"] = 0.0
            st.replan["held_step"] = st.current_zone
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
        held = float(st.replan.get("held_s") or 0.0) + (now - since).total_seconds()
        if held > limit:
            for key in ("held_since", "held_s", "held_step"):
                st.replan.pop(key, None)  # resumed by the operator: a new count
            why = " (Nomad's progress deadline is near)" if limit < self.hold_limit_s else ""
            self._pause(f"held for {limit / 60:.3g} min{why} and {still}; resume or abort")
        st.reason = reason
        last = datetime.fromisoformat(st.updated_at) if st.updated_at else since
        if (now - last).total_seconds() >= HEARTBEAT_S:
            self._persist()  # the record's heartbeat: no other process takes the rollout over

    def _end_hold(self) -> float:
        """The current hold is over (not the step): its seconds join the step's held time."""
        st = self._st()
        since = st.replan.pop("held_since", None)
        held = (self.clock.now() - datetime.fromisoformat(since)).total_seconds() if since else 0
        st.replan["held_s"] = float(st.replan.get("held_s") or 0.0) + held
        return held

    def _unhold(self, why: str) -> None:
        st = self._st()
        if st.status != "held":
            return
        held = self._end_hold()
        st.status = st.replan.pop("resume_status", None) or "rolling"
        st.reason = f"hold ended after {held:.0f}s: {why}"
        self._save(st.reason)

    def _stepped(self) -> None:
        """The rollout made progress (a node step went, or the worker a hold waited for was
        placed): the next hold counts from zero."""
        st = self._st()
        if st.replan.pop("held_s", None):
            log.debug("deploy %s: progress in %s: hold time reset", st.policy, st.current_zone)
        st.replan.pop("held_step", None)
