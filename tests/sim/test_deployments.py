"""Deployments over HTTP: canary -> promote -> successful, unhealthy image -> auto-revert,
pause and manual fail."""

from __future__ import annotations

import nomad
import pytest

from tests.sim.helpers import live_allocs, service_job

UPDATE = {
    "MaxParallel": 1,
    "Canary": 1,
    "AutoRevert": True,
    "MinHealthyTime": 10_000_000_000,
    "HealthyDeadline": 120_000_000_000,
    "ProgressDeadline": 300_000_000_000,
}


def _deploy_v1(twin, n, count=3):
    n.jobs.register_job({"Job": service_job("web", count=count, update=UPDATE)})
    twin.advance(200)
    dep = n.job.get_deployment("web")
    assert dep["Status"] == "successful"
    assert dep["StatusDescription"] == "Deployment completed successfully"
    return dep


def test_canary_then_promote_then_successful(twin):
    n = twin.nomad()
    _deploy_v1(twin, n)
    n.jobs.register_job({"Job": service_job("web", count=3, image="registry/web:2", update=UPDATE)})
    dep = n.job.get_deployment("web")
    assert dep["JobVersion"] == 1 and dep["Status"] == "running"
    assert dep["StatusDescription"] == "Deployment is running but requires manual promotion"
    allocs = live_allocs(n, "web")
    canaries = [a for a in allocs if (a["DeploymentStatus"] or {}).get("Canary")]
    assert len(allocs) == 4 and len(canaries) == 1  # canary beside the old ones
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.deployment.promote_deployment_all(dep["ID"])
    assert e.value.nomad_resp.status_code == 500
    assert e.value.nomad_resp.text == 'Task group "web" has 0/1 healthy allocations'
    twin.advance(200)  # canary pulls the new image and turns healthy
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "running"
    assert dep["TaskGroups"]["web"]["HealthyAllocs"] == 1
    assert n.deployment.promote_deployment_all(dep["ID"])["EvalID"]
    for _ in range(10):
        twin.advance(100)
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    assert dep["TaskGroups"]["web"]["Promoted"] is True
    allocs = live_allocs(n, "web")
    assert len(allocs) == 3 and {a["JobVersion"] for a in allocs} == {1}
    assert n.job.get_job("web")["Stable"] is True
    statuses = [e["status"] for e in twin.cluster.events if e["type"] == "deployment"]
    assert statuses == ["running", "successful", "running", "running", "successful"]


def test_unhealthy_image_fails_deployment_and_auto_reverts(twin):
    n = twin.nomad()
    _deploy_v1(twin, n)
    twin.cluster.faults.unhealthy_image("web:bad")
    n.jobs.register_job(
        {"Job": service_job("web", count=3, image="registry/web:bad", update=UPDATE)}
    )
    dep = n.job.get_deployment("web")
    twin.advance(400)  # past the progress deadline
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "failed"
    assert dep["StatusDescription"] == (
        "Failed due to progress deadline - rolling back to job version 0"
    )
    job = n.job.get_job("web")
    assert job["Version"] == 2
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "registry/web:1"
    twin.advance(60)
    allocs = live_allocs(n, "web")
    assert len(allocs) == 3
    assert all(a["ClientStatus"] == "running" for a in allocs)
    # the failed canary was rescheduled (after 30 s, then 60 s: the deployment watcher
    # allows it), each time failing again, until the progress deadline
    failed = [a for a in n.job.get_allocations("web") if a["ClientStatus"] == "failed"]
    assert len(failed) > 1 and all(a["DeploymentStatus"]["Healthy"] is False for a in failed)
    assert all(a["DesiredStatus"] == "stop" for a in failed)
    assert n.job.get_deployment("web")["Status"] == "successful"


def test_manual_fail_and_terminal_errors(twin):
    n = twin.nomad()
    _deploy_v1(twin, n, count=2)
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)})
    dep = n.job.get_deployment("web")
    paused = n.deployment.pause_deployment(dep["ID"], True)
    assert paused["DeploymentModifyIndex"] > 0
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "paused"
    n.deployment.pause_deployment(dep["ID"], False)
    reply = n.deployment.fail_deployment(dep["ID"])
    assert reply["RevertedJobVersion"] == 0
    dep = n.deployment.get_deployment(dep["ID"])
    assert dep["Status"] == "failed"
    assert dep["StatusDescription"] == "Deployment marked as failed - rolling back to job version 0"
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.deployment.fail_deployment(dep["ID"])
    assert e.value.nomad_resp.text == "can't fail terminal deployment"
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.deployment.promote_deployment_all("00000000-0000-0000-0000-000000000000")
    assert (e.value.nomad_resp.status_code, e.value.nomad_resp.text) == (
        500,
        "deployment not found",
    )


def test_newer_version_cancels_running_deployment(twin):
    n = twin.nomad()
    _deploy_v1(twin, n, count=2)
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:2", update=UPDATE)})
    first = n.job.get_deployment("web")
    n.jobs.register_job({"Job": service_job("web", count=2, image="registry/web:3", update=UPDATE)})
    first = n.deployment.get_deployment(first["ID"])
    assert first["Status"] == "cancelled"
    assert first["StatusDescription"] == "Cancelled due to newer version of job"
    assert n.job.get_deployment("web")["JobVersion"] == 2


def test_failed_version_without_auto_revert_stays_put(twin):
    n = twin.nomad()
    update = {**UPDATE, "AutoRevert": False}
    n.jobs.register_job({"Job": service_job("web", count=2, update=update)})
    twin.advance(200)
    twin.cluster.faults.unhealthy_image("web:bad")
    n.jobs.register_job(
        {"Job": service_job("web", count=2, image="registry/web:bad", update=update)}
    )
    twin.advance(400)
    dep = n.job.get_deployment("web")
    assert dep["StatusDescription"] == "Failed due to progress deadline"
    n.job.evaluate_job("web")  # later evaluations neither retry nor roll further
    twin.advance(400)
    assert n.job.get_deployment("web")["ID"] == dep["ID"]
    images = {
        a["ID"]: n.allocation.get_allocation(a["ID"])["Job"]["TaskGroups"][0]["Tasks"][0]["Config"][
            "image"
        ]
        for a in live_allocs(n, "web")
    }
    assert sorted(images.values()) == ["registry/web:1"] * 2  # the old ones keep serving
    assert n.job.get_job("web")["Version"] == 1
