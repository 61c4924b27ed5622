"""The warm-up gate for nodes that join the pool after a rollout (twin over HTTP, virtual
time): a new ineligible node gets the golden image and only then becomes eligible."""

from __future__ import annotations

from typing import Any

from nomadscale.deploy.prefetch import (
    IMAGE_META,
    ensure_prefetch_job,
    has_image,
    prefetch,
    warm_up_new_nodes,
)
from tests.deploy.helpers import OLD, setup_job


def _new_node(twin: Any, nomad: Any, name: str) -> str:
    node_id: str = twin.cluster.add_node(
        name=name, datacenter="zone-a", node_pool="gpu", meta={"zone": "zone-a", "gpu": "l4"}
    )
    nomad.set_eligibility(node_id, False)  # joined ineligible (client config) until warm
    return node_id


def _eligibility_changes(twin: Any, node_id: str) -> list[tuple[float, str]]:
    return [
        (e["time"].timestamp(), e["eligibility"])
        for e in twin.cluster.events
        if e["type"] == "eligibility" and e["node_id"] == node_id
    ]


def _warm(twin: Any, nomad: Any) -> Any:
    return warm_up_new_nodes(nomad, image=OLD, node_pool="gpu", job_id="image-prefetch",
                             namespace="default", clock=twin.clock, retries=1, poll_s=5.0)  # fmt: skip


def test_new_node_becomes_eligible_only_after_its_pull(twin: Any) -> None:
    nomad = setup_job(twin)  # 4 workers on OLD over 6 nodes
    ensure_prefetch_job(nomad, job_id="image-prefetch", namespace="default", node_pool="gpu")
    old_nodes = nomad.list_nodes(node_pool="gpu")
    prefetch(nomad, image=OLD, nodes=old_nodes, job_id="image-prefetch", namespace="default",
             clock=twin.clock)  # fmt: skip
    assert _warm(twin, nomad).ok == []  # every node already holds the golden image
    good = _new_node(twin, nomad, "gpu-zone-a-new-1")
    bad = _new_node(twin, nomad, "gpu-zone-a-new-2")
    twin.cluster.faults.pull_fails(bad, OLD)
    t0 = twin.clock.now().timestamp()

    res = _warm(twin, nomad)

    assert res.ok == [good]
    assert set(res.failed) == {bad} and res.attempts == 2
    assert twin.cluster.nodes[good].eligibility == "eligible"
    assert twin.cluster.nodes[bad].eligibility == "ineligible"
    assert OLD in twin.cluster.nodes[good].images and OLD not in twin.cluster.nodes[bad].images
    assert has_image(nomad, good, OLD) and not has_image(nomad, bad, OLD)
    assert nomad.node_metadata(good).meta[IMAGE_META] == OLD
    # the gate opens only for the instant the prefetch is placed, then closes until the pull
    # (7 GB at 800 Mbit/s = 70 s) succeeded
    changes = _eligibility_changes(twin, good)
    assert [s for _, s in changes] == ["ineligible", "eligible", "ineligible", "eligible"]
    opened, closed, ready = changes[1][0], changes[2][0], changes[3][0]
    assert t0 <= opened == closed
    assert ready >= opened + 70
    # no worker was placed on either new node meanwhile
    workers = twin.cluster.job_allocs(("default", "ml-worker"))
    assert not [a for a in workers if a.node_id in (good, bad)]
    # the failed node is tried again next cycle and stays ineligible while the pull fails
    again = _warm(twin, nomad)
    assert again.ok == [] and set(again.failed) == {bad}
    assert twin.cluster.nodes[bad].eligibility == "ineligible"
