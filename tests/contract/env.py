"""Where the Nomad tests point: the twin (default) or a real Nomad.

Set ``NOMADSCALE_TEST_NOMAD_ADDR`` (and optionally ``NOMADSCALE_TEST_NOMAD_TOKEN``, and
``NOMADSCALE_TEST_NOMAD_NODE_POOL``, default ``gpu-l4`` as in the Vagrant cluster) to run the
contract suite against a real cluster; it then registers its own throwaway jobs and purges
them afterwards. Also holds the small job specs the adapter and contract tests register.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nomadscale.core.clock import Clock, FakeClock

NS = 1_000_000_000
REAL_ADDR_ENV = "NOMADSCALE_TEST_NOMAD_ADDR"
REAL_TOKEN_ENV = "NOMADSCALE_TEST_NOMAD_TOKEN"
REAL_POOL_ENV = "NOMADSCALE_TEST_NOMAD_NODE_POOL"  # where the suite places its jobs


def real_nomad() -> tuple[str, str | None] | None:
    addr = os.environ.get(REAL_ADDR_ENV)
    return (addr, os.environ.get(REAL_TOKEN_ENV) or None) if addr else None


@dataclass
class Target:
    address: str
    token: str | None
    cluster: Any | None  # the twin's Cluster, None against a real Nomad
    node_pool: str | None
    datacenters: tuple[str, ...]

    @property
    def is_twin(self) -> bool:
        return self.cluster is not None

    def advance(self, seconds: float) -> None:
        """Let simulated time pass (twin only; a no-op against a real Nomad)."""
        if self.cluster is not None:
            self.cluster.advance(seconds)


@contextmanager
def twin_target(
    *,
    nodes: int = 6,
    zones: Sequence[str] = ("zone-a", "zone-b"),
    acl_token: str | None = None,
    clock: Clock | None = None,
    default_image_gb: float = 0.5,
) -> Iterator[Target]:
    """A started twin. Images default to 0.5 GB (a 5 s pull) so a fresh pull fits the
    60 s healthy deadline of ``service_job``; pass a bigger size to test slow pulls."""
    try:
        from nomadscale.sim.cluster import Cluster
        from nomadscale.sim.server import TwinServer
    except ImportError as exc:  # the twin is written in parallel
        import pytest

        pytest.skip(f"Nomad twin not available: {exc}")

    cluster = Cluster.build(
        nodes=nodes,
        zones=tuple(zones),
        node_pool="gpu",
        clock=clock or FakeClock(),
        acl_token=acl_token,
        default_image_gb=default_image_gb,
    )
    try:
        server = TwinServer(cluster, host="127.0.0.1", port=0).start()
    except ImportError as exc:  # routes still being written
        import pytest

        pytest.skip(f"Nomad twin not available: {exc}")
    try:
        yield Target(
            address=server.address,
            token=acl_token,
            cluster=cluster,
            node_pool="gpu",
            datacenters=tuple(zones),
        )
    finally:
        server.stop()


def settle(client: Any, target: Target, job_id: str, *, max_s: float = 1800) -> None:
    """Advance twin time until the job's latest deployment (if any) is no longer active."""
    waited = 0.0
    while waited < max_s:
        target.advance(30)
        waited += 30
        dep = client.latest_deployment(job_id)
        if dep is None or not dep.active:
            return
    raise AssertionError(f"{job_id}: deployment still active after {max_s}s")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _task(image: str) -> dict[str, Any]:
    return {
        "Name": "worker",
        "Driver": "docker",
        # busybox's own command (sh) exits at once: a real Nomad would restart it until the
        # allocation fails; the workers must keep running
        "Config": {"image": image, "command": "sleep", "args": ["86400"]},
        "Resources": {"CPU": 100, "MemoryMB": 64},
    }


def service_job(
    job_id: str,
    *,
    groups: Sequence[str] = ("ml-worker-a", "ml-worker-b"),
    count: int = 1,
    image: str = "busybox:1.36",
    datacenters: Sequence[str] = ("zone-a", "zone-b"),
    node_pool: str | None = "gpu",
    canary: int = 0,
    auto_promote: bool = False,
) -> dict[str, Any]:
    job: dict[str, Any] = {
        "ID": job_id,
        "Name": job_id,
        "Type": "service",
        "Datacenters": list(datacenters),
        "Meta": {"owner": "nomadscale-tests"},
        "Update": {
            "MaxParallel": 1,
            "Canary": canary,
            "AutoPromote": auto_promote,
            "AutoRevert": False,
            "HealthCheck": "task_states",
            "MinHealthyTime": 1 * NS,
            "HealthyDeadline": 60 * NS,
            "ProgressDeadline": 120 * NS,
        },
        "TaskGroups": [{"Name": g, "Count": count, "Tasks": [_task(image)]} for g in groups],
    }
    if node_pool:
        job["NodePool"] = node_pool
    return job


def prefetch_job(
    job_id: str,
    *,
    datacenters: Sequence[str] = ("zone-a", "zone-b"),
    node_pool: str | None = "gpu",
) -> dict[str, Any]:
    job: dict[str, Any] = {
        "ID": job_id,
        "Name": job_id,
        "Type": "sysbatch",
        "Datacenters": list(datacenters),
        "ParameterizedJob": {"Payload": "optional", "MetaRequired": ["image"]},
        "TaskGroups": [
            {
                "Name": "prefetch",
                "Count": 1,
                "Tasks": [
                    {
                        "Name": "pull",
                        "Driver": "raw_exec",
                        "Config": {"command": "/bin/true"},
                        "Resources": {"CPU": 50, "MemoryMB": 32},
                    }
                ],
            }
        ],
    }
    if node_pool:
        job["NodePool"] = node_pool
    return job
