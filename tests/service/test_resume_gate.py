"""The service resumes an interrupted rollout at start (``cmd_run.resume_rollouts``) with its
SLI gate: a canary that breaches the SLI is rolled back, as it would be under ``deploy
resume``; with no Prometheus configured a gated rollout is left for the operator, never
driven ungated."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from nomadscale.cli.cmd_run import resume_rollouts
from nomadscale.config.settings import Settings
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV
from tests.deploy.helpers import NEW, OLD, images_running, policy, setup_job
from tests.harness.promdata import Series

pytestmark = pytest.mark.consul


class Killed(BaseException):
    """The process died here."""


def _interrupted(twin: Any, kv: ConsulKV, prefix: str, pol: Any) -> None:
    """A rollout whose process died once its canary was placed in zone a."""

    def die(st: Any, info: dict[str, Any]) -> None:
        if st.status == "rolling" and info.get("healthy", 0) >= 1:
            raise Killed

    with pytest.raises(Killed):
        Rollout(policy=pol, nomad=twin.nomad, kv=kv, clock=twin.clock, prefix=prefix,
                reporter=die, watch_wait_s=0).start(NEW)  # fmt: skip
    stored = StateStore(kv, prefix=prefix).load(pol.name)[0]
    assert stored is not None and stored.active


def _resume(twin: Any, kv: ConsulKV, prefix: str, pol: Any, settings: Settings) -> None:
    ports = SimpleNamespace(nomad=twin.nomad, kv=kv, alerts=None, demand=lambda p: None)
    for task in resume_rollouts(settings, [pol], ports, twin.clock, quiet_s=0):
        task()


@pytest.mark.parametrize("with_prometheus", [True, False])
def test_the_service_resumes_a_gated_rollout_only_with_its_gate(
    twin: Any,
    prometheus_factory: Any,
    consul_agent: Any,
    consul_prefix: str,
    with_prometheus: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    twin.nomad = setup_job(twin)
    t0 = twin.clock.now().timestamp()
    ts = np.arange(t0, t0 + 7200, 15.0)
    prom = prometheus_factory([Series("ekyc_error_ratio", {"image": NEW}, ts, ts * 0 + 0.2)])
    sli = {"error_rate_query": 'max(ekyc_error_ratio{image="{image}"})', "max_error_rate": 0.01}
    pol = policy(sli=sli)
    kv = ConsulKV(addr=consul_agent.addr, token=consul_agent.token)
    twin.advance(600)
    _interrupted(twin, kv, consul_prefix, pol)
    settings = Settings(
        kv_prefix=consul_prefix, prometheus_url=prom.url if with_prometheus else None
    )
    caplog.set_level(logging.INFO)
    _resume(twin, kv, consul_prefix, pol, settings)
    st = StateStore(kv, prefix=consul_prefix).load(pol.name)[0]
    assert st is not None
    if with_prometheus:
        # the canary breaches the SLI (20% errors): rolled back, every worker on the old image
        assert st.status == "rolled_back" and "SLI gate" in st.reason, (st.status, st.reason)
        assert images_running(twin) == {OLD: 4}, images_running(twin)
    else:
        assert st.active, st.status  # left as it was, for `deploy resume` with Prometheus
        assert "PROMETHEUS_URL is not set" in caplog.text
