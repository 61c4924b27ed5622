"""Twin behaviours checked against Nomad's Go source, over HTTP (third round):

1. A destructive update is a stop and a placement in one plan: the plan stops the previous
   allocation first (its room is free for the replacement), and when no node fits the
   replacement it pops that stop again (scheduler/generic_sched.go computePlacements:
   ``stopPrevAlloc`` -> plan.AppendStoppedAlloc ... ``s.plan.PopUpdate(prevAllocation)``).
   The old allocation keeps running; the failure is recorded (FailedTGAllocs, a blocked
   evaluation, Queued). Once a group failed a placement, its further placements in the
   evaluation fail with it (``CoalescedFailures``), their old allocations kept too.
2. A blocked evaluation is run again when capacity changes (nomad/blocked_evals.go unblock ->
   evalBroker.EnqueueAll: the same evaluation, its status still ``blocked``): it completes
   itself (generic_sched.go Process -> setStatus: ``complete``, no FailedTGAllocs, empty
   StatusDescription), its placements carrying its ID, or, still failing, is re-blocked
   (``s.planner.ReblockEval``: same ID, still ``blocked``, no new evaluation). A later
   successful evaluation of the job cancels it (nomad/state/state_store.go nestedUpsertEval:
   ``evaluation %q successful``); a newer blocked evaluation makes it a duplicate the leader
   cancels (nomad/leader.go reapDupBlockedEvaluations: ``existing blocked evaluation exists
   for job %q``).
3. A stop is the server setting DesiredStatus ``stop``: the client kills the tasks (group and
   task shutdown_delay, then kill_timeout, default 5 s: client/allocrunner killTasks) and
   only then reports ClientStatus ``complete``. The scheduler counts a stopping allocation's
   room free at once (structs.Allocation.TerminalStatus includes DesiredStatus stop;
   scheduler/context.go ProposedAllocs uses AllocsByNodeTerminal(false)), but blocked
   evaluations are only unblocked when the client reports it finished (nomad/fsm.go
   applyAllocClientUpdate). A replacement waits for its previous allocation to terminate
   before its tasks start (client/allocwatcher NewAllocWatcher, localPrevAlloc/remotePrevAlloc
   Wait), and a drain completes once its allocations are terminal on the client
   (nomad/drainer/draining_node.go IsDone: ClientTerminalStatus).
4. Canaries take the names of the allocations they will replace (scheduler reconcile
   computeCanaries -> allocNameIndex.NextCanaries: the destructive updates' indexes first);
   once promoted, the old allocation sharing a canary's name is the one stopped
   (computeStop: "Prefer stopping any alloc that has the same name as the canaries").
"""

from __future__ import annotations

from typing import Any

import requests

from tests.sim.helpers import UPDATE, S, alloc, fill, live_allocs, scale, service_job, successful

KILL_S = 5  # the default kill_timeout
PULL_S = 70  # a 7 GB image at the twin's 800 Mbit/s


def _eval(n: Any, eval_id: str) -> dict[str, Any]:
    return n.evaluation.get_evaluation(eval_id)  # type: ignore[no-any-return]


def _events(alloc: dict[str, Any]) -> list[str]:
    states = alloc["TaskStates"] or {}
    return [e["Type"] for e in states["server"]["Events"]] if states else []


def _queued(n: Any, job_id: str = "web") -> int:
    return int(n.job.get_summary(job_id)["Summary"]["web"]["Queued"])


def _blocked_evals(n: Any, job_id: str = "web") -> list[dict[str, Any]]:
    return [e for e in n.job.get_evaluations(job_id) if e["Status"] == "blocked"]


def _ineligible(twin: Any, node_id: str, *, eligible: bool = False) -> None:
    r = requests.post(
        f"{twin.address}/v1/node/{node_id}/eligibility",
        json={"NodeID": node_id, "Eligibility": "eligible" if eligible else "ineligible"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def _blocked_increase(twin: Any, n: Any) -> dict[str, Any]:
    """web runs 2 allocations, the filler the other 4 GPUs; web goes to 4: its register
    evaluation fails 2 placements. Returns that evaluation."""
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    fill(twin, n, 4)
    reply = n.jobs.register_job({"Job": service_job("web", count=4, update=UPDATE)})
    ev = _eval(n, reply["EvalID"])
    assert ev["BlockedEval"] and ev["FailedTGAllocs"]
    return ev


# --- 1. a destructive update that cannot be placed keeps the old allocation ---------------


def test_a_destructive_update_that_fits_nowhere_keeps_the_old_allocations(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    before = {a["ID"] for a in live_allocs(n, "web")}
    v1 = service_job("web", count=2, image="registry/web:2", update=UPDATE)
    v1["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"][0]["Count"] = 2  # 1-GPU nodes
    reply = n.jobs.register_job({"Job": v1})

    allocs = n.job.get_allocations("web")
    assert {a["ID"] for a in allocs} == before  # nothing placed
    for a in allocs:
        assert (a["DesiredStatus"], a["ClientStatus"]) == ("run", "running")
        assert alloc(n, a["ID"])["NextAllocation"] == ""
    ev = _eval(n, reply["EvalID"])
    assert ev["FailedTGAllocs"]["web"]["CoalescedFailures"] == 0  # max_parallel 1
    blocked = _eval(n, ev["BlockedEval"])
    assert blocked["Status"] == "blocked" and blocked["PreviousEval"] == ev["ID"]
    assert _queued(n) == 1
    twin.advance(60)
    assert {a["ID"] for a in live_allocs(n, "web")} == before


def test_a_destructive_update_takes_the_room_its_old_allocation_frees(twin):
    """Every GPU is taken: the plan's stop of the old allocation frees its node for the
    replacement, which starts once the old one exited."""
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    fill(twin, n, 4)
    reply = n.jobs.register_job(
        {"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)}
    )
    assert not _eval(n, reply["EvalID"])["FailedTGAllocs"]
    (old,) = [a for a in n.job.get_allocations("web") if a["DesiredStatus"] == "stop"]
    repl = alloc(n, alloc(n, old["ID"])["NextAllocation"])
    assert repl["NodeID"] == old["NodeID"] and old["Name"] == "web.web[0]"
    assert old["ClientStatus"] == "running" and _events(repl) == ["Received"]


def test_the_failed_group_places_nothing_more_in_the_evaluation(twin):
    """max_parallel 2: the first destructive placement fails, the second is coalesced into
    it (not tried, its old allocation not stopped)."""
    n = twin.nomad()
    update = {**UPDATE, "MaxParallel": 2}
    successful(twin, n, service_job("web", count=2, update=update))
    v1 = service_job("web", count=2, image="registry/web:2", update=update)
    v1["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"][0]["Count"] = 2
    reply = n.jobs.register_job({"Job": v1})
    assert len(live_allocs(n, "web")) == 2
    assert _eval(n, reply["EvalID"])["FailedTGAllocs"]["web"]["CoalescedFailures"] == 1
    assert _queued(n) == 2


def test_a_destructive_update_off_a_cordoned_node_waits_for_room(twin):
    """web[0]'s node is ineligible and the rest is full: its update cannot be placed, so it
    keeps running. Once the filler's allocations exit, the blocked evaluation runs again and
    the update goes ahead: the old allocation stopped, its replacement elsewhere."""
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    fill(twin, n, 4)
    web0 = next(a for a in live_allocs(n, "web") if a["Name"] == "web.web[0]")
    _ineligible(twin, web0["NodeID"])
    reply = n.jobs.register_job(
        {"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)}
    )
    assert alloc(n, web0["ID"])["DesiredStatus"] == "run"
    ev = _eval(n, reply["EvalID"])
    assert ev["FailedTGAllocs"] and ev["BlockedEval"]

    n.job.deregister_job("filler")
    twin.advance(KILL_S + 1)
    old = alloc(n, web0["ID"])
    assert old["DesiredStatus"] == "stop"
    assert old["DesiredDescription"] == "alloc is being updated due to job update"
    repl = alloc(n, old["NextAllocation"])
    assert repl["Name"] == "web.web[0]" and repl["JobVersion"] == 1
    assert repl["NodeID"] != web0["NodeID"] and repl["EvalID"] == ev["BlockedEval"]
    assert _eval(n, ev["BlockedEval"])["Status"] == "complete"


# --- 2. the blocked evaluation --------------------------------------------------------------


def test_capacity_runs_the_blocked_evaluation_itself(twin):
    n = twin.nomad()
    ev = _blocked_increase(twin, n)
    n.job.deregister_job("filler")
    twin.advance(KILL_S + 1)
    blocked = _eval(n, ev["BlockedEval"])
    assert blocked["Status"] == "complete"
    assert blocked["FailedTGAllocs"] is None and blocked["StatusDescription"] == ""
    assert blocked["QueuedAllocations"] == {"web": 0}
    new = [a for a in live_allocs(n, "web") if a["EvalID"] == blocked["ID"]]
    assert len(new) == 2 and len(live_allocs(n, "web")) == 4
    # no other evaluation was created to place them
    assert [
        e["ID"] for e in n.job.get_evaluations("web") if e["TriggeredBy"] == "queued-allocs"
    ] == [blocked["ID"]]
    assert _queued(n) == 0


def test_a_blocked_evaluation_still_failing_is_blocked_again(twin):
    n = twin.nomad()
    ev = _blocked_increase(twin, n)
    evals_before = len(n.job.get_evaluations("web"))
    r = scale(twin.address, "filler", "web", 3)  # one GPU freed
    assert r.status_code == 200, r.text
    twin.advance(KILL_S + 1)
    blocked = _eval(n, ev["BlockedEval"])
    assert blocked["Status"] == "blocked" and blocked["FailedTGAllocs"]
    assert [e["ID"] for e in _blocked_evals(n)] == [blocked["ID"]]
    assert len(n.job.get_evaluations("web")) == evals_before
    new = [a for a in live_allocs(n, "web") if a["EvalID"] == blocked["ID"]]
    assert len(new) == 1 and len(live_allocs(n, "web")) == 3
    assert _queued(n) == 1

    # the rest of the room: the same evaluation completes
    n.job.deregister_job("filler")
    twin.advance(KILL_S + 1)
    assert _eval(n, blocked["ID"])["Status"] == "complete"
    assert len(live_allocs(n, "web")) == 4


def test_a_successful_evaluation_cancels_the_blocked_one(twin):
    n = twin.nomad()
    ev = _blocked_increase(twin, n)
    # back to 2 (a register: the Scale API refuses a job with an active deployment)
    reply = n.jobs.register_job({"Job": service_job("web", count=2, update=UPDATE)})
    assert not _eval(n, reply["EvalID"])["FailedTGAllocs"]
    blocked = _eval(n, ev["BlockedEval"])
    assert blocked["Status"] == "canceled"
    assert blocked["StatusDescription"] == f'evaluation "{blocked["ID"]}" successful'
    assert _blocked_evals(n) == []
    # nothing runs it again when capacity frees
    n.job.deregister_job("filler")
    twin.advance(KILL_S + 1)
    assert _eval(n, blocked["ID"])["Status"] == "canceled"
    assert len(live_allocs(n, "web")) == 2


def test_a_newer_blocked_evaluation_cancels_the_older_one(twin):
    n = twin.nomad()
    first = _blocked_increase(twin, n)
    reply = n.jobs.register_job({"Job": service_job("web", count=5, update=UPDATE)})
    second = _eval(n, reply["EvalID"])
    assert second["BlockedEval"] and second["BlockedEval"] != first["BlockedEval"]
    old = _eval(n, first["BlockedEval"])
    assert old["Status"] == "canceled"
    assert old["StatusDescription"] == 'existing blocked evaluation exists for job "web"'
    assert [e["ID"] for e in _blocked_evals(n)] == [second["BlockedEval"]]


# --- 3. stops take the task's kill time -----------------------------------------------------


def test_a_stopped_allocation_runs_until_its_task_is_killed(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    r = scale(twin.address, "web", "web", 1)
    assert r.status_code == 200, r.text
    (stopping,) = [a for a in n.job.get_allocations("web") if a["DesiredStatus"] == "stop"]
    assert stopping["ClientStatus"] == "running"
    assert _events(stopping)[-1] == "Killing"
    assert n.job.get_summary("web")["Summary"]["web"]["Running"] == 2
    twin.advance(KILL_S - 1)
    assert alloc(n, stopping["ID"])["ClientStatus"] == "running"
    twin.advance(1)
    done = alloc(n, stopping["ID"])
    assert done["ClientStatus"] == "complete"
    assert _events(done)[-2:] == ["Killing", "Killed"]
    assert done["TaskStates"]["server"]["State"] == "dead"
    assert n.job.get_summary("web")["Summary"]["web"]["Complete"] == 1


def test_shutdown_delay_and_kill_timeout_add_up(twin):
    n = twin.nomad()
    job = service_job("web", count=1, update=UPDATE)
    job["TaskGroups"][0]["ShutdownDelay"] = 10 * S
    job["TaskGroups"][0]["Tasks"][0]["KillTimeout"] = 20 * S
    successful(twin, n, job)
    n.job.deregister_job("web")
    (a,) = n.job.get_allocations("web")
    assert (a["DesiredStatus"], a["ClientStatus"]) == ("stop", "running")
    twin.advance(29)
    assert alloc(n, a["ID"])["ClientStatus"] == "running"
    twin.advance(1)
    assert alloc(n, a["ID"])["ClientStatus"] == "complete"


def test_a_pending_allocation_stops_at_once(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1, update=UPDATE)})
    twin.advance(10)  # still pulling its image
    n.job.deregister_job("web")
    (a,) = n.job.get_allocations("web")
    assert (a["DesiredStatus"], a["ClientStatus"]) == ("stop", "complete")


def test_the_scheduler_counts_a_stopping_allocations_room_free(twin):
    """Nomad's plan (and the plan applier) leave out allocations with DesiredStatus stop:
    a placement may take the GPU of an allocation still being killed."""
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    fill(twin, n, 4)
    assert scale(twin.address, "filler", "web", 3).status_code == 200
    (stopping,) = [a for a in n.job.get_allocations("filler") if a["DesiredStatus"] == "stop"]
    reply = scale(twin.address, "web", "web", 3).json()
    assert not _eval(n, reply["EvalID"])["FailedTGAllocs"]
    (new,) = [a for a in live_allocs(n, "web") if a["EvalID"] == reply["EvalID"]]
    assert new["NodeID"] == stopping["NodeID"]
    assert alloc(n, stopping["ID"])["ClientStatus"] == "running"


def test_a_blocked_evaluation_waits_for_the_stopping_allocation_to_exit(twin):
    n = twin.nomad()
    ev = _blocked_increase(twin, n)
    assert scale(twin.address, "filler", "web", 3).status_code == 200
    assert len(live_allocs(n, "web")) == 2
    assert _eval(n, ev["BlockedEval"])["Status"] == "blocked"
    twin.advance(KILL_S - 1)
    assert len(live_allocs(n, "web")) == 2
    twin.advance(1)
    assert len(live_allocs(n, "web")) == 3


def test_a_replacement_waits_for_its_previous_allocation_to_exit(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)})
    (old,) = [a for a in n.job.get_allocations("web") if a["DesiredStatus"] == "stop"]
    repl = alloc(n, alloc(n, old["ID"])["NextAllocation"])
    assert repl["ClientStatus"] == "pending" and _events(repl) == ["Received"]
    twin.advance(KILL_S - 1)
    assert _events(alloc(n, repl["ID"])) == ["Received"]
    twin.advance(1)
    assert alloc(n, old["ID"])["ClientStatus"] == "complete"
    assert "Task Setup" in _events(alloc(n, repl["ID"]))
    twin.advance(PULL_S)  # pulling its image since the old one exited
    assert alloc(n, repl["ID"])["ClientStatus"] == "pending"
    twin.advance(3)
    assert alloc(n, repl["ID"])["ClientStatus"] == "running"


def test_a_drain_completes_once_its_allocations_exited(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    victim = live_allocs(n, "web")[0]
    n.node.drain_node_with_spec(victim["NodeID"], {"Deadline": 3600 * S})
    a = alloc(n, victim["ID"])
    assert (a["DesiredStatus"], a["ClientStatus"]) == ("stop", "running")
    assert n.node.get_node(victim["NodeID"])["DrainStrategy"] is not None
    twin.advance(KILL_S)
    node = n.node.get_node(victim["NodeID"])
    assert node["DrainStrategy"] is None and node["LastDrain"]["Status"] == "complete"


# --- 4. canary names ---------------------------------------------------------------------


def test_canaries_take_the_names_of_the_allocations_they_replace(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 2}
    successful(twin, n, service_job("web", count=3, update=update))
    n.jobs.register_job({"Job": service_job("web", count=3, image="registry/web:2", update=update)})
    canaries = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    assert sorted(a["Name"] for a in canaries) == ["web.web[0]", "web.web[1]"]


def test_promotion_stops_the_old_allocation_sharing_a_canarys_name(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 1}
    successful(twin, n, service_job("web", count=2, update=update))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=update)})
    (canary,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    assert canary["Name"] == "web.web[0]"
    twin.advance(100)
    dep = n.job.get_deployment("web")
    old0 = next(
        a for a in live_allocs(n, "web") if a["Name"] == "web.web[0]" and a["JobVersion"] == 0
    )
    n.deployment.promote_deployment_all(dep["ID"])
    stopped = alloc(n, old0["ID"])
    assert stopped["DesiredStatus"] == "stop"
    assert stopped["DesiredDescription"] == "alloc not needed due to job update"
    assert stopped["NextAllocation"] == ""
    for _ in range(4):
        twin.advance(100)
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"
    live = live_allocs(n, "web")
    assert sorted(a["Name"] for a in live) == ["web.web[0]", "web.web[1]"]
    assert {a["JobVersion"] for a in live} == {1}
