"""Two service loops against one REAL Consul and the twin: exactly one acts; when the leader
dies (its lock session is no longer renewed), the other takes over as soon as Consul frees the
lock key, and no cycle slot is ever applied twice (checked in the twin's scaling events)."""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.leaderwatch import ConsulKeyWatch
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent
from tests.harness.twin import TwinFactory
from tests.service.helpers import LevelDemand, make_policy

pytestmark = [pytest.mark.consul, pytest.mark.slow]

TTL = 2.0
EVERY = 2.0  # seconds per cycle slot (policies allow whole minutes; tests go faster)
RENEW = 0.4
# Consul invalidates a session 2 x TTL after its last renewal (its TTL timer is TTL x 2); the
# leader renewed at most RENEW before it died, so the key frees between 2 x TTL - RENEW and
# 2 x TTL after the kill. The standby's blocking query on the key returns at once, it takes
# the lock (lock delay 0 here) and runs the current slot: one cycle against the twin over
# HTTP, well under ACT. (Without the watch the standby also waited for its next tick.)
ACT = 0.6


def _level(t: datetime) -> float:
    """Demand that alternates every slot, so every slot changes the count."""
    return 200.0 if int(t.timestamp() // EVERY) % 2 else 500.0


def _service(addr: str, prefix: str, nomad_addr: str, who: str) -> Service:
    policy = make_policy()
    kv = ConsulKV(addr=addr)
    lock = ConsulLock(addr=addr, key=f"{prefix}leader", ttl_s=TTL, lock_delay_s=0,
                      holder=LockHolder(host=who, pid=0, started_at=""))  # fmt: skip
    clock = SystemClock()
    ports = Ports(nomad=NomadClient(address=nomad_addr, clock=clock), kv=kv, lock=lock,
                  demand_for=lambda _p: LevelDemand(_level))  # fmt: skip
    settings = Settings(kv_prefix=prefix.rstrip("/"), lock_ttl_s=TTL)
    watch = ConsulKeyWatch(addr=addr, key=f"{prefix}leader")
    return Service(
        settings=settings,
        policies=[policy],
        ports=ports,
        clock=clock,
        renew_s=RENEW,
        every_s=EVERY,
        check=False,
        lock_watch=watch,
        incremental_forecasts=False,
    )  # fmt: skip  (LevelDemand rewrites history)


def _acted(svc: Service) -> list[str]:
    return [r.started_at.isoformat() for r in svc.recorder.recent if r.outcome == "applied"]


def test_one_leader_acts_and_the_other_takes_over(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory
) -> None:
    twin = twin_factory(nodes=12, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    nomad = NomadClient(address=twin.address)
    nomad.register_job(
        worker_job(
            make_policy(), counts={"zone-a": 2, "zone-b": 2}, image="i", update={"MaxParallel": 0}
        )
    )
    a = _service(consul_agent.addr, consul_prefix, twin.address, "a")
    b = _service(consul_agent.addr, consul_prefix, twin.address, "b")
    a.start()
    time.sleep(0.5)  # a is first to the lock
    b.start()
    try:
        time.sleep(3 * EVERY + 0.5)
        assert [a.leader, b.leader].count(True) == 1
        leader, other = (a, b) if a.leader else (b, a)
        assert len(_acted(leader)) >= 2
        assert _acted(other) == []
        assert {r.skipped for r in other.recorder.recent} <= {None}  # other only observes
        assert other.metrics.is_leader._value.get() == 0  # type: ignore[attr-defined]

        # the leader dies: no release, its session simply stops being renewed
        killed = time.monotonic()
        leader.stop_event.set()
        assert leader._scheduler is not None
        leader._scheduler.shutdown(wait=False)
        deadline = killed + 2 * TTL + EVERY + 2.0  # wait longer than the bounds, then judge
        while time.monotonic() < deadline and not other.leader:
            time.sleep(0.01)
        led = time.monotonic()
        led_wall = time.time()
        while time.monotonic() < deadline and not _acted(other):
            time.sleep(0.01)
        acted = time.monotonic()
        print(f"standby leads after {led - killed:.2f}s, acts after {acted - killed:.2f}s "
              f"(ttl {TTL:g}s, slot {EVERY:g}s)")  # fmt: skip
        assert other.leader and _acted(other), "the standby never took over"
        # leadership: as soon as Consul frees the key (see RENEW/ACT above)
        assert 2 * TTL - RENEW - 0.1 <= led - killed <= 2 * TTL + ACT, led - killed
        # acting: the current slot at once if the dead leader had not run it yet, else the
        # next slot (a slot is never applied twice); wall-clock aligned slots of EVERY
        next_slot = math.ceil(led_wall / EVERY) * EVERY
        assert acted - led <= (next_slot - led_wall) + ACT, (acted - led, next_slot - led_wall)
        time.sleep(2 * EVERY)
    finally:
        b.stop(timeout_s=5)
        a.stop(timeout_s=5)

    # every slot was applied by exactly one process, once per group
    status = nomad.job_status("ml-worker", namespace="ekyc")
    for name, group in status.groups.items():
        slots = [e.meta.get("nomadscale.slot") for e in group.events if e.meta]
        slots = [s for s in slots if s]
        dup = [s for s, n in Counter(slots).items() if n > 1]
        assert slots and not dup, (name, dup)
    applied_a, applied_b = set(_acted(a)), set(_acted(b))
    assert applied_a and applied_b and not (applied_a & applied_b)
    assert datetime.now(UTC) > max(datetime.fromisoformat(s) for s in applied_a | applied_b)
