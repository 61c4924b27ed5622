"""Nodes over HTTP: filters, drains (migration, deadline, LastDrain), eligibility, dynamic
metadata, lost nodes and queued allocations placed when capacity appears."""

from __future__ import annotations

import nomad
import pytest
import requests

from tests.sim.helpers import live_allocs, service_job

HOUR_NS = 3600 * 1_000_000_000


def test_build_spreads_nodes_over_zones(twin):
    n = twin.nomad()
    nodes = n.nodes.get_nodes()
    assert len(nodes) == 6
    assert sorted(x["Datacenter"] for x in nodes) == ["zone-a"] * 3 + ["zone-b"] * 3
    assert {x["NodePool"] for x in nodes} == {"gpu"}
    assert {x["NodeClass"] for x in nodes} == {"gpu-l4"}
    assert all("Meta" not in x for x in nodes)  # stubs carry no Meta
    full = n.node.get_node(nodes[0]["ID"])
    assert full["Meta"] == {"zone": full["Datacenter"], "gpu": "l4"}
    assert full["Drain"] is False and full["DrainStrategy"] is None


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('Datacenter == "zone-a"', 3),
        ('Meta.zone == "zone-b"', 3),
        ('Meta["gpu"] == "l4" and Datacenter != "zone-a"', 3),
        ('NodePool == "gpu" or Status == "down"', 6),
        ('SchedulingEligibility == "ineligible"', 1),
        ('"zone-a" in Datacenter', 3),
        ('"zone-c" not in Datacenter', 6),
        ('"zone" in Meta', 6),
        ('Name contains "zone-a"', 3),
        ('not (Status == "ready")', 0),
    ],
)
def test_node_filters(twin, expr, expected):
    n = twin.nomad()
    first = n.nodes.get_nodes()[0]["ID"]
    n.node.eligible_node(first, ineligible=True)
    assert len(n.nodes.get_nodes(filter_=expr)) == expected


def test_bad_filter_is_400(twin):
    r = requests.get(f"{twin.address}/v1/nodes", params={"filter": "Datacenter =="}, timeout=5)
    assert r.status_code == 400 and r.text.startswith("failed to parse filter")


def _no_migration(job):
    """migrate.max_parallel 0: the drainer never marks an allocation of the group (count -
    max_parallel = count healthy must stay), so only the deadline moves them."""
    job["TaskGroups"][0]["Migrate"] = {"MaxParallel": 0}
    return job


def test_drain_stops_and_replaces_then_completes(twin):
    """Nomad's drainer marks the allocation (DesiredTransition.Migrate); the scheduler stops
    it and places its replacement in the same plan (scheduler/reconcile.go
    computeMigrations): no make-before-break. The node, left with nothing, is done."""
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2, gpu=True)})
    twin.advance(200)
    victim = live_allocs(n, "web")[0]
    node_id = victim["NodeID"]
    r = n.node.request(
        node_id,
        "drain",
        method="post",
        json={
            "DrainSpec": {"Deadline": HOUR_NS, "IgnoreSystemJobs": True},
            "Meta": {"reason": "gce-maintenance"},
        },
    )
    assert r.status_code == 200 and r.json()["EvalIDs"]
    stopped = n.allocation.get_allocation(victim["ID"])
    assert (stopped["DesiredStatus"], stopped["DesiredDescription"]) == (
        "stop",
        "alloc is being migrated",
    )
    assert stopped["DesiredTransition"]["Migrate"] is True
    allocs = live_allocs(n, "web")
    assert len(allocs) == 2
    replacement = next(a for a in allocs if a["ClientStatus"] == "pending")
    assert replacement["NodeID"] != node_id
    assert n.allocation.get_allocation(replacement["ID"])["PreviousAllocation"] == victim["ID"]
    assert stopped["ClientStatus"] == "running"  # killed within its kill_timeout (5 s)
    assert n.node.get_node(node_id)["Drain"] is True
    twin.advance(5)  # it exited: the drain is done (drainer/draining_node.go IsDone)
    node = n.node.get_node(node_id)
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"
    assert node["LastDrain"]["Meta"] == {"reason": "gce-maintenance"}
    assert node["SchedulingEligibility"] == "ineligible"
    phases = [e["phase"] for e in twin.cluster.events if e["type"] == "drain"]
    assert phases == ["start", "complete"]
    twin.advance(200)
    assert {a["ClientStatus"] for a in live_allocs(n, "web")} == {"running"}


def test_drain_deadline_force_stops_when_nothing_fits(twin_factory):
    t = twin_factory(nodes=2)
    n = t.nomad()
    n.jobs.register_job({"Job": _no_migration(service_job("web", count=2, gpu=True))})
    t.advance(200)
    node_id = live_allocs(n, "web")[0]["NodeID"]
    n.node.drain_node_with_spec(node_id, {"Deadline": 600 * 1_000_000_000})
    node = n.node.get_node(node_id)
    assert node["SchedulingEligibility"] == "ineligible" and node["Drain"] is True
    assert node["LastDrain"]["Status"] == "draining"
    t.advance(300)
    assert len(live_allocs(n, "web")) == 2  # not migrated: keeps running
    assert n.node.get_node(node_id)["Drain"] is True
    t.advance(301)
    node = n.node.get_node(node_id)
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"
    assert len(live_allocs(n, "web")) == 1
    summary = n.jobs.get_jobs()[0]["JobSummary"]["Summary"]["web"]
    assert summary["Queued"] == 1
    phases = [e["phase"] for e in t.cluster.events if e["type"] == "drain"]
    assert phases == ["start", "deadline", "complete"]
    new_id = t.cluster.add_node(
        name="gpu-new", datacenter="zone-a", node_pool="gpu", meta={"zone": "zone-a", "gpu": "l4"}
    )
    assert any(a["NodeID"] == new_id for a in live_allocs(n, "web"))


def test_cancel_drain_and_eligibility_rules(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": _no_migration(service_job("web", count=6))})  # every GPU busy
    twin.advance(200)
    node_id = n.nodes.get_nodes()[0]["ID"]
    n.node.drain_node_with_spec(node_id, {"Deadline": HOUR_NS})
    assert n.node.get_node(node_id)["Drain"] is True
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.node.eligible_node(node_id, eligible=True)
    assert e.value.nomad_resp.text == (
        "can not set node's scheduling eligibility to eligible while it is draining"
    )
    n.node.drain_node_with_spec(node_id, None, mark_eligible=True)
    node = n.node.get_node(node_id)
    assert node["SchedulingEligibility"] == "eligible"
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "canceled"
    r = requests.post(
        f"{twin.address}/v1/node/{node_id}/eligibility", json={"Eligibility": "maybe"}, timeout=5
    )
    assert (r.status_code, r.text) == (500, 'invalid scheduling eligibility "maybe"')
    unknown = "00000000-0000-4000-8000-000000000000"
    r = requests.post(
        f"{twin.address}/v1/node/{unknown}/drain", json={"DrainSpec": None}, timeout=5
    )
    assert (r.status_code, r.text) == (500, "node not found")
    r = requests.get(f"{twin.address}/v1/node/{unknown}", timeout=5)
    assert (r.status_code, r.text) == (404, "node not found")
    bad = (500, "node lookup failed: index error: UUID must be 36 characters")
    r = requests.post(f"{twin.address}/v1/node/nope/drain", json={"DrainSpec": None}, timeout=5)
    assert (r.status_code, r.text) == bad  # state store NodeByID: go-memdb's UUID index
    r = requests.get(f"{twin.address}/v1/node/nope", timeout=5)
    assert (r.status_code, r.text) == bad


def test_empty_node_drain_completes_at_once(twin):
    n = twin.nomad()
    node_id = n.nodes.get_nodes()[0]["ID"]
    n.node.drain_node_with_spec(node_id, {"Deadline": HOUR_NS})
    node = n.node.get_node(node_id)
    assert node["Drain"] is False and node["LastDrain"]["Status"] == "complete"


def test_lost_node_reschedules_allocs(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=2)})
    twin.advance(200)
    lost = live_allocs(n, "web")[0]
    twin.cluster.lose_node(lost["NodeID"])
    assert n.allocation.get_allocation(lost["ID"])["ClientStatus"] == "lost"
    allocs = live_allocs(n, "web")
    assert len(allocs) == 2 and lost["NodeID"] not in {a["NodeID"] for a in allocs}
    evals = [e["TriggeredBy"] for e in n.job.get_evaluations("web")]
    assert "node-update" in evals
    assert n.node.get_node(lost["NodeID"])["Status"] == "down"


def test_queued_allocs_placed_when_a_node_boots(twin):
    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=8)})  # 6 GPUs only
    assert len(live_allocs(n, "web")) == 6
    blocked = [e for e in n.job.get_evaluations("web") if e["Status"] == "blocked"]
    assert len(blocked) == 1
    first = next(e for e in n.job.get_evaluations("web") if e["TriggeredBy"] == "job-register")
    assert first["FailedTGAllocs"]["web"]["CoalescedFailures"] == 1
    for i in range(2):
        twin.cluster.add_node(
            name=f"late-{i}", datacenter="zone-b", node_pool="gpu", status="initializing"
        )
    twin.advance(twin.cluster.boot_s + 1)
    assert len(live_allocs(n, "web")) == 8


def test_client_metadata_roundtrip(twin):
    base = twin.address
    node_id = twin.nomad().nodes.get_nodes()[0]["ID"]
    r = requests.get(f"{base}/v1/client/metadata", timeout=5)
    assert (r.status_code, r.text) == (400, "No local Node and node_id not provided")
    r = requests.post(
        f"{base}/v1/client/metadata",
        json={"NodeID": node_id, "Meta": {"gpu.health": "degraded", "zone": None}},
        timeout=5,
    )
    assert r.status_code == 200 and "X-Nomad-Index" not in r.headers
    body = r.json()
    assert body["Meta"]["gpu.health"] == "degraded" and "zone" not in body["Meta"]
    assert body["Dynamic"] == {"gpu.health": "degraded", "zone": None}
    assert body["Static"]["zone"]
    node = requests.get(f"{base}/v1/node/{node_id}", timeout=5).json()
    assert node["Meta"]["gpu.health"] == "degraded"
    r = requests.put(f"{base}/v1/client/metadata", json={"NodeID": node_id}, timeout=5)
    assert r.status_code == 405
