"""Nodes that join inside a zone's rollout, and a surge worker that can't be placed (twin over
HTTP, virtual time).

A node that joins the pool after a zone started (its ``_top_up`` already ran) gets the image
before the rollout places the zone's next allocation: no new-version allocation lands on a
node without the image (a node whose pull fails is made ineligible instead). A surge worker
whose free node another job takes between the re-plan and its placement is a blocked
evaluation in Nomad (``FailedTGAllocs``): the rollout sees it at once and goes on without the
surge when capacity allows, or holds (every worker serving) until a node is free again, and
pauses for the operator past the hold limit; it never waits for the progress deadline.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from nomadscale.core.ports import DemandSeries, EvalInfo, PlacementFailure
from nomadscale.deploy.progress import status_table
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import RolloutState
from nomadscale.deploy.surge import placement_failure
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from tests.deploy.helpers import (
    CALM,
    JOB,
    NEW,
    OLD,
    TRACE,
    RecordingAlerts,
    images_running,
    policy,
    sampling_twin,
    setup_job,
    surge_rpm,
)

POLL_S = 5.0
ZONE_B_FREE = "gpu-zone-b-0007"  # 9 nodes, 3 workers per zone: zone b's one free node
OTHER = "trainer"  # another team's GPU job

TRAINER_HCL = """
job "trainer" {
  type        = "service"
  node_pool   = "gpu"
  datacenters = ["zone-b"]

  group "train" {
    count = 1

    task "train" {
      driver = "docker"

      config {
        image = "us-docker.pkg.dev/acme/ml/trainer:1"
      }

      resources {
        cpu    = 1000
        memory = 4096

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
"""


def _add_node(c: Any, name: str = "gpu-zone-b-0009") -> str:
    """A new instance in zone b, ready and eligible, without the image."""
    return str(c.add_node(name=name, datacenter="zone-b", node_pool="gpu", node_class="gpu-l4",
                          meta={"zone": "zone-b", "gpu": "l4"}))  # fmt: skip


def _rollout(twin: Any, nomad: Any, rpm: float, **kw: Any) -> Rollout:
    kw.setdefault("demand", TraceDemandSource(TRACE))
    return Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=MemoryKV(clock=twin.clock),
                   clock=twin.clock, watch_wait_s=0, poll_s=POLL_S, **kw)  # fmt: skip


def _pulled(alloc: Any) -> bool:
    return any(e["Type"] == "Driver" and "Downloading" in e["msg"] for e in alloc.task_events)


def _placed_since(twin: Any, t0: float) -> list[Any]:
    allocs = [a for a in twin.cluster.job_allocs(JOB) if a.create_time >= t0]
    return sorted(allocs, key=lambda a: a.create_index)


def _image_arrived(twin: Any, node_id: str) -> datetime:
    """When the image reached ``node_id``: its prefetch allocation started (the pull done)."""
    arrived = [e["time"] for e in twin.cluster.events
               if e["type"] == "alloc_running" and e["node_id"] == node_id
               and str(e["job_id"]).startswith("image-prefetch")]  # fmt: skip
    assert arrived, f"no prefetch ran on node {node_id}"
    return min(arrived)


def _worker_placements(twin: Any, since: int) -> list[dict[str, Any]]:
    """ml-worker placements among the twin's events from position ``since`` on."""
    return [e for e in twin.cluster.events[since:]
            if e["type"] == "alloc_placed" and e["job_id"] == "ml-worker"]  # fmt: skip


def _failed_deployments(twin: Any) -> list[str]:
    return [e["deployment_id"] for e in twin.cluster.events
            if e["type"] == "deployment" and e["status"] == "failed"]  # fmt: skip


# --- gap 1: a node that joins inside a zone's rollout ------------------------------------


def test_a_node_that_joins_while_a_zone_start_holds_gets_the_image_before_the_surge(
    twin_factory: Any,
) -> None:
    """Zone b's free node is recreated right after zone a: zone b's start holds (no free node
    for the surge it needs). The new instance joins during the hold, so the hold ends and the
    surge worker goes to it: the rollout prefetches it first (the top-up before the zone's
    start ran before it joined)."""
    twin, clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)  # zone a: 5 nodes (2 free), zone b: 4 nodes (1 free)
    rpm, upper = surge_rpm(twin, 5.5, fleet=6)  # 6 of 6 needed: a surge per zone
    c = twin.cluster
    joined: list[str] = []

    def recreate_zone_b_free_node(st: RolloutState, info: dict[str, Any]) -> None:
        note = str(info.get("note", ""))
        if note == "zone ml-worker-a done":
            free = c.find_node(ZONE_B_FREE)
            assert free is not None and free.n_live == 0
            c.lose_node(free.id)  # the instance is deleted ...
        elif note.startswith("held before the next node step: ml-worker-b") and not joined:
            joined.append(_add_node(c))  # ... and its replacement joins during the hold

    r = _rollout(twin, nomad, rpm, reporter=recreate_zone_b_free_node)
    t0 = c.now_s()
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "completed", st.reason
    assert joined, st.log
    node = joined[0]
    assert any("no free node in zone zone-b" in line for line in st.log), st.log
    placed = _placed_since(twin, t0)
    on_joined = [a for a in placed if a.node_id == node]
    assert [a.task_group for a in on_joined] == ["ml-worker-b"]  # zone b's surge worker
    assert _image_arrived(twin, node) <= datetime.fromtimestamp(on_joined[0].create_time,
                                                                tz=CALM.tzinfo)  # fmt: skip
    assert [a.name for a in placed if _pulled(a)] == []
    assert node in st.prefetch["ok"]
    assert images_running(twin) == {NEW: 6}
    assert min(h for _, h in clock.samples) * rpm >= upper


@pytest.mark.parametrize("demand", ["trace", "none"])
def test_a_node_that_joins_mid_zone_gets_the_image_before_the_next_node_step(
    twin_factory: Any, demand: str
) -> None:
    """A node joins zone b while its first replacement is in flight: the rollout prefetches it
    before Nomad places zone b's next allocation, with or without a demand figure to re-plan
    with (the rollout places every next node step itself). The twin puts a replacement on the
    lowest-indexed empty node (here the one just vacated); real Nomad scores empty nodes alike
    and may pick the new one, so the order is what counts."""
    twin, _clock = sampling_twin(twin_factory, nodes=10, start=CALM)
    nomad = setup_job(twin, count=3)  # 2 free nodes per zone
    rpm = 1e5  # one worker serves the trace: no surge, every step goes
    c = twin.cluster
    joined: dict[str, Any] = {}

    def join_mid_zone(st: RolloutState, info: dict[str, Any]) -> None:
        if (
            not joined
            and info.get("group") == "ml-worker-b"
            and info.get("deployment") == "running"
            and info.get("total", 0) > 0
        ):
            joined["events"] = len(c.events)
            joined["node"] = _add_node(c)

    kw: dict[str, Any] = {"demand": None} if demand == "none" else {}
    t0 = c.now_s()
    st = _rollout(twin, nomad, rpm, reporter=join_mid_zone, **kw).start(NEW)

    assert st.status == "completed", st.reason
    assert joined, st.log
    node = joined["node"]
    after = _worker_placements(twin, joined["events"])
    assert len(after) == 2, after  # zone b's 2nd and 3rd replacements
    arrived = _image_arrived(twin, node)
    assert all(arrived <= e["time"] for e in after), (arrived, [e["time"] for e in after])
    assert node in st.prefetch["ok"]
    assert any("gpu-zone-b-0009" in line for line in st.log), st.log
    assert [a.name for a in _placed_since(twin, t0) if _pulled(a)] == []
    assert images_running(twin) == {NEW: 6}


# --- gap 2: the surge worker's free node is taken before it is placed --------------------


class Dial:
    """Demand at ``rpm`` over any window; the test turns it."""

    def __init__(self, rpm: float) -> None:
        self.rpm = rpm

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        n = max(1, int(lookback_s // step_s))
        start = end - timedelta(seconds=n * step_s)
        return DemandSeries(start=start, step_s=step_s, values=np.full(n, self.rpm))


def _take_free_node(twin: Any, nomad: Any) -> None:
    """Another team's GPU job lands on zone b's free node."""
    nomad.register_job(nomad.parse_hcl(TRAINER_HCL))
    trainer = [a for a in twin.cluster.job_allocs(("default", OTHER)) if a.live]
    assert [a.node_name for a in trainer] == [ZONE_B_FREE]


def _release_free_node(twin: Any) -> None:
    twin.nomad().job.deregister_job(OTHER)


def _taker(twin: Any, nomad: Any, marks: dict[str, Any], *, release_after_s: float | None) -> Any:
    """A reporter that has the trainer take zone b's free node the moment the rollout records
    zone b's surge (after its re-plan found the node free, before the zone's job version is
    registered), records when the rollout holds, and (``release_after_s``) stops the trainer
    that long after it took the node."""

    def report(st: RolloutState, info: dict[str, Any]) -> None:
        now = twin.clock.now()
        if str(info.get("note", "")).startswith("surge: ml-worker-b") and "taken" not in marks:
            marks["taken"] = now
            _take_free_node(twin, nomad)
        if st.status == "held" and "taken" in marks and "held" not in marks:
            marks["held"] = now
        if (
            release_after_s is not None
            and "taken" in marks
            and "released" not in marks
            and (now - marks["taken"]).total_seconds() >= release_after_s
        ):
            marks["released"] = now
            _release_free_node(twin)

    return report


def test_a_surge_whose_node_is_taken_holds_at_once_and_goes_on_when_a_node_is_free(
    twin_factory: Any,
) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)
    rpm, upper = surge_rpm(twin, 5.5, fleet=6)  # 6 of 6 needed: zone b's step needs its surge
    marks: dict[str, Any] = {}
    r = _rollout(twin, nomad, rpm, reporter=_taker(twin, nomad, marks, release_after_s=180))
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "completed", st.reason
    # the blocked surge was seen at once (not at the 10 min progress deadline) and held with
    # every worker serving until the trainer left 3 minutes later
    assert (marks["held"] - marks["taken"]).total_seconds() <= 2 * POLL_S, marks
    held = next(line for line in st.log if "held before the next node step: ml-worker-b" in line)
    assert "surge worker can't be placed" in held, held
    assert "nvidia/gpu" in held, held  # Nomad's reason: the GPU dimension is exhausted
    assert any("hold ended" in line for line in st.log), st.log
    assert _failed_deployments(twin) == []
    assert min(h for _, h in clock.samples) * rpm >= upper
    assert images_running(twin) == {NEW: 6}
    status = nomad.job_status("ml-worker")
    assert {g: s.desired for g, s in status.groups.items()} == {
        "ml-worker-a": 3, "ml-worker-b": 3,
    }  # fmt: skip


def test_a_blocked_surge_held_past_the_limit_pauses_then_resumes(twin_factory: Any) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)
    rpm, upper = surge_rpm(twin, 5.5, fleet=6)
    marks: dict[str, Any] = {}
    sink = RecordingAlerts()
    kv = MemoryKV(clock=twin.clock)
    r = Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=kv, clock=twin.clock,
                demand=TraceDemandSource(TRACE), alerts=sink, watch_wait_s=0, poll_s=POLL_S,
                hold_limit_s=120, reporter=_taker(twin, nomad, marks, release_after_s=None))  # fmt: skip
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "paused" and st.current_zone == "ml-worker-b", st.reason
    assert st.reason.startswith("held for 2 min and capacity is still short: ml-worker-b:")
    assert "surge worker can't be placed" in st.reason
    assert (clock.now() - marks["taken"]).total_seconds() < 180  # not the progress deadline
    assert [a["severity"] for a in sink.sent] == ["warning", "warning"]
    assert st.deployment_id and nomad.deployment(st.deployment_id).status == "paused"
    assert _failed_deployments(twin) == []
    assert images_running(twin) == {NEW: 3, OLD: 3}  # nothing of zone b taken out
    assert min(h for _, h in clock.samples) * rpm >= upper
    console = Console(record=True, width=240)
    console.print(status_table(st))
    assert "ml-worker-b 3 -> 4 (not placed: 1 allocation(s) not placed" in console.export_text()

    _release_free_node(twin)  # the trainer is done; an operator resumes
    again = Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=kv, clock=twin.clock,
                    demand=TraceDemandSource(TRACE), watch_wait_s=0, poll_s=POLL_S).resume()  # fmt: skip
    assert again is not None and again.status == "completed", again and again.reason
    assert images_running(twin) == {NEW: 6}
    assert min(h for _, h in clock.samples) * rpm >= upper


def test_a_blocked_surge_is_dropped_when_demand_allows_the_step_without_it(
    twin_factory: Any,
) -> None:
    """Demand rises before zone b (its start surges), then falls back while the surge worker
    can't be placed: the step is safe without it, so zone b goes on at its own count."""
    twin, clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)
    base, high = 1000.0, 1600.0
    rpm = high / 5.5  # at 1000 rpm 5 of 6 suffice (one out is safe); at 1600 rpm 6 of 6
    dial = Dial(base)
    marks: dict[str, Any] = {}
    taker = _taker(twin, nomad, marks, release_after_s=None)

    def report(st: RolloutState, info: dict[str, Any]) -> None:
        note = str(info.get("note", ""))
        if note == "zone ml-worker-a done":
            dial.rpm = high
        taker(st, info)
        if note.startswith("surge: ml-worker-b") and dial.rpm == high:
            dial.rpm = base  # the rise is over right when the surge's node was taken

    r = _rollout(twin, nomad, rpm, demand=dial, reporter=report)
    plan = r.plan(NEW)
    assert not plan.surge and plan.required_workers <= 5, plan.explain()
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "completed", st.reason
    assert "taken" in marks
    dropped = next(line for line in st.log if "surge worker of ml-worker-b not placed" in line)
    assert "going on without it" in dropped and dropped.endswith("-> go)"), dropped
    assert not any("held" in line for line in st.log), st.log
    assert st.surge is not None and st.surge["released"]
    assert _failed_deployments(twin) == []
    assert images_running(twin) == {NEW: 6}
    status = nomad.job_status("ml-worker")
    assert {g: s.desired for g, s in status.groups.items()} == {
        "ml-worker-a": 3, "ml-worker-b": 3,
    }  # fmt: skip
    trainer = [a for a in twin.cluster.job_allocs(("default", OTHER)) if a.live]
    assert [a.node_name for a in trainer] == [ZONE_B_FREE]  # never disturbed
    assert min(h for _, h in clock.samples) >= 5  # 5 serve 1000 rpm; never fewer


def test_placement_failure_reads_evaluations_like_nomad_job_status() -> None:
    gpu = PlacementFailure(unplaced=1, nodes_evaluated=4, nodes_exhausted=4,
                           dimension_exhausted={"devices: nvidia/gpu": 4})  # fmt: skip

    def ev(id_: str, idx: int, *, status: str = "complete", job_index: int = 40,
           failed: bool = False, blocked_eval: str = "") -> EvalInfo:  # fmt: skip
        return EvalInfo(id=id_, status=status, triggered_by="job-register",
                        job_modify_index=job_index, create_index=idx, blocked_eval=blocked_eval,
                        failed={"ml-worker-b": gpu} if failed else {})  # fmt: skip

    tried = ev("e1", 41, failed=True, blocked_eval="e2")
    # the twin: the blocked eval carries no failures; Nomad copies them onto it
    for blocked in (ev("e2", 42, status="blocked"), ev("e2", 42, status="blocked", failed=True)):
        assert placement_failure([tried, blocked], group="ml-worker-b", since_index=40) == gpu
        assert placement_failure([tried, blocked], group="ml-worker-a", since_index=40) is None
        # a failure of an older job version does not count
        assert placement_failure([tried, blocked], group="ml-worker-b", since_index=41) is None
    # capacity freed: the blocked eval ran (complete) and placed it
    done = ev("e2", 42, status="complete")
    assert placement_failure([tried, done], group="ml-worker-b", since_index=40) is None
    # placed, then a later failure of the same version is blocked again
    again = [
        tried,
        done,
        ev("e3", 50, failed=True, blocked_eval="e4"),
        ev("e4", 51, status="blocked"),
    ]
    assert placement_failure(again, group="ml-worker-b", since_index=40) == gpu
