"""Which allocations of a job serve traffic now, judged from Nomad's own answers.

Nomad's ``Healthy`` counts (``GET /v1/job/:id/scale``, a deployment's ``HealthyAllocs``, an
allocation's ``DeploymentStatus.Healthy``) are not a count of workers serving: every new job
version (a Scale API count change too) updates the unchanged allocations in place into the
new deployment with ``DeploymentStatus`` nil (scheduler/generic_sched.go), and the client's
health hook clears their health and watches it again when the DeploymentID changes
(client/allocrunner/health_hook.go ``Update``: "Deployment has changed, reset status"). For
about min_healthy_time after every count change those workers show ``Healthy: null`` while
they keep running and serving.

An allocation serves when it is wanted (DesiredStatus ``run``), running, not an unpromoted
canary (the scale endpoint leaves those out too), not marked unhealthy, and either

* healthy, or
* its health is unset only because it was moved into the job's latest deployment: it existed
  before that deployment (CreateIndex below the deployment's; a placement of the deployment
  is created with it or later) and its running tasks started at least the group's
  min_healthy_time ago (a task that restarted since is not serving again yet).

A fresh placement (replacement, surge, scale-up) is not serving until Nomad marks it healthy.
One case is judged too kindly: an allocation still in flight in a deployment that a newer job
version superseded, running longer than min_healthy_time without passing its checks. The
rollout re-plans only with nothing in flight, and Nomad refuses the Scale API during a
deployment, so nomadscale never creates that case itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from nomadscale.integrations.nomad_parse import rfc3339

DEFAULT_MIN_HEALTHY_S = 10.0  # Nomad's default for both the update and the migrate block
NS = 1_000_000_000


def min_healthy_s(tg: Mapping[str, Any]) -> float:
    """The min_healthy_time (seconds) the client watches a group's allocations with: the
    update block's when the group gets deployments (max_parallel > 0), else the migrate
    block's (health_hook.go ``getHealthParams``)."""
    update = tg.get("Update") or {}
    block = update if int(update.get("MaxParallel") or 0) > 0 else tg.get("Migrate") or {}
    value = block.get("MinHealthyTime")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DEFAULT_MIN_HEALTHY_S
    return max(0.0, float(value) / NS)


def _running_since(alloc: Mapping[str, Any]) -> datetime | None:
    """When the last of the allocation's running tasks started (None: no task is running,
    one failed, or a start time is missing)."""
    states = alloc.get("TaskStates")
    if not isinstance(states, Mapping) or not states:
        return None
    latest: datetime | None = None
    for state in states.values():
        if not isinstance(state, Mapping) or state.get("Failed"):
            return None
        if state.get("State") != "running":
            continue  # a finished prestart task, or a poststop task not started yet
        started = rfc3339(state.get("StartedAt"))
        if started is None:
            return None
        latest = started if latest is None or started > latest else latest
    return latest


def serving(
    alloc: Mapping[str, Any], *, now: datetime, min_healthy_s: float, deployment_index: int | None
) -> bool:
    """Whether one allocation (stub JSON with TaskStates) serves now; ``deployment_index``:
    the CreateIndex of the job's latest deployment (None: the job has none)."""
    if alloc.get("DesiredStatus") != "run" or alloc.get("ClientStatus") != "running":
        return False
    ds = alloc.get("DeploymentStatus")
    ds = ds if isinstance(ds, Mapping) else {}
    if ds.get("Canary"):
        return False
    healthy = ds.get("Healthy")
    if healthy is not None:
        return bool(healthy)
    created = alloc.get("CreateIndex")
    if deployment_index is None or not isinstance(created, int) or created >= deployment_index:
        return False  # a placement still waiting for its first health verdict
    since = _running_since(alloc)
    return since is not None and (now - since).total_seconds() >= min_healthy_s


def serving_counts(
    job: Mapping[str, Any],
    allocs: Iterable[Mapping[str, Any]],
    *,
    deployment: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, int]:
    """Serving allocations per task group of ``job`` (Job JSON; every group, 0 when none)."""
    groups = {str(tg.get("Name")): tg for tg in job.get("TaskGroups") or []}
    out = dict.fromkeys(groups, 0)
    index = deployment.get("CreateIndex") if deployment else None
    dep_index = index if isinstance(index, int) and not isinstance(index, bool) else None
    for a in allocs:
        tg = groups.get(str(a.get("TaskGroup")))
        if tg is None:
            continue
        if serving(a, now=now, min_healthy_s=min_healthy_s(tg), deployment_index=dep_index):
            out[str(tg.get("Name"))] += 1
    return out
