"""More twin behaviours checked against Nomad's Go source, over HTTP:

1. New placements need a deployment ready for them (scheduler/reconcile.go computeGroup,
   scheduler/reconciler/reconcile_cluster.go in newer versions: ``deploymentPlaceReady :=
   !paused && !failed && !isCanarying``; computeReplacements/placeAllocs). A paused or failed
   deployment places no count increase, no canary (computeCanaries: ``!deploymentPaused &&
   !deploymentFailed``) and no destructive update; lost allocations, due reschedules and
   migrations (a drain, or an allocation stopped through the API: nomad/alloc_endpoint.go
   Stop sets DesiredTransition.Migrate) are still replaced.
2. The blocked evaluation carries the placement failures (nomad/structs Evaluation
   CreateBlockedEval(..., failedTGAllocs), called from generic_sched.go createBlockedEval).
3. A replacement keeps the name of the allocation it replaces (computePlacements,
   computeMigrations, computeDestructiveUpdates: ``name: alloc.Name``) and links to it
   (generic_sched.go computePlacements: PreviousAllocation; the state store sets the
   previous allocation's NextAllocation).
4. While canaries are unpromoted, a migrated, lost or rescheduled allocation that is not a
   canary is placed with the job version Nomad keeps (generic_sched.go
   downgradedJobForPlacement: the latest deployment whose group is promoted or had no
   canaries), in that deployment.
5. The job JSON shows the default reschedule policy (api/tasks.go TaskGroup.Canonicalize,
   NewDefaultReschedulePolicy), merged with the job's ``Reschedule``.
"""

from __future__ import annotations

import copy
from typing import Any

import requests

from tests.sim.helpers import HOUR, UPDATE, S, alloc, fill, live_allocs, service_job, successful

ZERO_TIME = "0001-01-01T00:00:00Z"


def _free(n: Any) -> None:
    n.job.deregister_job("filler")


def _pause(twin: Any, dep_id: str, *, pause: bool) -> None:
    r = requests.post(
        f"{twin.address}/v1/deployment/pause/{dep_id}",
        json={"DeploymentID": dep_id, "Pause": pause},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def _stop(twin: Any, alloc_id: str) -> None:
    r = requests.post(f"{twin.address}/v1/allocation/{alloc_id}/stop", json={}, timeout=10)
    assert r.status_code == 200, r.text


def _blocked_count_increase(twin: Any, n: Any) -> dict[str, Any]:
    """web (2 allocations) is healthy; the filler takes the other 4 GPUs; web's count goes to
    4 and its 2 new placements fail. Returns the new deployment, now paused."""
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    fill(twin, n, 4)
    n.jobs.register_job({"Job": service_job("web", count=4, update=UPDATE)})
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and dep["Status"] == "running"
    assert len(live_allocs(n, "web")) == 2
    _pause(twin, dep["ID"], pause=True)
    return dep  # type: ignore[no-any-return]


# --- 1. placements need a deployment ready for them --------------------------------------


def test_a_paused_deployment_places_no_count_increase_when_capacity_frees(twin):
    n = twin.nomad()
    dep = _blocked_count_increase(twin, n)
    _free(n)
    twin.advance(60)
    assert len(live_allocs(n, "web")) == 2
    assert n.job.get_summary("web")["Summary"]["web"]["Queued"] == 0
    _pause(twin, dep["ID"], pause=False)
    assert len(live_allocs(n, "web")) == 4
    twin.advance(300)
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"


def test_a_failed_deployment_places_no_count_increase(twin):
    n = twin.nomad()
    dep = _blocked_count_increase(twin, n)
    _pause(twin, dep["ID"], pause=False)  # still blocked: no capacity
    r = requests.post(f"{twin.address}/v1/deployment/fail/{dep['ID']}", json={}, timeout=10)
    assert r.status_code == 200, r.text
    _free(n)
    twin.advance(120)
    assert len(live_allocs(n, "web")) == 2


def test_a_paused_deployment_places_no_canary(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 1}
    successful(twin, n, service_job("web", count=2, update=update))
    fill(twin, n, 4)
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=update)})
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and not dep["TaskGroups"]["web"]["PlacedCanaries"]
    _pause(twin, dep["ID"], pause=True)
    _free(n)
    twin.advance(60)
    assert [a["JobVersion"] for a in live_allocs(n, "web")] == [0, 0]
    _pause(twin, dep["ID"], pause=False)
    assert sorted(a["JobVersion"] for a in live_allocs(n, "web")) == [0, 0, 1]


def test_a_paused_deployment_replaces_lost_and_stopped_allocations(twin):
    """Lost allocations and migrations (an allocation stopped through the API is one) are
    replaced whatever the deployment's state, under their own names."""
    n = twin.nomad()
    _blocked_count_increase(twin, n)
    _free(n)
    lost, stopped = sorted(live_allocs(n, "web"), key=lambda a: a["Name"])
    twin.cluster.lose_node(lost["NodeID"])
    _stop(twin, stopped["ID"])
    live = live_allocs(n, "web")
    assert len(live) == 2
    by_prev = {alloc(n, a["ID"])["PreviousAllocation"]: a for a in live}
    assert set(by_prev) == {lost["ID"], stopped["ID"]}
    assert by_prev[lost["ID"]]["Name"] == lost["Name"]
    assert by_prev[stopped["ID"]]["Name"] == stopped["Name"]
    s = alloc(n, stopped["ID"])
    assert s["DesiredDescription"] == "alloc is being migrated"
    assert s["DesiredTransition"]["Migrate"] is True


# --- 2. the blocked evaluation ----------------------------------------------------------


def test_the_blocked_evaluation_carries_the_placement_failures(twin):
    n = twin.nomad()
    _blocked_count_increase(twin, n)
    evals = n.job.get_evaluations("web")
    (tried,) = [e for e in evals if e["BlockedEval"]]
    blocked = n.evaluation.get_evaluation(tried["BlockedEval"])
    assert blocked["Status"] == "blocked" and blocked["TriggeredBy"] == "queued-allocs"
    assert blocked["PreviousEval"] == tried["ID"]
    assert blocked["StatusDescription"] == "created to place remaining allocations"
    assert blocked["FailedTGAllocs"] == tried["FailedTGAllocs"]
    metric = blocked["FailedTGAllocs"]["web"]
    assert metric["CoalescedFailures"] == 1 and metric["NodesExhausted"] > 0
    for key in ("ResourcesExhausted", "ScoreMetaData", "NodesInPool", "NodesAvailable"):
        assert key in metric
    for ev in (blocked, tried):
        assert ev["RelatedEvals"] is None and ev["QuotaLimitReached"] == ""
        assert ev["WaitUntil"] == ZERO_TIME


# --- 3. replacement names ---------------------------------------------------------------


def test_a_replacement_keeps_the_name_of_the_allocation_it_replaces(twin):
    """web[0] fails and waits 30 s for its reschedule; meanwhile web[2] is stopped. Its
    replacement is web[2], not the lowest free index; web[0]'s replacement is web[0]."""
    n = twin.nomad()
    twin.cluster.faults.pull_fails(None, "registry/web:1", times=1)
    n.jobs.register_job({"Job": service_job("web", count=3, update=UPDATE)})
    twin.advance(36)
    (failed,) = [a for a in n.job.get_allocations("web") if a["ClientStatus"] == "failed"]
    assert failed["Name"] == "web.web[0]"
    victim = next(a for a in live_allocs(n, "web") if a["Name"] == "web.web[2]")
    _stop(twin, victim["ID"])
    repl = alloc(n, alloc(n, victim["ID"])["NextAllocation"])
    assert repl["Name"] == "web.web[2]" and repl["PreviousAllocation"] == victim["ID"]
    twin.advance(40)
    nxt = alloc(n, failed["ID"])["NextAllocation"]
    assert nxt and alloc(n, nxt)["Name"] == "web.web[0]"
    assert sorted(a["Name"] for a in live_allocs(n, "web")) == [
        "web.web[0]",
        "web.web[1]",
        "web.web[2]",
    ]


def test_a_destructive_update_replaces_under_the_same_name_and_links(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=2, update=UPDATE))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)})
    (new,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    prev = alloc(n, alloc(n, new["ID"])["PreviousAllocation"])
    assert prev["Name"] == new["Name"] and prev["NextAllocation"] == new["ID"]
    assert prev["DesiredDescription"] == "alloc is being updated due to job update"


def test_a_lost_allocation_is_replaced_under_its_name(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=3, update=UPDATE))
    victim = next(a for a in live_allocs(n, "web") if a["Name"] == "web.web[1]")
    twin.cluster.lose_node(victim["NodeID"])
    (repl,) = [a for a in live_allocs(n, "web") if a["ClientStatus"] == "pending"]
    assert repl["Name"] == "web.web[1]"
    assert alloc(n, repl["ID"])["PreviousAllocation"] == victim["ID"]
    assert alloc(n, victim["ID"])["NextAllocation"] == repl["ID"]


# --- 4. the job version a migration places while canarying -------------------------------


def test_a_migration_while_canarying_places_the_promoted_version(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 1}
    first = successful(twin, n, service_job("web", count=2, update=update))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=update)})
    twin.advance(100)  # the canary is healthy, the deployment waits for its promotion
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and dep["Status"] == "running"
    old = [a for a in live_allocs(n, "web") if a["JobVersion"] == 0]
    assert len(old) == 2
    n.node.drain_node_with_spec(old[0]["NodeID"], {"Deadline": HOUR, "IgnoreSystemJobs": True})
    repl = alloc(n, alloc(n, old[0]["ID"])["NextAllocation"])
    assert (repl["JobVersion"], repl["DeploymentID"]) == (0, first["ID"])
    assert repl["Job"]["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "registry/web:1"
    assert repl["Name"] == old[0]["Name"] and repl["DeploymentStatus"] is None
    twin.advance(100)
    assert alloc(n, repl["ID"])["DeploymentStatus"]["Healthy"] is True

    # promoted: the downgraded allocation is updated like the rest
    n.deployment.promote_deployment_all(dep["ID"])
    for _ in range(8):
        twin.advance(100)
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"
    assert {a["JobVersion"] for a in live_allocs(n, "web")} == {1}


def test_a_lost_allocation_while_canarying_is_replaced_with_the_promoted_version(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 1}
    first = successful(twin, n, service_job("web", count=2, update=update))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=update)})
    victim = next(a for a in live_allocs(n, "web") if a["JobVersion"] == 0)
    twin.cluster.lose_node(victim["NodeID"])
    repl = alloc(n, alloc(n, victim["ID"])["NextAllocation"])
    assert (repl["JobVersion"], repl["DeploymentID"], repl["Name"]) == (
        0,
        first["ID"],
        victim["Name"],
    )


# --- 5. the default reschedule policy ----------------------------------------------------


def test_the_job_shows_the_default_reschedule_policy(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1)})
    assert n.job.get_job("web")["TaskGroups"][0]["ReschedulePolicy"] == {
        "Attempts": 0,
        "Interval": 0,
        "Delay": 30 * S,
        "DelayFunction": "exponential",
        "MaxDelay": HOUR,
        "Unlimited": True,
    }
    job = service_job("merged", count=1)
    job["Reschedule"] = {"Attempts": 3, "Interval": HOUR, "Unlimited": False}
    job["TaskGroups"][0]["ReschedulePolicy"] = {"Delay": 5 * S}
    n.jobs.register_job({"Job": job})
    assert n.job.get_job("merged")["TaskGroups"][0]["ReschedulePolicy"] == {
        "Attempts": 3,
        "Interval": HOUR,
        "Delay": 5 * S,
        "DelayFunction": "exponential",
        "MaxDelay": HOUR,
        "Unlimited": False,
    }
    batch = copy.deepcopy(service_job("once", count=1, gpu=False))
    batch["Type"] = "batch"
    n.jobs.register_job({"Job": batch})
    assert n.job.get_job("once")["TaskGroups"][0]["ReschedulePolicy"] == {
        "Attempts": 1,
        "Interval": 24 * HOUR,
        "Delay": 5 * S,
        "DelayFunction": "constant",
        "MaxDelay": 0,
        "Unlimited": False,
    }
