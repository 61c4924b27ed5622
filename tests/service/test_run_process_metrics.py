"""``nomadscale run`` as a real process exports the rollout metrics (a rollout record another
process left in the real Consul) and the runbook metrics of the healing engine the CLI builds
in the same process, on its one /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nomadscale.core.clock import SystemClock
from nomadscale.deploy.state import RolloutState, StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent, free_port
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

pytestmark = [pytest.mark.consul, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


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
    policy = make_policy()
    twin = twin_factory(nodes=4, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    NomadClient(address=twin.address).register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    updated = datetime.now(UTC).replace(microsecond=0)
    state = RolloutState(
        policy="ekyc", image="registry.example.com/ekyc/ml-worker:2", job_id="ml-worker",
        namespace="ekyc", status="canary", zones=["ml-worker-a", "ml-worker-b"],
        started_at=updated.isoformat(), updated_at=updated.isoformat(),
    )  # fmt: skip
    StateStore(ConsulKV(addr=consul_agent.addr), prefix=prefix).create(state)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "NOMAD_ADDR": twin.address,
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "PROMETHEUS_URL": "http://127.0.0.1:9",
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMADSCALE_LOCK_TTL": "15s",
        "NOMADSCALE_HTTP_PORT": str(port),
        "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
        "NOMADSCALE_WEBHOOK_SECRETS": "whsec-test-0001",
        "PYTHONPATH": str(ROOT),
    }
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
        proc.wait(timeout=20)
