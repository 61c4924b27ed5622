"""Prometheus with gaps, then down, under the service (real Prometheus, real Consul for the
lock and the decision records, the twin over HTTP, virtual time): never a scale-down on
missing data, the last good decision holds, and holding is bounded by an alert."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from nomadscale.config.settings import Secret, Settings
from nomadscale.core.clock import FakeClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.pagerduty import PagerDutyAlerts
from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.chaos.conftest import Record
from tests.harness.pagerduty_server import PagerDutyServer
from tests.harness.promdata import Series
from tests.harness.services import ConsulAgent
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

pytestmark = [pytest.mark.consul, pytest.mark.prometheus]

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
CYCLE = timedelta(minutes=20)


@pytest.fixture
def pd() -> Iterator[PagerDutyServer]:
    server = PagerDutyServer().start()
    yield server
    server.stop()


def _demand() -> Series:
    """100 rpm for 7 h up to T0, nothing for the next cycle (a gap), then 100 rpm again."""
    ts = np.arange((T0 - timedelta(hours=7)).timestamp(), (T0 + 4 * CYCLE).timestamp(), 60.0)
    ts = ts[(ts <= T0.timestamp()) | (ts > (T0 + CYCLE).timestamp())]
    values = np.full(len(ts), 100.0)
    return Series("demand", {}, ts, values)


def test_prometheus_gaps_then_down(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    prometheus_factory: Any,
    pd: PagerDutyServer,
    fault_table: Record,
) -> None:
    prom = prometheus_factory([_demand()])
    clock = FakeClock(T0)
    twin = twin_factory(nodes=40, clock=clock)
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address, clock=clock)
    nomad.register_job(
        worker_job(
            policy, counts={"zone-a": 10, "zone-b": 10}, image="i", update={"MaxParallel": 0}
        )
    )
    kv = ConsulKV(addr=consul_agent.addr)
    lock = ConsulLock(addr=consul_agent.addr, key=f"{consul_prefix}leader", ttl_s=15,
                      lock_delay_s=0, holder=LockHolder(host="chaos", pid=0, started_at=""))  # fmt: skip
    client = PrometheusClient(url=prom.url, timeout=2)
    ports = Ports(
        nomad=nomad, kv=kv, lock=lock,
        demand_for=lambda _p: PrometheusDemandSource(client=client, query="demand"),
        alerts=PagerDutyAlerts(Secret("routing-key-chaos"), base_url=pd.url, timeout_s=2),
    )  # fmt: skip
    svc = Service(settings=Settings(kv_prefix=consul_prefix.rstrip("/"), lock_ttl_s=15),
                  policies=[policy], ports=ports, clock=clock, check=False)  # fmt: skip

    def cycle(at: datetime) -> Any:
        clock.set(at)
        res = svc.run_policy("ekyc", now=at)
        assert res is not None
        return res.record

    def counts() -> tuple[int, int]:
        st = nomad.job_status("ml-worker", namespace="ekyc")
        return st.groups["ml-worker-a"].desired, st.groups["ml-worker-b"].desired

    try:
        held = counts()
        # the whole last cycle of history is missing (a scrape gap)
        gap = cycle(T0 + CYCLE)
        assert gap.decision is not None
        fc = gap.decision["forecast"]
        assert fc["data_ok"] is False
        assert gap.decision["desired"] == sum(held) == 20
        assert "missing" in gap.decision["reason"]
        assert gap.outcome in ("unchanged", "applied") and counts() == held
        gap_why = gap.decision["reason"]
        print(gap.decision["explain"])
        # with the data back (at 100 rpm) the same service does scale down
        back = cycle(T0 + 3 * CYCLE)
        print(back.decision["explain"])
        assert back.decision["forecast"]["data_ok"] is True
        assert back.outcome == "applied" and sum(counts()) < sum(held), back.reason
        before_down = sum(held)
        held = counts()

        # Prometheus goes away: cycles fail, nothing is written, an alert after N cycles
        prom.stop()
        n = policy.alerting.failed_cycles_before_alert
        down = [cycle(T0 + CYCLE * (4 + i)) for i in range(n)]
        assert [r.outcome for r in down] == ["failed"] * n
        assert all("prometheus" in r.reason for r in down), down[0].reason
        assert counts() == held
        alerts = [e for e in pd.state.events if e.get("event_action") == "trigger"]
        assert len(alerts) == 1 and "cycles-failing" in alerts[0]["dedup_key"], alerts
        stored = [json.loads(e.value) for e in kv.list(f"{consul_prefix}decisions/ekyc/")]
        assert sum(1 for r in stored if r["outcome"] == "failed") == n
    finally:
        svc.stop(timeout_s=5)
    fault_table(
        "prometheus: gap over the last cycle of history",
        "no scale-down on missing data",
        f"data_ok false: held at {before_down} ({gap_why.split('; ')[-1]}); scaled down to "
        f"{sum(held)} once the data was back",
    )
    fault_table(
        "prometheus down",
        "last good decision holds, bounded: alert after N failed cycles",
        f"{n} cycles failed (recorded in KV with the reason), {sum(held)} workers held, "
        f"PagerDuty alert after {n * CYCLE.total_seconds() / 60:.0f} min",
    )
