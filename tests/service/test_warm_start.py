"""The first cycle after a start or a takeover is a steady one: the service warms every
forecaster at start-up, and a standby keeps its forecasters up to date each cycle slot, so the
new leader reads only the steps since the last slot (the twin over HTTP, in-memory KV/lock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.ports import DemandSeries
from nomadscale.integrations.consul import LockHolder
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import _SimClock, worker_job
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

START = datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC)


class Reads:
    """Fixed history (a daily wave on a 1-minute grid) that counts the steps each call reads."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        last = int(end.timestamp() // step_s)
        n = int(lookback_s // step_s)
        t = (np.arange(last - n, last) * step_s) / 86400.0
        self.reads.append(n)
        start = datetime.fromtimestamp((last - n) * step_s, tz=UTC)
        return DemandSeries(start=start, step_s=step_s, values=400 + 150 * np.sin(2 * np.pi * t))


def _service(twin: object, clock: _SimClock, kv: MemoryKV, who: str, src: Reads) -> Service:
    policy = make_policy()
    nomad = NomadClient(address=twin.address, clock=clock)  # type: ignore[attr-defined]
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0,
                      holder=LockHolder(host=who, pid=0, started_at=""))  # fmt: skip
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: src)
    return Service(settings=Settings(kv_prefix="ns"), policies=[policy], ports=ports,
                   clock=clock, poll_s=5, check=False)  # fmt: skip


def _to_slot(clock: _SimClock, k: int) -> None:
    """Virtual time to 5 s into the k-th 20-minute slot after START (cron fires on time)."""
    clock.sleep((START + timedelta(seconds=1200 * k) - clock.now()).total_seconds())


def _fleet(twin_factory: TwinFactory) -> tuple[Any, _SimClock]:
    """An 8-node twin in virtual time from START with the policy's job (2 workers per zone)."""
    fake = FakeClock(START)
    twin = twin_factory(nodes=8, clock=fake)
    twin.cluster.add_namespace("ekyc")
    NomadClient(address=twin.address).register_job(
        worker_job(make_policy(), counts={"zone-a": 2, "zone-b": 2}, image="i")
    )
    return twin, _SimClock(fake, twin.cluster.advance)


def _forecast_mode(svc: Service) -> str:
    rec = svc.recorder.recent[-1]
    assert rec.outcome in ("applied", "unchanged"), (rec.outcome, rec.reason)
    return str(rec.inputs["forecast"]).split()[0]


def test_warm_up_then_the_first_cycle_reads_only_new_steps(twin_factory: TwinFactory) -> None:
    twin, clock = _fleet(twin_factory)
    src = Reads()
    svc = _service(twin, clock, MemoryKV(clock=clock), "a", src)
    clock.on_tick = svc.ports.lock.acquire  # the lock tick renews as virtual time passes
    svc.warm_up()  # what start() runs in the background
    # once, enough for any anchored origin: two periods and a cycle (the 6 h lookback is
    # shorter than the 6 h 40 min the forecaster needs to calibrate: 400 1-minute steps)
    assert src.reads == [2 * 400 + 20]
    clock.sleep(1200)
    svc.run_once()
    assert _forecast_mode(svc) == "incremental"
    assert src.reads[-1] == 20  # one 20-minute cycle of 1-minute steps


def test_a_standby_takes_over_with_a_warm_forecaster(twin_factory: TwinFactory) -> None:
    twin, clock = _fleet(twin_factory)
    kv = MemoryKV(clock=clock)
    src_a, src_b = Reads(), Reads()
    leader = _service(twin, clock, kv, "a", src_a)
    standby = _service(twin, clock, kv, "b", src_b)
    assert leader.elect()
    clock.on_tick = leader.ports.lock.acquire
    for k in range(1, 4):  # three slots: the leader acts, the standby only follows history
        _to_slot(clock, k)
        skipped = standby.run_once()[-1].record
        assert skipped.skipped == "not-leader"
        leader.run_once()  # its waits for the twin's deployments move virtual time on
    assert src_b.reads == [2 * 400 + 20, 20, 20]
    leader.ports.lock.release()  # the leader steps down (or its session ends)
    clock.on_tick = standby.ports.lock.acquire
    _to_slot(clock, 4)
    standby.run_once()
    assert standby.leader
    assert _forecast_mode(standby) == "incremental"
    assert src_b.reads[-1] == 20
