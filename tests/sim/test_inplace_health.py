"""Health of allocations updated in place into a new deployment, over HTTP (python-nomad for
the reads it has, raw calls for the Scale API it lacks).

Every new job version, a Scale API count change too, updates the allocations it keeps in place
(the count is no task change). Nomad's scheduler moves them into the new deployment with
DeploymentStatus nil (scheduler/generic_sched.go computeJobAllocs), and the client's health
hook clears their health, healthy or not, and watches it again with the update block
(client/allocrunner/health_hook.go ``Update``: "Deployment has changed, reset status" ->
``ClearHealth``): healthy min_healthy_time later, unhealthy at healthy_deadline. So after every
count change the deployment stays active for about min_healthy_time, the group's Healthy counts
drop and come back, and a second Scale API call in that window gets a 400."""

from __future__ import annotations

import copy
from typing import Any

import requests

from tests.sim.helpers import live_allocs, scale, service_job

S = 1_000_000_000
MIN_HEALTHY_S = 30
HEALTHY_DEADLINE_S = 120
UPDATE = {
    "MaxParallel": 1,
    "MinHealthyTime": MIN_HEALTHY_S * S,
    "HealthyDeadline": HEALTHY_DEADLINE_S * S,
    "ProgressDeadline": 600 * S,
}
BLOCKED = (400, "job scaling blocked due to active deployment")


def _running(twin: Any, n: Any, job: dict[str, Any]) -> dict[str, Any]:
    n.jobs.register_job({"Job": job})
    twin.advance(300)
    dep = n.job.get_deployment(job["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    assert all(a["DeploymentStatus"]["Healthy"] is True for a in live_allocs(n, job["ID"]))
    return dep  # type: ignore[no-any-return]


def _scale_status(twin: Any, job_id: str = "web") -> dict[str, Any]:
    r = requests.get(f"{twin.address}/v1/job/{job_id}/scale", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["TaskGroups"]  # type: ignore[no-any-return]


def _health(n: Any, job_id: str = "web") -> dict[str, Any]:
    return {a["ID"]: (a["DeploymentStatus"] or {}).get("Healthy") for a in live_allocs(n, job_id)}


def test_count_change_clears_and_rewatches_the_health_of_the_allocations_kept(twin: Any) -> None:
    n = twin.nomad()
    first = _running(twin, n, service_job("web", count=3, update=UPDATE))
    before = _health(n)

    r = scale(twin.address, "web", "web", 2)
    assert r.status_code == 200, r.text

    dep = n.job.get_deployment("web")
    assert dep["ID"] != first["ID"] and dep["JobVersion"] == 1
    assert dep["Status"] == "running"
    g = dep["TaskGroups"]["web"]
    assert (g["DesiredTotal"], g["PlacedAllocs"], g["HealthyAllocs"], g["UnhealthyAllocs"]) == (
        2, 2, 0, 0,
    )  # fmt: skip
    kept = _health(n)
    assert set(kept) < set(before) and len(kept) == 2  # the same allocations, not replaced
    assert set(kept.values()) == {None}  # healthy a moment ago: cleared
    for alloc_id in kept:
        a = n.allocation.get_allocation(alloc_id)
        assert a["JobVersion"] == 1 and a["DeploymentID"] == dep["ID"]
        assert a["ClientStatus"] == "running" and a["TaskStates"]["server"]["Restarts"] == 0
    group = _scale_status(twin)["web"]
    assert (group["Desired"], group["Running"], group["Healthy"], group["Unhealthy"]) == (
        2, 2, 0, 0,
    )  # fmt: skip
    r = scale(twin.address, "web", "web", 3)
    assert (r.status_code, r.text) == BLOCKED

    twin.advance(MIN_HEALTHY_S - 1)
    assert set(_health(n).values()) == {None}
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "running"
    r = scale(twin.address, "web", "web", 3)
    assert (r.status_code, r.text) == BLOCKED

    twin.advance(2)
    assert _health(n) == dict.fromkeys(kept, True)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    assert dep["TaskGroups"]["web"]["HealthyAllocs"] == 2
    assert _scale_status(twin)["web"]["Healthy"] == 2
    assert n.job.get_job("web")["Stable"] is True
    assert scale(twin.address, "web", "web", 3).status_code == 200


def test_count_increase_stays_active_until_the_new_allocation_is_healthy(twin: Any) -> None:
    n = twin.nomad()
    _running(twin, n, service_job("web", count=2, update=UPDATE))
    before = set(_health(n))
    assert scale(twin.address, "web", "web", 3).status_code == 200
    dep = n.job.get_deployment("web")
    g = dep["TaskGroups"]["web"]
    assert (g["DesiredTotal"], g["PlacedAllocs"], g["HealthyAllocs"]) == (3, 3, 0)
    assert set(_health(n).values()) == {None}

    twin.advance(MIN_HEALTHY_S + 1)  # the kept ones are healthy again; the new one pulls
    health = _health(n)
    assert {health[i] for i in before} == {True}
    (new,) = set(health) - before
    assert health[new] is None
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "running" and dep["TaskGroups"]["web"]["HealthyAllocs"] == 2
    assert (scale(twin.address, "web", "web", 4).status_code, dep["Status"]) == (400, "running")

    for _ in range(5):
        twin.advance(60)
    assert set(_health(n).values()) == {True}
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "successful" and dep["TaskGroups"]["web"]["HealthyAllocs"] == 3


def test_scaling_one_group_rewatches_every_group_of_the_job(twin: Any) -> None:
    """A new job version updates the other group's allocations in place too: both zones'
    workers are re-watched after one zone's count change."""
    job = service_job("ml", count=2, update=UPDATE, group="zone-a", datacenters=["zone-a"])
    b = copy.deepcopy(job["TaskGroups"][0])
    b["Name"] = "zone-b"
    job["TaskGroups"].append(b)
    job["Datacenters"] = ["zone-a", "zone-b"]
    n = twin.nomad()
    _running(twin, n, job)

    assert scale(twin.address, "ml", "zone-a", 1).status_code == 200
    dep = n.job.get_deployment("ml")
    assert dep["Status"] == "running" and set(dep["TaskGroups"]) == {"zone-a", "zone-b"}
    by_group: dict[str, set[Any]] = {}
    for a in live_allocs(n, "ml"):
        by_group.setdefault(a["TaskGroup"], set()).add((a["DeploymentStatus"] or {}).get("Healthy"))
    assert by_group == {"zone-a": {None}, "zone-b": {None}}
    assert {g: s["Healthy"] for g, s in _scale_status(twin, "ml").items()} == {
        "zone-a": 0, "zone-b": 0,
    }  # fmt: skip
    r = scale(twin.address, "ml", "zone-b", 3)  # the other zone: blocked as well
    assert (r.status_code, r.text) == BLOCKED

    twin.advance(MIN_HEALTHY_S + 1)
    assert {g: s["Healthy"] for g, s in _scale_status(twin, "ml").items()} == {
        "zone-a": 1, "zone-b": 2,
    }  # fmt: skip
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"
    assert scale(twin.address, "ml", "zone-b", 3).status_code == 200


def test_rewatched_allocation_turns_unhealthy_at_the_healthy_deadline(twin: Any) -> None:
    """A worker whose checks no longer pass is not healthy again after the count change: the
    re-watch marks it unhealthy at healthy_deadline (not before)."""
    n = twin.nomad()
    _running(twin, n, service_job("web", count=2, update=UPDATE))
    twin.cluster.faults.unhealthy_image("registry/web:1")  # running, checks failing from now
    assert scale(twin.address, "web", "web", 1).status_code == 200
    dep = n.job.get_deployment("web")
    twin.advance(HEALTHY_DEADLINE_S - 1)
    assert set(_health(n).values()) == {None}
    twin.advance(2)
    assert set(_health(n).values()) == {False}
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["TaskGroups"]["web"]["UnhealthyAllocs"] == 1 and dep["Status"] == "running"
    assert _scale_status(twin)["web"]["Unhealthy"] == 1


def test_without_deployments_a_count_change_keeps_health(twin: Any) -> None:
    """max_parallel 0: no deployment, the DeploymentID does not change, health is kept and
    the Scale API is never blocked."""
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=3, update={"MaxParallel": 0})})
    twin.advance(300)
    assert n.job.get_deployment("web") is None
    assert scale(twin.address, "web", "web", 2).status_code == 200
    assert n.job.get_deployment("web") is None
    assert set(_health(n).values()) == {True} and len(_health(n)) == 2
    assert scale(twin.address, "web", "web", 4).status_code == 200
