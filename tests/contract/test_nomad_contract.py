"""Every endpoint nomadscale uses, called over HTTP and validated against Nomad's OpenAPI
response schemas (plus nomad-api.md schemas for newer fields). Runs against the twin, or
unchanged against a real Nomad with NOMADSCALE_TEST_NOMAD_ADDR set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.contract import spec
from tests.contract.conftest import World, seg
from tests.contract.env import unique
from tests.contract.steps import register, target_job

NS = 1_000_000_000


@dataclass(frozen=True)
class Read:
    template: str
    path: Callable[[World], str]
    params: Callable[[World], dict[str, Any]] | None = None
    optional: bool = False  # skip (not fail) when the target does not serve it

    @property
    def id(self) -> str:
        return self.template


READS = [
    Read("/status/leader", lambda w: "/status/leader"),
    Read("/status/peers", lambda w: "/status/peers", optional=True),
    Read("/regions", lambda w: "/regions", optional=True),
    Read("/namespaces", lambda w: "/namespaces", optional=True),
    Read("/jobs", lambda w: "/jobs"),
    Read("/job/{jobName}", lambda w: f"/job/{seg(w.job_id)}"),
    Read("/job/{jobName}/versions", lambda w: f"/job/{seg(w.job_id)}/versions"),
    Read("/job/{jobName}/allocations", lambda w: f"/job/{seg(w.job_id)}/allocations"),
    Read("/job/{jobName}/deployments", lambda w: f"/job/{seg(w.job_id)}/deployments"),
    Read("/job/{jobName}/deployment", lambda w: f"/job/{seg(w.job_id)}/deployment"),
    Read("/job/{jobName}/evaluations", lambda w: f"/job/{seg(w.job_id)}/evaluations"),
    Read("/job/{jobName}/summary", lambda w: f"/job/{seg(w.job_id)}/summary", optional=True),
    Read("/job/{jobName}/scale", lambda w: f"/job/{seg(w.job_id)}/scale"),
    Read("/nodes", lambda w: "/nodes"),
    Read("/node/{nodeId}", lambda w: f"/node/{w.node_id}"),
    Read("/node/{nodeId}/allocations", lambda w: f"/node/{w.node_id}/allocations"),
    Read("/allocations", lambda w: "/allocations"),
    Read("/allocation/{allocID}", lambda w: f"/allocation/{w.alloc_id}"),
    Read("/deployments", lambda w: "/deployments"),
    Read("/evaluations", lambda w: "/evaluations"),
    Read("/evaluation/{evalID}", lambda w: f"/evaluation/{w.eval_id}"),
    Read(
        "/evaluation/{evalID}/allocations",
        lambda w: f"/evaluation/{w.eval_id}/allocations",
        optional=True,
    ),
    Read("/scaling/policies", lambda w: "/scaling/policies", optional=True),
    Read(
        "/client/metadata",
        lambda w: "/client/metadata",
        params=lambda w: {"node_id": w.node_id},
    ),
]


@pytest.mark.parametrize("case", READS, ids=[r.id for r in READS])
def test_read_endpoint_matches_schema(world: World, case: Read) -> None:
    params = case.params(world) if case.params else None
    if case.optional:
        resp = world.api.call("GET", case.path(world), params=params, ok=False)
        if resp.status_code in (404, 405) and "not found" not in resp.text.lower():
            pytest.skip(f"target does not serve GET {case.template}: {resp.status_code}")
    world.api.check("GET", case.template, case.path(world), params=params)


def test_filtered_lists_match_schema(world: World) -> None:
    nodes = world.api.check("GET", "/nodes", "/nodes", params={"filter": 'Status == "ready"'})
    assert nodes and all(n["Status"] == "ready" for n in nodes)
    allocs = world.api.check(
        "GET",
        "/allocations",
        "/allocations",
        params={
            "filter": 'DesiredStatus == "run" and (ClientStatus == "pending" or '
            'ClientStatus == "running")',
            "namespace": "*",
            "task_states": "false",
        },
    )
    assert any(a["JobID"] == world.job_id for a in allocs)


def test_blocking_query_returns_index_header(world: World) -> None:
    resp = world.api.call("GET", f"/job/{seg(world.job_id)}", params={"index": 1, "wait": "1s"})
    spec.validate("GET", "/job/{jobName}", resp.json())
    assert int(resp.headers["X-Nomad-Index"]) > 1


def test_parse_plan_register_and_scale(world: World) -> None:
    hcl = 'job "parsed" {\n  group "g" {\n    count = 2\n    task "t" {\n      driver = "docker"\n      config {\n        image = "busybox"\n      }\n    }\n  }\n}\n'
    job = world.api.check("POST", "/jobs/parse", "/jobs/parse", body={"JobHCL": hcl})
    assert job["TaskGroups"][0]["Count"] == 2
    path = f"/job/{seg(world.job_id)}"
    current = world.api.call("GET", path).json()
    world.api.check(
        "POST", "/job/{jobName}/plan", f"{path}/plan", body={"Job": current, "Diff": True}
    )
    reg = world.api.check(
        "POST",
        "/job/{jobName}",
        path,
        body={"Job": current, "EnforceIndex": True, "JobModifyIndex": current["JobModifyIndex"]},
    )
    assert reg["JobModifyIndex"] >= current["JobModifyIndex"]
    world.api.check(
        "POST",
        "/job/{jobName}/scale",
        f"{path}/scale",
        body={
            "Count": 2,
            "Target": {"Group": "ml-worker-a"},
            "Message": "contract",
            "Meta": {"forecast": 1.5},
        },
    )
    world.wait_for(
        "the scale", lambda: len(world.api.call("GET", f"{path}/allocations").json()) >= 3
    )
    status = world.api.check("GET", "/job/{jobName}/scale", f"{path}/scale")
    assert status["TaskGroups"]["ml-worker-a"]["Desired"] == 2
    # An event without a count (Error true): ScalingRequest.Error is a bool.
    world.api.check(
        "POST",
        "/job/{jobName}/scale",
        f"{path}/scale",
        body={"Target": {"Group": "ml-worker-a"}, "Message": "no capacity", "Error": True},
    )
    events = world.api.check("GET", "/job/{jobName}/scale", f"{path}/scale")["TaskGroups"][
        "ml-worker-a"
    ]["Events"]
    assert events[0]["Error"] is True


def test_dispatched_child_and_its_allocations(world: World) -> None:
    path = f"/job/{seg(world.child_id)}"
    child = world.api.check("GET", "/job/{jobName}", path)
    assert child["ParentID"] == world.parent_id
    world.api.check("GET", "/job/{jobName}/allocations", f"{path}/allocations")
    again = world.api.check(
        "POST",
        "/job/{jobName}/dispatch",
        f"/job/{seg(world.parent_id)}/dispatch",
        params={"idempotency_token": "contract-1"},
        body={"Meta": {"image": "busybox:1.36"}},
    )
    assert again["DispatchedJobID"]
    world.cleanup.append(
        lambda: world.api.call(
            "DELETE", f"/job/{seg(again['DispatchedJobID'])}", params={"purge": "true"}, ok=False
        )
    )


def test_deployment_lifecycle(world: World) -> None:
    jid = unique("contract-canary")
    # count 2: after promotion one more new alloc is still rolling, so fail applies
    register(world, jid, target_job(world, jid, count=2, canary=1))
    path = f"/job/{seg(jid)}"

    def healthy_v0() -> bool:
        dep = world.api.call("GET", f"{path}/deployment").json()
        return bool(dep) and dep["Status"] == "successful"

    world.wait_for("the first deployment", healthy_v0, timeout_s=120)
    world.api.call(
        "POST",
        "/jobs",
        body={"Job": target_job(world, jid, count=2, canary=1, image="busybox:1.37")},
    )

    def canary_placed() -> bool:
        dep = world.api.call("GET", f"{path}/deployment").json()
        tg = (dep or {}).get("TaskGroups", {}).get("ml-worker-a", {})
        return dep["JobVersion"] == 1 and tg.get("HealthyAllocs", 0) >= 1

    world.wait_for("a healthy canary", canary_placed, timeout_s=120)
    dep = world.api.check("GET", "/job/{jobName}/deployment", f"{path}/deployment")
    dep_id = dep["ID"]
    world.api.check("GET", "/deployment/{deploymentID}", f"/deployment/{dep_id}")
    world.api.check(
        "GET", "/deployment/allocations/{deploymentID}", f"/deployment/allocations/{dep_id}"
    )
    world.api.check(
        "POST",
        "/deployment/pause/{deploymentID}",
        f"/deployment/pause/{dep_id}",
        body={"DeploymentID": dep_id, "Pause": True},
    )
    world.api.check(
        "POST",
        "/deployment/pause/{deploymentID}",
        f"/deployment/pause/{dep_id}",
        body={"DeploymentID": dep_id, "Pause": False},
    )
    world.api.check(
        "POST",
        "/deployment/promote/{deploymentID}",
        f"/deployment/promote/{dep_id}",
        body={"DeploymentID": dep_id, "All": True},
    )
    world.api.check(
        "POST",
        "/deployment/fail/{deploymentID}",
        f"/deployment/fail/{dep_id}",
        body={"DeploymentID": dep_id},
    )
    assert world.api.call("GET", f"/deployment/{dep_id}").json()["Status"] == "failed"


def test_stop_allocation(world: World) -> None:
    resp = world.api.check(
        "POST", "/allocation/{allocID}/stop", f"/allocation/{world.alloc_id}/stop", body={}
    )
    assert resp["EvalID"]


@pytest.mark.usefixtures("twin_only")
def test_node_writes(world: World) -> None:
    nid = world.node_id
    world.api.check(
        "POST",
        "/node/{nodeId}/drain",
        f"/node/{nid}/drain",
        body={
            "NodeID": nid,
            "DrainSpec": {"Deadline": 60 * NS, "IgnoreSystemJobs": True},
            "Meta": {"reason": "contract"},
        },
    )
    node = world.api.check("GET", "/node/{nodeId}", f"/node/{nid}")
    assert node["DrainStrategy"] is not None
    assert node["LastDrain"]["Meta"] == {"reason": "contract"}
    world.api.check(
        "POST",
        "/node/{nodeId}/drain",
        f"/node/{nid}/drain",
        body={"NodeID": nid, "DrainSpec": None, "MarkEligible": True},
    )
    world.api.check(
        "POST",
        "/node/{nodeId}/eligibility",
        f"/node/{nid}/eligibility",
        body={"NodeID": nid, "Eligibility": "ineligible"},
    )
    world.api.check(
        "POST",
        "/node/{nodeId}/eligibility",
        f"/node/{nid}/eligibility",
        body={"NodeID": nid, "Eligibility": "eligible"},
    )
    md = world.api.check(
        "POST",
        "/client/metadata",
        "/client/metadata",
        params={"node_id": nid},
        body={"NodeID": nid, "Meta": {"nomadscale.contract": "1"}},
    )
    assert md["Meta"]["nomadscale.contract"] == "1"


def test_error_replies_are_plain_text(world: World) -> None:
    resp = world.api.call("GET", "/job/no-such-job-contract", ok=False)
    assert resp.status_code == 404
    assert "not found" in resp.text.lower()
    assert not resp.text.lstrip().startswith("{")
