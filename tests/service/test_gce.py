"""GceMigPool against the twin's Compute endpoint (real HTTP on loopback)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.auth.credentials import AnonymousCredentials

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ExternalPermanentError, NotFoundError
from nomadscale.integrations.gce import GceMigPool
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.compute import ComputeServer, ComputeSim


@pytest.fixture
def env() -> Iterator[tuple[Cluster, ComputeSim, GceMigPool]]:
    clock = FakeClock()
    cluster = Cluster.build(nodes=4, zones=("zone-a", "zone-b"), node_pool="gpu", clock=clock)
    sim = ComputeSim(cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    sim.add_mig(name="mig-b", zone="zone-b", node_pool="gpu")
    with ComputeServer(sim) as server:
        pool = GceMigPool(
            project="proj", credentials=AnonymousCredentials(), base_url=server.base_url,
            clock=clock,
        )  # fmt: skip
        yield cluster, sim, pool


def _live(cluster: Cluster, zone: str) -> dict[str, str]:
    return {n.name: n.status for n in cluster.nodes.values() if n.datacenter == zone}


def test_size_and_list_adopt_the_existing_fleet(
    env: tuple[Cluster, ComputeSim, GceMigPool],
) -> None:
    cluster, _sim, pool = env
    assert pool.size("mig-a", zone="zone-a") == 2
    names = sorted(i.name for i in pool.list_instances("mig-a", zone="zone-a"))
    assert names == sorted(_live(cluster, "zone-a"))
    assert {i.status for i in pool.list_instances("mig-a", zone="zone-a")} == {"RUNNING"}


def test_resize_up_joins_nodes_after_boot(env: tuple[Cluster, ComputeSim, GceMigPool]) -> None:
    cluster, _sim, pool = env
    pool.resize("mig-a", 4, zone="zone-a")
    assert pool.size("mig-a", zone="zone-a") == 4
    instances = pool.list_instances("mig-a", zone="zone-a")
    new = [i for i in instances if i.status != "RUNNING"]
    assert len(new) == 2 and all(i.created is not None for i in new)
    # they are Nomad nodes in the zone's datacenter and pool, booting
    for inst in new:
        node = cluster.find_node(inst.name)
        assert node is not None
        assert (node.datacenter, node.node_pool, node.status) == ("zone-a", "gpu", "initializing")
    cluster.advance(cluster.boot_s + 1)
    assert {i.status for i in pool.list_instances("mig-a", zone="zone-a")} == {"RUNNING"}
    assert pool.size("mig-b", zone="zone-b") == 2  # other zone untouched


def test_delete_instances_removes_exactly_those(
    env: tuple[Cluster, ComputeSim, GceMigPool],
) -> None:
    cluster, sim, pool = env
    names = sorted(i.name for i in pool.list_instances("mig-b", zone="zone-b"))
    pool.delete_instances("mig-b", [names[0]], zone="zone-b")
    assert pool.size("mig-b", zone="zone-b") == 1
    assert [i.name for i in pool.list_instances("mig-b", zone="zone-b")] == [names[1]]
    status = _live(cluster, "zone-b")
    assert status[names[0]] == "down" and status[names[1]] == "ready"
    assert sim.events[-1]["type"] == "mig_delete"
    assert sim.events[-1]["instances"] == [names[0]]


def test_errors_are_one_line_nomadscale_errors(env: tuple[Cluster, ComputeSim, GceMigPool]) -> None:
    _cluster, _sim, pool = env
    with pytest.raises(NotFoundError, match="gce: get zone-a/nope: HTTP 404"):
        pool.size("nope", zone="zone-a")
    with pytest.raises(ExternalPermanentError, match="not in zone-a/mig-a"):
        pool.delete_instances("mig-a", ["ghost"], zone="zone-a")
