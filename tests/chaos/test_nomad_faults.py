"""Nomad misbehaving under the service (the twin over HTTP with faults, real Consul for the
lock and the decision records, virtual time for retries and waits): retries are bounded, a
cycle that cannot finish ends with its reason recorded in KV and writes nothing half-way it
would not fix, and the next cycle recovers. Every cycle has a write to make: zone-a is set
back to 1 worker before each one."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nomadscale.config.settings import Secret, Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.values import Decision, Direction
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.pagerduty import PagerDutyAlerts
from nomadscale.service.actuator import Action, Actuator, NodeRef
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.chaos.conftest import Record
from tests.harness.pagerduty_server import PagerDutyServer
from tests.harness.services import ConsulAgent
from tests.harness.twin import Twin, TwinFactory
from tests.service.helpers import constant, make_policy

pytestmark = [pytest.mark.consul]

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
CYCLE = timedelta(minutes=20)
RETRIES = 3  # NomadClient's max_retries: attempts of an idempotent request
TIMEOUT = 0.5  # NomadClient's request timeout (real seconds)


@dataclass
class Case:
    fault: str
    arm: Callable[[Twin], None]
    expected: str
    outcome: str  # of the faulty cycle
    max_hits: int | None = None  # fault hits the cycle may cause (bounded retries)


JOB_READS = "^GET /v1/job/ml-worker"
CASES = [
    Case("nomad 500s on every job read", lambda t: t.cluster.faults.fail(JOB_READS, 500),
         "bounded retries, cycle failed with the reason in KV", "failed", RETRIES),
    Case("nomad reads time out", lambda t: t.cluster.faults.latency(JOB_READS, 2 * TIMEOUT),
         "bounded retries, cycle failed with the reason in KV", "failed", None),
    Case("nomad answers slowly (< timeout)",
         lambda t: t.cluster.faults.latency(JOB_READS, TIMEOUT / 5),
         "slow but applied", "applied"),
    Case("nomad has no leader", lambda t: t.cluster.faults.no_leader(True),
         "bounded retries, cycle failed with the reason in KV", "failed"),
    Case("nomad drops 2 connections", lambda t: t.cluster.faults.drop(JOB_READS, times=2),
         "retried within the cycle, applied", "applied", 2),
    Case("nomad 500 on the scale write",
         lambda t: t.cluster.faults.fail("^POST /v1/job/ml-worker/scale$", 500, times=1),
         "write not retried blindly, cycle failed, next cycle applies", "failed", 1),
]  # fmt: skip


def _rig(consul: ConsulAgent, prefix: str, twin_factory: TwinFactory,
         pd: PagerDutyServer | None = None, *, pinned: bool = False,
         ) -> tuple[Service, Twin, NomadClient, ConsulKV]:  # fmt: skip
    """``pinned``: the groups' migrate max_parallel is 0, so Nomad's drainer never marks an
    allocation for migration before the drain deadline (nomad/drainer/watch_jobs.go
    handleTaskGroup keeps count - max_parallel healthy)."""
    clock = FakeClock(T0)
    twin = twin_factory(nodes=12, clock=clock)
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address, clock=clock, timeout=TIMEOUT, max_retries=RETRIES)
    job = worker_job(policy, counts={"zone-a": 4, "zone-b": 4}, image="i",
                     update={"MaxParallel": 0})  # fmt: skip
    job["NodePool"] = "gpu"  # the twin's nodes: allocations get placed
    if pinned:
        for tg in job["TaskGroups"]:
            tg["Migrate"] = {"MaxParallel": 0}
    nomad.register_job(job)
    kv = ConsulKV(addr=consul.addr)
    lock = ConsulLock(addr=consul.addr, key=f"{prefix}leader", ttl_s=15, lock_delay_s=0,
                      holder=LockHolder(host="chaos", pid=0, started_at=""))  # fmt: skip
    alerts = PagerDutyAlerts(Secret("rk"), base_url=pd.url, timeout_s=2) if pd else None
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: constant(500.0),
                  alerts=alerts)  # fmt: skip
    svc = Service(settings=Settings(kv_prefix=prefix.rstrip("/"), lock_ttl_s=15),
                  policies=[policy], ports=ports, clock=clock, check=False)  # fmt: skip
    return svc, twin, nomad, kv


@pytest.mark.parametrize("case", CASES, ids=[c.fault for c in CASES])
def test_nomad_fault_then_recovery(
    case: Case,
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    fault_table: Record,
) -> None:
    svc, twin, nomad, kv = _rig(consul_agent, consul_prefix, twin_factory)
    clock = twin.clock
    assert isinstance(clock, FakeClock)

    def cycle(at: datetime, arm: Callable[[Twin], None] | None = None) -> Any:
        nomad.scale("ml-worker", "ml-worker-a", 1, message="drift", namespace="ekyc")
        if arm is not None:
            arm(twin)
        clock.set(at)
        res = svc.run_policy("ekyc", now=at)
        assert res is not None
        return res.record

    def zone_a() -> int:
        return nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired

    try:
        assert cycle(T0).outcome == "applied"  # healthy first
        hits0 = len(twin.cluster.faults.hits)
        bad = cycle(T0 + CYCLE, case.arm)
        hits = len(twin.cluster.faults.hits) - hits0
        twin.cluster.faults.clear()
        assert bad.outcome == case.outcome, (bad.outcome, bad.reason, bad.errors)
        if case.max_hits is not None:
            assert hits <= case.max_hits, twin.cluster.faults.hits
        if bad.outcome == "failed":
            assert "nomad" in " ".join(bad.errors)
            stored = [json.loads(e.value) for e in kv.list(f"{consul_prefix}decisions/ekyc/")]
            mine = [r for r in stored if r["id"] == bad.id]
            assert mine and mine[0]["outcome"] == "failed", stored
            assert mine[0]["reason"] or mine[0]["errors"], mine
            assert zone_a() == 1  # nothing applied half-way
        nxt = cycle(T0 + 2 * CYCLE)
        assert nxt.outcome == "applied", nxt.reason
        print(nxt.decision["explain"])
        want = {z["zone"]: z["count"] for z in nxt.decision["zones"]}
        assert zone_a() == want["zone-a"] > 1
    finally:
        svc.stop(timeout_s=5)
    why = (bad.reason or "; ".join(bad.errors))[:70] if bad.outcome == "failed" else "ok"
    fault_table(
        case.fault,
        case.expected + "; next cycle recovers",
        f"{bad.outcome} after {hits} fault hit(s): {why}; next cycle applied",
    )


def test_drain_that_never_finishes_is_bounded(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    fault_table: Record,
) -> None:
    """The twin's clock is frozen and nothing may migrate before the drain deadline, so the
    drain never completes: the wait ends at deadline + grace on the actuator's (virtual)
    clock, the node is kept (not deleted) and alerted."""
    pd = PagerDutyServer().start()
    try:
        svc, twin, nomad, _kv = _rig(consul_agent, consul_prefix, twin_factory, pd, pinned=True)
        assert svc.elect()
        twin.advance(300)  # allocations placed and running
        node = next(n for n in nomad.list_nodes(with_allocs=True) if n.allocs_running > 0)
        ref = NodeRef(id=node.id, name=node.name, allocs=node.allocs_running)
        act_clock = FakeClock(T0)  # not the twin's: the twin never moves on
        actuator = Actuator(nomad=nomad, pool=None, lock=svc.ports.lock, clock=act_clock,
                            alerts=svc.ports.alerts, poll_s=5.0, drain_grace_s=60.0)  # fmt: skip
        decision = Decision(policy="ekyc", decided_at=T0, desired=7, current=8,
                            direction=Direction.DOWN, reason="chaos")  # fmt: skip
        actions = [
            Action("drain", node.datacenter, "mig", nodes=(ref,), deadline_s=600),
            Action("wait_drain", node.datacenter, "mig", nodes=(ref,), deadline_s=600),
        ]
        res = actuator.apply(actions, decision=decision, job="ml-worker", namespace="ekyc")
        svc.stop(timeout_s=5)
        waited = act_clock.monotonic()
        assert nomad.node(node.id).draining  # still draining in Nomad
        assert res.kept == [node.name]
        assert any("still draining" in e for e in res.errors)
        assert 660 <= waited <= 660 + 5.0
        alerts = [e for e in pd.state.events if e.get("event_action") == "trigger"]
        assert alerts and node.name in alerts[0]["dedup_key"]
    finally:
        pd.stop()
    fault_table(
        "drain that never finishes",
        "wait bounded by deadline + grace; node kept, not deleted; alert",
        f"gave up after {waited:.0f}s virtual (600 + 60 grace); node kept; alert sent",
    )
