"""NomadClient against the Nomad twin over real HTTP: jobs, scaling, nodes, allocations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ConflictError, ExternalPermanentError, NotFoundError
from nomadscale.core.ports import NodeInfo, NomadPort
from nomadscale.integrations.nomad import NomadClient
from tests.contract.env import Target, service_job, settle, twin_target, unique


@pytest.fixture
def target() -> Iterator[Target]:
    with twin_target(nodes=6) as t:
        yield t


@pytest.fixture
def client(target: Target) -> Iterator[NomadClient]:
    c = NomadClient(address=target.address, clock=FakeClock(), timeout=5.0)
    yield c
    c.close()


@pytest.fixture
def job_id(client: NomadClient, target: Target) -> str:
    jid = unique("ml-worker")
    client.register_job(service_job(jid, count=2))
    settle(client, target, jid)
    return jid


def test_client_satisfies_the_port(client: NomadClient) -> None:
    port: NomadPort = client
    assert port is client


def test_leader_is_an_address(client: NomadClient) -> None:
    assert ":" in client.leader()


def test_get_job_reads_group_counts_and_spec(client: NomadClient, job_id: str) -> None:
    job = client.get_job(job_id)
    assert job.job_id == job_id
    assert job.type == "service"
    assert job.groups == {"ml-worker-a": 2, "ml-worker-b": 2}
    assert job.spec["ID"] == job_id
    assert job.job_modify_index > 0


def test_missing_job_is_not_found(client: NomadClient) -> None:
    with pytest.raises(NotFoundError) as err:
        client.get_job("no-such-job")
    assert err.value.status == 404
    assert "\n" not in str(err.value)


def test_scale_sets_count_and_records_event_with_meta(
    client: NomadClient, job_id: str, target: Target
) -> None:
    eval_id = client.scale(
        job_id, "ml-worker-a", 3, message="predictive: 3 for 412 rpm", meta={"forecast": 412.5}
    )
    assert eval_id
    target.advance(30)
    status = client.job_status(job_id)
    assert status.groups["ml-worker-a"].desired == 3
    assert status.groups["ml-worker-b"].desired == 2
    last = client.last_scale_events(job_id)
    event = last["ml-worker-a"]
    assert event is not None
    assert event.count == 3
    assert event.previous_count == 2
    assert event.message == "predictive: 3 for 412 rpm"
    assert event.meta == {"forecast": 412.5}
    assert not event.error
    assert client.get_job(job_id).groups["ml-worker-a"] == 3


def test_scale_unknown_group_is_a_permanent_error(client: NomadClient, job_id: str) -> None:
    with pytest.raises(ExternalPermanentError) as err:
        client.scale(job_id, "nope", 1, message="x")
    assert err.value.status == 400
    assert "nope" in str(err.value)


def test_job_versions_newest_first(client: NomadClient, job_id: str, target: Target) -> None:
    client.scale(job_id, "ml-worker-b", 1, message="down")
    target.advance(30)
    versions = client.job_versions(job_id)
    assert [v.version for v in versions] == sorted((v.version for v in versions), reverse=True)
    assert versions[0].groups["ml-worker-b"] == 1
    assert versions[-1].groups["ml-worker-b"] == 2


def test_register_with_stale_enforce_index_conflicts(client: NomadClient, job_id: str) -> None:
    job = client.get_job(job_id)
    changed = {**job.spec, "Meta": {"owner": "someone-else"}}
    client.register_job(changed, enforce_index=job.job_modify_index)  # current: accepted
    with pytest.raises(ConflictError):
        client.register_job(job.spec, enforce_index=job.job_modify_index)  # now stale


def test_list_nodes_by_pool_and_zone(client: NomadClient, target: Target) -> None:
    every = client.list_nodes()
    gpu = client.list_nodes(node_pool="gpu")
    zone_a = client.list_nodes(node_pool="gpu", datacenter="zone-a")
    assert len(every) == len(gpu) == 6
    assert len(zone_a) == 3
    assert all(n.datacenter == "zone-a" and n.node_pool == "gpu" for n in zone_a)
    assert client.list_nodes(node_pool="cpu") == []
    assert all(n.status == "ready" and n.eligibility == "eligible" for n in every)


def test_list_nodes_with_alloc_counts_match_node_allocations(
    client: NomadClient, job_id: str
) -> None:
    nodes = client.list_nodes(node_pool="gpu", with_allocs=True)
    assert sum(n.allocs_running for n in nodes) == 4
    for n in nodes:
        live = [a for a in client.node_allocations(n.id) if not a.terminal]
        assert n.allocs_running == len(live)
        assert all(a.job_id == job_id for a in live)


def test_node_details_carry_meta(client: NomadClient) -> None:
    stub = client.list_nodes(datacenter="zone-b")[0]
    assert stub.meta == {}  # /v1/nodes stubs have no Meta
    full = client.node(stub.id)
    assert full.meta["zone"] == "zone-b"
    assert full.name == stub.name


def test_missing_node_is_not_found(client: NomadClient) -> None:
    with pytest.raises(NotFoundError):
        client.node("00000000-0000-0000-0000-000000000000")


def _busy_node(client: NomadClient) -> NodeInfo:
    return max(client.list_nodes(with_allocs=True), key=lambda n: n.allocs_running)


@pytest.fixture
def pinned_job_id(client: NomadClient, target: Target) -> str:
    """A job whose allocations a drain does not migrate before its deadline (migrate
    max_parallel 0: Nomad's drainer keeps count - 0 healthy, nomad/drainer/watch_jobs.go
    handleTaskGroup), so a drain of one of its nodes stays in progress."""
    jid = unique("ml-worker")
    job = service_job(jid, count=2)
    for tg in job["TaskGroups"]:
        tg["Migrate"] = {"MaxParallel": 0}
    client.register_job(job)
    settle(client, target, jid)
    return jid


def test_drain_with_meta_then_cancel(
    client: NomadClient, target: Target, pinned_job_id: str
) -> None:
    node = _busy_node(client)
    client.drain(node.id, deadline_s=600, meta={"reason": "gce-maintenance"})
    drained = client.node(node.id)
    assert drained.draining
    assert drained.eligibility == "ineligible"
    assert target.cluster is not None
    last = target.cluster.node(node.id).last_drain
    assert last["Meta"] == {"reason": "gce-maintenance"}
    client.cancel_drain(node.id, mark_eligible=True)
    back = client.node(node.id)
    assert not back.draining
    assert back.eligibility == "eligible"


def test_drain_unknown_node_is_not_found_not_retried(client: NomadClient) -> None:
    with pytest.raises(NotFoundError):
        client.drain("00000000-0000-0000-0000-000000000000", deadline_s=60)


def test_set_eligibility_both_ways(client: NomadClient) -> None:
    node = client.list_nodes()[1]
    client.set_eligibility(node.id, False)
    assert client.node(node.id).eligibility == "ineligible"
    client.set_eligibility(node.id, True)
    assert client.node(node.id).eligibility == "eligible"


def test_eligible_while_draining_is_a_conflict(client: NomadClient, pinned_job_id: str) -> None:
    node = _busy_node(client)
    client.drain(node.id, deadline_s=60)
    with pytest.raises(ConflictError):
        client.set_eligibility(node.id, True)


def test_dynamic_node_metadata_set_read_and_unset(client: NomadClient) -> None:
    node = client.list_nodes()[3]
    md = client.set_node_metadata(node.id, {"gpu.health": "degraded"})
    assert md.meta["gpu.health"] == "degraded"
    assert md.dynamic["gpu.health"] == "degraded"
    assert md.static["zone"] in ("zone-a", "zone-b")
    assert client.node_metadata(node.id).meta["gpu.health"] == "degraded"
    cleared = client.set_node_metadata(node.id, {"gpu.health": None})
    assert "gpu.health" not in cleared.meta


def test_allocation_read_and_stop(client: NomadClient, job_id: str, target: Target) -> None:
    allocs = [a for a in client.job_allocations(job_id) if not a.terminal]
    assert len(allocs) == 4
    one = client.allocation(allocs[0].id)
    assert one.id == allocs[0].id
    assert one.job_id == job_id
    assert one.client_status == "running"
    assert one.task_states.get("worker") == "running"
    assert client.stop_allocation(one.id)
    target.advance(5)
    assert client.allocation(one.id).desired_status == "stop"


def test_missing_allocation_is_not_found(client: NomadClient) -> None:
    with pytest.raises(NotFoundError):
        client.allocation("00000000-0000-0000-0000-000000000000")
