"""Consul frozen (SIGSTOP) and restarted under a running service loop (real Consul, the twin
over HTTP on the wall clock): no write reaches Nomad without a valid lock, and the loop
recovers by itself afterwards. Lock TTL 3s, consul timeout 1s, a cycle slot every 2s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from nomadscale.config.settings import Secret, Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.pagerduty import PagerDutyAlerts
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.chaos.conftest import Record
from tests.chaos.helpers import Drift, leader_scale_times, wait_for
from tests.harness.pagerduty_server import PagerDutyServer
from tests.harness.services import ConsulAgent
from tests.harness.twin import Twin, TwinFactory
from tests.service.helpers import LevelDemand, make_policy

pytestmark = [pytest.mark.consul, pytest.mark.slow]

TTL = 3.0
EVERY = 2.0
TIMEOUT = 1.0  # consul client timeout: a frozen agent costs at most this per call


def _level(_t: datetime) -> float:
    return 500.0  # 8 workers, 4 per zone; a Drift keeps pulling zone-a back to 1


@pytest.fixture
def pd() -> Iterator[PagerDutyServer]:
    server = PagerDutyServer().start()
    yield server
    server.stop()


def _setup(
    consul: ConsulAgent, prefix: str, twin_factory: TwinFactory, pd: PagerDutyServer
) -> tuple[Service, Twin]:
    twin = twin_factory(nodes=12, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address, clock=SystemClock())
    nomad.register_job(
        worker_job(policy, counts={"zone-a": 2, "zone-b": 2}, image="i", update={"MaxParallel": 0})
    )
    kv = ConsulKV(addr=consul.addr, timeout=TIMEOUT)
    lock = ConsulLock(addr=consul.addr, key=f"{prefix}leader", ttl_s=TTL, lock_delay_s=0,
                      timeout=TIMEOUT, holder=LockHolder(host="chaos", pid=0, started_at=""))  # fmt: skip
    alerts = PagerDutyAlerts(Secret("routing-key-chaos"), base_url=pd.url, timeout_s=2)
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: LevelDemand(_level),
                  alerts=alerts)  # fmt: skip
    settings = Settings(kv_prefix=prefix.rstrip("/"), lock_ttl_s=TTL)
    svc = Service(settings=settings, policies=[policy], ports=ports, clock=SystemClock(),
                  renew_s=0.5, every_s=EVERY, check=False)  # fmt: skip
    return svc, twin


def _scale_times(twin: Twin) -> list[datetime]:
    return leader_scale_times(twin.cluster)


def _drift(twin: Twin) -> Drift:
    return Drift(twin.address, job="ml-worker", namespace="ekyc", group="ml-worker-a")


def _applied_after(svc: Service, t: datetime) -> int:
    return sum(1 for r in list(svc.recorder.recent) if r.outcome == "applied" and r.started_at > t)


def test_consul_frozen_then_restarted(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    pd: PagerDutyServer,
    fault_table: Record,
) -> None:
    svc, twin = _setup(consul_agent, consul_prefix, twin_factory, pd)
    drift = _drift(twin).__enter__()
    svc.start()
    try:
        wait_for(lambda: _applied_after(svc, datetime.min.replace(tzinfo=UTC)) >= 2, 15, "cycles")

        # --- frozen: every Consul call hangs until the client timeout -----------------
        frozen_at = datetime.now(UTC)
        consul_agent.suspend()
        time.sleep(3 * TTL)
        thawed_at = datetime.now(UTC)
        consul_agent.resume()
        late = [t for t in _scale_times(twin) if frozen_at < t < thawed_at]
        first = wait_for(
            lambda: [t for t in _scale_times(twin) if t > thawed_at],
            4 * TTL + 2 * EVERY,
            "recovery",
        )
        back_s = (first[0] - thawed_at).total_seconds()
        # a write may only land right after the freeze, fenced by a check made just before it
        assert all((t - frozen_at).total_seconds() < TIMEOUT for t in late), late

        # --- restarted: the agent goes away and comes back on the same ports/data ---------
        down_at = datetime.now(UTC)
        consul_agent.restart()
        up_at = datetime.now(UTC)
        during = [t for t in _scale_times(twin) if down_at < t < up_at]
        wait_for(lambda: _applied_after(svc, up_at) >= 1, 4 * TTL + 2 * EVERY, "recovery")
        assert not during, during
    finally:
        svc.stop(timeout_s=5)
        drift.__exit__()
    fault_table(
        "consul SIGSTOP for 3xTTL, then SIGCONT",
        "no Nomad write without a valid lock; recovers with no manual step",
        f"{len(late)} write(s) in the freeze, all within {TIMEOUT:g}s of it (fenced just "
        f"before); writing again {back_s:.1f}s after the thaw",
    )
    fault_table(
        "consul restarted (stop + start)",
        "no Nomad write while it is down; recovers with no manual step",
        f"0 writes in the {(up_at - down_at).total_seconds():.1f}s down; applying again after",
    )


def test_consul_outage_raises_an_alert(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    pd: PagerDutyServer,
    fault_table: Record,
) -> None:
    svc, _twin = _setup(consul_agent, consul_prefix, twin_factory, pd)
    svc.start()
    try:
        wait_for(lambda: svc.leader, 10, "leadership")
        consul_agent.suspend()
        try:
            got: Any = None
            end = time.monotonic() + 4 * TTL
            while time.monotonic() < end and not got:
                got = [e for e in list(pd.state.events) if e.get("event_action") == "trigger"]
                time.sleep(0.1)
        finally:
            consul_agent.resume()
    finally:
        svc.stop(timeout_s=5)
    ok = bool(got)
    fault_table(
        "consul unreachable for 4xTTL",
        "an alert (PagerDuty Events API)",
        "alert sent" if ok else "no alert: only a log line (see the xfail)",
        ok=ok,
    )
    assert got, "no alert while the leader could not reach Consul"


def test_status_during_consul_freeze_does_not_stall_metrics(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    pd: PagerDutyServer,
    fault_table: Record,
) -> None:
    import threading

    import httpx

    from nomadscale.service.http import HttpServer, create_app
    from tests.harness.services import free_port

    svc, _twin = _setup(consul_agent, consul_prefix, twin_factory, pd)
    port = free_port()
    app = create_app(registry=svc.metrics.registry, status=svc.status)
    http = HttpServer(app, host="127.0.0.1", port=port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        consul_agent.suspend()
        try:
            t = threading.Thread(
                target=lambda: httpx.get(f"{base}/status", timeout=10), daemon=True
            )
            t.start()
            time.sleep(0.2)  # the /status request is waiting on Consul now
            t0 = time.monotonic()
            httpx.get(f"{base}/metrics", timeout=10)
            took = time.monotonic() - t0
        finally:
            consul_agent.resume()
        t.join(10)
    finally:
        http.stop()
        svc.stop(timeout_s=5)
    # not a speed target: stalled behind /status it would wait as long as Consul is frozen
    # (the request's 10 s); 2 s leaves room for a loaded CI machine
    ok = took < 2.0
    fault_table(
        "GET /status while consul is frozen",
        "/metrics (and webhooks) still answer at once",
        f"/metrics took {took * 1000:.0f} ms behind the blocked /status",
        ok=ok,
    )
    assert ok, took
