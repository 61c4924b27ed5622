"""Twin behaviours checked against Nomad's Go source, over HTTP (python-nomad, raw calls where
it lacks them):

1. In-place updates move an allocation into the job's *latest* deployment, whatever its
   status (scheduler/generic_sched.go computeJobAllocs: ``update.DeploymentID !=
   s.deployment.GetID()`` -> new DeploymentID, DeploymentStatus nil; ``s.deployment`` is
   state.LatestDeploymentByJobID), never into "no deployment" while one exists. The client
   clears the health (client/allocrunner/health_hook.go Update) and watches it again only if
   the group still has an update block (health_hook.go init: a deployment allocation of a
   group without one is never watched); an allocation outside any deployment is watched with
   the migrate block (getHealthParams).
2. The node drainer marks allocations for migration job-wide, ``migrate.max_parallel`` at a
   time, counting every allocation of the group whose health is set, healthy or not
   (nomad/drainer/watch_jobs.go handleTaskGroup: numToDrain = healthy - (count -
   max_parallel)); the scheduler stops a marked allocation and places its replacement in the
   same plan (scheduler/reconcile.go computeMigrations), even when nothing fits.
3. A failed allocation of an active, progress-based deployment is rescheduled once the
   deployment watcher marks it DesiredTransition.Reschedule
   (nomad/deploymentwatcher/deployment_watcher.go handleAllocUpdate), after the reschedule
   policy's delay (scheduler/generic/alloc/set.go updateByReschedulable); without reschedule
   attempts left the deployment fails at once (shouldFailEarly); allocations of a failed
   deployment are never replaced (reconcile.go computeReplacements).
4. ``DeploymentStatus`` is null until the client sets the health (the scheduler only creates
   it for canaries: generic_sched.go computePlacements, ``{Canary: true}``).
"""

from __future__ import annotations

import copy
from typing import Any

import requests

from tests.sim.helpers import HOUR, UPDATE, S, live_allocs, service_job

PULL_S = 70  # a 7 GB image at the twin's 800 Mbit/s
# a stopped allocation runs until its task is killed (the default kill_timeout); its
# replacement starts (and its health is watched) once it exited (client/allocwatcher)
KILL_S = 5


def _successful(twin: Any, n: Any, job: dict[str, Any], *, wait_s: int = 300) -> dict[str, Any]:
    n.jobs.register_job({"Job": job})
    twin.advance(wait_s)
    dep = n.job.get_deployment(job["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    return dep  # type: ignore[no-any-return]


def _alloc(n: Any, alloc_id: str) -> dict[str, Any]:
    return n.allocation.get_allocation(alloc_id)  # type: ignore[no-any-return]


def _health(alloc: dict[str, Any]) -> Any:
    return (alloc["DeploymentStatus"] or {}).get("Healthy")


# --- 1. in-place moves -------------------------------------------------------------------


def test_in_place_update_moves_an_allocation_into_the_latest_terminal_deployment(twin):
    """The job's deployment 1 succeeded; a stopped allocation's replacement is placed outside
    any deployment (no active one: DeploymentID ""), migrate-watched and healthy. Version 1
    drops the update block (max_parallel 0) and adds one: no new deployment. The scheduler
    still sets every in-place updated allocation's DeploymentID to the latest deployment's, so
    the replacement moves into deployment 1 with its health cleared, and the client never
    watches it again (a deployment allocation of a group without update block). The
    allocations already in deployment 1 keep their health; the new placement is outside any
    deployment and turns healthy with the migrate block."""
    n = twin.nomad()
    first = _successful(twin, n, service_job("web", count=2, update=UPDATE))
    victim, kept = live_allocs(n, "web")
    r = requests.post(f"{twin.address}/v1/allocation/{victim['ID']}/stop", json={}, timeout=10)
    assert r.status_code == 200, r.text
    (replacement,) = [a for a in live_allocs(n, "web") if a["ID"] != kept["ID"]]
    assert _alloc(n, replacement["ID"])["DeploymentID"] == ""
    twin.advance(200)
    assert _health(_alloc(n, replacement["ID"])) is True

    job = service_job("web", count=3, update={"MaxParallel": 0})
    n.jobs.register_job({"Job": job})
    assert n.job.get_deployment("web")["ID"] == first["ID"]  # no new deployment
    moved = _alloc(n, replacement["ID"])
    assert (moved["JobVersion"], moved["DeploymentID"]) == (1, first["ID"])
    assert moved["DeploymentStatus"] is None
    stayed = _alloc(n, kept["ID"])
    assert (stayed["JobVersion"], stayed["DeploymentID"], _health(stayed)) == (1, first["ID"], True)
    (new,) = [a for a in live_allocs(n, "web") if a["ID"] not in (kept["ID"], replacement["ID"])]
    assert _alloc(n, new["ID"])["DeploymentID"] == ""

    twin.advance(600)
    assert _alloc(n, replacement["ID"])["DeploymentStatus"] is None  # never watched again
    assert _alloc(n, replacement["ID"])["ClientStatus"] == "running"
    assert _health(_alloc(n, new["ID"])) is True
    assert _health(_alloc(n, kept["ID"])) is True
    r = requests.get(f"{twin.address}/v1/job/web/scale", timeout=10)
    assert r.json()["TaskGroups"]["web"]["Healthy"] == 2


def test_replacement_outside_deployments_is_watched_with_the_migrate_block(twin):
    """health_hook.go getHealthParams: an allocation without DeploymentID is watched with the
    migrate block (here min_healthy_time 40 s), not the update block (10 s)."""
    n = twin.nomad()
    job = service_job("web", count=1, update=UPDATE)
    job["TaskGroups"][0]["Migrate"] = {"MinHealthyTime": 40 * S, "HealthyDeadline": 300 * S}
    _successful(twin, n, job)
    (victim,) = live_allocs(n, "web")
    requests.post(f"{twin.address}/v1/allocation/{victim['ID']}/stop", json={}, timeout=10)
    (replacement,) = live_allocs(n, "web")
    for _ in range(PULL_S + 5):
        if _alloc(n, replacement["ID"])["ClientStatus"] == "running":
            break
        twin.advance(1)
    twin.advance(15)  # past the update block's 10 s
    assert _alloc(n, replacement["ID"])["DeploymentStatus"] is None
    twin.advance(30)
    assert _health(_alloc(n, replacement["ID"])) is True


# --- 2. drains ---------------------------------------------------------------------------


def _drain(n: Any, node_id: str) -> None:
    n.node.drain_node_with_spec(node_id, {"Deadline": HOUR, "IgnoreSystemJobs": True})


def test_drain_migrates_max_parallel_job_wide_and_waits_for_health(twin):
    """Two nodes of a 4-allocation group drain at once. healthy 4, count - max_parallel 3: one
    allocation is marked, stopped and replaced in the same evaluation; the other waits (its
    node's drain too) until the replacement's health is set, then goes the same way."""
    n = twin.nomad()
    _successful(twin, n, service_job("web", count=4, update=UPDATE))
    first, second = live_allocs(n, "web")[:2]
    _drain(n, first["NodeID"])
    _drain(n, second["NodeID"])

    migrated = [a for a in (first, second) if _alloc(n, a["ID"])["DesiredStatus"] == "stop"]
    assert len(migrated) == 1
    (waiting,) = [a for a in (first, second) if a is not migrated[0]]
    stopped = _alloc(n, migrated[0]["ID"])
    assert stopped["DesiredDescription"] == "alloc is being migrated"
    assert stopped["DesiredTransition"]["Migrate"] is True
    still = _alloc(n, waiting["ID"])
    assert still["DesiredStatus"] == "run" and still["DesiredTransition"]["Migrate"] is None
    live = live_allocs(n, "web")
    assert len(live) == 4  # 2 untouched + the waiting one + the replacement
    (repl,) = [a for a in live if a["ClientStatus"] == "pending"]
    assert _alloc(n, repl["ID"])["PreviousAllocation"] == migrated[0]["ID"]
    assert n.node.get_node(migrated[0]["NodeID"])["LastDrain"]["Status"] == "draining"
    twin.advance(KILL_S)  # the migrated allocation exited: its node's drain is done
    assert n.node.get_node(migrated[0]["NodeID"])["LastDrain"]["Status"] == "complete"
    assert n.node.get_node(waiting["NodeID"])["Drain"] is True

    twin.advance(PULL_S + 2 + 5)  # the replacement runs; its health is not set yet
    assert _alloc(n, waiting["ID"])["DesiredStatus"] == "run"
    twin.advance(10)  # healthy (migrate min_healthy_time 10 s): the next one goes
    assert _health(_alloc(n, repl["ID"])) is True
    assert _alloc(n, waiting["ID"])["DesiredDescription"] == "alloc is being migrated"
    twin.advance(200)
    node = n.node.get_node(waiting["NodeID"])
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"
    live = live_allocs(n, "web")
    assert len(live) == 4 and not {a["NodeID"] for a in live} & {first["NodeID"], second["NodeID"]}


def test_drain_moves_on_once_a_replacement_is_unhealthy(twin):
    """The drainer counts health *set*, not healthy: a replacement marked unhealthy at its
    migrate healthy_deadline (still pulling) lets the next allocation migrate."""
    n = twin.nomad()
    job = service_job("web", count=2, update=UPDATE)
    job["TaskGroups"][0]["Migrate"] = {
        "MaxParallel": 1,
        "MinHealthyTime": 1 * S,
        "HealthyDeadline": 30 * S,
    }
    _successful(twin, n, job)
    first, second = live_allocs(n, "web")
    _drain(n, first["NodeID"])
    _drain(n, second["NodeID"])
    moved = [a for a in (first, second) if _alloc(n, a["ID"])["DesiredStatus"] == "stop"]
    assert len(moved) == 1
    (waiting,) = [a for a in (first, second) if a is not moved[0]]
    twin.advance(KILL_S + 29)  # the replacement's health watch began once its previous exited
    assert _alloc(n, waiting["ID"])["DesiredStatus"] == "run"
    twin.advance(2)  # the replacement is unhealthy: health set
    repl = _alloc(n, _alloc(n, moved[0]["ID"])["NextAllocation"])
    assert repl["ClientStatus"] == "pending" and _health(repl) is False
    assert _alloc(n, waiting["ID"])["DesiredDescription"] == "alloc is being migrated"


def test_drain_at_capacity_stops_the_allocation_and_queues_its_replacement(twin_factory):
    """Nothing fits elsewhere: the marked allocation is stopped anyway, its replacement queued
    (a blocked evaluation), and the node's drain completes once it exited."""
    t = twin_factory(nodes=2)
    n = t.nomad()
    _successful(t, n, service_job("web", count=2, update=UPDATE))
    victim = live_allocs(n, "web")[0]
    _drain(n, victim["NodeID"])
    assert _alloc(n, victim["ID"])["DesiredDescription"] == "alloc is being migrated"
    assert len(live_allocs(n, "web")) == 1
    summary = n.job.get_summary("web")["Summary"]["web"]
    assert summary["Queued"] == 1
    assert n.node.get_node(victim["NodeID"])["Drain"] is True
    t.advance(KILL_S)
    node = n.node.get_node(victim["NodeID"])
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"


def test_drain_completes_once_its_last_allocation_stops_for_any_reason(twin):
    """migrate.max_parallel 0: the drainer marks nothing before the deadline. When the user
    stops the node's allocation, the node holds nothing any more and its drain completes
    (nomad/drainer/draining_node.go IsDone; the drainer wakes on every allocation change)."""
    n = twin.nomad()
    job = service_job("web", count=2, update=UPDATE)
    job["TaskGroups"][0]["Migrate"] = {"MaxParallel": 0}
    _successful(twin, n, job)
    victim = live_allocs(n, "web")[0]
    _drain(n, victim["NodeID"])
    assert n.node.get_node(victim["NodeID"])["Drain"] is True
    assert _alloc(n, victim["ID"])["DesiredStatus"] == "run"
    r = requests.post(f"{twin.address}/v1/allocation/{victim['ID']}/stop", json={}, timeout=10)
    assert r.status_code == 200, r.text
    assert n.node.get_node(victim["NodeID"])["Drain"] is True  # being killed
    twin.advance(KILL_S)
    node = n.node.get_node(victim["NodeID"])
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"


# --- 3. failed allocations during a deployment ------------------------------------------


def _rollout_with_failing_pull(twin: Any, n: Any, *, reschedule: dict[str, Any] | None) -> str:
    """v0 (2 allocs) healthy, then v1 whose first replacement's pull fails half way (35 s)."""
    job = service_job("web", count=2, update=UPDATE, gpu=False)
    if reschedule is not None:
        job["TaskGroups"][0]["ReschedulePolicy"] = reschedule
    _successful(twin, n, job)
    twin.cluster.faults.pull_fails(None, "web:2", times=1)
    v1 = copy.deepcopy(job)
    v1["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry/web:2"
    n.jobs.register_job({"Job": v1})
    (placed,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    twin.advance(KILL_S + PULL_S / 2 + 1)
    failed = _alloc(n, placed["ID"])
    assert failed["ClientStatus"] == "failed" and _health(failed) is False
    return str(placed["ID"])


def test_failed_allocation_of_a_progress_based_deployment_is_rescheduled(twin):
    n = twin.nomad()
    failed_id = _rollout_with_failing_pull(twin, n, reschedule=None)
    dep = n.job.get_deployment("web")
    assert dep["Status"] == "running" and dep["TaskGroups"]["web"]["UnhealthyAllocs"] == 1
    failed = _alloc(n, failed_id)
    assert failed["DesiredTransition"]["Reschedule"] is True  # the deployment watcher allows it
    assert failed["DesiredStatus"] == "run"

    twin.advance(28)  # the service default delay is 30 s after the failure
    assert _alloc(n, failed_id)["DesiredStatus"] == "run"
    twin.advance(3)
    failed = _alloc(n, failed_id)
    assert failed["DesiredStatus"] == "stop"
    assert failed["DesiredDescription"] == "alloc was rescheduled because it failed"
    assert failed["NextAllocation"]
    repl = _alloc(n, failed["NextAllocation"])
    assert repl["PreviousAllocation"] == failed_id and repl["DeploymentID"] == dep["ID"]
    (event,) = repl["RescheduleTracker"]["Events"]
    assert event["PrevAllocID"] == failed_id and event["Delay"] == 30 * S

    for _ in range(6):
        twin.advance(100)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    assert {a["JobVersion"] for a in live_allocs(n, "web")} == {1}


def test_no_reschedule_attempt_left_fails_the_deployment_at_once(twin):
    n = twin.nomad()
    _rollout_with_failing_pull(twin, n, reschedule={"Attempts": 0, "Unlimited": False})
    dep = n.job.get_deployment("web")
    assert (dep["Status"], dep["StatusDescription"]) == (
        "failed",
        "Failed due to unhealthy allocations",
    )


def test_failed_allocation_of_a_failed_deployment_is_never_replaced(twin):
    """progress_deadline 0: the first unhealthy allocation fails the deployment; its failed
    allocation keeps its slot and is not rescheduled, however long we wait."""
    n = twin.nomad()
    update = {**UPDATE, "ProgressDeadline": 0}
    job = service_job("web", count=2, update=update, gpu=False)
    _successful(twin, n, job)
    twin.cluster.faults.unhealthy_image("web:bad")
    bad = copy.deepcopy(job)
    bad["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = "registry/web:bad"
    n.jobs.register_job({"Job": bad})
    twin.advance(PULL_S + 10)
    dep = n.job.get_deployment("web")
    assert (dep["Status"], dep["StatusDescription"]) == (
        "failed",
        "Failed due to unhealthy allocations",
    )
    for _ in range(10):
        twin.advance(120)
    allocs = n.job.get_allocations("web")
    assert len(allocs) == 3  # 2 of v0 (one stopped for the update) + the failed one
    assert len(live_allocs(n, "web")) == 1


# --- 4. the DeploymentStatus wire format ------------------------------------------------


def test_deployment_status_is_null_until_the_health_is_set(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2, update=UPDATE)})
    for a in n.job.get_allocations("web"):
        assert a["DeploymentStatus"] is None
        assert _alloc(n, a["ID"])["DeploymentStatus"] is None
    twin.advance(PULL_S + 2 + 11)
    for a in n.job.get_allocations("web"):
        ds = a["DeploymentStatus"]
        assert ds["Healthy"] is True and ds["Canary"] is False
        assert ds["Timestamp"] != "0001-01-01T00:00:00Z" and ds["ModifyIndex"] > 0


def test_canary_has_a_deployment_status_without_health(twin):
    n = twin.nomad()
    update = {**UPDATE, "Canary": 1}
    _successful(twin, n, service_job("web", count=2, update=update))
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=update)})
    (canary,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    assert canary["DeploymentStatus"] == {
        "Healthy": None,
        "Timestamp": "0001-01-01T00:00:00Z",
        "Canary": True,
        "ModifyIndex": 0,
    }
