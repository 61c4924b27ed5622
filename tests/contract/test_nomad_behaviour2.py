"""More Nomad behaviours nomadscale relies on or meets, beyond the response schemas (second
file): the Scale API on a system job, resources on list stubs, blocking reads of what does
not exist, the lists of an unknown job, a job's ModifyIndex and status, GPU device groups.
Runs against the twin, or unchanged against a real Nomad with NOMADSCALE_TEST_NOMAD_ADDR set;
each test names the Nomad source it follows."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.contract.conftest import World, seg
from tests.contract.env import unique
from tests.contract.steps import deployment_is, register, target_job


def _system_job(world: World, jid: str) -> dict[str, Any]:
    job: dict[str, Any] = {
        "ID": jid,
        "Name": jid,
        "Type": "system",
        "Datacenters": list(world.target.datacenters),
        "TaskGroups": [
            {
                "Name": "agent",
                "Count": 1,
                "Tasks": [
                    {
                        "Name": "watch",
                        "Driver": "docker",
                        "Config": {"image": "busybox:1.36", "command": "sleep", "args": ["86400"]},
                        "Resources": {"CPU": 50, "MemoryMB": 32},
                    }
                ],
            }
        ],
    }
    if world.target.node_pool:
        job["NodePool"] = world.target.node_pool
    return job


def test_a_system_job_scales_to_one_or_zero_only(world: World) -> None:
    """nomad/job_endpoint.go Job.Scale: ``jobs of type "system" can only be scaled to 1 or
    0`` (400), checked right after the job lookup, before the group; 0 stops it everywhere
    (scheduler materializeSystemTaskGroups: no allocation for a count-0 group)."""
    jid = unique("contract-system")
    register(world, jid, _system_job(world, jid))
    path = f"/job/{seg(jid)}"
    for group in ("agent", "no-such-group"):
        body = {"Count": 2, "Target": {"Group": group}, "Message": "contract"}
        r = world.api.call("POST", f"{path}/scale", body=body, ok=False)
        assert (r.status_code, r.text.strip()) == (
            400,
            'jobs of type "system" can only be scaled to 1 or 0',
        ), group
    world.wait_for("the system job on a node", lambda: bool(_live(world, path)))
    world.api.call("POST", f"{path}/scale", body={"Count": 0, "Target": {"Group": "agent"}})
    assert world.api.call("GET", path).json()["TaskGroups"][0]["Count"] == 0
    world.wait_for("every allocation stopped", lambda: not _live(world, path))


def _live(world: World, path: str) -> list[dict[str, Any]]:
    allocs = world.api.call("GET", f"{path}/allocations").json() or []
    return [a for a in allocs if a["DesiredStatus"] == "run"]


def test_list_stubs_carry_resources_only_when_asked(world: World) -> None:
    """structs.Allocation.Stub and structs.Node.Stub copy AllocatedResources /
    NodeResources and ReservedResources only with ``resources=true`` (AllocStubFields,
    NodeStubFields; the fields are ``omitempty``); ``os=true`` adds the ``os.name``
    attribute to node stubs."""
    flt = {"filter": f'JobID == "{world.job_id}"'}
    plain = world.api.check("GET", "/allocations", "/allocations", params=flt)
    assert plain and all("AllocatedResources" not in a for a in plain)
    stubs = world.api.check("GET", "/allocations", "/allocations",
                            params={**flt, "resources": "true"})  # fmt: skip
    for a in stubs:
        task = a["AllocatedResources"]["Tasks"]["worker"]
        assert task["Cpu"]["CpuShares"] == 100 and task["Memory"]["MemoryMB"] == 64, task
    nodes = world.api.check("GET", "/nodes", "/nodes")
    for key in ("NodeResources", "ReservedResources", "Attributes"):
        assert all(key not in n for n in nodes), key
    nodes = world.api.check("GET", "/nodes", "/nodes", params={"resources": "true"})
    for n in nodes:
        assert n["NodeResources"]["Memory"]["MemoryMB"] > 0, n["ID"]
        assert isinstance(n["ReservedResources"], dict), n["ID"]
    nodes = world.api.check("GET", "/nodes", "/nodes", params={"os": "true"})
    assert all(set(n["Attributes"]) == {"os.name"} for n in nodes)


def test_a_blocking_read_of_an_unknown_deployment_blocks_then_404s(world: World) -> None:
    """nomad/deployment_endpoint.go GetDeployment runs a missing deployment as a blocking
    query on the deployment table's index; command/agent/deployment_endpoint.go
    deploymentQuery sets the index headers, then answers 404 ``deployment not found``."""
    path = f"/deployment/{uuid.uuid4()}"
    first = world.api.call("GET", path, ok=False)
    assert (first.status_code, first.text.strip()) == (404, "deployment not found")
    index = int(first.headers["X-Nomad-Index"])
    start = time.monotonic()
    r = world.api.call("GET", path, params={"index": index, "wait": "1s"}, ok=False)
    waited = time.monotonic() - start
    assert (r.status_code, r.text.strip()) == (404, "deployment not found")
    # it waited out its time, unless another deployment changed meanwhile (a shared cluster)
    assert waited >= 1.0 or int(r.headers["X-Nomad-Index"]) > index, waited


def test_the_lists_of_an_unknown_job_are_empty(world: World) -> None:
    """Job.Allocations, Job.Evaluations, Job.Deployments and Job.LatestDeployment query by
    job ID without looking the job up: an unknown job has empty lists (and a null latest
    deployment), not a 404 like GET /v1/job/:id."""
    path = f"/job/{seg(unique('contract-nojob'))}"
    for sub, empty in (("allocations", []), ("evaluations", []), ("deployments", []),
                       ("deployment", None)):  # fmt: skip
        r = world.api.call("GET", f"{path}/{sub}")
        assert r.json() == empty, sub
    assert world.api.call("GET", path, ok=False).status_code == 404


def test_a_jobs_modify_index_moves_with_its_status(world: World) -> None:
    """nomad/state/state_store.go setJobStatus writes the job at a new ModifyIndex when its
    status changes (JobModifyIndex stays); getJobStatus: a service job whose allocations
    and evaluations are all terminal, e.g. scaled to 0, is ``dead``
    (hashicorp/nomad#23591)."""
    jid = unique("contract-status")
    register(world, jid, target_job(world, jid, count=1))
    path = f"/job/{seg(jid)}"
    world.wait_for("the job running", lambda: world.api.call("GET", path).json()["Status"]
                   == "running")  # fmt: skip
    job = world.api.call("GET", path).json()
    assert job["Version"] == 0 and job["ModifyIndex"] > job["JobModifyIndex"], job
    world.wait_for("the first deployment", lambda: deployment_is(world, path, 0, "successful"),
                   timeout_s=180)  # fmt: skip
    body = {"Count": 0, "Target": {"Group": "ml-worker-a"}, "Message": "contract"}
    world.api.call("POST", f"{path}/scale", body=body)

    def dead() -> bool:
        return bool(world.api.call("GET", path).json()["Status"] == "dead")

    world.wait_for("the job dead", dead)
    job = world.api.call("GET", path).json()
    assert job["Version"] == 1 and job["ModifyIndex"] > job["JobModifyIndex"], job


def test_gpu_device_groups_are_named_after_the_model(world: World) -> None:
    """The NVIDIA device plugin groups GPUs by model (nomad-device-nvidia fingerprint.go:
    Name = NVML DeviceName, e.g. ``NVIDIA L4``, with ``memory`` in MiB and the common
    ``driver_version`` attribute)."""
    groups = []
    for stub in world.api.call("GET", "/nodes").json():
        node = world.api.call("GET", f"/node/{stub['ID']}").json()
        groups += [g for g in (node["NodeResources"] or {}).get("Devices") or []
                   if (g["Vendor"], g["Type"]) == ("nvidia", "gpu")]  # fmt: skip
    if not groups:
        pytest.skip("no NVIDIA GPU on the target's nodes")
    for g in groups:
        assert g["Name"] and g["Name"] != g["Name"].lower(), g["Name"]  # a model, not a key
        assert g["Attributes"]["memory"]["Unit"] == "MiB" and g["Attributes"]["memory"]["Int"]
        assert g["Attributes"]["driver_version"]["String"]


def test_job_parse_names_template_artifact_and_port_fields_as_the_api_does(world: World) -> None:
    """POST /v1/jobs/parse decodes jobspec2 into api.Job: a template's ``data`` is
    EmbeddedTmpl, ``destination`` DestPath, ``env`` Envvars (api/tasks.go Template); an
    artifact's ``source`` GetterSource, ``destination`` RelativeDest (TaskArtifact); a port's
    ``static`` Value (api/resources.go Port), in ReservedPorts."""
    hcl = """
job "contract-parse" {
  group "g" {
    network {
      port "http" {
        static = 9464
        to     = 9464
      }
    }
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/true"
      }
      template {
        destination = "secrets/env"
        env         = true
        data        = "A=1"
      }
      artifact {
        source      = "https://example.com/a.tgz"
        destination = "local/a"
      }
    }
  }
}
"""
    job = world.api.call("POST", "/jobs/parse", body={"JobHCL": hcl, "Canonicalize": False}).json()
    (group,) = job["TaskGroups"]
    (task,) = group["Tasks"]
    (tmpl,) = task["Templates"]
    assert (tmpl["DestPath"], tmpl["EmbeddedTmpl"], tmpl["Envvars"]) == ("secrets/env", "A=1", True)
    (art,) = task["Artifacts"]
    assert (art["GetterSource"], art["RelativeDest"]) == ("https://example.com/a.tgz", "local/a")
    (port,) = group["Networks"][0]["ReservedPorts"]
    assert (port["Label"], port["Value"], port["To"]) == ("http", 9464, 9464)
