"""Deployment behaviours the twin shares with real Nomad's reconciler and deployment watcher,
over HTTP: count-increase placements share max_parallel with destructive updates, a paused
deployment never fails at its progress deadline and gets a fresh one on resume, and a newer
job version stops the unpromoted canaries of the deployment it supersedes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.sim.helpers import live_allocs, service_job

S = 1_000_000_000


def _update(*, max_parallel: int = 1, canary: int = 0) -> dict[str, Any]:
    return {
        "MaxParallel": max_parallel,
        "Canary": canary,
        "AutoRevert": False,
        "MinHealthyTime": 10 * S,
        "HealthyDeadline": 120 * S,
        "ProgressDeadline": 300 * S,
    }


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _healthy_at(alloc: dict[str, Any]) -> datetime:
    status = alloc["DeploymentStatus"]
    assert status["Healthy"] is True, alloc["ID"]
    return _ts(status["Timestamp"])


def _created_at(alloc: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(alloc["CreateTime"] / S, tz=UTC)


def _run_to_success(n: Any, twin: Any, dep_id: str, *, version: int) -> list[dict[str, Any]]:
    """Let the deployment finish; it must succeed with all 4 live allocs at ``version``."""
    for _ in range(10):
        twin.advance(100)
    dep = n.deployment.get_deployment(dep_id)
    assert dep["Status"] == "successful", dep["StatusDescription"]
    live = live_allocs(n, "web")
    assert len(live) == 4 and {a["JobVersion"] for a in live} == {version}
    return live


@pytest.mark.parametrize(("max_parallel", "destructive_now"), [(1, 0), (3, 1)])
def test_count_increase_placements_share_max_parallel_with_destructive_updates(
    twin, max_parallel, destructive_now
):
    """Nomad (scheduler/reconcile.go): computeUnderProvisionedBy gives max_parallel,
    computeReplacements places every count-increase alloc and takes them off that limit,
    computeDestructiveUpdates replaces only what is left. 2 -> 4 with a new image places 2 new
    allocs; with max_parallel 1 no old alloc is replaced in that evaluation (2 > 1), with
    max_parallel 3 exactly one is."""
    n = twin.nomad()
    update = _update(max_parallel=max_parallel)
    n.jobs.register_job({"Job": service_job("web", count=2, gpu=False, update=update)})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"

    job = service_job("web", count=4, image="registry/web:2", gpu=False, update=update)
    n.jobs.register_job({"Job": job})
    allocs = n.job.get_allocations("web")
    stopped = [a for a in allocs if a["DesiredStatus"] == "stop"]
    assert len(stopped) == destructive_now
    assert all(a["JobVersion"] == 0 for a in stopped)
    assert all(
        a["DesiredDescription"] == "alloc is being updated due to job update" for a in stopped
    )
    live = live_allocs(n, "web")
    assert len(live) == 4
    assert sorted(a["JobVersion"] for a in live) == [0] * (2 - destructive_now) + [1] * (
        2 + destructive_now
    )
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1
    assert dep["TaskGroups"]["web"]["PlacedAllocs"] == 2 + destructive_now
    assert dep["TaskGroups"]["web"]["DesiredTotal"] == 4

    live = _run_to_success(n, twin, dep["ID"], version=1)
    if max_parallel == 1:
        # the first old alloc is only replaced once both new placements are healthy
        v1 = sorted(
            (a for a in n.job.get_allocations("web") if a["JobVersion"] == 1),
            key=lambda a: a["CreateIndex"],
        )
        first_two_healthy = max(_healthy_at(a) for a in v1[:2])
        assert _created_at(v1[2]) >= first_two_healthy


def test_paused_deployment_skips_progress_deadline_and_resume_restarts_it(twin):
    """Nomad 2.0.x (hashicorp/nomad#27804, backported in #27888): deploymentwatcher
    shouldFail does not fail a paused deployment; pausing and resuming set every group's
    RequireProgressBy to the time of that status update + ProgressDeadline, so the resumed
    deployment fails only a whole progress_deadline after the resume if nothing turns
    healthy."""
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2, update=_update())})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"
    twin.cluster.faults.unhealthy_image("web:bad")
    n.jobs.register_job(
        {"Job": service_job("web", count=2, image="registry/web:bad", update=_update())}
    )
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and dep["Status"] == "running"

    paused_at = twin.cluster.now_dt()
    n.deployment.pause_deployment(dep["ID"], True)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "paused"
    assert _ts(dep["TaskGroups"]["web"]["RequireProgressBy"]) == paused_at + timedelta(seconds=300)

    twin.advance(900)  # three progress deadlines; the replacement has long failed
    dep = n.deployment.get_deployment(dep["ID"])
    assert (dep["Status"], dep["StatusDescription"]) == ("paused", "Deployment is paused")
    assert dep["TaskGroups"]["web"]["HealthyAllocs"] == 0
    # a paused deployment still has its failed allocations rescheduled (the deployment
    # watcher allows it for any active deployment; reconcile.go computeReplacements places
    # reschedules "even if the deployment is failed"): each replacement fails in turn
    assert dep["TaskGroups"]["web"]["UnhealthyAllocs"] > 1

    resumed_at = twin.cluster.now_dt()
    n.deployment.pause_deployment(dep["ID"], False)
    dep = n.deployment.get_deployment(dep["ID"])
    assert (dep["Status"], dep["StatusDescription"]) == ("running", "Deployment is running")
    assert _ts(dep["TaskGroups"]["web"]["RequireProgressBy"]) == resumed_at + timedelta(seconds=300)

    twin.advance(290)
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "running"
    twin.advance(20)
    dep = n.deployment.get_deployment(dep["ID"])
    assert (dep["Status"], dep["StatusDescription"]) == (
        "failed",
        "Failed due to progress deadline",
    )


@pytest.mark.parametrize(
    "image_v2",
    [
        "registry/web:3",  # another image: the old canary is now an out-of-date alloc
        "registry/web:2",  # the canary's own tasks (only count changed): still stopped
    ],
)
def test_newer_version_stops_unpromoted_canaries_of_superseded_deployment(twin, image_v2):
    """Nomad (scheduler/reconcile.go): cancelUnneededDeployments cancels the running
    deployment of the older version and keeps it as oldDeployment; cancelUnneededCanaries
    then stops the PlacedCanaries of its unpromoted groups ("alloc not needed due to job
    update") before anything else is computed, and the new deployment places its own
    canary."""
    n = twin.nomad()
    update = _update(canary=1)
    n.jobs.register_job({"Job": service_job("web", count=3, gpu=False, update=update)})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"
    v1 = service_job("web", count=3, image="registry/web:2", gpu=False, update=update)
    n.jobs.register_job({"Job": v1})
    twin.advance(200)  # the canary turns healthy; nobody promotes it
    first = n.job.get_deployment("web")
    assert first["StatusDescription"] == "Deployment is running but requires manual promotion"
    assert first["TaskGroups"]["web"]["HealthyAllocs"] == 1
    (old_canary,) = first["TaskGroups"]["web"]["PlacedCanaries"]

    v2 = service_job("web", count=4, image=image_v2, gpu=False, update=update)
    n.jobs.register_job({"Job": v2})
    first = n.deployment.get_deployment(first["ID"])
    assert (first["Status"], first["StatusDescription"]) == (
        "cancelled",
        "Cancelled due to newer version of job",
    )
    stopped = n.allocation.get_allocation(old_canary)
    assert stopped["DesiredStatus"] == "stop"
    assert stopped["DesiredDescription"] == "alloc not needed due to job update"
    second = n.job.get_deployment("web")
    assert second["JobVersion"] == 2 and second["ID"] != first["ID"]
    (new_canary,) = second["TaskGroups"]["web"]["PlacedCanaries"]
    assert new_canary != old_canary
    live = live_allocs(n, "web")
    assert sorted(a["ID"] for a in live if a["JobVersion"] != 0) == [new_canary]
    assert sum(1 for a in live if a["JobVersion"] == 0) == 3
    assert n.allocation.get_allocation(new_canary)["DeploymentStatus"]["Canary"] is True

    twin.advance(200)
    n.deployment.promote_deployment_all(second["ID"])
    live = _run_to_success(n, twin, second["ID"], version=2)
    assert old_canary not in {a["ID"] for a in live}
