"""Twin behaviours checked against Nomad's Go source, over HTTP (fifth round):

1. Scaling a system job. nomad/job_endpoint.go Job.Scale answers 400 ``jobs of type "system"
   can only be scaled to 1 or 0`` for a count above 1, right after the job lookup (before
   the group, the scaling policy and the deployment checks); there is no such limit for
   sysbatch jobs.
2. ``resources=true`` on list endpoints. structs.Allocation.Stub copies AllocatedResources
   and structs.Node.Stub copies NodeResources and ReservedResources only when the query asks
   for them (AllocStubFields / NodeStubFields); the fields are ``omitempty``, so a plain list
   has no such keys at all; ``os=true`` adds ``Attributes: {"os.name": ...}`` to node stubs.
3. Blocking-query jitter: nomad/rpc.go blockingRPC adds ``helper.RandomStagger(wait /
   structs.JitterFraction)`` (16) to the wait.
4. A blocking read of something that does not exist: Deployment.GetDeployment (and
   Job.GetJob, ...) runs as a blocking query on the table's index and the HTTP handler
   answers 404 only when it returns (command/agent/deployment_endpoint.go deploymentQuery:
   setMeta, then ``deployment not found``). The job sub-lists of an unknown job are empty,
   not 404 (Job.Allocations, Job.Evaluations, Job.Deployments, Job.LatestDeployment).
5. A job's ModifyIndex moves when its status changes (nomad/state/state_store.go
   setJobStatus writes the job with ``ModifyIndex = index``), and the status follows
   getJobStatus: a job whose allocations and evaluations are all terminal is ``dead``.
   GET /v1/job/:id blocks on that ModifyIndex only (Job.GetJob).
6. GPU device groups are named after the GPU model as NVML reports it (nomad-device-nvidia
   fingerprint.go: groups keyed by DeviceName, attributes memory/power/bar1/... and the
   common driver_version); a request naming a model places only on that model.
"""

from __future__ import annotations

import random
import time
from typing import Any

import requests

from nomadscale.sim import TwinServer
from tests.sim.helpers import UPDATE, live_allocs, scale, service_job, successful


def _system_job(job_id: str = "sys", job_type: str = "system") -> dict[str, Any]:
    return {
        "ID": job_id,
        "Name": job_id,
        "Type": job_type,
        "NodePool": "gpu",
        "Datacenters": ["zone-a", "zone-b"],
        "TaskGroups": [
            {
                "Name": "agent",
                "Count": 1,
                "Tasks": [{"Name": "watch", "Driver": "docker", "Config": {"image": "w:1"}}],
            }
        ],
    }


# --- 1. scaling a system job ------------------------------------------------------------


def test_a_system_job_scales_to_one_or_zero_and_a_sysbatch_job_is_not_limited(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": _system_job()})
    twin.advance(30)
    r = scale(twin.address, "sys", "agent", 2)
    assert (r.status_code, r.text) == (400, 'jobs of type "system" can only be scaled to 1 or 0')
    # checked before the group lookup
    r = scale(twin.address, "sys", "nope", 2)
    assert (r.status_code, r.text) == (400, 'jobs of type "system" can only be scaled to 1 or 0')
    assert len(live_allocs(n, "sys")) == 6
    assert scale(twin.address, "sys", "agent", 0).status_code == 200
    assert n.job.get_job("sys")["TaskGroups"][0]["Count"] == 0
    twin.advance(30)
    assert live_allocs(n, "sys") == []  # a count-0 group wants no allocation anywhere
    n.jobs.register_job({"Job": _system_job("batchy", "sysbatch")})
    r = scale(twin.address, "batchy", "agent", 3)
    assert r.status_code == 200, r.text
    assert n.job.get_job("batchy")["TaskGroups"][0]["Count"] == 3


# --- 2. resources on list stubs ---------------------------------------------------------


def test_alloc_stubs_carry_allocated_resources_only_when_asked(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=1, update=UPDATE))
    base = f"{twin.address}/v1/allocations"
    for params in ({}, {"filter": 'JobID == "web"'}):
        (plain,) = requests.get(base, params=params, timeout=10).json()
        assert "AllocatedResources" not in plain
        (stub,) = requests.get(base, params={**params, "resources": "true"}, timeout=10).json()
        res = stub["AllocatedResources"]
        task = res["Tasks"]["server"]
        assert task["Cpu"]["CpuShares"] == 100 and task["Memory"]["MemoryMB"] == 128
        (dev,) = task["Devices"]
        assert (dev["Vendor"], dev["Type"], dev["Name"]) == ("nvidia", "gpu", "NVIDIA L4")
        assert res["Shared"]["DiskMB"] == 300
        assert stub["DesiredTransition"] == {
            "Migrate": None,
            "Reschedule": None,
            "ForceReschedule": None,
            "NoShutdownDelay": None,
        }
        assert stub["NextAllocation"] == ""
        full = n.allocation.get_allocation(stub["ID"])
        assert full["AllocatedResources"] == res


def test_node_stubs_carry_resources_and_os_only_when_asked(twin):
    base = f"{twin.address}/v1/nodes"
    for params in ({}, {"filter": 'Datacenter == "zone-a"'}):
        plain = requests.get(base, params=params, timeout=10).json()[0]
        for key in ("NodeResources", "ReservedResources", "Attributes"):
            assert key not in plain, key
        stub = requests.get(base, params={**params, "resources": "true"}, timeout=10).json()[0]
        assert stub["NodeResources"]["Cpu"]["CpuShares"] > 0
        assert stub["NodeResources"]["Memory"]["MemoryMB"] > 0
        (gpu,) = stub["NodeResources"]["Devices"]
        assert gpu["Name"] == "NVIDIA L4"
        assert stub["ReservedResources"]["Cpu"]["CpuShares"] >= 0
        assert "Attributes" not in stub
        with_os = requests.get(base, params={**params, "os": "true"}, timeout=10).json()[0]
        assert with_os["Attributes"] == {"os.name": "ubuntu"}
        assert "NodeResources" not in with_os
        full = requests.get(f"{twin.address}/v1/node/{stub['ID']}", timeout=10).json()
        assert full["NodeResources"] == stub["NodeResources"]
        assert full["ReservedResources"] == stub["ReservedResources"]


# --- 3. blocking-query jitter -----------------------------------------------------------


class _Fixed(random.Random):
    def random(self) -> float:
        return 0.99


def test_a_blocking_query_waits_its_wait_plus_a_sixteenth_at_most(twin):
    server = TwinServer(twin.cluster, rng=_Fixed()).start()
    try:
        index = int(requests.get(f"{server.address}/v1/nodes", timeout=10).headers["X-Nomad-Index"])
        start = time.monotonic()
        r = requests.get(
            f"{server.address}/v1/nodes", params={"index": index, "wait": "800ms"}, timeout=10
        )
        waited = time.monotonic() - start
    finally:
        server.stop()
    assert r.status_code == 200
    # 0.8 s + 0.99 * 0.8 / 16 = 0.8495 s
    assert 0.845 <= waited < 1.5, waited


# --- 4. blocking reads of what does not exist -------------------------------------------


def _timed_get(url: str, **params: Any) -> tuple[requests.Response, float]:
    start = time.monotonic()
    r = requests.get(url, params=params, timeout=10)
    return r, time.monotonic() - start


def test_a_blocking_read_of_an_unknown_deployment_blocks_then_404s(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1, update=UPDATE)})
    url = f"{twin.address}/v1/deployment/00000000-0000-0000-0000-000000000000"
    r, _ = _timed_get(url)
    assert (r.status_code, r.text) == (404, "deployment not found")
    index = int(r.headers["X-Nomad-Index"])
    assert index == twin.cluster.table_index["deployments"]
    r, waited = _timed_get(url, index=index, wait="500ms")
    assert (r.status_code, r.text) == (404, "deployment not found")
    assert waited >= 0.5 and int(r.headers["X-Nomad-Index"]) == index
    # an older index answers at once
    r, waited = _timed_get(url, index=index - 1, wait="5s")
    assert r.status_code == 404 and waited < 1
    # same for a job
    r, waited = _timed_get(f"{twin.address}/v1/job/ghost", index=twin.cluster.index, wait="300ms")
    assert (r.status_code, r.text) == (404, "job not found") and waited >= 0.3


def test_the_lists_of_an_unknown_job_are_empty(twin):
    base = f"{twin.address}/v1/job/ghost"
    for path, empty in (
        ("allocations", []),
        ("evaluations", []),
        ("deployments", []),
        ("deployment", None),
    ):
        r = requests.get(f"{base}/{path}", timeout=10)
        assert (r.status_code, r.json()) == (200, empty), path
        assert int(r.headers["X-Nomad-Index"]) >= 1
    for path in ("", "/summary", "/scale"):
        assert requests.get(f"{base}{path}", timeout=10).status_code == 404, path


def test_the_allocations_of_an_unknown_node_are_empty(twin):
    """nomad/node_endpoint.go GetAllocs lists by node ID without looking the node up."""
    r = requests.get(f"{twin.address}/v1/node/ghost/allocations", timeout=10)
    assert (r.status_code, r.json()) == (200, [])
    r = requests.get(f"{twin.address}/v1/node/00000000-0000-4000-8000-000000000000", timeout=10)
    assert (r.status_code, r.text) == (404, "node not found")
    r = requests.get(f"{twin.address}/v1/node/ghost", timeout=10)  # not a UUID: NodeByID
    assert (r.status_code, r.text) == (
        500,
        "node lookup failed: index error: UUID must be 36 characters",
    )


def test_a_replaced_allocation_names_its_successor_at_a_new_modify_index(twin):
    """state_store.go upsertAllocsImpl: the previous allocation gets NextAllocation at the
    plan's index; AllocListStub carries NextAllocation and DesiredTransition."""
    n = twin.nomad()
    successful(twin, n, service_job("web", count=1, update=UPDATE))
    (old,) = live_allocs(n, "web")
    assert requests.post(f"{twin.address}/v1/allocation/{old['ID']}/stop", timeout=10).ok
    (new,) = live_allocs(n, "web")
    stub = next(a for a in n.job.get_allocations("web") if a["ID"] == old["ID"])
    assert stub["NextAllocation"] == new["ID"]
    assert stub["ModifyIndex"] >= new["CreateIndex"] > old["ModifyIndex"]


# --- 5. the job's ModifyIndex and status ------------------------------------------------


def test_the_jobs_modify_index_moves_with_its_status_only(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2, update=UPDATE)})
    registered = n.job.get_job("web")
    twin.advance(300)
    job = n.job.get_job("web")
    assert job["JobModifyIndex"] == registered["JobModifyIndex"]
    # an allocation changing without the status changing does not move it
    index = job["ModifyIndex"]
    a = live_allocs(n, "web")[0]
    assert requests.post(f"{twin.address}/v1/allocation/{a['ID']}/stop", timeout=10).ok
    twin.advance(120)
    r, waited = _timed_get(f"{twin.address}/v1/job/web", index=index, wait="300ms")
    assert int(r.headers["X-Nomad-Index"]) == index and waited >= 0.3
    assert r.json()["ModifyIndex"] == index
    # scaled to zero: every allocation and evaluation terminal, the job is dead, at a new
    # ModifyIndex after its JobModifyIndex
    assert scale(twin.address, "web", "web", 0).status_code == 200
    twin.advance(120)
    job = n.job.get_job("web")
    assert job["Status"] == "dead", job["Status"]
    assert job["ModifyIndex"] > job["JobModifyIndex"]
    stub = requests.get(f"{twin.address}/v1/jobs", timeout=10).json()[0]
    assert stub["Status"] == "dead" and stub["ModifyIndex"] == job["ModifyIndex"]


def test_a_blocking_job_read_wakes_when_its_status_changes(twin):
    n = twin.nomad()
    successful(twin, n, service_job("web", count=1, update=UPDATE))
    index = n.job.get_job("web")["ModifyIndex"]
    assert scale(twin.address, "web", "web", 0).status_code == 200
    twin.advance(60)
    r, waited = _timed_get(f"{twin.address}/v1/job/web", index=index, wait="5s")
    assert waited < 2 and r.json()["Status"] == "dead"
    assert int(r.headers["X-Nomad-Index"]) == r.json()["ModifyIndex"] > index


def test_a_system_job_is_running_until_stopped(twin_factory):
    twin = twin_factory(nodes=0)
    n = twin.nomad()
    n.jobs.register_job({"Job": _system_job()})
    assert n.job.get_job("sys")["Status"] == "running"


# --- 6. GPU device groups named after the model -----------------------------------------


def test_gpu_device_groups_are_named_after_the_model_with_its_attributes(twin_factory):
    twin = twin_factory(nodes=2, gpu="t4")
    n = twin.nomad()
    node = n.node.get_node(n.nodes.get_nodes()[0]["ID"])
    (group,) = node["NodeResources"]["Devices"]
    assert (group["Vendor"], group["Type"], group["Name"]) == ("nvidia", "gpu", "Tesla T4")
    attrs = group["Attributes"]
    assert attrs["memory"] == {"Int": 15360, "Float": None, "String": None, "Bool": None,
                               "Unit": "MiB"}  # fmt: skip
    assert attrs["driver_version"]["String"]
    assert node["Meta"]["gpu"] == "t4"


def test_a_device_request_naming_a_model_places_only_on_that_model(twin):
    n = twin.nomad()
    job = service_job("t4", count=1, update=UPDATE)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"][0]["Name"] = "nvidia/gpu/Tesla T4"
    n.jobs.register_job({"Job": job})
    twin.advance(60)
    assert live_allocs(n, "t4") == []
    (ev,) = [e for e in n.job.get_evaluations("t4") if e["Status"] == "blocked"]
    assert ev["TriggeredBy"] == "queued-allocs"
    job = service_job("l4", count=1, update=UPDATE)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"][0]["Name"] = "nvidia/gpu/NVIDIA L4"
    n.jobs.register_job({"Job": job})
    twin.advance(60)
    (a,) = live_allocs(n, "l4")
    full = n.allocation.get_allocation(a["ID"])
    (dev,) = full["AllocatedResources"]["Tasks"]["server"]["Devices"]
    assert dev["Name"] == "NVIDIA L4"


def test_a_count_that_is_not_a_whole_number_is_the_decoders_400(twin):
    """``count = "abc"`` (or a JSON string / 2.0) is rejected by Go's JSON decoder with
    a 400 naming the field; the twin answered 500 with a Python ValueError."""
    for count, kind in (("abc", "string"), (2.5, "number"), (2.0, "number"), (True, "bool")):
        job = service_job("bad-count", count=1)
        job["TaskGroups"][0]["Count"] = count
        r = requests.post(f"{twin.address}/v1/jobs", json={"Job": job}, timeout=10)
        assert r.status_code == 400, (count, r.status_code, r.text)
        assert r.text.strip() == (
            f"json: cannot unmarshal {kind} into Go struct field TaskGroup.Job.TaskGroups.Count "
            "of type int"
        )
    job = service_job("good-count", count=1)
    job["TaskGroups"][0]["Count"] = 2
    assert requests.post(f"{twin.address}/v1/jobs", json={"Job": job}, timeout=10).ok
