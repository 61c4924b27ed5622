"""Blocked evaluations: created when an evaluation cannot place everything, run again (the
same evaluation) when capacity changes, cancelled by a later successful evaluation of the
job or by a newer blocked one.

Follows Nomad's scheduler/generic_sched.go (Process, createBlockedEval, setStatus,
ReblockEval), nomad/blocked_evals.go (one tracked blocked evaluation per job: Block,
processBlockJobDuplicate, Untrack, unblock -> evalBroker.EnqueueAll: the evaluation itself,
its status left ``blocked``), nomad/leader.go reapDupBlockedEvaluations and
nomad/state/state_store.go nestedUpsertEval.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from nomadscale.sim.model import unix_ns

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster, JobKey
    from nomadscale.sim.model import JobRecord

FAILED_PLACEMENTS = "created to place remaining allocations"  # blockedEvalFailedPlacements


def block(c: Cluster, job: JobRecord, ev: dict[str, Any], failed: dict[str, Any]) -> None:
    """``ev`` (not itself blocked) failed placements: a blocked evaluation carrying them
    (structs.Evaluation.CreateBlockedEval(..., s.failedTGAllocs)) is tracked for the job; the
    one tracked before becomes a duplicate the leader cancels."""
    key = (job.namespace, job.id)
    b = c.new_eval(job, triggered_by="queued-allocs", status="blocked", previous=ev["ID"])
    b["StatusDescription"] = FAILED_PLACEMENTS
    b["FailedTGAllocs"] = copy.deepcopy(failed)
    ev["BlockedEval"] = b["ID"]
    old = c.evals.get(c.blocked.get(key, ""))
    if old is not None and old["Status"] == "blocked":
        _cancel(c, old, f'existing blocked evaluation exists for job "{job.id}"')
    c.blocked[key] = b["ID"]


def reblock(c: Cluster, key: JobKey, ev: dict[str, Any]) -> None:
    """A blocked evaluation run again still failed: it stays ``blocked`` and tracked, with
    the failures it was created with (generic_sched.go Process: ``s.eval.Copy()`` ->
    planner.ReblockEval; no new blocked evaluation for a blocked one)."""
    ev["SnapshotIndex"] = c.index
    c.blocked[key] = ev["ID"]


def complete(c: Cluster, key: JobKey, ev: dict[str, Any]) -> None:
    """``ev`` completed with nothing left to place. Run again from blocked, it completes
    itself (setStatus: status ``complete``, description "", no failures); and every blocked
    evaluation of the job is cancelled (nestedUpsertEval: "Check if the job has any blocked
    evaluations and cancel them") and no longer tracked (fsm.go handleUpsertedEval ->
    blockedEvals.Untrack)."""
    if ev["Status"] == "blocked":
        ev["Status"] = "complete"
        ev["StatusDescription"] = ""
        ev["FailedTGAllocs"] = None
    for other in c.evals_by_job.get(key, ()):
        if other is not ev and other["Status"] == "blocked":
            _cancel(c, other, f'evaluation "{other["ID"]}" successful')
    c.blocked.pop(key, None)


def _cancel(c: Cluster, ev: dict[str, Any], description: str) -> None:
    ev["Status"] = "canceled"
    ev["StatusDescription"] = description
    ev["ModifyTime"] = unix_ns(c.now_s())
    ev["ModifyIndex"] = c.bump("evals")


def unblock(c: Cluster) -> None:
    """Capacity changed: every tracked blocked evaluation is run again, as itself (the twin
    does not model computed node classes: any change may help any job)."""
    from nomadscale.sim import sched

    for key, eval_id in list(c.blocked.items()):
        c.blocked.pop(key, None)
        ev = c.evals.get(eval_id)
        job = c.jobs.get(key)
        if ev is None or ev["Status"] != "blocked" or job is None:
            continue
        sched.reconcile(c, job, triggered_by=ev["TriggeredBy"], blocked_eval=ev)
