"""How many destructive updates a rolling deployment may start, over HTTP, as Nomad's
reconciler decides it (scheduler/reconcile.go computeUnderProvisionedBy): max_parallel minus
the allocations *of the current deployment* (by DeploymentID) whose health is not yet set;
none at all while one of them is unhealthy, and none while the deployment is paused.
Allocations of a superseded deployment never count, and an allocation an in-place update
moves into the new deployment has its health watched again (generic_sched.go sets its
DeploymentStatus to nil; the client's health hook clears it when the DeploymentID changes)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sim.helpers import live_allocs, service_job

S = 1_000_000_000
# 7 GB images at the twin's 800 Mbit/s: a 70 s pull, healthy 2 s + min_healthy_time later
PULL_S = 70
# a replacement starts once the allocation it replaces exited: the default kill_timeout
# (client/allocwatcher: the upstream allocs hook waits for the previous allocation)
KILL_S = 5


def _update(
    *,
    max_parallel: int = 1,
    auto_revert: bool = False,
    healthy_deadline_s: int = 120,
    progress_deadline_s: int = 300,
) -> dict[str, Any]:
    return {
        "MaxParallel": max_parallel,
        "Canary": 0,
        "AutoRevert": auto_revert,
        "MinHealthyTime": 10 * S,
        "HealthyDeadline": healthy_deadline_s * S,
        "ProgressDeadline": progress_deadline_s * S,
    }


def _job(*, count: int, image: str, update: dict[str, Any]) -> dict[str, Any]:
    job = service_job("web", count=count, image=image, gpu=False, update=update)
    tg = job["TaskGroups"][0]
    # a failed allocation stays failed for the test's span: a progress-based deployment
    # allows its reschedule, but only after an hour's delay; no task restarts. (With no
    # reschedule attempt at all, Nomad 1.6+ would fail the deployment at once instead:
    # deploymentwatcher shouldFailEarly.)
    tg["ReschedulePolicy"] = {
        "Attempts": 1,
        "Interval": 24 * 3600 * S,
        "Delay": 3600 * S,
        "DelayFunction": "constant",
        "Unlimited": False,
    }
    tg["RestartPolicy"] = {"Attempts": 0, "Interval": 1800 * S, "Delay": 15 * S, "Mode": "fail"}
    return job


def _running_v0(twin: Any, n: Any, *, count: int, update: dict[str, Any]) -> None:
    n.jobs.register_job({"Job": _job(count=count, image="registry/web:1", update=update)})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"


def _by_version(n: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for a in live_allocs(n, "web"):
        out[a["JobVersion"]] = out.get(a["JobVersion"], 0) + 1
    return out


def _image(n: Any, alloc_id: str) -> str:
    job = n.allocation.get_allocation(alloc_id)["Job"]
    return str(job["TaskGroups"][0]["Tasks"][0]["Config"]["image"])


@pytest.mark.parametrize("auto_revert", [False, True])
def test_unhealthy_alloc_of_the_deployment_stops_further_destructive_updates(twin, auto_revert):
    """max_parallel 2, count 4: the first two replacements go out together; one fails (an
    image pull error) and is unhealthy. When the other turns healthy, Nomad starts nothing
    else ("An unhealthy allocation means nothing else should happen"), even though only one
    of the two max_parallel slots is taken: the deployment waits, and fails at its progress
    deadline (reset by that healthy allocation), rolling back with auto_revert."""
    n = twin.nomad()
    update = _update(max_parallel=2, auto_revert=auto_revert)
    _running_v0(twin, n, count=4, update=update)
    twin.cluster.faults.pull_fails(None, "web:2", times=1)
    n.jobs.register_job({"Job": _job(count=4, image="registry/web:2", update=update)})
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and _by_version(n) == {0: 2, 1: 2}

    twin.advance(KILL_S + PULL_S + 2 + 10 + 1)  # one failed half way through its pull, one healthy
    healthy_at = twin.cluster.now_s() - 1
    dep = n.deployment.get_deployment(dep["ID"])
    g = dep["TaskGroups"]["web"]
    assert (g["PlacedAllocs"], g["HealthyAllocs"], g["UnhealthyAllocs"]) == (2, 1, 1)
    assert dep["Status"] == "running"
    v1 = [a for a in n.job.get_allocations("web") if a["JobVersion"] == 1]
    assert sorted(a["ClientStatus"] for a in v1) == ["failed", "running"]
    assert _by_version(n) == {0: 2, 1: 1}  # the slot the healthy one freed stays unused

    twin.advance(300 - 1 - (twin.cluster.now_s() - healthy_at) - 5)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "running"
    assert len(n.job.get_allocations("web")) == 6  # still no third replacement
    n.job.evaluate_job("web")  # re-evaluating changes nothing either
    assert len(n.job.get_allocations("web")) == 6

    twin.advance(10)  # past the progress deadline
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "failed"
    if not auto_revert:
        assert dep["StatusDescription"] == "Failed due to progress deadline"
        assert _by_version(n).get(0) == 2  # no destructive update of a failed version
        return
    assert dep["StatusDescription"] == (
        "Failed due to progress deadline - rolling back to job version 0"
    )
    for _ in range(6):
        twin.advance(100)
    assert n.job.get_deployment("web")["Status"] == "successful"
    live = live_allocs(n, "web")
    assert len(live) == 4 and {_image(n, a["ID"]) for a in live} == {"registry/web:1"}


def test_allocs_of_a_superseded_deployment_do_not_take_max_parallel(twin):
    """A replacement of deployment 1 is still in flight when job version 2 (another image)
    supersedes it: it belongs to deployment 1, so deployment 2 (max_parallel 1) replaces one
    allocation at once instead of waiting for it: that very one, first in name order (it took
    over index 0 of the allocation it replaced)."""
    n = twin.nomad()
    update = _update(max_parallel=1)
    _running_v0(twin, n, count=3, update=update)
    n.jobs.register_job({"Job": _job(count=3, image="registry/web:2", update=update)})
    first = n.job.get_deployment("web")
    (in_flight,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    twin.advance(30)  # still pulling
    assert n.allocation.get_allocation(in_flight["ID"])["ClientStatus"] == "pending"

    n.jobs.register_job({"Job": _job(count=3, image="registry/web:3", update=update)})
    first = n.deployment.get_deployment(first["ID"])
    assert first["Status"] == "cancelled"
    second = n.job.get_deployment("web")
    assert second["JobVersion"] == 2 and second["TaskGroups"]["web"]["PlacedAllocs"] == 1
    replaced = n.allocation.get_allocation(in_flight["ID"])
    assert replaced["DesiredStatus"] == "stop"
    assert replaced["DesiredDescription"] == "alloc is being updated due to job update"
    assert _by_version(n) == {0: 2, 2: 1}
    for _ in range(10):
        twin.advance(100)
    second = n.deployment.get_deployment(second["ID"])
    assert second["Status"] == "successful", second["StatusDescription"]
    assert _by_version(n) == {2: 3}


def test_in_place_move_to_a_new_deployment_watches_health_again(twin):
    """Deployment 1's replacement pulls longer than its healthy_deadline: unhealthy, though
    its task then runs. Job version 2 only gives it a longer healthy_deadline (an update block
    change: in place). Nomad moves the allocation into deployment 2 with its health unset and
    the client watches it again, so it is healthy min_healthy_time later and the rollout goes
    on; the unhealthy mark of the superseded deployment does not hold up the new one."""
    n = twin.nomad()
    _running_v0(twin, n, count=3, update=_update())
    short = _update(healthy_deadline_s=30, progress_deadline_s=600)
    n.jobs.register_job({"Job": _job(count=3, image="registry/web:2", update=short)})
    first = n.job.get_deployment("web")
    (slow,) = [a for a in live_allocs(n, "web") if a["JobVersion"] == 1]
    twin.advance(PULL_S + 2 + 10 + 5)
    a = n.allocation.get_allocation(slow["ID"])
    assert a["ClientStatus"] == "running" and a["DeploymentStatus"]["Healthy"] is False
    assert n.deployment.get_deployment(first["ID"])["TaskGroups"]["web"]["UnhealthyAllocs"] == 1
    assert _by_version(n) == {0: 2, 1: 1}  # deployment 1 waits

    longer = _update(healthy_deadline_s=120, progress_deadline_s=600)
    n.jobs.register_job({"Job": _job(count=3, image="registry/web:2", update=longer)})
    second = n.job.get_deployment("web")
    assert second["JobVersion"] == 2 and second["ID"] != first["ID"]
    a = n.allocation.get_allocation(slow["ID"])
    assert a["JobVersion"] == 2 and a["DeploymentID"] == second["ID"]
    assert (a["DeploymentStatus"] or {}).get("Healthy") is None
    g = second["TaskGroups"]["web"]
    assert (g["PlacedAllocs"], g["HealthyAllocs"], g["UnhealthyAllocs"]) == (1, 0, 0)
    assert _by_version(n) == {0: 2, 2: 1}  # in flight again: max_parallel 1 is taken

    twin.advance(11)
    a = n.allocation.get_allocation(slow["ID"])
    assert a["DeploymentStatus"]["Healthy"] is True
    assert n.deployment.get_deployment(second["ID"])["TaskGroups"]["web"]["HealthyAllocs"] == 1
    assert _by_version(n) == {0: 1, 2: 2}  # the next replacement went out
    for _ in range(10):
        twin.advance(100)
    second = n.deployment.get_deployment(second["ID"])
    assert second["Status"] == "successful", second["StatusDescription"]
    assert _by_version(n) == {2: 3}


def test_paused_deployment_makes_no_destructive_updates(twin):
    """While a deployment is paused Nomad neither places nor replaces for it, whatever
    triggers the evaluation: the replacement in flight turns healthy during the pause, a
    forced re-evaluation still replaces nothing, and resuming carries on."""
    n = twin.nomad()
    update = _update(max_parallel=1)
    _running_v0(twin, n, count=3, update=update)
    n.jobs.register_job({"Job": _job(count=3, image="registry/web:2", update=update)})
    dep = n.job.get_deployment("web")
    n.deployment.pause_deployment(dep["ID"], True)
    twin.advance(200)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "paused" and dep["TaskGroups"]["web"]["HealthyAllocs"] == 1
    assert n.job.evaluate_job("web")["EvalID"]
    assert _by_version(n) == {0: 2, 1: 1}
    assert len(n.job.get_allocations("web")) == 4

    n.deployment.pause_deployment(dep["ID"], False)
    assert _by_version(n) == {0: 1, 1: 2}
    for _ in range(10):
        twin.advance(100)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    assert _by_version(n) == {1: 3}
