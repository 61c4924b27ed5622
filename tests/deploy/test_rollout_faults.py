"""Rollouts under faults: SLI breach (real Prometheus), a lost node, Nomad 500s, and the state
record in real Consul after each."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.prometheus import PrometheusClient
from nomadscale.service.control import Control
from tests.deploy.helpers import NEW, OLD, images_running, policy, setup_job
from tests.harness.promdata import Series


def test_sli_breach_mid_rollout_rolls_back(twin: Any, prometheus_factory: Any) -> None:
    nomad = setup_job(twin)
    t0 = twin.clock.now().timestamp()
    ts = np.arange(t0, t0 + 7200, 15.0)
    errors = np.where(ts < t0 + 600 + 170, 0.0, 0.2)  # fine for zone a, then errors
    prom = prometheus_factory([Series("ekyc_error_ratio", {"image": NEW}, ts, errors)])
    sli = {"error_rate_query": 'max(ekyc_error_ratio{image="{image}"})', "max_error_rate": 0.01}
    alerts: list[dict[str, Any]] = []

    class Alerts:
        def trigger(self, **kw: Any) -> None:
            alerts.append(kw)

        def resolve(self, **kw: Any) -> None:
            pass

    r = Rollout(policy=policy(sli=sli), nomad=nomad, kv=MemoryKV(clock=twin.clock),
        clock=twin.clock, prometheus=PrometheusClient(url=prom.url), alerts=Alerts(),
        watch_wait_s=0)  # fmt: skip
    twin.advance(600)
    st = r.start(NEW)
    assert st.status == "rolled_back", (st.reason, st.sli, st.log)
    assert "SLI gate" in st.reason and "error rate" in st.reason
    assert st.sli["last"]["verdict"] == "breach"
    assert images_running(twin) == {OLD: 4}
    assert alerts and "rolled back" in alerts[0]["summary"]


def test_node_lost_mid_rollout_completes(twin: Any) -> None:
    nomad = setup_job(twin)
    lost: list[str] = []

    def lose(st: Any, info: dict[str, Any]) -> None:
        if not lost and st.status == "rolling" and st.zones_done:
            victim = next(a.node_id for a in twin.cluster.job_allocs(("default", "ml-worker"))
                          if a.live and a.task_group == "ml-worker-a")  # fmt: skip
            lost.append(victim)
            twin.cluster.lose_node(victim)

    r = Rollout(policy=policy(), nomad=nomad, kv=MemoryKV(clock=twin.clock), clock=twin.clock,
                reporter=lose, watch_wait_s=0)  # fmt: skip
    st = r.start(NEW)
    assert lost
    assert st.status == "completed", st.reason
    assert images_running(twin) == {NEW: 4}


@pytest.mark.consul
def test_nomad_500s_then_resume_with_state_in_consul(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    nomad = setup_job(twin)
    kv = ConsulKV(addr=consul_agent.addr, token=consul_agent.token)
    prefix = consul_prefix + "nomadscale"
    hit: list[bool] = []

    def outage(st: Any, info: dict[str, Any]) -> None:
        if not hit and st.status == "rolling" and st.deployment_id:
            hit.append(True)
            twin.cluster.faults.fail("/v1/deployment/", status=500, times=40)

    r = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                reporter=outage, watch_wait_s=0, outage_limit_s=60)  # fmt: skip
    st = r.start(NEW)
    assert hit
    assert st.status == "paused" and "nomad unavailable" in st.reason
    assert Control(kv, prefix=prefix).deploy_active("ekyc-ml") is not None  # autoscaler holds
    twin.cluster.faults.clear()
    again = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                    watch_wait_s=0).resume()  # fmt: skip
    assert again is not None and again.status == "completed", again and again.reason
    assert images_running(twin) == {NEW: 4}
    stored = StateStore(kv, prefix=prefix).load("ekyc-ml")[0]
    assert stored is not None and stored.status == "completed" and stored.id == st.id
    assert Control(kv, prefix=prefix).deploy_active("ekyc-ml") is None


def test_abort_rolls_back(twin: Any) -> None:
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if st.zones_done and st.deployment_id:
            raise Crash

    with pytest.raises(Crash):
        Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, reporter=crash,
                watch_wait_s=0).start(NEW)  # fmt: skip
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, watch_wait_s=0).abort()
    assert st is not None and st.status == "aborted"
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}
