"""Smaller endpoints: namespaces, evaluations, allocations, paging, write headers, and the
scheduler's bookkeeping staying consistent through churn."""

from __future__ import annotations

import nomad
import pytest
import requests

from tests.sim.helpers import live_allocs, scale, service_job


def test_namespaces(twin):
    n = twin.nomad()
    assert [x["Name"] for x in n.namespaces.get_namespaces()] == ["default"]
    r = requests.get(f"{twin.address}/v1/namespace/nope", timeout=5)
    assert (r.status_code, r.text) == (404, "namespace not found")
    job = service_job("web", count=1)
    r = requests.post(f"{twin.address}/v1/jobs?namespace=ekyc", json={"Job": job}, timeout=5)
    assert (r.status_code, r.text) == (500, 'job "web" is in nonexistent namespace "ekyc"')
    r = requests.post(f"{twin.address}/v1/namespace/ekyc", json={"Name": "ekyc"}, timeout=5)
    assert r.status_code == 200
    r = requests.post(f"{twin.address}/v1/jobs?namespace=ekyc", json={"Job": job}, timeout=5)
    assert r.status_code == 200
    assert n.jobs.get_jobs(namespace="ekyc")[0]["Namespace"] == "ekyc"
    assert n.jobs.get_jobs() == []  # default namespace only
    assert len(n.jobs.get_jobs(namespace="*")) == 1


def test_evaluations_and_allocations(twin):
    n = twin.nomad()
    reply = n.jobs.register_job({"Job": service_job("web", count=2)})
    ev = n.evaluation.get_evaluation(reply["EvalID"])
    assert ev["TriggeredBy"] == "job-register" and ev["Status"] == "complete"
    assert ev["JobID"] == "web"
    assert ev["DeploymentID"] == n.job.get_deployment("web")["ID"]  # default update block
    r = requests.get(f"{twin.address}/v1/evaluations", params={"job": "web"}, timeout=5)
    assert [e["ID"] for e in r.json()] == [reply["EvalID"]]
    unknown = "00000000-0000-4000-8000-000000000000"
    for path, what in (("evaluation", "eval"), ("allocation", "alloc")):
        r = requests.get(f"{twin.address}/v1/{path}/{unknown}", timeout=5)
        assert (r.status_code, r.text) == (404, f"{what} not found")
        # not a UUID: go-memdb's UUID index refuses it (state store EvalByID / AllocByID)
        r = requests.get(f"{twin.address}/v1/{path}/nope", timeout=5)
        assert (r.status_code, r.text) == (
            500,
            f"{what} lookup failed: index error: UUID must be 36 characters",
        )
    allocs = n.allocations.get_allocations()
    assert len(allocs) == 2 and allocs[0]["TaskStates"]["server"]["State"] == "pending"
    full = n.allocation.get_allocation(allocs[0]["ID"])
    assert full["Job"]["ID"] == "web" and full["EvalID"] == reply["EvalID"]
    filtered = n.allocations.get_allocations(filter_=f'NodeID == "{allocs[0]["NodeID"]}"')
    assert [a["ID"] for a in filtered] == [allocs[0]["ID"]]


def test_stop_allocation_is_replaced(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2)})
    twin.advance(200)
    victim = live_allocs(n, "web")[0]
    assert n.allocation.stop_allocation(victim["ID"])["EvalID"]
    assert n.allocation.get_allocation(victim["ID"])["DesiredStatus"] == "stop"
    allocs = live_allocs(n, "web")
    assert len(allocs) == 2 and victim["ID"] not in {a["ID"] for a in allocs}


def test_node_paging_and_write_headers(twin):
    r = requests.get(f"{twin.address}/v1/nodes", params={"per_page": 4}, timeout=5)
    first = r.json()
    assert len(first) == 4 and r.headers["X-Nomad-NextToken"]
    r2 = requests.get(
        f"{twin.address}/v1/nodes",
        params={"per_page": 4, "next_token": r.headers["X-Nomad-NextToken"]},
        timeout=5,
    )
    assert len(r2.json()) == 2 and "X-Nomad-NextToken" not in r2.headers
    assert {x["ID"] for x in first}.isdisjoint({x["ID"] for x in r2.json()})
    w = requests.put(f"{twin.address}/v1/jobs", json={"Job": service_job("web")}, timeout=5)
    assert int(w.headers["X-Nomad-Index"]) > 0 and "X-Nomad-KnownLeader" not in w.headers


def test_manual_allocation_health(twin):
    n = twin.nomad()
    job = service_job("web", count=1, update={"MaxParallel": 1, "HealthCheck": "manual"})
    n.jobs.register_job({"Job": job})
    dep = n.job.get_deployment("web")
    alloc = live_allocs(n, "web")[0]
    n.deployment.deployment_allocation_health(dep["ID"], healthy_allocations=[alloc["ID"]])
    assert n.deployment.get_deployment(dep["ID"])["Status"] == "successful"
    with pytest.raises(nomad.api.exceptions.BaseNomadException):
        n.deployment.deployment_allocation_health(dep["ID"], healthy_allocations=["x"])


def test_node_bookkeeping_survives_churn(twin):
    n = twin.nomad()
    c = twin.cluster
    n.jobs.register_job({"Job": service_job("web", count=4)})
    n.jobs.register_job({"Job": service_job("cpu", count=5, gpu=False)})
    twin.advance(200)
    scale(twin.address, "web", "web", 6)
    node_id = live_allocs(n, "web")[0]["NodeID"]
    n.node.drain_node_with_spec(node_id, {"Deadline": 60 * 10**9})
    c.lose_node(next(i for i in c.nodes if i != node_id))
    twin.advance(400)
    # 6 wanted, 4 GPUs left: the scale-up deployment cannot finish and blocks scaling...
    assert scale(twin.address, "web", "web", 2).status_code == 400
    twin.advance(300)  # ...until its progress deadline (10m) fails it
    dep = n.job.get_deployment("web")
    assert (dep["Status"], dep["StatusDescription"]) == (
        "failed",
        "Failed due to progress deadline",
    )
    assert scale(twin.address, "web", "web", 2).status_code == 200
    twin.advance(100)
    for node in c.nodes.values():
        live = [a for a in c.allocs_by_node[node.id] if a.live]
        assert node.n_live == len(live)
        assert node.gpu_used == sum(a.gpus for a in live) <= node.gpus
    assert len(live_allocs(n, "web")) == 2 and len(live_allocs(n, "cpu")) == 5


def test_eval_allocations_and_scaling_policies(twin):
    n = twin.nomad()
    job = service_job("web", count=2, scaling={"Min": 1, "Max": 8})
    reply = n.jobs.register_job({"Job": job})
    allocs = n.evaluation.get_allocations(reply["EvalID"])
    assert len(allocs) == 2 and {a["EvalID"] for a in allocs} == {reply["EvalID"]}
    policies = n.scaling.get_scaling_policies()
    assert [p["Target"] for p in policies] == [
        {"Namespace": "default", "Job": "web", "Group": "web"}
    ]
    policy = n.scaling.get_scaling_policy(policies[0]["ID"])
    assert (policy["Min"], policy["Max"], policy["Enabled"]) == (1, 8, True)


def test_default_image_size_sets_pull_time(twin_factory):
    t = twin_factory(nodes=2, default_image_gb=0.1)  # 0.1 GB at 800 Mbit/s = 1 s
    n = t.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1)})
    t.advance(t.cluster.start_s + 1.5)
    assert live_allocs(n, "web")[0]["ClientStatus"] == "running"
