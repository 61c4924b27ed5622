"""Building blocks for the service tests: a small policy, a level demand source, a fleet."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from nomadscale.config.policy import Policy
from nomadscale.core.ports import DemandSeries
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.simulate import worker_job

ROOT = Path(__file__).resolve().parents[2]


def make_policy(
    *, name: str = "ekyc", node_pool: bool = False, rpm_per_worker: float = 100.0, **over: Any
) -> Policy:
    doc: dict[str, Any] = {
        "name": name,
        "cycle": "20m",
        "lead_time": "10m",
        "demand": {"source": "prometheus", "query": "demand", "step": "1m", "lookback": "6h"},
        "forecast": {"model": "auto", "target_availability": 0.99},
        "capacity": {"rpm_per_worker": rpm_per_worker},
        "bounds": {"min": 1, "max": 40, "max_step_up": 20, "max_step_down": 20},
        "zones": {
            "split": "odd-even",
            "list": [
                {
                    "name": "zone-a",
                    "group": "ml-worker-a",
                    "node_pool": "gpu",
                    "instance_group": "mig-a",
                },
                {
                    "name": "zone-b",
                    "group": "ml-worker-b",
                    "node_pool": "gpu",
                    "instance_group": "mig-b",
                },
            ],
        },
        "target": {"job": "ml-worker", "namespace": "ekyc"},
    }
    if node_pool:
        doc["target"]["node_pool"] = {
            "provider": "gce-mig", "project": "proj", "workers_per_node": 1,
            "drain_deadline": "10m", "scale_in_order": "empty-then-oldest",
        }  # fmt: skip
    doc.update(over)
    return Policy.model_validate(doc)


class LevelDemand:
    """A DemandSource whose whole history sits at ``level(end)`` requests per minute (the
    world changes in jumps; tests set the level)."""

    def __init__(self, level: Callable[[datetime], float]) -> None:
        self.level = level

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        n = int(lookback_s // step_s)
        last = math.floor(end.timestamp() / step_s) * step_s
        start = datetime.fromtimestamp(last - n * step_s, tz=end.tzinfo)
        return DemandSeries(start=start, step_s=step_s, values=np.full(n, self.level(end)))


def constant(rpm: float) -> LevelDemand:
    return LevelDemand(lambda _t: rpm)


def after(clock: Any, seconds: float) -> datetime:
    return clock.now() + timedelta(seconds=seconds)


WEBHOOK_SECRET = "whsec-test-0001"


def run_process_env(
    *, consul_addr: str, prefix: str, twin: Any, tmp_path: Path, port: int, healing: bool = False
) -> dict[str, str]:
    """Everything ``python -m nomadscale run`` needs as a real process: the small policy's job
    registered in ``twin``, its policy and settings files under ``tmp_path``, and the
    environment pointing at the twin and Consul (Prometheus is not reached before the first
    cycle). ``healing``: with a webhook secret, so the process builds the healing engine and
    serves its routes. Callers add what their test is about (notify socket, ...)."""
    policy = make_policy()
    twin.cluster.add_namespace("ekyc")
    NomadClient(address=twin.address).register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "NOMAD_ADDR": twin.address,
        "CONSUL_HTTP_ADDR": consul_addr,
        "PROMETHEUS_URL": "http://127.0.0.1:9",
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMADSCALE_LOCK_TTL": "15s",
        "NOMADSCALE_HTTP_PORT": str(port),
        "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
        "PYTHONPATH": str(ROOT),
    }
    if healing:
        env["NOMADSCALE_WEBHOOK_SECRETS"] = WEBHOOK_SECRET
    return env
