"""``nomadscale run`` as a real process exports the rollout metrics (a rollout record another
process left in the real Consul) and the runbook metrics of the healing engine the CLI builds
in the same process, on its one /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nomadscale.core.clock import SystemClock
from nomadscale.deploy.state import RolloutState, StateStore
from nomadscale.integrations.consul import ConsulKV
from tests.harness.services import ConsulAgent, free_port
from tests.harness.twin import TwinFactory
from tests.service.helpers import run_process_env

pytestmark = [pytest.mark.consul, pytest.mark.slow]


def _samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_run_process_exports_rollout_and_runbook_metrics(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    prefix = consul_prefix.rstrip("/")
    port = free_port()
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=port, healing=True)  # fmt: skip
    updated = datetime.now(UTC).replace(microsecond=0)
    state = RolloutState(
        policy="ekyc", image="registry.example.com/ekyc/ml-worker:2", job_id="ml-worker",
        namespace="ekyc", status="canary", zones=["ml-worker-a", "ml-worker-b"],
        started_at=updated.isoformat(), updated_at=updated.isoformat(),
    )  # fmt: skip
    StateStore(ConsulKV(addr=consul_agent.addr), prefix=prefix).create(state)
    log = tmp_path / "run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nomadscale", "run"], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 20
        m: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        while ("nomadscale_kv_up", frozenset()) not in m:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
            try:
                m = _samples(port)
            except OSError:
                continue
        assert m[("nomadscale_kv_up", frozenset())] == 1.0
        ekyc = ("policy", "ekyc")
        assert m[("nomadscale_deploy_status", frozenset({ekyc, ("status", "canary")}))] == 1.0
        assert m[("nomadscale_deploy_status", frozenset({ekyc, ("status", "rolling")}))] == 0.0
        assert m[("nomadscale_deploy_zones", frozenset({ekyc}))] == 2.0
        assert m[("nomadscale_deploy_last_progress_timestamp_seconds", frozenset({ekyc}))] == (
            updated.timestamp()
        )
        for rb in ("gpu-host-maintenance", "node-down", "gpu-xid-error"):
            key = ("nomadscale_runbook_runs_in_progress", frozenset({("runbook", rb)}))
            assert m[key] == 0.0
    finally:
        proc.terminate()
        try:  # no cycle runs (Prometheus refuses at once): a stop takes well under a second
            status = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"run ignored SIGTERM: {log.read_text()[-3000:]}") from None
    assert status == 0, log.read_text()[-3000:]
    assert "service stopped" in log.read_text()
