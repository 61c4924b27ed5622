"""Shared setup for rollout tests: a policy for the twin's shape and the ml-worker job."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.core.clock import FakeClock
from nomadscale.data import bundled_trace_path
from nomadscale.deploy.preflight import estimate_seconds, forecast_upper
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.tracefile import TraceDemandSource

ROOT = Path(__file__).resolve().parents[2]
TRACE = str(bundled_trace_path())  # the real alibaba trace shipped as package data
CALM = datetime(2000, 1, 6, 15, 10, tzinfo=UTC)  # the trace is flat (67729-68135 rpm) until 16:00
OLD = "registry.example.com/ekyc/ml-worker:2026.10.2"
JOB = ("default", "ml-worker")
NEW = "registry.example.com/ekyc/ml-worker:2026.11.1"


def policy(*, rpm: float = 240.0, bmax: int = 40, sli: dict[str, Any] | None = None,
           on_fail: str = "block", canary: int = 1) -> Policy:  # fmt: skip
    deploy: dict[str, Any] = {
        "image": NEW, "image_size": "7GB", "prefetch_job": "image-prefetch",
        "prefetch_retries": 1, "on_prefetch_failure": on_fail, "canary": canary,
        "min_healthy_time": "30s", "healthy_deadline": "5m", "progress_deadline": "10m",
    }  # fmt: skip
    if sli is not None:
        deploy["sli"] = sli
    return Policy.model_validate(
        {
            "name": "ekyc-ml",
            "demand": {"source": "trace", "trace": TRACE, "step": "10m"},
            "capacity": {"rpm_per_worker": rpm},
            "bounds": {"min": 1, "max": bmax},
            "zones": {"list": [
                {"name": "zone-a", "group": "ml-worker-a", "node_pool": "gpu"},
                {"name": "zone-b", "group": "ml-worker-b", "node_pool": "gpu"},
            ]},
            "target": {"job": "ml-worker", "namespace": "default"},
            "deploy": deploy,
        }
    )  # fmt: skip


def surge_rpm(twin: Any, workers: float, *, fleet: int) -> tuple[float, float]:
    """rpm_per_worker (and the forecast upper bound the preflight of ``fleet`` workers plans
    for with it) at which the upper bound is ``workers`` workers. Headroom is calibrated on
    whole workers, so the bound depends on rpm_per_worker: a fixed-point iteration
    ``rpm = upper(rpm) / workers`` until the bound is within a quarter worker of ``workers``."""
    rpm = 1e9
    for _ in range(12):
        pol = policy(rpm=rpm, bmax=80)
        horizon = estimate_seconds(pol, fleet, prefetched=True)  # what the preflight plans
        upper = forecast_upper(pol, TraceDemandSource(TRACE), now=twin.clock.now(),
                               horizon_s=horizon)  # fmt: skip
        if abs(upper / rpm - workers) <= 0.25:
            return rpm, upper
        rpm = upper / workers
    raise AssertionError(f"no rpm_per_worker puts the forecast upper bound at {workers} workers")


class SamplingClock(FakeClock):
    """Virtual time that samples the twin's serving ml-worker allocations every simulated
    second (set ``cluster`` once the twin exists). Serving, not ``healthy``: like Nomad, the
    twin clears and re-watches the health of every allocation a new job version updates in
    place, and those workers keep serving meanwhile (``Alloc.serving``)."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.cluster: Any = None
        self.samples: list[tuple[float, int]] = []

    def sleep(self, seconds: float) -> None:
        left = max(0.0, seconds)
        while True:
            step = min(1.0, left)
            super().sleep(step)
            left -= step
            self.sample()
            if left <= 0:
                return

    def sample(self) -> None:
        if self.cluster is None:
            return
        with self.cluster.lock:
            self.cluster.process_due()
            serving = sum(1 for a in self.cluster.job_allocs(JOB) if a.serving)
        self.samples.append((self.now().timestamp(), serving))


def sampling_twin(twin_factory: Any, *, nodes: int, start: datetime) -> tuple[Any, SamplingClock]:
    clock = SamplingClock(start)
    twin = twin_factory(nodes=nodes, clock=clock)
    clock.cluster = twin.cluster
    return twin, clock


def setup_job(twin: Any, *, count: int = 2) -> NomadClient:
    """Register jobs/ml-worker.nomad.hcl with ``count`` per zone; wait until it is healthy."""
    nomad = NomadClient(address=twin.address, clock=twin.clock)
    spec = nomad.parse_hcl((ROOT / "jobs" / "ml-worker.nomad.hcl").read_text())
    # the rollout tests run in the twin's default namespace and node pool
    spec["Namespace"] = "default"
    spec["NodePool"] = next(iter(twin.cluster.nodes.values())).node_pool
    for tg in spec["TaskGroups"]:
        tg["Count"] = count
        if tg.get("Scaling"):
            tg["Scaling"]["Max"] = 100
    nomad.register_job(spec)
    twin.advance(300)
    return nomad


def images_running(twin: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in twin.cluster.job_allocs(("default", "ml-worker")):
        if a.live and a.client_status == "running":
            out[a.image] = out.get(a.image, 0) + 1
    return out


def cli_status(twin: Any, consul_agent: Any, prefix: str, tmp_path: Path) -> dict[str, Any]:
    """``nomadscale deploy status ekyc-ml --json`` as an operator runs it: settings from the
    environment (CONSUL_HTTP_ADDR, NOMADSCALE_KV_PREFIX, NOMAD_ADDR), an empty config file."""
    from click.testing import CliRunner

    from nomadscale.cli.main import _register, cli

    _register()  # what main() does before running (idempotent)
    config = tmp_path / "nomadscale.yaml"
    config.write_text("{}\n")
    env = {
        "NOMADSCALE_CONFIG": str(config),
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "CONSUL_HTTP_TOKEN": consul_agent.token or "",
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMAD_ADDR": twin.address,
    }
    result = CliRunner().invoke(cli, ["deploy", "status", "ekyc-ml", "--json"], env=env)
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.output)
    return out


class RecordingAlerts:
    """An alert sink that keeps what the rollout triggered (``sent``); resolves are ignored."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def trigger(self, **kw: Any) -> None:
        self.sent.append(kw)

    def resolve(self, **kw: Any) -> None:
        return None


def other_team_job(name: str, *, dc: str, job_type: str = "service", gpu: bool = True,
             node: str | None = None) -> str:  # fmt: skip
    """Another team's job in ``dc``: one GPU per allocation (``gpu``), pinned to ``node``."""
    pin = (f'constraint {{\n attribute = "${{node.unique.name}}"\n value = "{node}"\n }}'
           if node else "")  # fmt: skip
    device = 'device "nvidia/gpu" {\n count = 1\n }' if gpu else ""
    count = "" if job_type == "system" else "count = 1"
    return f"""
job "{name}" {{
  type        = "{job_type}"
  node_pool   = "gpu"
  datacenters = ["{dc}"]
  group "g" {{
    {count}
    {pin}
    task "t" {{
      driver = "docker"
      config {{
        image = "us-docker.pkg.dev/acme/other/{name}:1"
      }}
      resources {{
        cpu    = 200
        memory = 256
        {device}
      }}
    }}
  }}
}}
"""
