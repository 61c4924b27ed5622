"""NomadClient deployments, HCL parsing and dispatch against the twin over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ConflictError, ExternalPermanentError, NotFoundError
from nomadscale.integrations.nomad import NomadClient
from tests.contract.env import Target, prefetch_job, service_job, settle, twin_target, unique

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture
def target() -> Iterator[Target]:
    with twin_target(nodes=6) as t:
        yield t


@pytest.fixture
def client(target: Target) -> Iterator[NomadClient]:
    c = NomadClient(address=target.address, clock=FakeClock(), timeout=5.0)
    yield c
    c.close()


def _canary_rollout(client: NomadClient, target: Target) -> tuple[str, str]:
    """Register v0 (settled), then v1 with a new image and 1 canary: returns (job, deployment)."""
    jid = unique("ml-canary")
    client.register_job(service_job(jid, groups=("ml-worker-a",), count=2, canary=1))
    settle(client, target, jid)
    client.register_job(
        service_job(jid, groups=("ml-worker-a",), count=2, canary=1, image="busybox:1.37")
    )
    target.advance(120)
    dep = client.latest_deployment(jid)
    assert dep is not None
    assert dep.job_version == 1
    return jid, dep.id


def test_parse_hcl_of_the_shipped_jobs(client: NomadClient) -> None:
    for name, kind in (
        ("ml-worker.nomad.hcl", "service"),
        ("image-prefetch.nomad.hcl", "sysbatch"),
    ):
        path = JOBS / name
        if not path.exists():
            pytest.skip(f"{path} not written yet")
        job = client.parse_hcl(path.read_text())
        assert job["Type"] == kind
        assert job["TaskGroups"]


def test_parse_bad_hcl_is_a_permanent_error(client: NomadClient) -> None:
    with pytest.raises(ExternalPermanentError) as err:
        client.parse_hcl('job "x" {')
    assert err.value.status == 400


def test_job_evaluations_report_a_placement_that_is_blocked(
    client: NomadClient, target: Target
) -> None:
    jid = unique("ml-blocked")
    job = service_job(jid, groups=("ml-worker-a",), datacenters=("zone-a",), count=4)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"] = [{"Name": "nvidia/gpu", "Count": 1}]
    client.register_job(job)  # zone a has 3 one-GPU nodes: one allocation can't be placed
    evals = client.job_evaluations(jid)
    assert [e.create_index for e in evals] == sorted(e.create_index for e in evals)
    # the evaluation that tried, and the blocked one it created: Nomad copies the placement
    # failures onto it (generic_sched.go createBlockedEval, Evaluation.CreateBlockedEval)
    tried, blocked = [e for e in evals if "ml-worker-a" in e.failed]
    assert tried.triggered_by == "job-register"
    assert tried.failed["ml-worker-a"].unplaced == 1
    assert "not placed" in tried.failed["ml-worker-a"].explain()
    assert (blocked.id, blocked.status) == (tried.blocked_eval, "blocked")
    assert blocked.triggered_by == "queued-allocs"
    assert blocked.failed == tried.failed
    assert all(e.job_modify_index == client.get_job(jid).job_modify_index for e in evals)


def test_no_deployment_yet_is_none(client: NomadClient) -> None:
    jid = unique("batch")
    client.register_job(prefetch_job(jid))
    assert client.latest_deployment(jid) is None


def test_canary_deployment_needs_promotion_then_promote(
    client: NomadClient, target: Target
) -> None:
    jid, dep_id = _canary_rollout(client, target)
    dep = client.deployment(dep_id)
    assert dep.active
    assert dep.needs_promotion
    assert dep.groups["ml-worker-a"].desired_canaries == 1
    assert len(dep.groups["ml-worker-a"].placed_canaries) == 1
    assert client.job_status(jid).active_deployment == dep_id
    assert client.promote(dep_id)
    target.advance(300)
    done = client.deployment(dep_id)
    assert done.status == "successful"
    assert not done.active
    assert client.job_status(jid).active_deployment is None


def test_scale_during_active_deployment_is_a_conflict(client: NomadClient, target: Target) -> None:
    jid, _ = _canary_rollout(client, target)
    with pytest.raises(ConflictError) as err:
        client.scale(jid, "ml-worker-a", 5, message="up")
    assert "active deployment" in str(err.value)


def test_pause_resume_and_fail(client: NomadClient, target: Target) -> None:
    _, dep_id = _canary_rollout(client, target)
    client.pause_deployment(dep_id)
    assert client.deployment(dep_id).status == "paused"
    client.pause_deployment(dep_id, pause=False)
    assert client.deployment(dep_id).status == "running"
    client.fail_deployment(dep_id)
    failed = client.deployment(dep_id)
    assert failed.status == "failed"
    with pytest.raises(ConflictError) as err:
        client.promote(dep_id)  # Nomad answers 500 "can't promote terminal deployment"
    assert "terminal" in str(err.value)


def test_unknown_deployment_is_not_found(client: NomadClient) -> None:
    with pytest.raises(NotFoundError):
        client.deployment("00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFoundError):  # 500 "deployment not found" on writes
        client.fail_deployment("00000000-0000-0000-0000-000000000000")


def test_watch_returns_at_once_when_index_is_old(client: NomadClient, target: Target) -> None:
    _, dep_id = _canary_rollout(client, target)
    dep, index = client.watch_deployment(dep_id, index=0, wait_s=5)
    assert dep.id == dep_id
    assert index >= dep.modify_index > 0


def test_watch_blocks_until_the_deployment_changes(client: NomadClient, target: Target) -> None:
    _, dep_id = _canary_rollout(client, target)
    _, index = client.watch_deployment(dep_id, index=0, wait_s=1)

    def pause_later() -> None:
        time.sleep(0.3)
        other = NomadClient(address=target.address, clock=FakeClock())
        other.pause_deployment(dep_id)
        other.close()

    t = threading.Thread(target=pause_later)
    started = time.monotonic()
    t.start()
    dep, new_index = client.watch_deployment(dep_id, index=index, wait_s=10)
    t.join()
    assert dep.status == "paused"
    assert new_index > index
    assert 0.2 < time.monotonic() - started < 5


def test_watch_times_out_with_the_same_index(client: NomadClient, target: Target) -> None:
    _, dep_id = _canary_rollout(client, target)
    _, index = client.watch_deployment(dep_id, index=0, wait_s=1)
    started = time.monotonic()
    dep, same = client.watch_deployment(dep_id, index=index, wait_s=0.5)
    assert dep.id == dep_id
    assert same == index
    assert time.monotonic() - started >= 0.4


def test_dispatch_with_idempotency_token_runs_once_per_node(
    client: NomadClient, target: Target
) -> None:
    parent = unique("image-prefetch")
    client.register_job(prefetch_job(parent))
    child = client.dispatch(
        parent, meta={"image": "ml:2"}, payload=b"hello", idempotency_token="tok-1"
    )
    assert child.startswith(f"{parent}/dispatch-")
    again = client.dispatch(
        parent, meta={"image": "ml:2"}, payload=b"hello", idempotency_token="tok-1"
    )
    assert again == child  # the token reached Nomad (query string), so no second child
    target.advance(60)
    allocs = client.job_allocations(child)
    assert len({a.node_id for a in allocs}) == 6
    assert all(a.client_status == "complete" for a in allocs)
    assert client.get_job(child).type == "sysbatch"


def test_dispatch_without_required_meta_is_permanent(client: NomadClient) -> None:
    parent = unique("image-prefetch")
    client.register_job(prefetch_job(parent))
    with pytest.raises(ExternalPermanentError) as err:
        client.dispatch(parent, meta={})
    assert not isinstance(err.value, NotFoundError)


def test_dispatch_of_a_service_job_is_permanent(client: NomadClient) -> None:
    jid = unique("svc")
    client.register_job(service_job(jid))
    with pytest.raises(ExternalPermanentError):
        client.dispatch(jid, meta={"image": "x"})
