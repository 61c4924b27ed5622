"""Rollouts under faults: SLI breach (real Prometheus), a lost node, Nomad 500s, an abort,
failed prefetch; after each, the record in real Consul as ``nomadscale deploy status --json``
shows it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.prometheus import PrometheusClient
from nomadscale.service.control import Control
from tests.deploy.helpers import (
    NEW,
    OLD,
    RecordingAlerts,
    cli_status,
    images_running,
    policy,
    setup_job,
)
from tests.harness.promdata import Series

pytestmark = pytest.mark.consul


def _kv(consul_agent: Any) -> ConsulKV:
    return ConsulKV(addr=consul_agent.addr, token=consul_agent.token)


def test_sli_breach_mid_rollout_rolls_back(
    twin: Any, prometheus_factory: Any, consul_agent: Any, consul_prefix: str, tmp_path: Any
) -> None:
    nomad = setup_job(twin)
    t0 = twin.clock.now().timestamp()
    ts = np.arange(t0, t0 + 7200, 15.0)
    errors = np.where(ts < t0 + 600 + 170, 0.0, 0.2)  # fine for zone a, then errors
    prom = prometheus_factory([Series("ekyc_error_ratio", {"image": NEW}, ts, errors)])
    sli = {"error_rate_query": 'max(ekyc_error_ratio{image="{image}"})', "max_error_rate": 0.01}
    sink = RecordingAlerts()
    alerts = sink.sent

    r = Rollout(policy=policy(sli=sli), nomad=nomad, kv=_kv(consul_agent), clock=twin.clock,
        prefix=consul_prefix, prometheus=PrometheusClient(url=prom.url), alerts=sink,
        watch_wait_s=0)  # fmt: skip
    twin.advance(600)
    st = r.start(NEW)
    assert st.status == "rolled_back", (st.reason, st.sli, st.log)
    assert "SLI gate" in st.reason and "error rate" in st.reason
    assert st.sli["last"]["verdict"] == "breach"
    assert images_running(twin) == {OLD: 4}
    assert alerts and "rolled back" in alerts[0]["summary"]
    shown = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert shown["id"] == st.id
    assert shown["status"] == "rolled_back" and not shown["active"]
    assert "SLI gate" in shown["reason"] and shown["finished_at"]


def test_node_lost_mid_rollout_completes(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Any
) -> None:
    nomad = setup_job(twin)
    lost: list[str] = []

    def lose(st: Any, info: dict[str, Any]) -> None:
        if not lost and st.status == "rolling" and st.zones_done:
            victim = next(a.node_id for a in twin.cluster.job_allocs(("default", "ml-worker"))
                          if a.live and a.task_group == "ml-worker-a")  # fmt: skip
            lost.append(victim)
            twin.cluster.lose_node(victim)

    r = Rollout(policy=policy(), nomad=nomad, kv=_kv(consul_agent), clock=twin.clock,
                prefix=consul_prefix, reporter=lose, watch_wait_s=0)  # fmt: skip
    st = r.start(NEW)
    assert lost
    assert st.status == "completed", st.reason
    assert images_running(twin) == {NEW: 4}
    shown = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert shown["id"] == st.id and shown["status"] == "completed" and not shown["active"]
    assert shown["zones_done"] == ["ml-worker-a", "ml-worker-b"]


def test_nomad_500s_then_resume_with_state_in_consul(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Any
) -> None:
    nomad = setup_job(twin)
    kv = _kv(consul_agent)
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
    shown = cli_status(twin, consul_agent, prefix, tmp_path)
    assert shown["id"] == st.id and shown["status"] == "paused" and shown["active"]
    assert "nomad unavailable" in shown["reason"]
    twin.cluster.faults.clear()
    again = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                    watch_wait_s=0).resume()  # fmt: skip
    assert again is not None and again.status == "completed", again and again.reason
    assert images_running(twin) == {NEW: 4}
    stored = StateStore(kv, prefix=prefix).load("ekyc-ml")[0]
    assert stored is not None and stored.status == "completed" and stored.id == st.id
    assert Control(kv, prefix=prefix).deploy_active("ekyc-ml") is None
    shown = cli_status(twin, consul_agent, prefix, tmp_path)
    assert shown["id"] == st.id and shown["status"] == "completed" and not shown["active"]


def test_abort_rolls_back(twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Any) -> None:
    nomad = setup_job(twin)
    kv = _kv(consul_agent)

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if st.zones_done and st.deployment_id:
            raise Crash

    with pytest.raises(Crash):
        Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, reporter=crash,
                prefix=consul_prefix, watch_wait_s=0).start(NEW)  # fmt: skip
    crashed = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert crashed["active"] and crashed["status"] in ("canary", "rolling")
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                 watch_wait_s=0).abort()  # fmt: skip
    assert st is not None and st.status == "aborted"
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}
    shown = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert shown["id"] == st.id and shown["status"] == "aborted" and not shown["active"]
    assert shown["reason"] == "aborted by operator"


def test_prefetch_failure_blocks_and_status_shows_why(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Any
) -> None:
    nomad = setup_job(twin)
    bad = next(iter(twin.cluster.nodes))
    twin.cluster.faults.pull_fails(bad, NEW)
    st = Rollout(policy=policy(), nomad=nomad, kv=_kv(consul_agent), clock=twin.clock,
                 prefix=consul_prefix, watch_wait_s=0).start(NEW)  # fmt: skip
    assert st.status == "aborted"
    assert images_running(twin) == {OLD: 4}
    shown = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert shown["status"] == "aborted" and not shown["active"]
    assert "prefetch failed" in shown["reason"] and twin.cluster.nodes[bad].name in shown["reason"]
    assert bad in shown["prefetch"]["failed"]
