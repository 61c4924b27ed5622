"""``nomadscale forecast`` forecasts exactly as the live loop decides: for the same policy,
trace and ``now`` it prints the upper bound and the worker count of the live cycle's decision
record (``plan --json`` run as an operator runs it, and a leader cycle of the service that
scales the job on the twin over HTTP). Headroom is calibrated on whole workers everywhere: at
this capacity the proportional headroom (capacity unknown) would ask for one worker more."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.integrations.consul import LockHolder
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.runtime import demand_for
from nomadscale.service.simulate import _SimClock, worker_job
from nomadscale.stages.decide import forecast_config_from, lookback_s
from nomadscale.stages.forecast import forecast
from tests.deploy.helpers import TRACE
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

RPM = 4000.0  # 15 workers for the trace's last cycle (16 with proportional headroom)
LINE = re.compile(r"upper (?P<upper>[\d.]+) rpm .*-> (?P<workers>\d+) workers")


def _cli(args: list[str], env: dict[str, str | None]) -> str:
    _register()  # what main() does before running (idempotent)
    res = CliRunner().invoke(cli, args, env=env)
    assert res.exit_code == 0, res.output
    return res.output


def test_forecast_command_prints_the_live_cycles_upper_bound_and_workers(
    twin_factory: TwinFactory, tmp_path: Path
) -> None:
    policy = make_policy(rpm_per_worker=RPM, demand={"source": "trace", "trace": TRACE,
                                                     "step": "10m"})  # fmt: skip
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    now = TraceDemandSource(TRACE).trace.end  # where both commands put "now" on a trace
    fake = FakeClock(now - timedelta(hours=12))
    twin = twin_factory(nodes=20, clock=fake)
    twin.cluster.add_namespace("ekyc")
    job = worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i",
                     update={"MaxParallel": 0})  # fmt: skip
    NomadClient(address=twin.address).register_job(job)
    env: dict[str, str | None] = {
        **{k: None for k in os.environ if k.startswith(("NOMAD", "CONSUL", "PROMETHEUS"))},
        "NOMAD_ADDR": twin.address,
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
    }

    # the operator's view: `forecast`, and the decision record of a dry-run cycle (`plan`)
    m = LINE.search(_cli(["forecast", "ekyc"], env))
    assert m is not None
    printed_upper, printed_workers = m["upper"], int(m["workers"])
    planned: dict[str, Any] = json.loads(_cli(["plan", "ekyc", "--json"], env))["decision"]

    # the live loop: a standby of the service that followed the history for 12 hours (its
    # kept forecaster fed slot by slot) takes over and decides at the same `now`, applied to
    # the twin
    clock = _SimClock(fake, twin.cluster.advance)
    kv = MemoryKV(clock=clock)
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0,
                      holder=LockHolder(host="b", pid=0, started_at=""))  # fmt: skip
    other = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0,
                       holder=LockHolder(host="a", pid=0, started_at=""))  # fmt: skip
    settings = Settings(kv_prefix="ns")
    ports = Ports(nomad=NomadClient(address=twin.address, clock=clock), kv=kv, lock=lock,
                  demand_for=demand_for(settings))  # fmt: skip
    svc = Service(settings=settings, policies=[policy], ports=ports, clock=clock, poll_s=5,
                  check=False)  # fmt: skip
    for k in range(36, 0, -1):  # the other process leads meanwhile
        fake.set(now - timedelta(minutes=20 * k))
        assert other.acquire()
        skipped = svc.run_policy("ekyc", now=fake.now())
        assert skipped is not None and skipped.record.skipped == "not-leader"
    fake.set(now)
    other.release()
    clock.on_tick = lock.acquire  # the lock tick renews as virtual time passes
    out = svc.run_policy("ekyc", now=now)
    assert out is not None and out.record.outcome == "applied", out.record.line()
    assert out.record.inputs["forecast"].startswith("incremental (2 steps read"), out.record.inputs
    live = out.record.decision
    assert live is not None

    for rec in (planned, live):
        assert rec["decided_at"] == now.isoformat()
        assert f"{rec['forecast']['upper']:.1f}" == printed_upper, (rec["forecast"], m[0])
        assert rec["meta"]["raw"] == rec["desired"] == printed_workers, (rec["meta"], m[0])
    st = NomadClient(address=twin.address).job_status("ml-worker", namespace="ekyc")
    assert sum(g.desired for g in st.groups.values()) == printed_workers == 15

    # proportional headroom (a caller without the capacity) sizes this cycle differently
    series = TraceDemandSource(TRACE).history(end=now, lookback_s=lookback_s(policy),
                                              step_s=policy.demand.step_s)  # fmt: skip
    blind = replace(forecast_config_from(policy), capacity_rpm=None)
    assert forecast(series, now=now, config=blind).upper / RPM > printed_workers
