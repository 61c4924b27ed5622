"""``NomadClient.serving_counts`` against the twin over real HTTP: workers serving now, which
the scale status' ``Healthy`` is not once a count change makes Nomad clear and re-watch the
health of every allocation it updates in place; plus the per-allocation rule on Nomad's JSON."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from nomadscale.core.errors import ConflictError
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.nomad_serving import min_healthy_s, serving
from tests.harness.twin import Twin
from tests.sim.helpers import service_job

S = 1_000_000_000
UPDATE = {"MaxParallel": 1, "MinHealthyTime": 30 * S, "HealthyDeadline": 120 * S,
          "ProgressDeadline": 600 * S}  # fmt: skip


@pytest.fixture
def client(twin: Twin) -> Iterator[NomadClient]:
    c = NomadClient(address=twin.address, clock=twin.clock, timeout=5.0)
    yield c
    c.close()


def _running(twin: Twin, client: NomadClient, count: int, **kw: Any) -> None:
    client.register_job(service_job("web", count=count, update=UPDATE, **kw))
    twin.advance(300)
    assert client.job_status("web").groups["web"].healthy == count


def test_count_change_keeps_the_workers_kept_serving(twin: Twin, client: NomadClient) -> None:
    _running(twin, client, 3)
    client.scale("web", "web", 2, message="test")
    status = client.job_status("web")
    assert status.active_deployment is not None
    assert status.groups["web"].healthy == 0  # Nomad re-watches them ...
    assert client.serving_counts("web") == {"web": 2}  # ... and they serve meanwhile
    with pytest.raises(ConflictError, match="active deployment"):
        client.scale("web", "web", 3, message="test")
    twin.advance(31)
    assert client.job_status("web").groups["web"].healthy == 2
    assert client.serving_counts("web") == {"web": 2}


def test_a_fresh_placement_serves_once_healthy(twin: Twin, client: NomadClient) -> None:
    _running(twin, client, 2)
    client.scale("web", "web", 3, message="test")
    assert client.serving_counts("web") == {"web": 2}
    twin.advance(31)  # the kept ones are healthy again; the new one still pulls its image
    assert client.job_status("web").groups["web"].placed == 3
    assert client.serving_counts("web") == {"web": 2}
    for _ in range(4):
        twin.advance(60)
    assert client.serving_counts("web") == {"web": 3}


def test_unpromoted_canaries_and_unhealthy_workers_do_not_serve(
    twin: Twin, client: NomadClient
) -> None:
    _running(twin, client, 2)
    spec = service_job("web", count=2, image="registry/web:2", update={**UPDATE, "Canary": 1})
    client.register_job(spec)
    for _ in range(4):
        twin.advance(60)
    dep = client.latest_deployment("web")
    assert dep is not None and dep.groups["web"].healthy_allocs == 1  # the canary
    assert client.serving_counts("web") == {"web": 2}  # the two old ones, not the canary
    client.fail_deployment(dep.id)
    twin.advance(5)
    _running(twin, client, 2)  # v2 = the old image again: a clean deployment
    twin.cluster.faults.unhealthy_image("registry/web:1")  # checks fail from now on
    client.scale("web", "web", 1, message="test")
    assert client.serving_counts("web") == {"web": 1}  # re-watched: still serving ...
    twin.advance(121)
    assert client.serving_counts("web") == {"web": 0}  # ... until marked unhealthy


def _alloc(**over: Any) -> dict[str, Any]:
    a: dict[str, Any] = {
        "DesiredStatus": "run",
        "ClientStatus": "running",
        "CreateIndex": 10,
        "DeploymentStatus": {"Healthy": None, "Canary": False, "ModifyIndex": 12},
        "TaskStates": {
            "init": {"State": "dead", "Failed": False, "StartedAt": "2026-01-05T00:00:00Z"},
            "worker": {"State": "running", "StartedAt": "2026-01-05T00:00:01.123456789Z"},
        },
    }
    a.update(over)
    return a


def test_the_rule_on_nomads_json() -> None:
    now = datetime(2026, 1, 5, 0, 1, tzinfo=UTC)  # the worker task started 59 s ago

    def judge(a: dict[str, Any], dep_index: int | None = 20, min_s: float = 30.0) -> bool:
        return serving(a, now=now, min_healthy_s=min_s, deployment_index=dep_index)

    assert judge(_alloc())  # existed before the deployment, running 59 s: re-watched
    assert not judge(_alloc(), min_s=60.0)  # started less than min_healthy_time ago
    assert not judge(_alloc(CreateIndex=20))  # placed by the deployment: not healthy yet
    assert not judge(_alloc(), dep_index=None)  # no deployment: a fresh placement
    assert not judge(_alloc(DesiredStatus="stop"))
    assert not judge(_alloc(ClientStatus="pending"))
    assert judge(_alloc(DeploymentStatus={"Healthy": True}, CreateIndex=30))
    assert not judge(_alloc(DeploymentStatus={"Healthy": False}))
    assert not judge(_alloc(DeploymentStatus={"Healthy": True, "Canary": True}))
    failed = _alloc()
    failed["TaskStates"]["init"]["Failed"] = True
    assert not judge(failed)
    assert min_healthy_s({"Update": {"MaxParallel": 1, "MinHealthyTime": 30 * S}}) == 30.0
    assert min_healthy_s({"Update": {"MaxParallel": 0}, "Migrate": {"MinHealthyTime": 5 * S}}) == 5
    assert min_healthy_s({}) == 10.0
