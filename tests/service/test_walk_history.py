"""What a cycle does with an imperfect Prometheus history (real Prometheus, the twin over
HTTP, the service's own cycle code; virtual time): a bad sample does not fail every cycle, a
bad query is one line naming the policy file and field, missing data never scales down and
the record and ``plan`` say why, and ``plan``/``forecast`` give the service's numbers for the
same ``now``, wherever in its slot the scheduler fired."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.policy import Policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.integrations.consul import LockHolder
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.control import Control
from nomadscale.service.cycle import CycleRunner, Ports
from nomadscale.service.loop import Service
from nomadscale.service.records import Recorder
from nomadscale.service.runtime import demand_for
from nomadscale.service.simulate import worker_job
from tests.deploy.helpers import TRACE
from tests.harness.promdata import Series
from tests.harness.services import PrometheusServer
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

pytestmark = pytest.mark.prometheus

SLOT = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
LINE = re.compile(r"upper (?P<upper>[\d.]+) rpm .*-> (?P<workers>\d+) workers")


def _fleet(twin_factory: TwinFactory, policy: Policy, *, each: int, clock: Any) -> Any:
    twin = twin_factory(nodes=40, clock=clock)
    twin.cluster.add_namespace("ekyc")
    job = worker_job(policy, counts={"zone-a": each, "zone-b": each}, image="i",
                     update={"MaxParallel": 0})  # fmt: skip
    NomadClient(address=twin.address).register_job(job)
    return twin


def _service(twin: Any, policy: Policy, prom: PrometheusServer, clock: FakeClock) -> Service:
    kv = MemoryKV(clock=clock)
    client = PrometheusClient(url=prom.url)
    ports = Ports(
        nomad=NomadClient(address=twin.address, clock=clock), kv=kv,
        lock=MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0),
        demand_for=lambda p: PrometheusDemandSource(client=client, query=p.demand.query),
    )  # fmt: skip
    return Service(settings=Settings(kv_prefix="ns"), policies=[policy], ports=ports,
                   clock=clock, poll_s=5, check=False)  # fmt: skip


def _counters(end: float, *, hours: float = 7.0) -> list[Series]:
    """Two instances' request counters (90 and 450 rpm), scraped every 15 s give or take a
    few ms (real scrapes are never exactly on time)."""
    rng = np.random.default_rng(3)
    out = []
    for inst, per_s in (("a", 1.5), ("b", 7.5)):
        ts = np.arange(end - hours * 3600, end, 15.0) + rng.uniform(0, 0.05, int(hours * 240))
        out.append(
            Series("req_total", {"instance": inst}, ts, np.cumsum(np.full(len(ts), 15 * per_s)))
        )
    return out


# --- a bad sample ----------------------------------------------------------------------------


def test_an_infinite_sample_in_the_lookback_does_not_fail_the_cycles(
    twin_factory: TwinFactory, prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    """One +Inf sample three hours back (a ratio query dividing by zero for a scrape) used to
    fail every cycle ("value ... is not finite") for as long as it stayed in the lookback; the
    fleet was never sized meanwhile. It is a gap now, and the cycle decides."""
    ts = np.arange((SLOT - timedelta(hours=7)).timestamp(), SLOT.timestamp() + 3600, 60.0)
    values = np.full(len(ts), 550.0)
    values[len(ts) - 240] = np.inf
    prom = prometheus_factory([Series("demand", {}, ts, values)])
    clock = FakeClock(SLOT)
    policy = make_policy()
    twin = _fleet(twin_factory, policy, each=10, clock=clock)
    svc = _service(twin, policy, prom, clock)
    try:
        for k in range(2):  # the warm start, then an incremental cycle
            at = SLOT + timedelta(minutes=20 * k)
            clock.set(at)
            res = svc.run_policy("ekyc", now=at)
            assert res is not None, k
            assert res.record.outcome in ("applied", "unchanged"), res.record.line()
            decision = res.record.decision
            assert decision is not None and decision["forecast"]["data_ok"] is True
            assert 6 <= decision["desired"] <= 8  # 550 rpm at 100 rpm a worker, + headroom
    finally:
        svc.stop(timeout_s=5)


# --- plan, forecast and the service ----------------------------------------------------------


def _cli_env(tmp_path: Path, twin: Any, prom: PrometheusServer, policy: Policy) -> dict[str, Any]:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    return {
        **{k: None for k in os.environ if k.startswith(("NOMAD", "CONSUL", "PROMETHEUS"))},
        "NOMAD_ADDR": twin.address,
        "PROMETHEUS_URL": prom.url,
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
    }


def _cli(args: list[str], env: dict[str, Any]) -> Any:
    _register()  # what main() does before running (idempotent)
    return CliRunner().invoke(cli, args, env=env)


def test_bad_promql_is_one_line_naming_the_policy_file_and_field(
    twin_factory: TwinFactory,
    prometheus_factory: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """``plan`` used to end with "prometheus query_range 'sum(rate(...': bad_data: ..." and
    the service logged and recorded the same every cycle: nothing said it is the policy's
    ``demand.query`` to fix, nor in which file."""
    prom = prometheus_factory([])
    policy = make_policy(demand={"source": "prometheus", "step": "1m", "lookback": "6h",
                                 "query": "sum(rate(ekyc_requests_total[5m]) * 60"})  # fmt: skip
    twin = _fleet(twin_factory, policy, each=2, clock=FakeClock(SLOT))
    env = _cli_env(tmp_path, twin, prom, policy)
    res = _cli(["plan", "ekyc"], env)
    assert res.exit_code == 1, res.output
    [line] = res.output.strip().splitlines()
    assert line.startswith("error: ekyc: plan failed: ") and "Traceback" not in res.output
    assert f"{tmp_path / 'policies' / 'ekyc.yaml'}: demand.query: " in line, line
    assert "parse error" in line
    res = _cli(["forecast", "ekyc"], env)
    assert res.exit_code == 1, res.output
    [line] = res.output.strip().splitlines()
    # the file too, as plan does (the query's source used to be only "demand.query")
    assert line.startswith(f"error: {tmp_path / 'policies' / 'ekyc.yaml'}: demand.query: "
                           "prometheus query_range 'sum(rate("), line  # fmt: skip


def test_no_recent_data_holds_the_fleet_and_plan_says_why(
    twin_factory: TwinFactory,
    prometheus_factory: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """Scrapes stopped 40 minutes ago (demand was low): ``plan`` keeps the 20 workers, the
    decision record says the history is missing, and ``forecast`` says it is incomplete."""
    now = time.time() // 60 * 60
    ts = np.arange(now - 6 * 3600, now - 40 * 60, 60.0)
    prom = prometheus_factory([Series("demand", {}, ts, np.full(len(ts), 120.0))])
    policy = make_policy()
    twin = _fleet(twin_factory, policy, each=10, clock=FakeClock(SLOT))
    env = _cli_env(tmp_path, twin, prom, policy)
    res = _cli(["plan", "ekyc", "--json"], env)
    assert res.exit_code == 0, res.output
    decision = json.loads(res.output)["decision"]
    assert decision["desired"] == decision["current"] == 20
    assert decision["forecast"]["data_ok"] is False and "no_data_hold" in decision["bounds_hit"]
    assert "demand history missing: not scaling down" in decision["reason"]
    res = _cli(["plan", "ekyc"], env)
    assert res.exit_code == 0 and "demand history missing: not scaling down" in res.output
    assert "would scale" not in res.output
    res = _cli(["forecast", "ekyc"], env)
    assert res.exit_code == 0 and "(history incomplete)" in res.output, res.output


def _trace_series(*, last: float) -> tuple[Series, float]:
    """The bundled real trace (10-minute steps, rpm) as a gauge whose last sample is at
    ``last`` (floored to the step); and its first sample's time."""
    tr = TraceDemandSource(TRACE).trace
    ts = np.arange(len(tr.rpm)) * tr.step_s
    ts = ts + (last // tr.step_s * tr.step_s - ts[-1])
    return Series("ekyc_demand", {}, ts, tr.rpm), float(ts[0])


def _member(
    twin: Any, policy: Policy, prom: PrometheusServer, *, kv: MemoryKV, clock: FakeClock, who: str
) -> Service:
    """One process of the service (leader or standby: the shared lock decides), reading
    Prometheus as ``nomadscale run`` does (``demand_for`` from the settings)."""
    settings = Settings(kv_prefix="ns", prometheus_url=prom.url)
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0,
                      holder=LockHolder(host=who, pid=0, started_at=""))  # fmt: skip
    ports = Ports(nomad=NomadClient(address=twin.address, clock=clock), kv=kv, lock=lock,
                  demand_for=demand_for(settings))  # fmt: skip
    return Service(settings=settings, policies=[policy], ports=ports, clock=clock, poll_s=5,
                   check=False)  # fmt: skip


def _said(decision: dict[str, Any]) -> tuple[float, int]:
    """What an operator compares: the forecast's upper bound and the workers it asks for."""
    return decision["forecast"]["upper"], decision["meta"]["raw"]


def test_plan_forecast_and_the_service_agree_for_the_same_now(
    twin_factory: TwinFactory,
    prometheus_factory: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """The service's leader keeps one forecaster for 20 hours of cycles over a real trace, a
    standby started hours later follows, takes over, and keeps deciding; at every few slots
    a ``plan`` (a fresh dry-run cycle) and the standby's forecaster give the acting leader's
    upper bound and worker count exactly, and at the end ``plan --json`` and ``forecast`` as
    an operator runs them (against Prometheus, at the wall clock) give the new leader's.
    They used to differ once the service had run past its first cycle (its forecaster was
    warm-started from the lookback when it started, plan's from the lookback at ``now``):
    by a median 6% of the upper bound, a worker or more in most cycles."""
    series, first = _trace_series(last=time.time() + 3600)
    prom = prometheus_factory([series], lookback_s=300)
    policy = make_policy(
        rpm_per_worker=4000.0,
        demand={"source": "prometheus", "step": "10m", "lookback": "6h", "query": "ekyc_demand"},
    )  # fmt: skip
    end = datetime.fromtimestamp(time.time() // 1200 * 1200, UTC)  # the wall clock's slot
    clock = FakeClock(end - timedelta(hours=30))
    assert clock.now().timestamp() - first > 86400  # a day of data before the first cycle
    twin = _fleet(twin_factory, policy, each=2, clock=clock)
    kv = MemoryKV(clock=clock)
    a = _member(twin, policy, prom, kv=kv, clock=clock, who="a")
    b: Service | None = None
    plan_ports = replace(a.ports, kv=MemoryKV(clock=clock))
    checked = 0
    try:
        for k in range(30 * 3):  # every slot from 30 h before the wall clock's
            slot = end - timedelta(hours=30) + timedelta(minutes=20 * k)
            clock.set(slot)
            if k == 3 * 10:  # b starts 10 h after a
                b = _member(twin, policy, prom, kv=kv, clock=clock, who="b")
            if k == 3 * 20:
                a.ports.lock.release()  # a steps down (or its host dies): b takes over
                a.stop(timeout_s=5)
            leader = a if k < 3 * 20 else b
            assert leader is not None
            res = leader.run_policy("ekyc", now=slot)
            assert res is not None and res.record.decision is not None, (k, res)
            live = res.record.decision
            assert res.record.inputs["forecast"].split()[0] in ("warm", "incremental",
                                                                  "rewarm"), k  # fmt: skip
            if b is not None and leader is a:  # the standby follows the history
                skipped = b.run_policy("ekyc", now=slot)
                assert skipped is not None and skipped.record.skipped == "not-leader"
            if k % 7:
                continue
            runner = CycleRunner(policy=policy, ports=plan_ports, control=Control(plan_ports.kv),
                                 recorder=Recorder(kv=None), clock=clock)  # fmt: skip
            planned = runner.run(leader=False, dry_run=True, now=slot).record.decision
            assert planned is not None
            assert _said(planned) == _said(live), (k, slot)
            if b is not None and leader is a:
                fc, _ = b.runners["ekyc"].forecaster.forecast(b.ports.demand(policy), now=slot)
                assert fc == (fc_a := a.runners["ekyc"].forecaster.forecast(
                    a.ports.demand(policy), now=slot)[0]), (k, fc, fc_a)  # fmt: skip
            checked += 1
        assert b is not None and b.leader and checked == 13

        # the operator's commands at the wall clock, and the new leader's cycle at that now
        env = _cli_env(tmp_path, twin, prom, policy)
        for _ in range(3):  # both commands within one step (10 minutes), else again
            res_plan = _cli(["plan", "ekyc", "--json"], env)
            assert res_plan.exit_code == 0, res_plan.output
            planned = json.loads(res_plan.output)["decision"]
            printed = _cli(["forecast", "ekyc"], env)
            now = datetime.fromisoformat(planned["decided_at"])
            if time.time() // 600 == now.timestamp() // 600:
                break
        assert printed.exit_code == 0, printed.output
        m = LINE.search(printed.output)
        assert m is not None, printed.output
        assert now - end < timedelta(minutes=20)  # in the slot after the last one b ran
        clock.set(now)
        res = b.run_policy("ekyc", now=now)
        assert res is not None and res.record.decision is not None, res
        live = res.record.decision
        assert _said(live) == _said(planned)
        assert (f"{live['forecast']['upper']:.1f}", live["meta"]["raw"]) == (
            m["upper"], int(m["workers"]))  # fmt: skip
    finally:
        a.stop(timeout_s=5)
        if b is not None:
            b.stop(timeout_s=5)


def test_a_cycle_fired_after_its_slot_decides_what_plan_decides_at_the_slot(
    twin_factory: TwinFactory, prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    """APScheduler fires a few ms after the slot and the cycle reads the clock: its history
    used to sit on that instant's grid (rate() evaluated 4 ms later, every step), so the
    decision differed from a ``plan`` at the slot, and the kept forecaster stayed on the
    shifted grid from then on. The history is on the step grid now."""
    prom = prometheus_factory(_counters(SLOT.timestamp() + 3600), lookback_s=300)
    policy = make_policy(demand={"source": "prometheus", "step": "1m", "lookback": "6h",
                                 "query": "sum(rate(req_total[5m])) * 60"})  # fmt: skip
    clock = FakeClock(SLOT)
    twin = _fleet(twin_factory, policy, each=2, clock=clock)
    client = PrometheusClient(url=prom.url)
    plan_ports = Ports(
        nomad=NomadClient(address=twin.address), kv=MemoryKV(clock=clock),
        lock=MemoryLock(kv=MemoryKV(clock=clock), key="x", ttl_s=30),
        demand_for=lambda p: PrometheusDemandSource(client=client, query=p.demand.query),
    )  # fmt: skip

    def plan_at(at: datetime) -> dict[str, Any]:
        runner = CycleRunner(policy=policy, ports=plan_ports, control=Control(plan_ports.kv),
                             recorder=Recorder(kv=None), clock=clock)  # fmt: skip
        res = runner.run(leader=False, dry_run=True, now=at)
        assert res.record.decision is not None, res.record.line()
        return res.record.decision

    svc = _service(twin, policy, prom, clock)
    try:
        for k in range(2):  # the warm start, then an incremental cycle
            slot = SLOT + timedelta(minutes=20 * k)
            fired = slot + timedelta(milliseconds=4)
            clock.set(fired)
            res = svc.run_policy("ekyc", now=fired)
            assert res is not None and res.record.decision is not None, res
            live = res.record.decision
            assert res.record.inputs["history_end"] == slot.isoformat()
            planned = plan_at(slot)
            assert live["forecast"]["upper"] == planned["forecast"]["upper"], k
            assert live["desired"] == planned["desired"]
    finally:
        svc.stop(timeout_s=5)
