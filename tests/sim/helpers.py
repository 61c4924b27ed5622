"""Shared helpers for twin tests: job specs and raw calls python-nomad lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
WORKER_IMAGE = "registry.example.com/ekyc/ml-worker:2026.10.2"
# nanoseconds, as Nomad's durations; a one-at-a-time update block for deployment tests
S = 1_000_000_000
HOUR = 3600 * S
UPDATE = {
    "MaxParallel": 1,
    "MinHealthyTime": 10 * S,
    "HealthyDeadline": 120 * S,
    "ProgressDeadline": 600 * S,
}


def hcl(name: str) -> str:
    return (ROOT / "jobs" / name).read_text()


def service_job(
    job_id: str = "web",
    *,
    count: int = 2,
    image: str = "registry/web:1",
    update: dict[str, Any] | None = None,
    gpu: bool = True,
    datacenters: list[str] | None = None,
    scaling: dict[str, Any] | None = None,
    group: str = "web",
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": "server",
        "Driver": "docker",
        "Config": {"image": image},
        "Resources": {"CPU": 100, "MemoryMB": 128},
    }
    if gpu:
        task["Resources"]["Devices"] = [{"Name": "nvidia/gpu", "Count": 1}]
    tg: dict[str, Any] = {"Name": group, "Count": count, "Tasks": [task]}
    if scaling is not None:
        tg["Scaling"] = scaling
    job: dict[str, Any] = {
        "ID": job_id,
        "Name": job_id,
        "Type": "service",
        "NodePool": "gpu",
        "Datacenters": datacenters or ["zone-a", "zone-b"],
        "TaskGroups": [tg],
    }
    if update is not None:
        job["Update"] = update
    return job


def scale(address: str, job_id: str, group: str, count: int | None, **extra: Any) -> Any:
    body = {"Count": count, "Target": {"Group": group}, "Message": "test", **extra}
    return requests.post(f"{address}/v1/job/{job_id}/scale", json=body, timeout=10)


def live_allocs(n: Any, job_id: str) -> list[dict[str, Any]]:
    return [
        a
        for a in n.job.get_allocations(job_id)
        if a["DesiredStatus"] == "run" and a["ClientStatus"] in ("pending", "running")
    ]


def alloc(n: Any, alloc_id: str) -> dict[str, Any]:
    return n.allocation.get_allocation(alloc_id)  # type: ignore[no-any-return]


def successful(twin: Any, n: Any, job: dict[str, Any]) -> dict[str, Any]:
    n.jobs.register_job({"Job": job})
    twin.advance(300)
    dep = n.job.get_deployment(job["ID"])
    assert dep["Status"] == "successful", dep["StatusDescription"]
    return dep  # type: ignore[no-any-return]


def fill(twin: Any, n: Any, count: int) -> None:
    """Another job takes ``count`` GPUs (one per node)."""
    n.jobs.register_job({"Job": service_job("filler", count=count, image="registry/filler:1")})
    twin.advance(100)
