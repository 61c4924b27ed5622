"""Scaling both zones of one job, and an operator's "apply now" right after (the twin over
HTTP, virtual time). Every Scale API count change is a new job version: Nomad updates the
workers it keeps in place into a new deployment and re-watches their health for
min_healthy_time (10 s here, the default update block), refusing the Scale API meanwhile. The
actuator waits for that deployment between the zones; a kicked cycle inside the window is
skipped with its reason recorded, and the running service tries that kick again until it
applies (``service.kicks``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import _SimClock, worker_job
from tests.harness.twin import TwinFactory
from tests.service.helpers import constant, make_policy

START = datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC)
MIN_HEALTHY_S = 10.0  # Nomad's default update block (the job sets none)


def _service(twin_factory: TwinFactory) -> tuple[Any, Service, _SimClock]:
    fake = FakeClock(START)
    twin = twin_factory(nodes=8, clock=fake, node_pool="default")  # the job's pool
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    NomadClient(address=twin.address).register_job(
        worker_job(policy, counts={"zone-a": 2, "zone-b": 2}, image="i")
    )
    clock = _SimClock(fake, twin.cluster.advance)
    clock.sleep(600)
    status = NomadClient(address=twin.address).job_status("ml-worker", namespace="ekyc")
    assert [g.healthy for g in status.groups.values()] == [2, 2]
    kv = MemoryKV(clock=clock)
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=30, lock_delay_s=0)
    ports = Ports(nomad=NomadClient(address=twin.address, clock=clock), kv=kv, lock=lock,
                  demand_for=lambda _p: constant(250.0))  # fmt: skip
    svc = Service(settings=Settings(kv_prefix="ns"), policies=[policy], ports=ports,
                  clock=clock, poll_s=1, check=False)  # fmt: skip
    clock.on_tick = lock.acquire
    assert svc.elect()
    return twin, svc, clock


def _hold(svc: Service, clock: _SimClock, count: int) -> str:
    """``nomadscale scale ekyc --count N --now``: a fixed override, then a kick."""
    svc.control.set_override("ekyc", kind="fixed", value=count, reason="test", source="scale",
                             now=clock.now(), duration=timedelta(hours=1))  # fmt: skip
    return svc.control.request_kick("ekyc", reason=f"scale to {count}", now=clock.now())


def _scales(twin: Any) -> list[dict[str, Any]]:
    return [e for e in twin.cluster.events if e["type"] == "scale"]


def test_zone_b_scales_once_the_deployment_of_zone_a_ended(twin_factory: TwinFactory) -> None:
    twin, svc, clock = _service(twin_factory)
    out = svc.run_policy("ekyc", kick=_hold(svc, clock, 2))
    assert out is not None and out.record.outcome == "applied", out.record.line()
    assert out.record.applied == ["scale zone-a/ml-worker-a 2 -> 1",
                                  "scale zone-b/ml-worker-b 2 -> 1"]  # fmt: skip
    a, b = _scales(twin)
    assert (a["group"], b["group"]) == ("ml-worker-a", "ml-worker-b")
    # Nomad refuses the Scale API while zone a's deployment re-watches the workers it kept
    assert (b["time"] - a["time"]).total_seconds() >= MIN_HEALTHY_S
    deps = [e for e in twin.cluster.events if e["type"] == "deployment"]
    assert [e["status"] for e in deps][-3:] == ["running", "successful", "running"]
    status = svc.ports.nomad.job_status("ml-worker", namespace="ekyc")
    assert {g: s.desired for g, s in status.groups.items()} == {
        "ml-worker-a": 1, "ml-worker-b": 1,
    }  # fmt: skip


def test_apply_now_right_after_a_cycle_is_skipped_with_its_reason(
    twin_factory: TwinFactory,
) -> None:
    twin, svc, clock = _service(twin_factory)
    out = svc.run_policy("ekyc", kick=_hold(svc, clock, 2))
    assert out is not None and out.record.outcome == "applied", out.record.line()
    active = svc.ports.nomad.job_status("ml-worker", namespace="ekyc").active_deployment
    assert active is not None  # zone b's count change: its re-watch runs for 10 s

    out = svc.run_policy("ekyc", kick=_hold(svc, clock, 4))  # the operator, a moment later
    assert out is not None and out.record.outcome == "skipped"
    assert out.record.skipped == "deployment"
    assert out.record.reason == f"deployment {active} is active"
    assert len(_scales(twin)) == 2

    clock.sleep(MIN_HEALTHY_S + 1)
    out = svc.run_policy("ekyc", kick=_hold(svc, clock, 4))
    assert out is not None and out.record.outcome == "applied", out.record.line()
    assert out.record.applied == ["scale zone-a/ml-worker-a 1 -> 2",
                                  "scale zone-b/ml-worker-b 1 -> 2"]  # fmt: skip


def test_an_apply_now_that_met_a_deployment_applies_once_it_ended(
    twin_factory: TwinFactory,
) -> None:
    """The running service (scheduler, real time): a kick landing in the deployment of the
    previous count change is tried again, and applies within seconds of the deployment's end
    instead of waiting for the next scheduled cycle."""
    import time

    from nomadscale.core.clock import SystemClock

    clock = SystemClock()
    twin = twin_factory(nodes=8, clock=clock, node_pool="default", images=("i",))
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address)
    update = {"MaxParallel": 1, "MinHealthyTime": 2_000_000_000}  # re-watch 2 s
    nomad.register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update=update)
    )
    kv = MemoryKV(clock=clock)
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=10, lock_delay_s=0)
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: constant(120.0))
    svc = Service(settings=Settings(kv_prefix="ns", lock_ttl_s=10), policies=[policy],
                  ports=ports, clock=clock, renew_s=0.3, every_s=3600, poll_s=0.2,
                  check=False)  # fmt: skip
    svc.kick_retries.every_s = 0.5

    def desired() -> dict[str, int]:
        st = nomad.job_status("ml-worker", namespace="ekyc")
        return {g: s.desired for g, s in st.groups.items()}

    def wait(what: str, ok: Any, within: float) -> None:
        deadline = time.monotonic() + within
        while not ok():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    svc.start()
    try:
        wait("leadership", lambda: svc.leader, 5)
        wait("the workers", lambda: all(
            g.healthy == 1 for g in nomad.job_status("ml-worker", namespace="ekyc").groups.values()
        ), 30)  # fmt: skip
        now = clock.now()
        svc.control.set_override("ekyc", kind="fixed", value=4, reason="t", who="t", now=now,
                                 duration=timedelta(hours=1))  # fmt: skip
        svc.control.request_kick("ekyc", reason="first", now=now, who="t")
        wait("the first kick", lambda: desired() == {"ml-worker-a": 2, "ml-worker-b": 2}, 20)
        # zone b's count change started a deployment: the next kick meets it
        assert nomad.job_status("ml-worker", namespace="ekyc").active_deployment is not None
        svc.control.set_override("ekyc", kind="fixed", value=6, reason="t", who="t",
                                 now=clock.now(), duration=timedelta(hours=1))  # fmt: skip
        kid = svc.control.request_kick("ekyc", reason="second", now=clock.now(), who="t")
        wait("the second kick", lambda: desired() == {"ml-worker-a": 3, "ml-worker-b": 3}, 20)
        skipped = [r for r in svc.recorder.recent if r.skipped == "deployment"]
        assert skipped, "the second kick did not meet the deployment"
        assert svc.kick_retries.waiting("ekyc") is None
        assert kid
    finally:
        svc.stop(timeout_s=5)
