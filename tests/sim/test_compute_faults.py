"""The twin's Compute Engine endpoint under faults (``nomadscale.sim.faults.ComputeFaults``),
over real HTTP through ``GceMigPool``, and how its resize down picks instances.

Shapes follow the Compute REST v1 reference: ``instanceGroupManagers.get`` carries
``currentActions`` (InstanceGroupManagerActionsSummary) and ``status.isStable``;
``listManagedInstances`` gives each instance a ``currentAction`` and, when its creation
failed, ``lastAttempt.errors.errors[]`` with GCE's code; a MIG retries a failed creation
until it succeeds (ManagedInstance.currentAction ``CREATING``). Waits run on a FakeClock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ExternalPermanentError, ExternalTemporaryError
from nomadscale.integrations.gce import GceMigPool
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.compute import ComputeServer, ComputeSim
from nomadscale.sim.faults import QUOTA, STOCKOUT

MIG_A = "/zones/zone-a/instanceGroupManagers/mig-a"


class Env:
    def __init__(self, cluster: Cluster, sim: ComputeSim, server: ComputeServer,
                 pool: GceMigPool, clock: FakeClock) -> None:  # fmt: skip
        self.cluster, self.sim, self.server, self.pool, self.clock = (
            cluster, sim, server, pool, clock)  # fmt: skip

    def post(self, path: str, **kw: Any) -> requests.Response:
        base = f"{self.server.base_url}/projects/proj"
        return requests.post(base + path, timeout=5, **kw)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.server.base_url}/projects/proj{path}", timeout=5)


@pytest.fixture
def env() -> Iterator[Env]:
    clock = FakeClock(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))
    cluster = Cluster.build(nodes=4, zones=("zone-a", "zone-b"), node_pool="gpu", clock=clock)
    sim = ComputeSim(cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    sim.add_mig(name="mig-b", zone="zone-b", node_pool="gpu")
    with ComputeServer(sim) as server:
        pool = GceMigPool(project="proj", credentials=AnonymousCredentials(),
                          base_url=server.base_url, clock=clock, poll_s=2,
                          operation_timeout_s=60)  # fmt: skip
        yield Env(cluster, sim, server, pool, clock)


def test_429_and_503_answer_with_gce_error_bodies_and_retry_after(env: Env) -> None:
    env.sim.faults.fail(f"^GET .*{MIG_A}$", 429, times=1, retry_after=7,
                        message="Rate Limit Exceeded")  # fmt: skip
    raw = env.get(MIG_A)
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "7"
    assert raw.json()["error"]["message"] == "Rate Limit Exceeded"
    env.sim.faults.fail(f"^GET .*{MIG_A}$", 503, times=2, retry_after=4)
    t0 = env.clock.monotonic()
    assert env.pool.size("mig-a", zone="zone-a") == 2  # retried after each Retry-After
    assert env.clock.monotonic() - t0 == pytest.approx(8.0)
    env.sim.faults.fail(f"^GET .*{MIG_A}$", 503, times=None)
    with pytest.raises(ExternalTemporaryError, match="gce: get zone-a/mig-a: HTTP 503"):
        env.pool.size("mig-a", zone="zone-a")


def test_operations_that_end_in_error_or_never_finish(env: Env) -> None:
    faults = env.sim.faults
    faults.operation(f"^POST .*{MIG_A}/resize$", ends="error", apply=False,
                     code="RESOURCE_NOT_READY", message="The resource is not ready")  # fmt: skip
    with pytest.raises(ExternalPermanentError,
                       match=r"^gce: resize zone-a/mig-a to 3: The resource is not ready$"):  # fmt: skip
        env.pool.resize("mig-a", 3, zone="zone-a")
    assert env.sim.size("zone-a", "mig-a") == 2  # not applied
    faults.operation(f"^POST .*{MIG_A}/resize$", ends="never")
    t0 = env.clock.monotonic()
    with pytest.raises(ExternalTemporaryError, match="not done after 60s"):
        env.pool.resize("mig-a", 3, zone="zone-a")
    assert 60.0 <= env.clock.monotonic() - t0 <= 64.0
    assert env.sim.size("zone-a", "mig-a") == 3  # applied, its operation never DONE
    env.pool.resize("mig-a", 2, zone="zone-a")  # rules used up: DONE again


def test_a_stockout_leaves_instances_creating_with_the_error_until_the_zone_can(
    env: Env,
) -> None:
    """Resize 2 -> 5 in a zone that has room for one more: one instance boots as a Nomad
    node; two stay CREATING without a VM, each with ZONE_RESOURCE_POOL_EXHAUSTED in its last
    attempt; the MIG is not stable. Once the zone has room, the MIG creates them."""
    env.sim.faults.stockout("zone-a", available=1)
    nodes_before = len(env.cluster.nodes)
    env.pool.resize("mig-a", 5, zone="zone-a")  # the operation is DONE: actions scheduled
    assert len(env.cluster.nodes) == nodes_before + 1
    mig = env.get(MIG_A).json()
    assert mig["targetSize"] == 5
    assert mig["currentActions"]["creating"] == 3 and mig["currentActions"]["none"] == 2
    assert mig["status"]["isStable"] is False
    listed = env.post(f"{MIG_A}/listManagedInstances").json()["managedInstances"]
    stuck = [m for m in listed if m.get("lastAttempt")]
    assert len(stuck) == 2
    for m in stuck:
        assert m["currentAction"] == "CREATING" and "instanceStatus" not in m
        (err,) = m["lastAttempt"]["errors"]["errors"]
        assert err["code"] == STOCKOUT and "zones/zone-a" in err["message"]
    env.sim.faults.restock("zone-a")
    env.cluster.advance(env.cluster.boot_s + 1)
    listed = env.post(f"{MIG_A}/listManagedInstances").json()["managedInstances"]
    assert not [m for m in listed if m.get("lastAttempt")]
    env.cluster.advance(env.cluster.boot_s + 1)
    mig = env.get(MIG_A).json()
    assert mig["currentActions"]["none"] == 5 and mig["status"]["isStable"] is True
    assert len(env.cluster.nodes) == nodes_before + 3


def test_a_quota_error_is_reported_with_its_own_code(env: Env) -> None:
    env.sim.faults.stockout("zone-b", code=QUOTA)
    env.pool.resize("mig-b", 3, zone="zone-b")
    listed = env.post("/zones/zone-b/instanceGroupManagers/mig-b/listManagedInstances").json()
    (err,) = [m["lastAttempt"]["errors"]["errors"][0] for m in listed["managedInstances"]
              if m.get("lastAttempt")]  # fmt: skip
    assert err["code"] == QUOTA and "Quota 'NVIDIA_L4_GPUS' exceeded" in err["message"]


def test_a_resize_down_deletes_instances_without_a_vm_then_booting_ones_first(
    env: Env,
) -> None:
    """GCE weighs the status of the VM when it picks what a resize down deletes: an instance
    it could not create, then one still booting, go before running Nomad nodes, whatever
    their creation times say."""
    env.sim.faults.stockout("zone-a", available=1)
    env.pool.resize("mig-a", 4, zone="zone-a")  # 2 running, 1 booting, 1 without a VM
    mig = env.sim.migs[("zone-a", "mig-a")]
    (booting,) = [n for n, nid in mig.instances.items()
                  if env.cluster.nodes[nid].status != "ready"]  # fmt: skip
    for name in mig.instances:  # the running ones look newest: creation time is not enough
        mig.created[name] -= timedelta(hours=1) if name == booting else timedelta(0)
    env.pool.resize("mig-a", 3, zone="zone-a")
    assert mig.stuck == {} and booting in mig.instances
    env.pool.resize("mig-a", 2, zone="zone-a")
    assert booting not in mig.instances
    assert all(env.cluster.nodes[nid].status == "ready" for nid in mig.instances.values())


def test_a_resize_down_among_equal_creation_times_does_not_follow_insertion_order(
    env: Env,
) -> None:
    """The adopted fleet shares one creation time; a node that is not ready yet (booting)
    is added last. The resize down takes it, not the first node inserted (a running one)."""
    env.cluster.add_node(name="gpu-zone-b-late", datacenter="zone-b", node_pool="gpu",
                         status="initializing")  # fmt: skip
    sim = ComputeSim(env.cluster, project="proj")
    mig = sim.add_mig(name="mig-b", zone="zone-b", node_pool="gpu")
    assert len(set(mig.created.values())) == 1 and len(mig.instances) == 3
    first = next(iter(mig.instances))
    sim.resize("zone-b", "mig-b", 2)
    assert "gpu-zone-b-late" not in mig.instances and first in mig.instances
    # two running nodes, one creation time: the tie-break is the name (the highest goes), the
    # same on every run whatever order the instances were inserted in
    sim.resize("zone-b", "mig-b", 1)
    assert list(mig.instances) == ["gpu-zone-b-0001"]
