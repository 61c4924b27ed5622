"""Preflight counts a zone's free nodes the way Nomad places a GPU worker (twin over HTTP).

A node is free for one more worker when the GPU a worker asks for is free there (``room``),
not when it runs fewer allocations: the maintenance watcher (a system job) or a non-GPU job
leaves it free, another team's GPU job takes it, a 2-GPU node running one worker still has
room. The group's canary already placed (a rollout that resumes) keeps its node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import SafetyError
from nomadscale.deploy.preflight import Plan, preflight
from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource
from nomadscale.integrations.tracefile import TraceDemandSource
from tests.deploy.helpers import (
    CALM,
    JOB,
    NEW,
    OLD,
    ROOT,
    TRACE,
    other_team_job,
    policy,
    setup_job,
    surge_rpm,
)
from tests.harness.promdata import Series


def _run(twin: Any, nomad: Any, hcl: str) -> list[str]:
    """Register a job; the nodes its live allocations run on a minute later."""
    spec = nomad.parse_hcl(hcl)
    nomad.register_job(spec)
    twin.advance(60)
    return sorted(a.node_name for a in twin.cluster.job_allocs(("default", spec["ID"]))
                  if a.live)  # fmt: skip


def _spare(twin: Any, dc: str) -> str:
    """The one node of ``dc`` no ml-worker runs on."""
    taken = {a.node_name for a in twin.cluster.job_allocs(JOB) if a.live}
    [name] = [n.name for n in twin.cluster.nodes.values()
              if n.datacenter == dc and n.name not in taken]  # fmt: skip
    return name


def _plan(twin: Any, nomad: Any, *, rpm: float = 1e6, canary: int = 1) -> Plan:
    return preflight(policy(rpm=rpm, bmax=80, canary=canary), nomad, now=twin.clock.now(),
                     demand=TraceDemandSource(TRACE))  # fmt: skip


def _free(plan: Plan) -> dict[str, int]:
    return {z.datacenter: z.free for z in plan.zones}


def _refusal(twin: Any, nomad: Any, **kw: Any) -> str:
    with pytest.raises(SafetyError) as err:
        _plan(twin, nomad, **kw)
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_a_node_running_only_system_and_non_gpu_jobs_counts_as_free(twin_factory: Any) -> None:
    twin = twin_factory(nodes=6, clock=FakeClock(CALM))
    nomad = setup_job(twin, count=2)  # 3 nodes per zone, 1 spare each
    spares = {dc: _spare(twin, dc) for dc in ("zone-a", "zone-b")}
    watcher = nomad.parse_hcl((ROOT / "jobs" / "maintenance-watcher.nomad.hcl").read_text())
    watcher["NodePool"] = "gpu"  # the twin's GPU nodes are in pool "gpu"
    nomad.register_job(watcher)
    shipper = _run(twin, nomad, other_team_job("shipper", dc="zone-a", gpu=False,
                                           node=spares["zone-a"]))  # fmt: skip
    assert shipper == [spares["zone-a"]]
    on_spare = {a.job_id for a in twin.cluster.allocs.values()
                if a.live and a.node_name == spares["zone-a"]}  # fmt: skip
    assert on_spare == {"maintenance-watcher", "shipper"}, on_spare

    plan = _plan(twin, nomad)  # the canary (zone a) needs a free node: it has one

    assert _free(plan) == {"zone-a": 1, "zone-b": 1}
    assert not plan.surge


def test_a_node_whose_gpu_another_job_holds_is_not_free(twin_factory: Any) -> None:
    twin = twin_factory(nodes=6, clock=FakeClock(CALM))
    nomad = setup_job(twin, count=2)
    spare_a = _spare(twin, "zone-a")
    assert _run(twin, nomad, other_team_job("trainer", dc="zone-a")) == [spare_a]

    # one worker per node would leave zone a one free node: its GPU is the trainer's
    why = _refusal(twin, nomad)
    assert why == ("deploy ekyc-ml: zone zone-a (ml-worker-a) has 0 free node(s) "
                   "(with 1 nvidia/gpu free), 1 canary needs 1"), why  # fmt: skip
    assert _free(_plan(twin, nomad, canary=0)) == {"zone-a": 0, "zone-b": 1}


def test_a_surge_refused_when_its_zones_free_gpu_is_taken(twin_factory: Any) -> None:
    twin = twin_factory(nodes=6, clock=FakeClock(CALM))
    nomad = setup_job(twin, count=2)
    rpm, _upper = surge_rpm(twin, 3.5, fleet=4)  # 4 of 4 needed: a surge worker per zone
    assert _plan(twin, nomad, rpm=rpm, canary=0).surge  # room for it while zone b's GPU is free
    spare_b = _spare(twin, "zone-b")
    assert _run(twin, nomad, other_team_job("trainer", dc="zone-b")) == [spare_b]

    why = _refusal(twin, nomad, rpm=rpm, canary=0)

    assert why.startswith("deploy ekyc-ml: zone zone-b (ml-worker-b) has 0 free node(s)"), why
    assert why.endswith("a surge worker needs 1"), why


def test_a_two_gpu_node_running_one_worker_has_room(twin_factory: Any) -> None:
    twin = twin_factory(nodes=0, clock=FakeClock(CALM))
    big = "gpu-zone-a-big"  # zone a: one node with 2 GPUs; zone b: two with 1 GPU
    for name, dc, gpus in ((big, "zone-a", 2), ("gpu-zone-b-1", "zone-b", 1),
                           ("gpu-zone-b-2", "zone-b", 1)):  # fmt: skip
        twin.cluster.add_node(name=name, datacenter=dc, node_pool="gpu", gpus=gpus,
                              meta={"zone": dc, "gpu": "l4"})  # fmt: skip
    nomad = setup_job(twin, count=1)
    workers = {a.task_group: a.node_name for a in twin.cluster.job_allocs(JOB) if a.live}
    assert workers["ml-worker-a"] == big

    # one node running one worker: one worker per node would leave zone a no free node
    assert _free(_plan(twin, nomad)) == {"zone-a": 1, "zone-b": 1}

    assert _run(twin, nomad, other_team_job("trainer", dc="zone-a", node=big)) == [big]
    why = _refusal(twin, nomad)  # both of its GPUs held now
    assert "zone zone-a (ml-worker-a) has 0 free node(s)" in why, why


def test_the_groups_placed_canary_keeps_its_node(twin_factory: Any) -> None:
    """A rollout resuming with its canary placed (the spare node's GPU is the canary's) is not
    refused for want of a node for that canary."""
    twin = twin_factory(nodes=6, clock=FakeClock(CALM))
    nomad = setup_job(twin, count=2)
    spare_a = _spare(twin, "zone-a")
    spec = dict(nomad.get_job("ml-worker").spec)
    for tg in spec["TaskGroups"]:
        if tg["Name"] == "ml-worker-a":
            tg["Tasks"][0]["Config"]["image"] = NEW
    nomad.register_job(spec)  # the job's update block: 1 canary, manual promotion
    twin.advance(120)
    canaries = [a for a in twin.cluster.job_allocs(JOB) if a.live and a.image == NEW]
    assert [a.node_name for a in canaries] == [spare_a]
    assert sum(1 for a in twin.cluster.job_allocs(JOB) if a.live and a.image == OLD) == 4

    plan = preflight(policy(), nomad, now=twin.clock.now(), demand=None)  # what resume runs

    assert _free(plan) == {"zone-a": 1, "zone-b": 1}


def test_no_recent_demand_data_plans_for_the_whole_fleet(
    twin_factory: Any, prometheus_factory: Any
) -> None:
    """A demand source with nothing recent (a Prometheus gap, a wrong query) is not zero
    demand: the rollout plans for the capacity of every worker there is, so each node step
    brings a surge worker; before, the upper bound was 0 rpm and no surge was planned. A
    trace that ended is not a gap: it is read right after its last step, as ``plan`` does."""
    twin = twin_factory(nodes=8, clock=FakeClock(CALM))  # 2 spare nodes per zone
    nomad = setup_job(twin, count=2)
    src = TraceDemandSource(TRACE)
    tr = src.trace
    ts = tr.start.timestamp() + tr.step_s * np.arange(len(tr.rpm))
    prom = prometheus_factory([Series("demand_rpm", {"policy": "ekyc-ml"}, ts, tr.rpm)])
    gap = PrometheusDemandSource(client=PrometheusClient(url=prom.url),
                                 query='demand_rpm{policy="ekyc-ml"}', stamp="start")  # fmt: skip
    later = tr.end + (tr.end - tr.start)  # Prometheus holds nothing this recent
    plan = preflight(policy(rpm=1e6, bmax=80), nomad, now=later, demand=gap)
    assert plan.required_workers == 4 and plan.surge
    assert plan.forecast_upper == 4 * 1e6
    assert plan.explain().endswith("no recent demand data: planning for the 4 workers' capacity")
    # with data, the same policy needs one worker and no surge (1e6 rpm per worker)
    calm = preflight(policy(rpm=1e6, bmax=80), nomad, now=twin.clock.now(), demand=src)
    assert calm.required_workers == 1 and not calm.surge and not calm.notes
    ended = preflight(policy(rpm=1e6, bmax=80), nomad, now=later, demand=src)
    at_end = preflight(policy(rpm=1e6, bmax=80), nomad, now=tr.end, demand=src)
    assert ended.forecast_upper == at_end.forecast_upper
    assert ended.required_workers == 1 and not ended.surge and not ended.notes
