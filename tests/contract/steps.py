"""Steps the contract tests share: a job for the target, register it (purged afterwards),
list a job's
allocations (schema-checked), whether its latest deployment is a version in a status, let time pass (simulated on the twin, real on a real Nomad)."""

from __future__ import annotations

import time
from typing import Any

from tests.contract.conftest import World, seg
from tests.contract.env import service_job


def register(world: World, jid: str, job: dict[str, Any]) -> None:
    """Register ``job`` (id ``jid``); it is purged when the test ends."""
    world.api.call("POST", "/jobs", body={"Job": job})
    world.cleanup.append(
        lambda: world.api.call("DELETE", f"/job/{seg(jid)}", params={"purge": "true"}, ok=False)
    )


def target_job(world: World, jid: str, *, count: int = 1, **extra: Any) -> dict[str, Any]:
    """A one-group (``ml-worker-a``) service job placed where the target's nodes are (its
    datacenters and node pool)."""
    return service_job(jid, groups=("ml-worker-a",), count=count,
                       datacenters=world.target.datacenters, node_pool=world.target.node_pool,
                       **extra)  # fmt: skip


def job_allocs(world: World, path: str) -> list[dict[str, Any]]:
    return world.api.check("GET", "/job/{jobName}/allocations", f"{path}/allocations") or []


def pause(world: World, seconds: float) -> None:
    """Let time pass: simulated on the twin, real against a real Nomad."""
    if world.target.is_twin:
        world.target.advance(seconds)
    else:
        time.sleep(seconds)


def deployment_is(world: World, path: str, version: int, status: str) -> bool:
    """The latest deployment of the job at ``path`` is of job ``version`` and in ``status``."""
    dep = world.api.call("GET", f"{path}/deployment").json()
    return bool(dep) and dep["JobVersion"] == version and dep["Status"] == status
