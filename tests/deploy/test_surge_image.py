"""Which image a surge worker runs, and where (twin over HTTP, virtual time).

A surge worker added at a zone's start is part of that zone's new job version: it runs the new
image, which the prefetch put on every node, and is never replaced itself (a surge on the old
version would pull the ~7 GB old image on a node that only holds the new one, then be replaced,
and the release would stop a freshly replaced worker). A node that joined the zone after the
prefetch (a recreated instance) gets the image before anything of the rollout can land on it.
"""

from __future__ import annotations

from typing import Any

from nomadscale.deploy.prefetch import IMAGE_META
from nomadscale.deploy.replan import HOLD, SURGE, check_step
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import RolloutState
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from tests.deploy.helpers import (
    CALM,
    JOB,
    NEW,
    OLD,
    TRACE,
    images_running,
    policy,
    sampling_twin,
    setup_job,
    surge_rpm,
)

GROUPS = ("ml-worker-a", "ml-worker-b")


def _placed_since(twin: Any, t0: float) -> list[Any]:
    """ml-worker allocations placed from ``t0`` (twin seconds) on, oldest first."""
    allocs = [a for a in twin.cluster.job_allocs(JOB) if a.create_time >= t0]
    return sorted(allocs, key=lambda a: a.create_index)


def _pulled(alloc: Any) -> bool:
    return any(e["Type"] == "Driver" and "Downloading" in e["msg"] for e in alloc.task_events)


def _add_node(c: Any) -> str:
    """A new instance in zone b, ready and eligible, without the image."""
    return str(c.add_node(name="gpu-zone-b-0009", datacenter="zone-b", node_pool="gpu",
                          node_class="gpu-l4", meta={"zone": "zone-b", "gpu": "l4"}))  # fmt: skip


def _rollout(twin: Any, nomad: Any, rpm: float, **kw: Any) -> Rollout:
    return Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=MemoryKV(clock=twin.clock),
                   clock=twin.clock, demand=TraceDemandSource(TRACE), watch_wait_s=0,
                   poll_s=5.0, **kw)  # fmt: skip


def _assert_surged_and_released(nomad: Any, st: RolloutState) -> None:
    assert st.status == "completed", st.reason
    surges = [line for line in st.log if "surge: " in line]
    assert [s.split("surge: ")[1].split(" ")[0] for s in surges] == list(GROUPS), surges
    assert st.surge is not None and st.surge["released"]
    status = nomad.job_status("ml-worker")
    assert {g: status.groups[g].desired for g in GROUPS} == dict.fromkeys(GROUPS, 3)


def test_surge_worker_runs_the_new_image_and_is_never_replaced(twin_factory: Any) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=10, start=CALM)
    nomad = setup_job(twin, count=3)  # 6 workers, 2 free nodes per zone
    rpm, upper = surge_rpm(twin, 5.5, fleet=6)  # 6 of 6 needed: surge one per zone
    r = _rollout(twin, nomad, rpm)
    assert r.plan(NEW).surge
    t0 = twin.cluster.now_s()
    clock.samples.clear()

    st = r.start(NEW)

    _assert_surged_and_released(nomad, st)
    assert images_running(twin) == {NEW: 6}
    placed = _placed_since(twin, t0)
    # every worker the rollout placed runs the new image, none pulled it (the prefetch did)
    assert {a.image for a in placed} == {NEW}, [(a.name, a.image) for a in placed]
    assert [a.name for a in placed if _pulled(a)] == []
    # per zone: its 3 workers replaced once and one surge worker (zone a's is its canary),
    # nothing placed twice
    for group in GROUPS:
        mine = [a for a in placed if a.task_group == group]
        assert len(mine) == 4, (group, [(a.name, a.image, a.node_name) for a in mine])
    assert min(h for _, h in clock.samples) * rpm >= upper


def test_surge_on_a_node_that_joined_after_the_prefetch_finds_the_image(
    twin_factory: Any,
) -> None:
    twin, _clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)  # zone a: 5 nodes (2 free), zone b: 4 nodes (1 free)
    rpm, _upper = surge_rpm(twin, 5.5, fleet=6)
    c = twin.cluster
    joined: list[str] = []

    def recreate_free_node(st: RolloutState, info: dict[str, Any]) -> None:
        """Right after the prefetch, zone b's free node is recreated (a MIG autohealing the
        instance): the old node goes down, a new one joins ready and eligible, without the
        image."""
        if joined or not str(info.get("note", "")).startswith("prefetched"):
            return
        free = c.find_node("gpu-zone-b-0007")
        assert free is not None and free.n_live == 0
        c.lose_node(free.id)
        joined.append(_add_node(c))

    r = _rollout(twin, nomad, rpm, reporter=recreate_free_node)
    assert r.plan(NEW).surge
    t0 = c.now_s()

    st = r.start(NEW)

    _assert_surged_and_released(nomad, st)
    assert images_running(twin) == {NEW: 6}
    node = joined[0]
    placed = _placed_since(twin, t0)
    on_joined = [a for a in placed if a.node_id == node]
    assert on_joined and {a.image for a in on_joined} == {NEW}, [
        (a.name, a.image) for a in on_joined
    ]
    # the joined node got the image before the rollout placed anything there: no pull
    assert [a.name for a in placed if _pulled(a)] == []
    assert nomad.node_metadata(node).meta.get(IMAGE_META) == NEW
    assert node in st.prefetch["ok"]
    assert any("gpu-zone-b-0009" in line for line in st.log), st.log


def test_a_joined_node_whose_pull_fails_is_never_counted_as_capacity(
    twin_factory: Any,
) -> None:
    twin, _clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)
    rpm, _upper = surge_rpm(twin, 5.5, fleet=6)
    c = twin.cluster
    joined: list[str] = []

    def recreate_free_node(st: RolloutState, info: dict[str, Any]) -> None:
        """As above, but the image never reaches the new node (a broken layer download)."""
        if joined or not str(info.get("note", "")).startswith("prefetched"):
            return
        free = c.find_node("gpu-zone-b-0007")
        assert free is not None
        c.lose_node(free.id)
        joined.append(_add_node(c))
        c.faults.pull_fails(node_id=joined[0], image_substring=NEW.rsplit(":", 1)[1])

    r = _rollout(twin, nomad, rpm, reporter=recreate_free_node, hold_limit_s=120)

    st = r.start(NEW)

    # zone b's node lacks the image: made ineligible, so no surge fits and the rollout holds
    # (every worker serving) and then pauses for the operator, instead of placing there
    node = joined[0]
    assert st.status == "paused" and st.current_zone == "ml-worker-b", st.reason
    assert "no free node in zone zone-b (3 usable for 3 workers)" in st.reason
    assert node in st.prefetch["ineligible"] and node not in st.prefetch["ok"]
    assert any("failed on gpu-zone-b-0009" in line for line in st.log), st.log
    assert c.node(node).eligibility == "ineligible"
    assert [a.name for a in c.job_allocs(JOB) if a.node_id == node] == []
    assert images_running(twin) == {NEW: 3, OLD: 3}
    assert st.deployment_id is None  # zone b's job version was never registered


def test_at_a_zone_start_a_surge_that_would_not_cover_the_step_is_a_hold() -> None:
    """A zone-start surge comes with the zone's deployment, where a hold is bounded by the
    progress deadline: when one surge worker would not make the step safe, the zone holds
    before any deployment (every worker serving) instead."""
    kw: dict[str, Any] = {"group": "ml-worker-b", "at": CALM, "rpm_per_worker": 100.0,
                          "demand_rpm": 700.0, "planned_upper": None,
                          "surge_blocked": lambda: None}  # fmt: skip
    # 6 serving, 7 needed: one out leaves 5, and with a surge worker still 6
    assert check_step(serving=6, **kw).action == SURGE  # inside a deployment
    chk = check_step(serving=6, surge_must_cover=True, **kw)
    assert chk.action == HOLD and chk.why_not_surge == "one surge worker would still leave 6 < 7"
    assert check_step(serving=7, surge_must_cover=True, **kw).action == SURGE  # 7 - 1 + 1 = 7
    assert check_step(serving=8, surge_must_cover=True, **kw).action == "go"
