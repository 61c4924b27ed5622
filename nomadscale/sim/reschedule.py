"""Rescheduling of failed allocations: the group's reschedule policy, its delays and attempts,
and which failed allocations an evaluation replaces now, later or never.

Follows Nomad's nomad/structs (Allocation.NextRescheduleTime, NextDelay,
RescheduleTracker.RescheduleEligible, rescheduleInfo; the default policies
DefaultServiceJobReschedulePolicy / DefaultBatchJobReschedulePolicy),
scheduler/generic/alloc/set.go (FilterByRescheduleable, updateByReschedulable) and
scheduler/reconcile.go (computeReplacements).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nomadscale.sim.jobspec import RESCHEDULE_DEFAULTS
from nomadscale.sim.model import NS, unix_ns

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import Alloc, Deployment

ALLOC_RESCHEDULED = "alloc was rescheduled because it failed"
WINDOW_S = 1.0  # rescheduleWindowSize: due this close to now counts as now
MAX_PAST_EVENTS = 5  # maxPastRescheduleEvents kept for an unlimited policy


@dataclass(frozen=True)
class Policy:
    attempts: int
    interval_s: float
    delay_s: float
    function: str
    max_delay_s: float
    unlimited: bool

    @property
    def enabled(self) -> bool:
        return self.attempts > 0 or self.unlimited


def policy(c: Cluster, a: Alloc) -> Policy:
    """The reschedule policy of ``a``'s group in its job version: Nomad's default for the job
    type (service: unlimited, 30 s exponential up to 1 h; the twin's service delay is
    ``Cluster.reschedule_delay_s``), then the job's ``Reschedule``, then the group's. A
    registered job's groups carry the whole canonical policy (jobspec.canonicalize, as
    api/tasks.go TaskGroup.Canonicalize), so the defaults here only fill specs stored
    without one. System and sysbatch jobs have none: their failed allocations are not
    rescheduled."""
    jtype = a.job.get("Type", "service")
    if jtype in ("system", "sysbatch"):
        return Policy(0, 0.0, 0.0, "constant", 0.0, unlimited=False)
    merged = dict(RESCHEDULE_DEFAULTS["batch" if jtype == "batch" else "service"])
    if jtype != "batch":
        merged["Delay"] = round(c.reschedule_delay_s * NS)
    tg: dict[str, Any] = next(
        (g for g in a.job.get("TaskGroups") or [] if g.get("Name") == a.task_group), {}
    )
    for src in (a.job.get("Reschedule"), a.job.get("ReschedulePolicy"), tg.get("ReschedulePolicy")):
        merged.update({k: v for k, v in (src or {}).items() if v is not None})
    return Policy(
        attempts=int(merged["Attempts"] or 0),
        interval_s=float(merged["Interval"] or 0) / NS,
        delay_s=float(merged["Delay"] or 0) / NS,
        function=str(merged["DelayFunction"] or "constant"),
        max_delay_s=float(merged["MaxDelay"] or 0) / NS,
        unlimited=bool(merged["Unlimited"]),
    )


def _fail_time(a: Alloc) -> float:
    """Allocation.LastEventTime: when its tasks finished (else its last modification)."""
    return a.finished_at if a.finished_at is not None else a.modify_time


def _attempted(a: Alloc, pol: Policy, at: float) -> int:
    """RescheduleTracker.rescheduleInfo: reschedules within the policy's interval."""
    if pol.attempts <= 0 or pol.interval_s <= 0:
        return 0
    return sum(1 for e in a.reschedule_events if at - e["RescheduleTime"] / NS < pol.interval_s)


def eligible(a: Alloc, pol: Policy, at: float) -> bool:
    """RescheduleTracker.RescheduleEligible: whether the policy allows one more attempt."""
    if not pol.enabled:
        return False
    if pol.unlimited or (not a.reschedule_events and pol.attempts > 0):
        return True
    return _attempted(a, pol, at) < pol.attempts


def next_delay(a: Alloc, pol: Policy) -> float:
    """Allocation.NextDelay: the policy's delay, grown by its delay function over the
    allocation's past reschedules, capped at max_delay (and back to the base delay once the
    allocation ran longer than that cap since the last reschedule)."""
    delay = pol.delay_s
    events = a.reschedule_events
    if not events:
        return delay
    last = events[-1]["Delay"] / NS
    if pol.function == "exponential":
        delay = last * 2
    elif pol.function == "fibonacci":
        if len(events) >= 2:
            before = events[-2]["Delay"] / NS
            delay = last if (before == pol.max_delay_s and last == pol.delay_s) else last + before
    else:
        return delay
    if pol.max_delay_s > 0 and delay > pol.max_delay_s:
        delay = pol.max_delay_s
        if _fail_time(a) - events[-1]["RescheduleTime"] / NS > delay:
            delay = pol.delay_s
    return delay


def next_time(a: Alloc, pol: Policy) -> float | None:
    """Allocation.NextRescheduleTime: when a failed allocation may be replaced, or None when
    its policy allows no further attempt."""
    if not pol.enabled or a.desired_status != "run" or a.client_status != "failed":
        return None
    fail_time = _fail_time(a)
    delay = next_delay(a, pol)
    ok = pol.unlimited or (pol.attempts > 0 and not a.reschedule_events)
    if pol.attempts > 0 and a.reschedule_events:
        ok = _attempted(a, pol, fail_time) < pol.attempts and delay < pol.interval_s
    return fail_time + delay if ok else None


def tracker_for(prev: Alloc, pol: Policy, now: float) -> list[dict[str, Any]]:
    """generic_sched.go updateRescheduleTracker: the replacement's RescheduleTracker events,
    the previous allocation's (those within the interval, or the last few when unlimited)
    plus this reschedule."""
    if pol.attempts > 0:
        events = [
            dict(e)
            for e in prev.reschedule_events
            if pol.interval_s > 0 and now - e["RescheduleTime"] / NS <= pol.interval_s
        ]
    else:
        events = [dict(e) for e in prev.reschedule_events[-MAX_PAST_EVENTS:]]
    events.append(
        {
            "RescheduleTime": unix_ns(now),
            "PrevAllocID": prev.id,
            "PrevNodeID": prev.node_id,
            "Delay": round(next_delay(prev, pol) * NS),
        }
    )
    return events


def classify(
    c: Cluster,
    failed: Iterable[Alloc],
    *,
    deployment: Deployment | None,
    failed_deployment: Deployment | None,
) -> tuple[list[Alloc], list[Alloc]]:
    """Split a group's failed allocations (desired ``run``) into those that keep their slot
    and those to replace now.

    * A failed allocation of the active deployment waits until the deployment watcher marks
      it DesiredTransition.Reschedule (updateByReschedulable);
    * one its policy allows no attempt for keeps its slot for good;
    * one due later keeps its slot until then: a follow-up evaluation is scheduled for that
      time (createRescheduleLaterEvals);
    * one due now is replaced, unless it belongs to the job version's failed deployment
      (computeReplacements: never for "partOfFailedDeployment"); it then keeps its slot.
    """
    now = c.now_s()
    kept: list[Alloc] = []
    due: list[Alloc] = []
    for a in failed:
        if deployment is not None and a.deployment_id == deployment.id and not a.reschedule_ok:
            kept.append(a)
            continue
        at = next_time(a, policy(c, a))
        if at is None:
            kept.append(a)
        elif at <= now + WINDOW_S:
            part_of_failed = failed_deployment is not None and (
                a.deployment_id == failed_deployment.id
            )
            (kept if part_of_failed else due).append(a)
        else:
            kept.append(a)
            if a.followup_at != at:
                a.followup_at = at
                c.schedule(at, "reschedule", f"{a.namespace}\x00{a.job_id}")
    return kept, due
