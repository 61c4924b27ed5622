"""Parameterized sysbatch dispatch (the image prefetch job) runs once on every eligible node."""

from __future__ import annotations

import re

import nomad
import pytest

from tests.sim.helpers import WORKER_IMAGE, hcl


def _register_prefetch(n) -> None:
    job = n.jobs.parse(hcl("image-prefetch.nomad.hcl"))
    job["Namespace"], job["NodePool"] = "default", "gpu"  # the twin fixture's namespace and pool
    n.jobs.register_job({"Job": job})


def test_dispatch_pulls_image_on_each_eligible_node(twin):
    n = twin.nomad()
    _register_prefetch(n)
    nodes = n.nodes.get_nodes()
    n.node.eligible_node(nodes[0]["ID"], ineligible=True)
    reply = n.job.dispatch_job(
        "image-prefetch", meta={"image": WORKER_IMAGE}, id_prefix_template="v2"
    )
    child = reply["DispatchedJobID"]
    assert re.fullmatch(r"image-prefetch/dispatch-v2-\d+-[0-9a-f]{8}", child)
    assert reply["EvalID"] and reply["JobCreateIndex"] > 0
    allocs = n.job.get_allocations(child)
    assert sorted(a["NodeID"] for a in allocs) == sorted(x["ID"] for x in nodes[1:])
    assert all(a["ClientStatus"] == "pending" for a in allocs)
    twin.advance(60)  # 7 GB at 800 Mbit/s = 70 s: still pulling
    assert all(a["ClientStatus"] == "pending" for a in n.job.get_allocations(child))
    twin.advance(30)
    assert all(a["ClientStatus"] == "complete" for a in n.job.get_allocations(child))
    assert n.job.get_job(child)["Status"] == "dead"
    assert n.job.get_job(child)["Meta"] == {"image": WORKER_IMAGE}
    for node in nodes[1:]:
        assert WORKER_IMAGE in twin.cluster.nodes[node["ID"]].images
    assert WORKER_IMAGE not in twin.cluster.nodes[nodes[0]["ID"]].images
    summary = n.job.get_summary("image-prefetch")
    assert summary["Children"] == {"Pending": 0, "Running": 0, "Dead": 1}


def test_cached_image_makes_workers_start_fast(twin):
    n = twin.nomad()
    _register_prefetch(n)
    n.job.dispatch_job("image-prefetch", meta={"image": "registry/web:1"})
    twin.advance(120)
    from tests.sim.helpers import live_allocs, service_job

    n.jobs.register_job({"Job": service_job("web", count=2)})
    twin.advance(5)  # no pull: start_s only
    assert all(a["ClientStatus"] == "running" for a in live_allocs(n, "web"))


@pytest.mark.parametrize(
    ("meta", "text"),
    [
        ({}, "Dispatch did not provide required meta keys: [image]"),
        ({"image": "x", "color": "red"}, "Dispatch includes invalid meta keys: [color]"),
    ],
)
def test_dispatch_meta_rules(twin, meta, text):
    n = twin.nomad()
    _register_prefetch(n)
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.job.dispatch_job("image-prefetch", meta=meta)
    assert (e.value.nomad_resp.status_code, e.value.nomad_resp.text) == (500, text)


def test_dispatch_of_non_parameterized_job_fails(twin):
    from tests.sim.helpers import service_job

    n = twin.nomad()
    n.jobs.register_job({"Job": service_job("web", count=1)})
    with pytest.raises(nomad.api.exceptions.BaseNomadException) as e:
        n.job.dispatch_job("web")
    assert e.value.nomad_resp.text == 'Specified job "web" is not a parameterized job'


def test_idempotency_token_is_a_query_param(twin):
    n = twin.nomad()
    _register_prefetch(n)
    first = n.job.request(
        "image-prefetch",
        "dispatch",
        method="post",
        params={"idempotency_token": "t1"},
        json={"Meta": {"image": "x"}},
    )
    again = n.job.request(
        "image-prefetch",
        "dispatch",
        method="post",
        params={"idempotency_token": "t1"},
        json={"Meta": {"image": "x"}},
    )
    assert first.json()["DispatchedJobID"] == again.json()["DispatchedJobID"]


def test_slow_pull_hits_docker_image_pull_timeout(twin_factory):
    t = twin_factory(nodes=2, image_pull_mbps=100)  # 7 GB at 100 Mbit/s = 560 s > 5m
    n = t.nomad()
    from tests.sim.helpers import service_job

    n.jobs.register_job({"Job": service_job("web", count=1)})
    _register_prefetch(n)  # its task sets image_pull_timeout = "30m"
    child = n.job.dispatch_job("image-prefetch", meta={"image": "big:1"})["DispatchedJobID"]
    t.advance(301)
    web = n.job.get_allocations("web")
    assert [a["ClientStatus"] for a in web] == ["failed"]
    events = [e["Type"] for e in web[0]["TaskStates"]["server"]["Events"]]
    assert "Driver Failure" in events
    assert {a["ClientStatus"] for a in n.job.get_allocations(child)} == {"pending"}
    t.advance(300)
    assert {a["ClientStatus"] for a in n.job.get_allocations(child)} == {"complete"}


def test_escaped_child_ids_reach_the_same_job(twin):
    """Go's client (and the adapter) escape a dispatched child ID as one path segment."""
    import requests

    n = twin.nomad()
    _register_prefetch(n)
    child = n.job.dispatch_job("image-prefetch", meta={"image": "x"})["DispatchedJobID"]
    escaped = child.replace("/", "%2F")
    base = f"{twin.address}/v1/job/{escaped}"
    assert requests.get(base, timeout=5).json()["ID"] == child
    assert requests.get(f"{base}/summary", timeout=5).json()["JobID"] == child
    allocs = requests.get(f"{base}/allocations", timeout=5).json()
    assert len(allocs) == len(twin.cluster.nodes)
    assert requests.delete(f"{base}?purge=true", timeout=5).ok
    assert requests.get(base, timeout=5).status_code == 404
    # any other escaped slash is one segment too, not a different route
    assert requests.get(f"{twin.address}/v1/job/a%2Fb/summary", timeout=5).status_code == 404


def test_pull_fails_on_one_node(twin):
    n = twin.nomad()
    _register_prefetch(n)
    nodes = sorted(twin.cluster.nodes)
    bad = nodes[0]
    twin.cluster.faults.pull_fails(bad, image_substring="worker:2026.02")
    child = n.job.dispatch_job("image-prefetch", meta={"image": "acme/worker:2026.02.1"})[
        "DispatchedJobID"
    ]
    twin.advance(120)
    by_node = {a["NodeID"]: a for a in n.job.get_allocations(child)}
    assert by_node[bad]["ClientStatus"] == "failed"
    events = by_node[bad]["TaskStates"]["pull"]["Events"]
    failure = [e for e in events if e["Type"] == "Driver Failure"]
    assert failure and "Failed to pull `acme/worker:2026.02.1`" in failure[0]["DisplayMessage"]
    assert all(by_node[x]["ClientStatus"] == "complete" for x in nodes[1:])
    assert "acme/worker:2026.02.1" not in twin.cluster.nodes[bad].images
    # another image pulls fine on the same node
    other = n.job.dispatch_job("image-prefetch", meta={"image": "acme/other:1"})["DispatchedJobID"]
    twin.advance(120)
    assert {a["ClientStatus"] for a in n.job.get_allocations(other)} == {"complete"}


def test_pull_fails_a_limited_number_of_times_on_any_node(twin):
    from tests.sim.helpers import live_allocs, service_job

    n = twin.nomad()
    twin.cluster.faults.pull_fails(times=1)
    n.jobs.register_job({"Job": service_job("web", count=2)})
    twin.advance(200)
    allocs = n.job.get_allocations("web")
    assert sorted(a["ClientStatus"] for a in allocs).count("failed") == 1
    assert sum(a["ClientStatus"] == "running" for a in live_allocs(n, "web")) >= 1
