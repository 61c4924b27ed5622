"""Chaos round 2: the cycle's writes (GCE instance groups, Nomad counts per zone, drains and
instance deletes) failing between and during themselves. Real Consul for the lock and the
decision records, the twin over HTTP, its Compute endpoint behind a loopback fault proxy
(``helpers.GceFaults``), virtual time for every wait."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.gce import GceMigPool
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.records import TAKEOVER
from nomadscale.service.simulate import worker_job
from nomadscale.sim.compute import ComputeServer
from tests.chaos.conftest import Record
from tests.chaos.helpers import (
    GceFaults,
    HoldNthScale,
    MigRig,
    level_series,
    mig_fleet,
    run_env,
    start_service,
    stop_process,
    wait_for,
)
from tests.harness.services import ConsulAgent, free_port, metrics_text
from tests.harness.twin import TwinFactory
from tests.service.helpers import LevelDemand, make_policy

pytestmark = [pytest.mark.consul]


@dataclass
class Rig(MigRig):
    gce: GceFaults


def _standby(rig: Rig, consul: ConsulAgent) -> Service:
    """A second service process on the same Nomad, MIGs and Consul, with its own lock."""
    a = rig.svc.ports
    lock = ConsulLock(addr=consul.addr, key=f"{rig.prefix}/leader", ttl_s=15, lock_delay_s=0,
                      holder=LockHolder(host="standby", pid=1, started_at=""))  # fmt: skip
    ports = Ports(nomad=a.nomad, kv=a.kv, lock=lock, pool_for=a.pool_for, demand_for=a.demand_for)
    return Service(settings=rig.svc.settings, policies=list(rig.svc.policies.values()),
                   ports=ports, clock=rig.clock, poll_s=10, check=False, host="standby")  # fmt: skip


def _destroy_session(consul: ConsulAgent, sid: str) -> None:
    req = urllib.request.Request(f"{consul.addr}/v1/session/destroy/{sid}", method="PUT")
    urllib.request.urlopen(req, timeout=2).close()


@pytest.fixture
def rig(consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory) -> Iterator[Rig]:
    """3 nodes per zone in MIGs mig-a/b, 3 workers per zone, demand 560 rpm (no change)."""
    twin, sim, clock = mig_fleet(twin_factory)
    cluster = twin.cluster
    policy = make_policy(node_pool=True)
    level = {"rpm": 560.0}
    prefix = consul_prefix.rstrip("/")
    with ComputeServer(sim) as server, GceFaults(server.base_url) as gce:
        nomad = NomadClient(address=twin.address, clock=clock)
        # a count change starts a deployment whose workers Nomad watches for 90s
        update = {"MaxParallel": 1, "MinHealthyTime": 90 * 10**9}
        nomad.register_job(worker_job(policy, counts={"zone-a": 3, "zone-b": 3}, image="img:1",
                                      update=update))  # fmt: skip
        cluster.advance(600)
        kv = ConsulKV(addr=consul_agent.addr)
        lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=15,
                          lock_delay_s=0, holder=LockHolder(host="chaos2", pid=0,
                                                            started_at=""))  # fmt: skip
        pool = GceMigPool(project="proj", credentials=AnonymousCredentials(),
                          base_url=gce.base_url, clock=clock, poll_s=1,
                          operation_timeout_s=120)  # fmt: skip
        ports = Ports(nomad=nomad, kv=kv, lock=lock, pool_for=lambda _p: pool,
                      demand_for=lambda _p: LevelDemand(lambda _t: level["rpm"]))  # fmt: skip
        svc = Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=15), policies=[policy],
                      ports=ports, clock=clock, poll_s=10, check=False)  # fmt: skip
        try:
            yield Rig(twin, sim, svc, level, clock, nomad, kv, prefix, gce)
        finally:
            svc.stop(timeout_s=5)


def _cycle(rig: Rig) -> Any:
    rig.clock.sleep(1200)  # the next cycle slot
    res = rig.svc.run_policy("ekyc")
    assert res is not None
    return res.record


def test_gce_429_with_an_http_date_retry_after_is_retried(rig: Rig, fault_table: Record) -> None:
    rig.demand["rpm"] = 900.0  # scale up: the MIGs grow first
    rig.gce.fail("^GET /compute/v1/projects/proj/zones/zone-a/instanceGroupManagers/mig-a$",
                 429, times=1, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # fmt: skip
    rig.gce.fail("^POST .*/mig-b/resize$", 503, times=1)
    rec = _cycle(rig)
    assert rec.outcome == "applied", rec.line()
    want = {z["zone"]: z["count"] for z in rec.decision["zones"]}
    assert rig.sizes() == want
    assert rig.counts() == {"ml-worker-a": want["zone-a"], "ml-worker-b": want["zone-b"]}
    stored = [r for r in rig.records() if r["id"] == rec.id]
    assert stored and stored[0]["outcome"] == "applied"
    fault_table(
        "GCE 429 (Retry-After as a date) on the MIG read, 503 on a resize",
        "retried with a bounded wait; the cycle applies",
        f"applied: MIGs {rig.sizes()}, counts {rig.counts()}",
    )


def _lost_workers(rig: Rig, names: set[str]) -> list[str]:
    """Workers that were running on a node of ``names`` when it went away."""
    allocs = [a for allocs in rig.twin.cluster.allocs_by_job.values() for a in allocs]
    return [a.name for a in allocs if a.node_name in names and a.client_status == "lost"]


def test_a_failed_instance_delete_never_lets_the_resize_down_pick_nodes_with_workers(
    rig: Rig, fault_table: Record
) -> None:
    """zone-a's MIG still counts a lost instance (target 3, 2 live nodes), so scaling to one
    worker per zone plans delete(drained victim) + resize 2 -> 1 (the lost one). The delete
    answers 503: resizing down anyway would let the MIG pick which instance goes, and the
    twin (like GCE, which may take any) removes the node that runs the zone's worker."""
    cluster = rig.twin.cluster
    oldest = min((n for n in cluster.nodes.values() if n.datacenter == "zone-a"),
                 key=lambda n: n.create_index)  # fmt: skip
    cluster.lose_node(oldest.id)
    cluster.advance(60)
    mig = rig.sim.migs[("zone-a", "mig-a")]  # instances created in node order, 1 min apart:
    for name in mig.instances:  # which one a resize down takes is the cloud's choice
        node = cluster.find_node(name)
        assert node is not None
        mig.created[name] = cluster.now_dt() + timedelta(minutes=node.create_index)
    assert rig.sim.size("zone-a", "mig-a") == 3
    rig.demand["rpm"] = 120.0  # -> 1 worker per zone
    rig.gce.fail("^POST .*/zones/zone-a/instanceGroupManagers/mig-a/deleteInstances$", 503)
    mark = len(rig.sim.events)
    rec = _cycle(rig)
    assert rec.outcome == "failed", rec.line()
    assert any("deleteInstances" in e or "delete" in e for e in rec.errors), rec.errors
    removed = {n for e in rig.sim.events[mark:] for n in e.get("removed", [])}
    assert not _lost_workers(rig, removed), (removed, rec.line())
    assert not any(a.startswith("resize zone-a") for a in rec.applied), rec.applied
    # the next cycle finishes the zone: the drained victim deleted, the lost one resized away
    rig.clock.sleep(60)
    nxt = _cycle(rig)
    assert nxt.outcome == "applied", nxt.line()
    assert rig.sizes() == {"zone-a": 1, "zone-b": 1}
    assert rig.counts() == {"ml-worker-a": 1, "ml-worker-b": 1}
    gone = {n for e in rig.sim.events[mark:] for n in e.get("removed", []) + e.get("instances", [])}
    assert not _lost_workers(rig, gone), gone
    fault_table(
        "GCE 503 on deleteInstances before a planned MIG resize down",
        "resize down skipped (the MIG would choose the instance); next cycle converges",
        f"cycle failed: {rec.errors[0][:60]}; no worker lost; next cycle MIGs {rig.sizes()}",
    )


def test_lock_lost_between_zone_scales_fences_the_rest_and_the_takeover_finishes_it(
    rig: Rig, consul_agent: ConsulAgent, fault_table: Record
) -> None:
    """The leader scales zone-a, then waits for the deployment that count change started;
    meanwhile Consul ends its session (a partition, a long GC pause). It must write nothing
    more; the standby takes the lock and its takeover cycle (same slot) finishes zone-b at
    once, and the history tells what the interrupted cycle applied."""
    cluster = rig.twin.cluster
    lock_a = rig.svc.ports.lock
    assert isinstance(lock_a, ConsulLock)
    rig.clock.sleep(1200)
    now = rig.clock.now()
    rig.demand["rpm"] = 120.0  # 6 -> 2 workers: zone-a first, then zone-b after its deployment
    mark, gmark = len(cluster.events), len(rig.sim.events)
    lost: list[float] = []

    def partition() -> None:  # the clock's tick while the leader waits between the zones
        scaled = [e for e in cluster.events[mark:] if e["type"] == "scale"]
        if scaled and not lost and lock_a.session_id:
            _destroy_session(consul_agent, lock_a.session_id)
            lost.append(len(cluster.events))

    rig.clock.on_tick = partition
    res = rig.svc.run_policy("ekyc", now=now)
    rig.clock.on_tick = None
    assert res is not None and lost, res
    rec = res.record
    assert rec.outcome == "aborted" and "leader lock lost" in rec.reason, rec.line()
    dep = rig.nomad.job_status("ml-worker", namespace="ekyc").active_deployment
    assert dep, "zone-a's deployment should still run at the takeover"
    assert rec.applied == ["scale zone-a/ml-worker-a 3 -> 1"], rec.applied
    writes = [e for e in cluster.events[lost[0] :] if e["type"] in ("scale", "drain")]
    assert writes == [] and rig.sim.events[gmark:] == []  # fenced: nothing after the loss
    assert rig.counts() == {"ml-worker-a": 1, "ml-worker-b": 3}
    b = _standby(rig, consul_agent)
    try:
        assert b.elect()
        out = b.run_policy("ekyc", now=now, trigger=TAKEOVER)  # the same slot
        assert out is not None
        assert out.record.outcome == "applied", out.record.line()
        assert rig.counts() == {"ml-worker-a": 1, "ml-worker-b": 1}
        assert rig.sizes() == {"zone-a": 1, "zone-b": 1}
        history = {r["id"]: r for r in rig.records()}
        mine = history[out.record.id]
        assert (mine["trigger"], mine["host"], mine["outcome"]) == ("takeover", "standby",
                                                                    "applied")  # fmt: skip
        assert mine["inputs"]["interrupted"] == rec.id
        old = history[rec.id]  # stored by nobody at the loss: finished by the standby
        assert old["outcome"] == "aborted" and old["reason"].startswith("interrupted"), old
        assert old["applied"] == ["scale zone-a/ml-worker-a 3 -> 1"]
        assert "interrupted" in old["error_kinds"]
        last = b.status()["policies"]["ekyc"]["last"]
        assert last["id"] == out.record.id and last["outcome"] == "applied"
        metric = b.metrics.registry.get_sample_value(
            "nomadscale_errors_total", {"policy": "ekyc", "kind": "interrupted"})  # fmt: skip
        assert metric == 1.0
        stuck = [n.name for n in cluster.nodes.values()
                 if n.status != "down" and (n.draining or n.eligibility != "eligible")]  # fmt: skip
        assert stuck == []
    finally:
        b.stop(timeout_s=5)
    fault_table(
        "leader lock lost between the zone scales (deployment wait)",
        "no write after the loss; takeover finishes the slot at once; history tells",
        f"aborted after zone-a; takeover applied {rig.counts()}; old record: interrupted",
    )


@pytest.mark.prometheus
@pytest.mark.slow
def test_leader_sigkilled_between_zone_scales_takeover_cycle_converges_and_tells(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    prometheus_factory: Any,
    tmp_path: Path,
    fault_table: Record,
) -> None:
    """A real ``nomadscale run`` leader is SIGKILLed after zone-a's scale, its zone-b call
    held. The standby's first cycle after taking the lock (``takeover``, the same slot) must
    finish zone-b itself, without a kick and not a cycle (20 min) later, and the decision
    history must show the killed cycle as interrupted with what it applied."""
    prefix = consul_prefix.rstrip("/")
    now = time.time()
    prom = prometheus_factory([level_series(1000.0, start=now - 7 * 3600, end=now + 600)])
    policy = make_policy()  # cycle 20m: the next scheduled slot is far away
    twin = twin_factory(nodes=40, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    hold = HoldNthScale("ml-worker", nth=2)
    twin.cluster.faults = hold
    nomad = NomadClient(address=twin.address)
    nomad.register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    ports = {"a": free_port(), "b": free_port()}

    def env(who: str) -> dict[str, str]:
        return run_env(tmp_path, policy, nomad=twin.address, consul=consul_agent.addr,
                       prometheus=prom.url, prefix=prefix, lock_ttl="11s",
                       http_port=ports[who])  # fmt: skip

    kv = ConsulKV(addr=consul_agent.addr)

    def history() -> list[dict[str, Any]]:
        return [json.loads(e.value) for e in kv.list(f"{prefix}/decisions/ekyc/")]

    a = start_service(env("a"), tmp_path / "a.log")
    b = None
    try:
        assert hold.holding.wait(30), (tmp_path / "a.log").read_text()[-3000:]
        journal = wait_for(lambda: [r for r in history() if r["outcome"] == "applying"
                                    and r["applied"]], 5, "the journal")  # fmt: skip
        b = start_service(env("b"), tmp_path / "b.log")
        wait_for(lambda: "nomadscale_is_leader 0.0" in metrics_text(ports["b"]), 20, "b up")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        hold.release.set()  # the held request is dropped: it never reached Nomad
        st = nomad.job_status("ml-worker", namespace="ekyc")
        half = st.groups["ml-worker-a"].desired
        assert half > 1 and st.groups["ml-worker-b"].desired == 1

        def converged() -> dict[str, Any] | None:
            for r in history():
                if r["outcome"] == "applied":
                    return r
            return None

        done = wait_for(converged, 2 * 11 + 20, "the takeover cycle to apply", every=0.2)
        status = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{ports['b']}/status", timeout=2).read())  # fmt: skip
        metrics = metrics_text(ports["b"])
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0
    finally:
        hold.release.set()
        stop_process(a)
        if b is not None:
            stop_process(b)
    assert done["trigger"] == "takeover", done  # the first cycle of the new leader
    st = nomad.job_status("ml-worker", namespace="ekyc")
    want = {z["group"]: z["count"] for z in done["decision"]["zones"]}
    assert {g: st.groups[g].desired for g in want} == want
    assert want["ml-worker-a"] == half  # a's half was right and is not written again
    assert len(st.groups["ml-worker-a"].events) == 1 and len(st.groups["ml-worker-b"].events) == 1
    killed = {r["id"]: r for r in history()}[journal[0]["id"]]
    assert killed["outcome"] == "aborted" and killed["reason"].startswith("interrupted"), killed
    assert killed["applied"] == [f"scale zone-a/ml-worker-a 1 -> {half}"]
    assert done["inputs"]["interrupted"] == killed["id"]
    last = status["policies"]["ekyc"]["last"]
    assert (last["id"], last["trigger"]) == (done["id"], "takeover")
    assert 'nomadscale_errors_total{kind="interrupted",policy="ekyc"} 1.0' in metrics
    fault_table(
        "leader SIGKILL between zone scales (no kick, cycle 20m)",
        "the takeover cycle finishes zone-b; the killed cycle is recorded as interrupted",
        f"takeover applied {want}; killed cycle: aborted, interrupted, applied {killed['applied']}",
    )


def test_a_drain_cancelled_with_workers_on_the_node_never_deletes_it(
    rig: Rig, fault_table: Record
) -> None:
    """While the leader waits for its drains, an operator cancels one (``nomad node drain
    -disable``) with workers still on the node. A drain that ended is not a node that is
    empty: deleting the instance would kill those workers."""
    cluster = rig.twin.cluster
    job = rig.nomad.get_job("ml-worker", namespace="ekyc").spec
    for tg in job["TaskGroups"]:  # nothing migrates before the drain deadline
        tg["Migrate"] = {"MaxParallel": 0}
    rig.nomad.register_job(job)
    rig.clock.sleep(300)
    rig.demand["rpm"] = 120.0
    cancelled: list[tuple[str, int]] = []

    def operator() -> None:  # the clock's tick while the leader waits for the drains
        if cancelled:
            return
        nodes = rig.nomad.list_nodes(node_pool="gpu", with_allocs=True)
        busy = [n for n in nodes if n.draining and n.allocs_running > 0]
        for n in busy:
            rig.nomad.cancel_drain(n.id, mark_eligible=True)
            cancelled.append((n.name, n.allocs_running))

    rig.clock.on_tick = operator
    mark = len(rig.sim.events)
    rec = _cycle(rig)
    rig.clock.on_tick = None
    assert cancelled, "no drained node had workers when the drain was cancelled"
    names = {name for name, _n in cancelled}
    deleted = {n for e in rig.sim.events[mark:] for n in e.get("instances", [])}
    assert not names & deleted, (names, deleted, rec.line())
    assert not _lost_workers(rig, names | deleted)
    assert rec.outcome == "failed", rec.line()
    assert any(name in e and "still" in e for e in rec.errors for name in names), rec.errors
    for name in names:
        node = cluster.find_node(name)
        assert node is not None and node.status != "down"
    fault_table(
        "operator cancels a drain mid-wait, workers still on the node",
        "the node is not deleted; the cycle says why",
        f"kept {sorted(names)}; {rec.errors[0][:70]}",
    )
