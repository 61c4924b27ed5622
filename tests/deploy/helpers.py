"""Shared setup for rollout tests: a policy for the twin's shape and the ml-worker job."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.integrations.nomad import NomadClient
from nomadscale.sim.faults import FaultInjector

ROOT = Path(__file__).resolve().parents[2]
TRACE = "/work/shared/traces/llm_alibaba_servegen_msmall_10min.csv"
OLD = "us-docker.pkg.dev/acme/ml/worker:2026.01.1"
NEW = "us-docker.pkg.dev/acme/ml/worker:2026.02.1"


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


def setup_job(twin: Any, *, count: int = 2) -> NomadClient:
    """Register jobs/ml-worker.nomad.hcl with ``count`` per zone; wait until it is healthy."""
    nomad = NomadClient(address=twin.address, clock=twin.clock)
    spec = nomad.parse_hcl((ROOT / "jobs" / "ml-worker.nomad.hcl").read_text())
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


class PullFails(FaultInjector):
    """The twin's faults plus "pulling ``image`` fails on node X" for sysbatch pulls.

    The twin has no per-node pull fault; its allocation-start hook asks ``image_is_bad`` with
    the image only, so this reads the allocation from the caller's frame (test-only).
    """

    def __init__(self, node_id: str, image: str) -> None:
        super().__init__()
        self.node_id, self.image = node_id, image

    def image_is_bad(self, image: str) -> bool:
        frame = inspect.currentframe()
        alloc = frame.f_back.f_locals.get("a") if frame and frame.f_back else None
        if alloc is not None and alloc.node_id == self.node_id and image == self.image:
            return True
        return super().image_is_bad(image)
