"""Nomad behaviours nomadscale relies on, beyond the response schemas: what a deployment does
with the allocations it keeps, replaces, reschedules and migrates; health status on the wire;
evaluations of a placement that failed. Runs against the twin, or unchanged against a real
Nomad with NOMADSCALE_TEST_NOMAD_ADDR set; each test names the Nomad source it follows."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from tests.contract.conftest import World, seg
from tests.contract.env import unique
from tests.contract.steps import deployment_is, job_allocs, pause, register, target_job

NS = 1_000_000_000


def test_a_count_change_re_watches_the_kept_allocations(world: World) -> None:
    """What nomadscale's serving count and its waits rely on: a Scale API count change is a new
    job version whose deployment takes in the allocations it keeps (their health cleared and
    watched again, client/allocrunner/health_hook.go), and Nomad refuses another count change
    until that deployment ends."""
    jid = unique("contract-rewatch")
    job = target_job(world, jid, count=1)
    job["Update"]["MinHealthyTime"] = 30 * NS  # a window a real cluster can be seen in
    register(world, jid, job)
    path = f"/job/{seg(jid)}"

    deployment = partial(deployment_is, world, path)

    world.wait_for("the first deployment", lambda: deployment(0, "successful"), timeout_s=180)
    (kept,) = world.api.call("GET", f"{path}/allocations").json()
    scale = {"Count": 2, "Target": {"Group": "ml-worker-a"}, "Message": "contract"}
    world.api.call("POST", f"{path}/scale", body=scale)
    world.wait_for("the count change's deployment", lambda: deployment(1, "running"))
    dep = world.api.call("GET", f"{path}/deployment").json()
    again = world.api.call("POST", f"{path}/scale", body={**scale, "Count": 3}, ok=False)
    assert again.status_code == 400, again.text
    assert "job scaling blocked due to active deployment" in again.text

    def moved() -> bool:
        a = world.api.call("GET", f"/allocation/{kept['ID']}").json()
        return a["DeploymentID"] == dep["ID"] and a["JobVersion"] == 1

    world.wait_for("the kept allocation in the new deployment", moved)
    world.wait_for("the count change's deployment to end", lambda: deployment(1, "successful"),
                   timeout_s=180)  # fmt: skip
    # the kept allocation counts in the new deployment (placed, and healthy again)
    tg = world.api.call("GET", f"{path}/deployment").json()["TaskGroups"]["ml-worker-a"]
    assert tg["HealthyAllocs"] == 2 and tg["PlacedAllocs"] == 2, tg
    world.api.call("POST", f"{path}/scale", body={**scale, "Count": 1})


def test_an_allocation_has_no_deployment_status_until_its_health_is_set(world: World) -> None:
    """DeploymentStatus stays null until the client sets the health: the scheduler creates
    it only for canaries (scheduler/generic_sched.go computePlacements) and the client only
    reports one once SetHealth ran (client/allocrunner/state SetDeploymentStatus); never an
    object with ``Healthy: null`` for a placement of a rollout."""
    jid = unique("contract-health")
    job = target_job(world, jid, count=1)
    job["Update"]["MinHealthyTime"] = 10 * NS  # a window a real cluster can be seen in
    register(world, jid, job)
    path = f"/job/{seg(jid)}"
    unset: list[Any] = []

    def healthy() -> bool:
        allocs = job_allocs(world, path)
        unset.extend(
            a["DeploymentStatus"]
            for a in allocs
            if (a["DeploymentStatus"] or {}).get("Healthy") is None
        )
        return bool(allocs) and all(
            (a["DeploymentStatus"] or {}).get("Healthy") is True for a in allocs
        )

    world.wait_for("a healthy allocation", healthy, timeout_s=120)
    assert unset, "never saw the allocation before its health was set"
    assert all(ds is None for ds in unset), unset
    (alloc,) = job_allocs(world, path)
    assert alloc["DeploymentStatus"]["Canary"] is False


def test_an_in_place_update_moves_allocations_into_the_latest_deployment(world: World) -> None:
    """With no new deployment, an in-place update still sets an allocation's DeploymentID to
    the job's latest deployment, whatever its status (generic_sched.go computeJobAllocs:
    ``s.deployment`` is the latest deployment). A replacement placed after deployment 1
    ended (DeploymentID "") is moved into it with its health cleared, and the client does not
    watch it again when the group has no update block (client/allocrunner/health_hook.go)."""
    jid = unique("contract-latest")
    register(world, jid, target_job(world, jid, count=1))
    path = f"/job/{seg(jid)}"

    def successful() -> bool:
        dep = world.api.call("GET", f"{path}/deployment").json()
        return bool(dep) and dep["Status"] == "successful"

    world.wait_for("the first deployment", successful, timeout_s=180)
    dep_id = world.api.call("GET", f"{path}/deployment").json()["ID"]
    (first,) = job_allocs(world, path)
    world.api.call("POST", f"/allocation/{first['ID']}/stop", body={})

    def running(a: dict[str, Any]) -> bool:
        return a["DesiredStatus"] == "run" and a["ClientStatus"] == "running"

    def healthy_replacement() -> bool:
        live = [a for a in job_allocs(world, path) if running(a) and a["ID"] != first["ID"]]
        return len(live) == 1 and (live[0]["DeploymentStatus"] or {}).get("Healthy") is True

    world.wait_for("a healthy replacement", healthy_replacement, timeout_s=180)
    (repl,) = [a for a in job_allocs(world, path) if running(a)]
    assert world.api.call("GET", f"/allocation/{repl['ID']}").json()["DeploymentID"] == ""

    job = target_job(world, jid, count=2)
    job["Update"]["MaxParallel"] = 0  # no update block: no deployment
    world.api.call("POST", "/jobs", body={"Job": job})

    def moved() -> bool:
        a = world.api.call("GET", f"/allocation/{repl['ID']}").json()
        return a["JobVersion"] == 1 and a["DeploymentID"] == dep_id

    world.wait_for("the in-place update", moved)
    assert world.api.call("GET", f"{path}/deployment").json()["ID"] == dep_id

    def new_healthy() -> bool:
        return any(
            running(a) and a["ID"] != repl["ID"] and (a["DeploymentStatus"] or {}).get("Healthy")
            for a in job_allocs(world, path)
        )

    world.wait_for("the new allocation to be healthy", new_healthy, timeout_s=180)
    pause(world, 15)  # longer than the migrate block's min_healthy_time
    a = world.api.call("GET", f"/allocation/{repl['ID']}").json()
    assert a["ClientStatus"] == "running"
    assert (a["DeploymentStatus"] or {}).get("Healthy") is None, a["DeploymentStatus"]


def test_a_failed_allocation_of_a_deployment_is_rescheduled(world: World) -> None:
    """A failed allocation of an active, progress-based deployment is marked
    DesiredTransition.Reschedule by the deployment watcher (deployment_watcher.go
    handleAllocUpdate) and replaced after the reschedule delay (service default 30 s;
    scheduler/generic/alloc/set.go updateByReschedulable), in the same deployment."""
    jid = unique("contract-resched")
    register(world, jid, target_job(world, jid))
    path = f"/job/{seg(jid)}"

    deployment = partial(deployment_is, world, path)

    world.wait_for("the first deployment", lambda: deployment(0, "successful"), timeout_s=180)
    missing = "nomadscale-contract-missing"  # an image tag no registry has
    if world.target.cluster is not None:
        world.target.cluster.faults.pull_fails(None, missing)
    job = target_job(world, jid, image=f"busybox:{missing}")
    job["TaskGroups"][0]["RestartPolicy"] = {
        "Attempts": 0, "Interval": 1800 * NS, "Delay": 15 * NS, "Mode": "fail",
    }  # fmt: skip
    world.api.call("POST", "/jobs", body={"Job": job})

    def failed() -> list[dict[str, Any]]:
        return [
            a
            for a in job_allocs(world, path)
            if a["JobVersion"] == 1 and a["ClientStatus"] == "failed"
        ]

    world.wait_for("the new version's allocation to fail", lambda: bool(failed()))
    first_id = min(failed(), key=lambda a: a["CreateIndex"])["ID"]

    def rescheduled() -> bool:
        return bool(world.api.call("GET", f"/allocation/{first_id}").json()["NextAllocation"])

    world.wait_for("its reschedule", rescheduled, timeout_s=90)
    a = world.api.call("GET", f"/allocation/{first_id}").json()
    assert a["DesiredTransition"]["Reschedule"] is True
    assert a["DesiredStatus"] == "stop"
    nxt = world.api.call("GET", f"/allocation/{a['NextAllocation']}").json()
    assert nxt["PreviousAllocation"] == first_id
    assert nxt["DeploymentID"] == a["DeploymentID"]
    assert nxt["RescheduleTracker"]["Events"][-1]["PrevAllocID"] == first_id


@pytest.mark.usefixtures("twin_only")
def test_a_drain_stops_and_replaces_its_allocations(world: World) -> None:
    """The drainer marks an allocation DesiredTransition.Migrate and the scheduler stops it
    and places its replacement together (nomad/drainer/watch_jobs.go handleTaskGroup,
    scheduler/reconcile.go computeMigrations)."""
    jid = unique("contract-drain")
    job = target_job(world, jid, count=2)
    register(world, jid, job)
    path = f"/job/{seg(jid)}"

    def healthy() -> bool:
        allocs = [a for a in job_allocs(world, path) if a["ClientStatus"] == "running"]
        return len(allocs) == 2 and all(
            (a["DeploymentStatus"] or {}).get("Healthy") for a in allocs
        )

    world.wait_for("the job to be healthy", healthy, timeout_s=180)
    victim = job_allocs(world, path)[0]
    nid = victim["NodeID"]
    world.cleanup.append(
        lambda: world.api.call(
            "POST",
            f"/node/{nid}/drain",
            body={"NodeID": nid, "DrainSpec": None, "MarkEligible": True},
            ok=False,
        )
    )
    world.api.call(
        "POST",
        f"/node/{nid}/drain",
        body={"NodeID": nid, "DrainSpec": {"Deadline": 3600 * NS, "IgnoreSystemJobs": True}},
    )

    def migrated() -> bool:
        a = world.api.call("GET", f"/allocation/{victim['ID']}").json()
        return a["DesiredStatus"] == "stop" and bool(a["NextAllocation"])

    world.wait_for("the migration", migrated)
    a = world.api.call("GET", f"/allocation/{victim['ID']}").json()
    assert a["DesiredTransition"]["Migrate"] is True
    assert a["DesiredDescription"] == "alloc is being migrated"
    nxt = world.api.call("GET", f"/allocation/{a['NextAllocation']}").json()
    assert nxt["PreviousAllocation"] == victim["ID"] and nxt["NodeID"] != nid


def test_a_group_shows_the_default_reschedule_policy(world: World) -> None:
    """Registering canonicalizes the job (api/tasks.go TaskGroup.Canonicalize,
    NewDefaultReschedulePolicy): a service group without a reschedule block gets
    structs.DefaultServiceJobReschedulePolicy."""
    job = world.api.check("GET", "/job/{jobName}", f"/job/{seg(world.job_id)}")
    for tg in job["TaskGroups"]:
        assert tg["ReschedulePolicy"] == {
            "Attempts": 0,
            "Interval": 0,
            "Delay": 30 * NS,
            "DelayFunction": "exponential",
            "MaxDelay": 3600 * NS,
            "Unlimited": True,
        }, tg["ReschedulePolicy"]


def test_a_blocked_evaluation_carries_the_placement_failures(world: World) -> None:
    """An allocation no node can take: the evaluation reports FailedTGAllocs and creates a
    blocked evaluation that carries them too (generic_sched.go createBlockedEval ->
    Evaluation.CreateBlockedEval(..., failedTGAllocs)), triggered by "queued-allocs"."""
    jid = unique("contract-blocked")
    job = target_job(world, jid, count=1)
    job["Constraints"] = [
        {"LTarget": "${meta.nomadscale_contract_nowhere}", "RTarget": "x", "Operand": "="}
    ]
    register(world, jid, job)
    path = f"/job/{seg(jid)}/evaluations"

    def tried() -> list[dict[str, Any]]:
        evals = world.api.check("GET", "/job/{jobName}/evaluations", path) or []
        return [e for e in evals if e["BlockedEval"]]

    world.wait_for("the placement failure", lambda: bool(tried()))
    first = tried()[0]
    assert set(first["FailedTGAllocs"]) == {"ml-worker-a"}
    blocked = world.api.check("GET", "/evaluation/{evalID}", f"/evaluation/{first['BlockedEval']}")
    assert blocked["Status"] == "blocked" and blocked["TriggeredBy"] == "queued-allocs"
    assert blocked["PreviousEval"] == first["ID"]
    assert set(blocked["FailedTGAllocs"]) == {"ml-worker-a"}
    assert (
        blocked["FailedTGAllocs"]["ml-worker-a"]["NodesEvaluated"]
        == first["FailedTGAllocs"]["ml-worker-a"]["NodesEvaluated"]
    )


def test_a_paused_deployment_still_replaces_a_stopped_allocation(world: World) -> None:
    """A stopped allocation is a migration (nomad/alloc_endpoint.go Stop:
    DesiredTransition.Migrate), which the reconciler places whatever the deployment's state
    (reconcile.go computeMigrations; only new placements wait for ``deploymentPlaceReady``),
    under the stopped allocation's name."""
    jid = unique("contract-paused")
    register(world, jid, target_job(world, jid, count=1))
    path = f"/job/{seg(jid)}"

    deployment = partial(deployment_is, world, path)

    world.wait_for("the first deployment", lambda: deployment(0, "successful"), timeout_s=180)
    (kept,) = job_allocs(world, path)
    job = target_job(world, jid, count=2)
    job["Update"]["MinHealthyTime"] = 60 * NS  # keeps the deployment running a while
    job["Update"]["HealthyDeadline"] = 120 * NS
    job["Update"]["ProgressDeadline"] = 600 * NS
    world.api.call("POST", "/jobs", body={"Job": job})
    world.wait_for("the count change's deployment", lambda: deployment(1, "running"))
    dep = world.api.call("GET", f"{path}/deployment").json()
    world.api.call(
        "POST", f"/deployment/pause/{dep['ID']}", body={"DeploymentID": dep["ID"], "Pause": True}
    )
    world.api.call("POST", f"/allocation/{kept['ID']}/stop", body={})

    def replaced() -> bool:
        return bool(world.api.call("GET", f"/allocation/{kept['ID']}").json()["NextAllocation"])

    world.wait_for("the stopped allocation's replacement", replaced)
    a = world.api.call("GET", f"/allocation/{kept['ID']}").json()
    assert a["DesiredTransition"]["Migrate"] is True
    assert a["DesiredDescription"] == "alloc is being migrated"
    nxt = world.api.call("GET", f"/allocation/{a['NextAllocation']}").json()
    assert nxt["PreviousAllocation"] == kept["ID"] and nxt["Name"] == kept["Name"]
    assert nxt["DeploymentID"] == dep["ID"]
    assert world.api.call("GET", f"/deployment/{dep['ID']}").json()["Status"] == "paused"


def test_a_task_reads_back_with_the_default_kill_timeout(world: World) -> None:
    """Registering canonicalizes every task: no kill_timeout reads back as 5 s (api/tasks.go
    Task.Canonicalize; nomad/structs Task.Canonicalize: DefaultKillTimeout)."""
    job = world.api.check("GET", "/job/{jobName}", f"/job/{seg(world.job_id)}")
    for tg in job["TaskGroups"]:
        for task in tg["Tasks"]:
            assert task["KillTimeout"] == 5 * NS, task["KillTimeout"]
            assert task["ShutdownDelay"] == 0 and task["Leader"] is False


def test_a_stopped_allocation_is_killed_within_its_kill_timeout(world: World) -> None:
    """A stop sends the interrupt and force-kills after the task's kill_timeout capped by the
    client's max_kill_timeout (default 30 s; client/allocrunner/alloc_runner.go killTasks ->
    TaskEvent.SetKillTimeout, taskrunner/driver_handle.go NewDriverHandle); the allocation is
    complete once its task exited. The twin's tasks take their whole kill timeout; a real
    task may exit sooner, so only the twin is held to the lower bound."""
    jid = unique("contract-kill")
    job = target_job(world, jid, count=1)
    job["TaskGroups"][0]["Tasks"][0]["KillTimeout"] = 20 * NS
    register(world, jid, job)
    path = f"/job/{seg(jid)}"
    world.wait_for("the first deployment", lambda: deployment_is(world, path, 0, "successful"),
                   timeout_s=180)  # fmt: skip
    (a,) = job_allocs(world, path)
    world.api.call("DELETE", path)

    def killing() -> dict[str, Any]:
        got = world.api.call("GET", f"/allocation/{a['ID']}").json()
        events = got["TaskStates"]["worker"]["Events"]
        return next((e for e in events if e["Type"] == "Killing"), {})

    world.wait_for("the Killing event", lambda: bool(killing()), timeout_s=30)
    assert killing()["DisplayMessage"] == "Sent interrupt. Waiting 20s before force killing"
    if world.target.is_twin:
        pause(world, 15)
        assert world.api.call("GET", f"/allocation/{a['ID']}").json()["ClientStatus"] == "running"

    def complete() -> bool:
        got = world.api.call("GET", f"/allocation/{a['ID']}").json()
        return bool(got["ClientStatus"] == "complete")

    world.wait_for("the task to be killed", complete, timeout_s=60)


def test_allocations_hold_gpus_of_their_node_no_other_allocation_holds(world: World) -> None:
    """Each GPU is an instance under its UUID (nomad-device-nvidia fingerprint.go: ``ID:
    dev.UUID``); the scheduler gives an allocation instances of its node's device group that
    no other allocation there holds (scheduler/device.go AssignDevice)."""
    nodes = [
        world.api.call("GET", f"/node/{n['ID']}").json()
        for n in world.api.call("GET", "/nodes").json()
    ]
    gpus: dict[str, set[tuple[str, str]]] = {}
    for n in nodes:
        groups = [g for g in n["NodeResources"]["Devices"] or [] if g["Type"] == "gpu"]
        gpus[n["ID"]] = {(g["Name"], i["ID"]) for g in groups for i in g["Instances"]}
    ids = [i for held in gpus.values() for _, i in held]
    if not ids:
        pytest.skip("the target's nodes report no GPU")
    assert len(ids) == len(set(ids)), ids
    jid = unique("contract-gpu")
    job = target_job(world, jid, count=2)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"] = [{"Name": "gpu", "Count": 1}]
    register(world, jid, job)
    path = f"/job/{seg(jid)}"
    world.wait_for("the deployment", lambda: deployment_is(world, path, 0, "successful"),
                   timeout_s=180)  # fmt: skip
    held: dict[str, list[str]] = {}
    for stub in job_allocs(world, path):
        a = world.api.call("GET", f"/allocation/{stub['ID']}").json()
        (dev,) = a["AllocatedResources"]["Tasks"]["worker"]["Devices"]
        assert len(dev["DeviceIDs"]) == 1
        assert {(dev["Name"], i) for i in dev["DeviceIDs"]} <= gpus[a["NodeID"]]
        held.setdefault(a["NodeID"], []).extend(dev["DeviceIDs"])
    for node_id, mine in held.items():
        assert len(mine) == len(set(mine)), (node_id, mine)


def test_the_scale_api_checks_the_payloads_job_id_first(world: World) -> None:
    """command/agent/job_endpoint.go jobScaleAction: a Target.Job other than the URL's is a
    400 before JobScaleRequest.Validate looks at the group or the count."""
    r = world.api.call(
        "POST",
        f"/job/{seg(world.job_id)}/scale",
        body={"Count": -1, "Target": {"Job": "nomadscale-not-this-job"}},
        ok=False,
    )
    assert (r.status_code, r.text.strip()) == (400, "job ID in payload did not match URL")


def test_another_jobs_change_does_not_wake_a_blocking_scale_status(world: World) -> None:
    """ScaleStatus blocks on the newest of the job's ModifyIndex (also its JobModifyIndex in
    the reply), its scaling events and its live allocations (nomad/job_endpoint.go
    ScaleStatus): registering another job does not wake it."""
    path = f"/job/{seg(world.job_id)}/scale"
    first = world.api.call("GET", path)
    index = int(first.headers["X-Nomad-Index"])
    job = world.api.call("GET", f"/job/{seg(world.job_id)}").json()
    assert first.json()["JobModifyIndex"] == job["ModifyIndex"]
    jid = unique("contract-other")
    register(world, jid, target_job(world, jid, count=1))
    r = world.api.call("GET", path, params={"index": index, "wait": "2s"})
    assert int(r.headers["X-Nomad-Index"]) == index
