"""Jobs over real HTTP: parse the repo's HCL files, register, versions, scale API rules."""

from __future__ import annotations

import nomad
import pytest
import requests

from tests.sim.helpers import hcl, live_allocs, scale, service_job


def test_parse_and_register_repo_job_files(twin):
    n = twin.nomad()
    worker = n.jobs.parse(hcl("ml-worker.nomad.hcl"))
    prefetch = n.jobs.parse(hcl("image-prefetch.nomad.hcl"), canonicalize=True)
    assert worker["ID"] == "ml-worker"
    groups = {g["Name"]: g for g in worker["TaskGroups"]}
    assert set(groups) == {"ml-worker-a", "ml-worker-b"}
    a = groups["ml-worker-a"]
    assert a["Constraints"][0]["LTarget"] == "${node.datacenter}"
    assert a["Constraints"][0]["RTarget"] == "zone-a"
    assert a["Tasks"][0]["Resources"]["Devices"] == [{"Name": "nvidia/gpu", "Count": 1}]
    assert a["Scaling"]["Min"] == 1 and a["Scaling"]["Max"] >= a["Count"]
    assert prefetch["Type"] == "sysbatch"
    assert prefetch["ParameterizedJob"]["MetaRequired"] == ["image"]
    assert prefetch["TaskGroups"][0]["Tasks"][0]["Config"]["image_pull_timeout"] == "30m"

    assert (worker["Namespace"], worker["NodePool"]) == ("ekyc", "gpu-l4")
    for job in (worker, prefetch):  # the twin fixture's namespace and pool
        job["Namespace"], job["NodePool"] = "default", "gpu"
    reply = n.jobs.register_job({"Job": worker})
    assert reply["EvalID"]
    assert n.jobs.register_job({"Job": prefetch})["EvalID"] == ""  # parameterized
    twin.advance(300)
    allocs = live_allocs(n, "ml-worker")
    assert len(allocs) == 4
    by_node = {x["ID"]: x["Datacenter"] for x in n.nodes.get_nodes()}
    for alloc in allocs:
        zone = "zone-a" if alloc["TaskGroup"] == "ml-worker-a" else "zone-b"
        assert by_node[alloc["NodeID"]] == zone
    assert len({x["NodeID"] for x in allocs}) == 4  # one GPU per node
    job = n.job.get_job("ml-worker")
    assert job["Status"] == "running" and job["Stable"] is True


def test_parse_errors_are_plain_text_400(twin):
    r = requests.post(f"{twin.address}/v1/jobs/parse", json={"JobHCL": "job {"}, timeout=5)
    assert r.status_code == 400 and r.text.startswith("Failed to parse job")
    r = requests.post(f"{twin.address}/v1/jobs/parse", json={"JobHCL": ""}, timeout=5)
    assert (r.status_code, r.text) == (400, "Job spec is empty")


def test_register_validations_and_enforce_index(twin):
    n = twin.nomad()
    with pytest.raises(nomad.api.exceptions.BadRequestNomadException) as e:
        n.jobs.register_job({"Job": None})
    assert e.value.nomad_resp.text == "Job must be specified"
    with pytest.raises(nomad.api.exceptions.BadRequestNomadException) as e:
        n.job.register_job("other", {"Job": service_job("web")})
    assert e.value.nomad_resp.text == "Job ID does not match name"
    first = n.jobs.register_job({"Job": service_job("web"), "EnforceIndex": True})
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.jobs.register_job({"Job": service_job("web"), "EnforceIndex": True})
    assert e.value.nomad_resp.status_code == 500
    assert "job already exists" in e.value.nomad_resp.text
    jmi = first["JobModifyIndex"]
    ok = n.jobs.register_job(
        {"Job": service_job("web", count=3), "EnforceIndex": True, "JobModifyIndex": jmi}
    )
    assert ok["JobModifyIndex"] > jmi
    versions = n.job.get_versions("web")["Versions"]
    assert [v["Version"] for v in versions] == [1, 0]


def test_go_style_case_insensitive_keys(twin):
    body = {
        "job": {
            "id": "lower",
            "type": "service",
            "nodepool": "gpu",
            "taskgroups": [
                {
                    "name": "g",
                    "count": 1,
                    "tasks": [{"name": "t", "driver": "docker", "config": {"image": "x:1"}}],
                }
            ],
        }
    }
    r = requests.put(f"{twin.address}/v1/jobs", json=body, timeout=5)
    assert r.status_code == 200, r.text
    job = requests.get(f"{twin.address}/v1/job/lower", timeout=5).json()
    assert job["TaskGroups"][0]["Count"] == 1
    assert job["TaskGroups"][0]["Tasks"][0]["Config"] == {"image": "x:1"}


def test_unknown_job_wrong_method_and_empty_body(twin):
    base = twin.address
    r = requests.get(f"{base}/v1/job/nope", timeout=5)
    assert (r.status_code, r.text) == (404, "job not found")
    assert r.headers["Content-Type"].startswith("text/plain")
    r = requests.delete(f"{base}/v1/jobs", timeout=5)
    assert (r.status_code, r.text) == (405, "Invalid method")
    r = requests.post(f"{base}/v1/node/x/drain", timeout=5)
    assert (r.status_code, r.text) == (400, "Request body is empty")


def test_scale_changes_count_version_and_records_events(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2)})
    twin.advance(120)
    r = scale(twin.address, "web", "web", 4, Meta={"forecast": 3.7})
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Nomad-Index"]) >= r.json()["Index"] > 0
    ev = n.evaluation.get_evaluation(r.json()["EvalID"])
    assert ev["TriggeredBy"] == "job-scaling"
    assert n.job.get_job("web")["Version"] == 1
    assert len(live_allocs(n, "web")) == 4
    twin.advance(120)
    scale(twin.address, "web", "web", None, Message="note only", Error=True)
    r = scale(twin.address, "web", "web", 1)
    assert r.status_code == 200, r.text
    twin.advance(30)
    allocs = live_allocs(n, "web")
    assert len(allocs) == 1
    assert allocs[0]["Name"] == "web.web[0]"  # newest stopped first
    status = requests.get(f"{twin.address}/v1/job/web/scale", timeout=5).json()
    group = status["TaskGroups"]["web"]
    assert group["Desired"] == 1 and group["Running"] == 1 and group["Healthy"] == 1
    events = group["Events"]
    assert [e["Count"] for e in events] == [1, None, 4]  # newest first
    assert events[1]["Error"] is True and events[1]["EvalID"] is None
    assert events[2]["Meta"] == {"forecast": 3.7} and events[2]["PreviousCount"] == 2
    kinds = [e["type"] for e in twin.cluster.events if e["type"] in ("register", "scale")]
    assert kinds == ["register", "register", "scale", "scale", "register", "scale"]


def test_scale_events_capped_at_20(twin):
    twin.nomad().jobs.register_job({"Job": service_job("web", count=1)})
    for i in range(25):
        scale(twin.address, "web", "web", None, Message=f"m{i}")
    events = requests.get(f"{twin.address}/v1/job/web/scale", timeout=5).json()["TaskGroups"][
        "web"
    ]["Events"]
    assert len(events) == 20 and events[0]["Message"] == "m24"


def test_scale_rejected_during_active_deployment(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1, update={"MaxParallel": 1})})
    twin.advance(200)
    assert n.job.get_deployment("web")["Status"] == "successful"
    assert scale(twin.address, "web", "web", 3).status_code == 200
    dep = n.job.get_deployment("web")
    assert dep["Status"] == "running"
    r = scale(twin.address, "web", "web", 2)
    assert (r.status_code, r.text) == (400, "job scaling blocked due to active deployment")
    assert scale(twin.address, "web", "web", None, Message="event only").status_code == 200
    twin.advance(200)
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"
    assert scale(twin.address, "web", "web", 2).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Count": 2, "Target": {}}, 400, "missing task group name for scaling action"),
        ({"Count": -1, "Target": {"Group": "web"}}, 400, "scaling action count can't be negative"),
        (
            {"Count": 2, "Error": True, "Target": {"Group": "web"}},
            400,
            "scaling action should not contain count if error is true",
        ),
        (
            {"Count": 2, "Target": {"Group": "nope"}},
            400,
            'task group "nope" specified for scaling does not exist in job',
        ),
        (
            {"Count": 0, "Target": {"Group": "web"}},
            400,
            "group count was less than scaling policy minimum: 0 < 1",
        ),
        (
            {"Count": 9, "Target": {"Group": "web"}},
            400,
            "group count was greater than scaling policy maximum: 9 > 5",
        ),
        (
            {"Count": 2, "Target": {"Group": "web", "Job": "other"}},
            400,
            "job ID in payload did not match URL",
        ),
    ],
)
def test_scale_rejections(twin, body, status, text):
    job = service_job("web", count=2, scaling={"Min": 1, "Max": 5, "Enabled": True})
    twin.nomad().jobs.register_job({"Job": job})
    r = requests.post(f"{twin.address}/v1/job/web/scale", json=body, timeout=5)
    assert (r.status_code, r.text) == (status, text)


def test_scale_unknown_job_404(twin):
    r = scale(twin.address, "ghost", "g", 1)
    assert (r.status_code, r.text) == (404, 'job "ghost" not found')


def test_list_jobs_prefix_filter_and_stop(twin):
    n = twin.nomad()
    for jid in ("web-1", "web-2", "api"):
        n.jobs.register_job({"Job": service_job(jid, count=1, gpu=False)})
    assert [j["ID"] for j in n.jobs.get_jobs(prefix="web")] == ["web-1", "web-2"]
    stubs = n.jobs.get_jobs(filter_='ID == "api"')
    assert [j["ID"] for j in stubs] == ["api"]
    assert stubs[0]["JobSummary"]["Summary"]["web"]["Starting"] == 1
    n.job.deregister_job("api")
    twin.advance(5)
    job = n.job.get_job("api")
    assert job["Stop"] is True and job["Status"] == "dead"
    n.job.deregister_job("web-1", purge=True)
    assert [j["ID"] for j in n.jobs.get_jobs()] == ["api", "web-2"]


def test_plan_is_a_dry_run(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2, gpu=False)})
    plan = n.job.plan_job("web", {"Job": service_job("web", count=5, gpu=False)})
    assert plan["Annotations"]["DesiredTGUpdates"]["web"]["Place"] == 3
    assert n.job.get_job("web")["TaskGroups"][0]["Count"] == 2


def test_same_spec_keeps_version_but_scale_always_writes_one(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2)})
    n.jobs.register_job({"Job": service_job("web", count=2)})
    assert n.job.get_job("web")["Version"] == 0
    twin.advance(200)
    assert scale(twin.address, "web", "web", 2).status_code == 200
    assert n.job.get_job("web")["Version"] == 1
