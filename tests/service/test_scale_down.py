"""Scale-down through the real service pieces: Nomad twin over HTTP + GCE endpoint over HTTP.

Drains happen before deletes, victims are the oldest nodes (first started, first stopped),
and a zone left half-applied by a crashed leader is finished by the next cycle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from nomadscale.config.settings import Settings
from nomadscale.integrations.gce import GceMigPool
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.actuator import plan_actions
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import _SimClock, worker_job
from nomadscale.sim.compute import ComputeServer, ComputeSim
from tests.harness.twin import Twin, TwinFactory
from tests.service.helpers import LevelDemand, make_policy


@dataclass
class Fleet:
    twin: Twin
    sim: ComputeSim
    svc: Service
    demand: dict[str, float]
    clock: _SimClock
    nomad: NomadClient


@contextmanager
def _fleet(twin_factory: TwinFactory, zone_names: dict[str, str] | None = None) -> Iterator[Fleet]:
    """3 nodes per Nomad datacenter zone-a/b (created oldest first) in MIGs mig-a/b, the
    worker job pinned to those datacenters. ``zone_names``: datacenter -> the policy's (and
    the MIGs') zone name, when the zones are named after the cloud's."""
    names = zone_names or {"zone-a": "zone-a", "zone-b": "zone-b"}
    twin = twin_factory(nodes=6, node_pool="gpu")
    cluster = twin.cluster
    cluster.add_namespace("ekyc")
    sim = ComputeSim(cluster, project="proj")
    for dc, zone in names.items():
        sim.add_mig(name=f"mig-{dc[-1]}", zone=zone, datacenter=dc, node_pool="gpu")
    clock = _SimClock(twin.clock, cluster.advance)
    by_dc = make_policy(node_pool=True)  # zones named like the datacenters: builds the job
    doc = by_dc.to_yaml_dict()
    for z in doc["zones"]["list"]:
        z["name"] = names[z["name"]]
    policy = type(by_dc).model_validate(doc)
    level = {"rpm": 560.0}
    with ComputeServer(sim) as gce:
        nomad = NomadClient(address=twin.address, clock=clock)
        nomad.register_job(worker_job(by_dc, counts={"zone-a": 3, "zone-b": 3}, image="img:1"))
        cluster.advance(600)
        kv = MemoryKV(clock=clock)
        lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0)
        clock.on_tick = lock.acquire
        pool = GceMigPool(project="proj", credentials=AnonymousCredentials(),
                          base_url=gce.base_url, clock=clock, poll_s=1)  # fmt: skip
        ports = Ports(nomad=nomad, kv=kv, lock=lock, pool_for=lambda _p: pool,
                      demand_for=lambda _p: LevelDemand(lambda _t: level["rpm"]))  # fmt: skip
        svc = Service(settings=Settings(kv_prefix="ns"), policies=[policy], ports=ports,
                      clock=clock, poll_s=10)  # fmt: skip
        yield Fleet(twin, sim, svc, level, clock, nomad)


@pytest.fixture
def fleet(twin_factory: TwinFactory) -> Iterator[Fleet]:
    with _fleet(twin_factory) as f:
        yield f


def _events(twin: Twin, *types: str) -> list[dict[str, Any]]:
    return [e for e in twin.cluster.events if e["type"] in types]


def test_scale_down_drains_oldest_then_deletes_exactly_them(fleet: Fleet) -> None:
    twin, cluster = fleet.twin, fleet.twin.cluster
    by_age = {
        zone: [n.name for n in sorted(cluster.nodes.values(), key=lambda n: n.create_index)
               if n.datacenter == zone]
        for zone in ("zone-a", "zone-b")
    }  # fmt: skip
    mark = len(cluster.events)
    fleet.demand["rpm"] = 120.0  # -> 2 workers: 1 per zone
    out = fleet.svc.run_policy("ekyc")
    assert out is not None and out.record.outcome == "applied", out.record.line()
    assert out.decision is not None and out.decision.desired == 2, out.decision.explain()
    oldest = {zone: names[:2] for zone, names in by_age.items()}
    events = [e for e in cluster.events[mark:] if e["type"] in ("drain", "node_removed", "scale")]
    by_id = {n.id: n.name for n in cluster.nodes.values()}
    started = [
        by_id[e["node_id"]] for e in events if e["type"] == "drain" and e["phase"] == "start"
    ]
    removed = [e["name"] for e in events if e["type"] == "node_removed"]
    assert sorted(started) == sorted(oldest["zone-a"] + oldest["zone-b"])
    assert sorted(removed) == sorted(started)
    for name in removed:  # each node: drain start -> drain complete -> removed
        nid = next(i for i, n in by_id.items() if n == name)
        idx = [i for i, e in enumerate(events) if e.get("node_id") == nid or e.get("name") == name]
        kinds = [(events[i]["type"], events[i].get("phase")) for i in idx]
        assert kinds == [("drain", "start"), ("drain", "complete"), ("node_removed", None)], kinds
    first_drain = next(i for i, e in enumerate(events) if e["type"] == "drain")
    assert all(i < first_drain for i, e in enumerate(events) if e["type"] == "scale")
    drain_meta = next(e for e in events if e["type"] == "drain")["meta"]
    assert drain_meta == {"drained_by": "nomadscale", "decision_id": out.decision.id}
    st = fleet.nomad.job_status("ml-worker", namespace="ekyc")
    assert {g: st.groups[g].desired for g in st.groups} == {"ml-worker-a": 1, "ml-worker-b": 1}
    assert fleet.sim.size("zone-a", "mig-a") == 1 and fleet.sim.size("zone-b", "mig-b") == 1
    ev = st.groups["ml-worker-a"].events[0]
    assert ev.meta["nomadscale.decision_id"] == out.decision.id
    assert "nomadscale.forecast" in ev.meta and "nomadscale.headroom" in ev.meta
    # the next cycle has nothing left to do
    cluster.advance(1200)
    again = fleet.svc.run_policy("ekyc")
    assert again is not None and again.record.actions == [], again.record.line()
    assert _events(twin, "node_removed") and len(_events(twin, "node_removed")) == 4


def test_scale_up_resizes_the_instance_group_first(fleet: Fleet) -> None:
    cluster = fleet.twin.cluster
    fleet.demand["rpm"] = 900.0
    mark = len(fleet.sim.events)
    nmark = len(cluster.events)
    out = fleet.svc.run_policy("ekyc")
    assert out is not None and out.record.outcome == "applied", out.record.line()
    want = {z.zone: z.count for z in out.decision.zones} if out.decision else {}
    assert sum(want.values()) > 6
    resized = [e for e in fleet.sim.events[mark:] if e["type"] == "mig_resize"]
    assert {e["zone"]: e["size"] for e in resized} == want
    scales = [e for e in cluster.events[nmark:] if e["type"] == "scale"]
    added = [e for e in cluster.events[nmark:] if e["type"] == "node_added"]
    assert added and scales
    assert cluster.events.index(added[0]) < cluster.events.index(scales[0])


def test_next_cycle_finishes_a_half_applied_scale_down(fleet: Fleet) -> None:
    """A leader crashed after draining (recorded as pending) but before deleting."""
    cluster = fleet.twin.cluster
    svc = fleet.svc
    runner = svc.runners["ekyc"]
    fleet.demand["rpm"] = 120.0
    svc.elect()
    status = fleet.nomad.job_status("ml-worker", namespace="ekyc")
    from nomadscale.stages.decide import decide

    decision = decide(policy=runner.policy, series=LevelDemand(lambda _t: 120.0).history(
        end=fleet.clock.now(), lookback_s=21600, step_s=60), now=fleet.clock.now(),
        current=6, current_zones={"zone-a": 3, "zone-b": 3}, last_scale_at=None)  # fmt: skip
    actions = runner._plan(decision, status)
    draining = [n for a in actions if a.kind == "drain" for n in a.nodes]
    assert len(draining) == 4
    # crash simulation: only the scale + drain + pending record happened
    from nomadscale.service.actuator import Actuator

    act = Actuator(nomad=fleet.nomad, pool=None, lock=svc.ports.lock, clock=fleet.clock,
                   on_removing=runner._on_removing)  # fmt: skip
    partial = tuple(a for a in actions if a.kind in ("scale", "drain"))
    act.apply(partial, decision=decision, job="ml-worker", namespace="ekyc")
    assert all(cluster.find_node(n.name).status != "down" for n in draining)  # type: ignore[union-attr]
    cluster.advance(1200)
    out = svc.run_policy("ekyc")
    assert out is not None and out.record.outcome == "applied", out.record.line()
    gone = {e["name"] for e in cluster.events if e["type"] == "node_removed"}
    assert gone == {n.name for n in draining}
    # and the plan from actual state is now empty
    views = runner._views(with_allocs=False, pending=runner._pending())
    assert plan_actions(decision, fleet.nomad.job_status("ml-worker", namespace="ekyc"),
                        views, drain_deadline_s=600) == ()  # fmt: skip


def test_a_lost_lock_stops_every_write(fleet: Fleet) -> None:
    cluster = fleet.twin.cluster
    fleet.demand["rpm"] = 120.0
    mark, gmark = len(cluster.events), len(fleet.sim.events)
    fleet.svc.ports.lock.release()  # another process now may lead: this one must not write
    out = fleet.svc.runners["ekyc"].run(leader=True)
    assert out.record.outcome == "aborted", out.record.line()
    assert "leader lock lost" in out.record.reason
    assert out.record.actions and out.record.applied == []
    writes = [e for e in cluster.events[mark:] if e["type"] in ("scale", "drain", "node_removed")]
    assert writes == [] and fleet.sim.events[gmark:] == []


def test_dry_run_plans_without_writing(fleet: Fleet) -> None:
    cluster = fleet.twin.cluster
    fleet.demand["rpm"] = 120.0
    fleet.svc.dry_run = True
    mark = len(cluster.events)
    out = fleet.svc.run_policy("ekyc")
    assert out is not None and out.record.outcome == "planned"
    assert any(a.startswith("drain") for a in out.record.actions)
    assert [e for e in cluster.events[mark:] if e["type"] in ("scale", "drain")] == []


def test_zones_named_after_the_cloud_find_their_nodes_through_the_pinned_datacenter(
    twin_factory: TwinFactory,
) -> None:
    """The shipped naming: policy zones are GCE zones (``asia-southeast2-a``, where the MIGs
    live), the job pins each group to a Nomad datacenter (``zone-a``). Scale-in still drains
    the zone's oldest nodes before deleting exactly those instances."""
    names = {"zone-a": "asia-southeast2-a", "zone-b": "asia-southeast2-b"}
    with _fleet(twin_factory, names) as fleet:
        cluster = fleet.twin.cluster
        by_age = sorted(cluster.nodes.values(), key=lambda n: n.create_index)
        oldest = [n.name for dc in names for n in [m for m in by_age if m.datacenter == dc][:2]]
        mark = len(cluster.events)
        fleet.demand["rpm"] = 120.0  # -> 2 workers: 1 per zone
        out = fleet.svc.run_policy("ekyc")
        assert out is not None and out.record.outcome == "applied", out.record.line()
        events = cluster.events[mark:]
        by_id = {n.id: n.name for n in cluster.nodes.values()}
        drained = [by_id[e["node_id"]] for e in events
                   if e["type"] == "drain" and e["phase"] == "start"]  # fmt: skip
        removed = [e["name"] for e in events if e["type"] == "node_removed"]
        assert sorted(drained) == sorted(oldest), drained
        assert sorted(removed) == sorted(drained)
        assert fleet.sim.size("asia-southeast2-a", "mig-a") == 1
        assert fleet.sim.size("asia-southeast2-b", "mig-b") == 1


def test_a_node_held_by_a_healing_run_is_neither_capacity_nor_a_scale_in_victim(
    fleet: Fleet,
) -> None:
    """A healing run drains a node and keeps it ineligible while the host is maintained; it
    is empty, so 'empty-then-oldest' ranked it first: the autoscaler drained and deleted it
    under the run (which failed ~2 h later, 'left for a human'), and counted it as
    capacity. Now it stays, its instance stays in the MIG, and the scale-in takes others."""
    cluster, nomad = fleet.twin.cluster, fleet.nomad
    zone_a = sorted((n for n in cluster.nodes.values() if n.datacenter == "zone-a"),
                    key=lambda n: n.create_index)  # fmt: skip
    held = zone_a[-1]  # the youngest: never an 'oldest' victim, but empty once drained
    nomad.drain(held.id, deadline_s=60, meta={"nomadscale.run": "run-1"})
    cluster.advance(300)
    info = nomad.node(held.id)
    assert info.eligibility == "ineligible" and info.allocs_running == 0
    st = nomad.job_status("ml-worker", namespace="ekyc")
    assert st.groups["ml-worker-a"].desired == 3  # its worker moved to another node
    fleet.demand["rpm"] = 120.0  # -> 2 workers: 1 per zone
    out = fleet.svc.run_policy("ekyc")
    assert out is not None and out.record.outcome == "applied", out.record.line()
    assert cluster.nodes[held.id].status != "down", "deleted under the healing run"
    drained = {e["node_id"] for e in cluster.events if e["type"] == "drain"
               and e["phase"] == "start" and e.get("meta", {}).get("drained_by")}  # fmt: skip
    assert held.id not in drained
    assert fleet.sim.size("zone-a", "mig-a") == 2  # the held instance + the one needed
    serving = [n for n in cluster.nodes.values() if n.datacenter == "zone-a"
               and n.id != held.id and n.status != "down"]  # fmt: skip
    assert len(serving) == 1, out.record.actions
    assert fleet.sim.size("zone-b", "mig-b") == 1
    # the host comes back: the next cycle counts it again and trims the zone to its need
    nomad.set_eligibility(held.id, True)
    cluster.advance(1200)
    again = fleet.svc.run_policy("ekyc")
    assert again is not None and again.record.outcome == "applied", again.record.line()
    assert fleet.sim.size("zone-a", "mig-a") == 1


def test_a_scale_in_drain_taken_over_by_healing_is_not_deleted_under_it(fleet: Fleet) -> None:
    """A maintenance notice for a node the autoscaler is draining: healing takes the drain
    over (its own Meta). The autoscaler waited for 'its' drain and then deleted the node
    the run was waiting on; now it keeps it, says why, and no longer counts it as its
    removal (nor as capacity)."""
    cluster, nomad = fleet.twin.cluster, fleet.nomad
    oldest_a = min((n for n in cluster.nodes.values() if n.datacenter == "zone-a"),
                   key=lambda n: n.create_index)  # fmt: skip
    tick = fleet.clock.on_tick
    taken: list[str] = []

    def take_over() -> None:
        assert tick is not None
        tick()
        if not taken and nomad.node(oldest_a.id).draining:  # the autoscaler's drain runs
            nomad.drain(oldest_a.id, deadline_s=600, meta={"nomadscale.run": "run-7"})
            taken.append(oldest_a.id)

    fleet.clock.on_tick = take_over
    fleet.demand["rpm"] = 120.0  # -> 1 worker per zone: zone-a drains its 2 oldest
    out = fleet.svc.run_policy("ekyc")
    fleet.clock.on_tick = tick
    assert taken, "the drain was never seen running"
    assert out is not None, "no cycle"
    assert cluster.nodes[oldest_a.id].status != "down", "deleted under the healing run"
    assert any(
        e == f"node {oldest_a.name} in zone-a: its drain was taken over by healing run run-7: "
        "not deleted"
        for e in out.record.errors
    ), out.record.errors
    # the next cycle: the node is the run's (ineligible), neither ours to remove nor capacity
    cluster.advance(1200)
    again = fleet.svc.run_policy("ekyc")
    assert again is not None and again.record.outcome in ("applied", "unchanged"), again
    assert cluster.nodes[oldest_a.id].status != "down"
    assert not any(oldest_a.name in a for a in again.record.actions), again.record.actions
    assert fleet.sim.size("zone-a", "mig-a") == 2  # the held instance + the one needed
