"""Twin behaviours checked against Nomad's Go source, over HTTP (fourth round):

1. Kill time. A task's ``kill_timeout`` defaults to 5 s and the job reads back with it
   (api/tasks.go Task.Canonicalize, nomad/structs Task.Canonicalize: ``DefaultKillTimeout``);
   the client caps it at its own ``max_kill_timeout`` (agent config, default 30 s; there is
   no job or group ``max_kill_timeout``): client/allocrunner/taskrunner/driver_handle.go
   NewDriverHandle ``killTimeout: min(task.KillTimeout, maxKillTimeout)``. A stop kills the
   leader task first and waits for it, then the other main tasks together, then the sidecars
   (client/allocrunner/alloc_runner.go killTasks). The Killing event says how long it waits,
   as a Go duration (structs TaskEvent: ``Sent interrupt. Waiting %v before force killing``).
2. GPU devices. The NVIDIA device plugin reports each GPU under its UUID
   (hashicorp/nomad-device-nvidia fingerprint.go deviceGroupFromFingerprintData:
   ``ID: dev.UUID``), so instance IDs differ across nodes and GPUs. The scheduler gives an
   allocation instances no other allocation on the node holds, under the node's device
   group name (scheduler/device.go AssignDevice over structs.DeviceAccounter:
   ``AllocatedDeviceResource{Vendor, Type, Name: id.Name, DeviceIDs}``, ``ask.Count`` of
   them), on the task that asked for them only (AllocatedResources.Tasks[task].Devices).
3. The Scale API and its status. The HTTP handler checks the payload's job ID before
   anything else (command/agent/job_endpoint.go jobScaleAction: 400 ``job ID in payload did
   not match URL``), then JobScaleRequest.Validate (namespace, group, count). The scale
   status reports the job's ModifyIndex as JobModifyIndex, and its blocking index is that of
   the job, its scaling events and its own allocations (nomad/job_endpoint.go ScaleStatus);
   GET /v1/job/:id blocks on the job's ModifyIndex (Job.GetJob): another job's changes do
   not wake either query.
"""

from __future__ import annotations

import re
import time
from typing import Any

import requests

from nomadscale.core.clock import FakeClock
from tests.sim.helpers import UPDATE, S, alloc, live_allocs, scale, service_job, successful

GPU_UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _events(a: dict[str, Any], task: str = "server") -> list[dict[str, Any]]:
    return list(a["TaskStates"][task]["Events"])


def _gpu_job(job_id: str = "web", **kw: Any) -> dict[str, Any]:
    return service_job(job_id, update=UPDATE, **kw)


def _devices(n: Any, alloc_id: str) -> dict[str, Any]:
    return alloc(n, alloc_id)["AllocatedResources"]["Tasks"]  # type: ignore[no-any-return]


def _node_gpus(n: Any, node_id: str) -> list[str]:
    (group,) = n.node.get_node(node_id)["NodeResources"]["Devices"]
    return [i["ID"] for i in group["Instances"]]


# --- 1. kill time -----------------------------------------------------------------------


def test_a_task_reads_back_with_the_default_kill_timeout(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": _gpu_job()})
    task = n.job.get_job("web")["TaskGroups"][0]["Tasks"][0]
    assert task["KillTimeout"] == 5 * S
    assert task["ShutdownDelay"] == 0
    assert task["KillSignal"] == ""
    assert task["Leader"] is False


def test_the_leader_is_killed_first_then_the_other_tasks_then_the_sidecars(twin):
    """leader 10 s, then the main task 6 s, then the sidecar 4 s: 20 s to complete."""
    n = twin.nomad()
    job = _gpu_job(count=1)
    tasks = job["TaskGroups"][0]["Tasks"]
    tasks[0].update({"Leader": True, "KillTimeout": 10 * S})
    base = {"Driver": "docker", "Config": {"image": "registry/aux:1"}}
    tasks.append({**base, "Name": "aux", "KillTimeout": 6 * S})
    tasks.append(
        {
            **base,
            "Name": "proxy",
            "KillTimeout": 4 * S,
            "Lifecycle": {"Hook": "prestart", "Sidecar": True},
        }
    )
    successful(twin, n, job)
    (a,) = live_allocs(n, "web")
    n.job.deregister_job("web")
    twin.advance(19)
    assert alloc(n, a["ID"])["ClientStatus"] == "running"
    twin.advance(1)
    assert alloc(n, a["ID"])["ClientStatus"] == "complete"


def test_the_clients_max_kill_timeout_caps_the_tasks(twin_factory):
    twin = twin_factory(clock=FakeClock(), max_kill_timeout_s=120)
    n = twin.nomad()
    job = _gpu_job(count=1)
    job["TaskGroups"][0]["Tasks"][0]["KillTimeout"] = 90 * S
    successful(twin, n, job)
    (a,) = live_allocs(n, "web")
    n.job.deregister_job("web")
    killing = _events(alloc(n, a["ID"]))[-1]
    assert killing["Type"] == "Killing"
    assert killing["DisplayMessage"] == "Sent interrupt. Waiting 1m30s before force killing"
    twin.advance(89)
    assert alloc(n, a["ID"])["ClientStatus"] == "running"
    twin.advance(1)
    assert alloc(n, a["ID"])["ClientStatus"] == "complete"

    small = twin_factory(clock=FakeClock(), max_kill_timeout_s=10)
    n = small.nomad()
    successful(small, n, job)
    (a,) = live_allocs(n, "web")
    n.job.deregister_job("web")
    assert _events(alloc(n, a["ID"]))[-1]["DisplayMessage"].endswith(
        "Waiting 10s before force killing"
    )
    small.advance(10)
    assert alloc(n, a["ID"])["ClientStatus"] == "complete"


# --- 2. GPU devices ---------------------------------------------------------------------


def test_every_gpu_has_its_own_uuid(twin_factory):
    twin = twin_factory(nodes=4)
    n = twin.nomad()
    twin.cluster.add_node(name="big", datacenter="zone-a", node_pool="gpu", gpus=4,
                          meta={"zone": "zone-a", "gpu": "l4"})  # fmt: skip
    ids = [i for node in n.nodes.get_nodes() for i in _node_gpus(n, node["ID"])]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert all(GPU_UUID.match(i) for i in ids), ids


def test_allocations_on_one_node_hold_different_gpus_of_its_group(twin_factory):
    twin = twin_factory(nodes=0)
    node_id = twin.cluster.add_node(name="big", datacenter="zone-a", node_pool="gpu", gpus=3,
                                    meta={"zone": "zone-a", "gpu": "l4"})  # fmt: skip
    n = twin.nomad()
    job = _gpu_job(count=1)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"][0]["Count"] = 2
    successful(twin, n, job)
    successful(twin, n, _gpu_job("other", count=1))
    held: list[str] = []
    for jid in ("web", "other"):
        (a,) = live_allocs(n, jid)
        (dev,) = _devices(n, a["ID"])["server"]["Devices"]
        assert (dev["Vendor"], dev["Type"], dev["Name"]) == ("nvidia", "gpu", "NVIDIA L4")
        held += dev["DeviceIDs"]
    assert len(held) == 3 and sorted(held) == sorted(_node_gpus(n, node_id))


def test_a_freed_gpu_goes_to_the_next_placement(twin_factory):
    twin = twin_factory(nodes=0)
    node_id = twin.cluster.add_node(name="big", datacenter="zone-a", node_pool="gpu", gpus=2,
                                    meta={"zone": "zone-a", "gpu": "l4"})  # fmt: skip
    n = twin.nomad()
    successful(twin, n, _gpu_job(count=2))
    before = {a["ID"]: _devices(n, a["ID"])["server"]["Devices"][0]["DeviceIDs"][0]
              for a in live_allocs(n, "web")}  # fmt: skip
    assert sorted(before.values()) == sorted(_node_gpus(n, node_id))
    assert scale(twin.address, "web", "web", 1).status_code == 200
    twin.advance(300)
    (kept,) = live_allocs(n, "web")
    freed = next(g for a, g in before.items() if a != kept["ID"])
    successful(twin, n, _gpu_job("other", count=1))
    (new,) = live_allocs(n, "other")
    assert _devices(n, new["ID"])["server"]["Devices"][0]["DeviceIDs"] == [freed]


def test_only_the_task_asking_for_a_gpu_holds_one(twin):
    n = twin.nomad()
    job = _gpu_job(count=1)
    job["TaskGroups"][0]["Tasks"].append(
        {"Name": "logs", "Driver": "docker", "Config": {"image": "registry/logs:1"}}
    )
    successful(twin, n, job)
    (a,) = live_allocs(n, "web")
    tasks = _devices(n, a["ID"])
    assert tasks["logs"]["Devices"] is None
    (dev,) = tasks["server"]["Devices"]
    assert dev["DeviceIDs"] == _node_gpus(n, a["NodeID"])


# --- 3. the Scale API and its status ----------------------------------------------------


def test_the_payloads_job_id_is_checked_first(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": _gpu_job(scaling={"Min": 1, "Max": 4})})
    r = requests.post(f"{twin.address}/v1/job/web/scale",
                      json={"Count": 2, "Target": {"Job": "other", "Group": ""}}, timeout=10)  # fmt: skip
    assert (r.status_code, r.text) == (400, "job ID in payload did not match URL")
    r = requests.post(
        f"{twin.address}/v1/job/web/scale",
        json={"Count": -1, "Target": {"Namespace": "other"}},
        timeout=10,
    )
    assert (r.status_code, r.text) == (400, "namespace in payload did not match header")


def test_the_scale_status_reports_the_jobs_modify_index(twin):
    n = twin.nomad()
    successful(twin, n, _gpu_job())
    job = n.job.get_job("web")
    status = requests.get(f"{twin.address}/v1/job/web/scale", timeout=10).json()
    assert status["JobModifyIndex"] == job["ModifyIndex"]


def _blocking(twin: Any, path: str, index: int) -> tuple[int, float]:
    start = time.monotonic()
    r = requests.get(f"{twin.address}{path}", params={"index": index, "wait": "1s"}, timeout=10)
    assert r.status_code == 200, r.text
    return int(r.headers["X-Nomad-Index"]), time.monotonic() - start


def test_another_jobs_changes_do_not_wake_a_blocking_job_or_scale_query(twin):
    n = twin.nomad()
    successful(twin, n, _gpu_job())
    for path in ("/v1/job/web", "/v1/job/web/scale"):
        r = requests.get(f"{twin.address}{path}", timeout=10)
        index = int(r.headers["X-Nomad-Index"])
        n.jobs.register_job({"Job": _gpu_job(f"other{len(path)}", count=1)})
        twin.advance(30)
        got, waited = _blocking(twin, path, index)
        assert got == index and waited >= 0.9, (path, got, index)
    # its own changes do
    r = requests.get(f"{twin.address}/v1/job/web/scale", timeout=10)
    index = int(r.headers["X-Nomad-Index"])
    assert scale(twin.address, "web", "web", 3).status_code == 200
    got, waited = _blocking(twin, "/v1/job/web/scale", index)
    assert got > index and waited < 0.9
