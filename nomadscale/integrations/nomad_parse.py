"""Nomad JSON -> nomadscale's frozen port values. Pure functions, tolerant of missing keys
(Go encodes nil maps and slices as ``null``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nomadscale.core.ports import (
    AllocInfo,
    DeploymentGroup,
    DeploymentInfo,
    GroupStatus,
    JobInfo,
    JobStatus,
    NodeInfo,
    NodeMetadata,
    ScaleEvent,
)

_ZERO_TIME = "0001-01-01T00:00:00Z"


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _map(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def ns_time(value: Any) -> datetime:
    """Unix nanoseconds -> aware UTC datetime."""
    return datetime.fromtimestamp(_int(value) / 1e9, tz=UTC)


def rfc3339(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    # Go prints up to 9 fractional digits; fromisoformat takes at most 6.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def job_info(data: Mapping[str, Any]) -> JobInfo:
    groups = {
        str(g.get("Name", "")): _int(g.get("Count"))
        for g in (data.get("TaskGroups") or [])
        if isinstance(g, Mapping)
    }
    return JobInfo(
        job_id=str(data.get("ID", "")),
        namespace=str(data.get("Namespace") or "default"),
        type=str(data.get("Type") or "service"),
        status=str(data.get("Status") or ""),
        stopped=bool(data.get("Stop")),
        version=_int(data.get("Version")),
        stable=bool(data.get("Stable")),
        job_modify_index=_int(data.get("JobModifyIndex")),
        groups=groups,
        meta={str(k): str(v) for k, v in _map(data.get("Meta")).items()},
        node_pool=str(data.get("NodePool") or ""),
        parameterized=bool(data.get("ParameterizedJob")),
        spec=dict(data),
    )


def scale_event(data: Mapping[str, Any]) -> ScaleEvent:
    count = data.get("Count")
    prev = data.get("PreviousCount")
    return ScaleEvent(
        time=ns_time(data.get("Time")),
        count=None if count is None else _int(count),
        previous_count=None if prev is None else _int(prev),
        message=str(data.get("Message") or ""),
        error=bool(data.get("Error")),
        meta=_map(data.get("Meta")),
    )


def job_status(
    data: Mapping[str, Any], *, active_deployment: str | None, namespace: str
) -> JobStatus:
    groups: dict[str, GroupStatus] = {}
    for name, g in _map(data.get("TaskGroups")).items():
        g = _map(g)
        events = tuple(scale_event(e) for e in (g.get("Events") or []) if isinstance(e, Mapping))
        events = tuple(sorted(events, key=lambda e: e.time, reverse=True))
        groups[str(name)] = GroupStatus(
            name=str(name),
            desired=_int(g.get("Desired")),
            placed=_int(g.get("Placed")),
            running=_int(g.get("Running")),
            healthy=_int(g.get("Healthy")),
            unhealthy=_int(g.get("Unhealthy")),
            events=events,
        )
    return JobStatus(
        job_id=str(data.get("JobID", "")),
        namespace=str(data.get("Namespace") or namespace),
        stopped=bool(data.get("JobStopped")),
        groups=groups,
        active_deployment=active_deployment,
        job_modify_index=_int(data.get("JobModifyIndex")),
    )


def node_info(data: Mapping[str, Any], *, allocs_running: int = 0) -> NodeInfo:
    drain = data.get("Drain")
    if drain is None:
        drain = data.get("DrainStrategy") is not None
    return NodeInfo(
        id=str(data.get("ID", "")),
        name=str(data.get("Name", "")),
        datacenter=str(data.get("Datacenter", "")),
        node_pool=str(data.get("NodePool") or "default"),
        status=str(data.get("Status", "")),
        eligibility=str(data.get("SchedulingEligibility", "")),
        draining=bool(drain),
        create_index=_int(data.get("CreateIndex")),
        meta={str(k): str(v) for k, v in _map(data.get("Meta")).items()},
        allocs_running=allocs_running,
    )


def alloc_info(data: Mapping[str, Any]) -> AllocInfo:
    ds = data.get("DeploymentStatus")
    ds = _map(ds)
    healthy = ds.get("Healthy")
    states = _map(data.get("TaskStates"))
    return AllocInfo(
        id=str(data.get("ID", "")),
        job_id=str(data.get("JobID", "")),
        namespace=str(data.get("Namespace") or "default"),
        task_group=str(data.get("TaskGroup", "")),
        node_id=str(data.get("NodeID", "")),
        node_name=str(data.get("NodeName", "")),
        desired_status=str(data.get("DesiredStatus", "")),
        client_status=str(data.get("ClientStatus", "")),
        job_version=_int(data.get("JobVersion")),
        deployment_id=data.get("DeploymentID") or None,
        healthy=None if healthy is None else bool(healthy),
        canary=bool(ds.get("Canary")),
        task_states={str(k): str(_map(v).get("State", "")) for k, v in states.items()},
        failed_tasks=tuple(sorted(str(k) for k, v in states.items() if _map(v).get("Failed"))),
        create_index=_int(data.get("CreateIndex")),
        modify_index=_int(data.get("ModifyIndex")),
    )


def deployment_info(data: Mapping[str, Any]) -> DeploymentInfo:
    groups: dict[str, DeploymentGroup] = {}
    for name, g in _map(data.get("TaskGroups")).items():
        g = _map(g)
        groups[str(name)] = DeploymentGroup(
            name=str(name),
            desired_total=_int(g.get("DesiredTotal")),
            placed_allocs=_int(g.get("PlacedAllocs")),
            healthy_allocs=_int(g.get("HealthyAllocs")),
            unhealthy_allocs=_int(g.get("UnhealthyAllocs")),
            desired_canaries=_int(g.get("DesiredCanaries")),
            placed_canaries=tuple(str(a) for a in (g.get("PlacedCanaries") or [])),
            promoted=bool(g.get("Promoted")),
            auto_revert=bool(g.get("AutoRevert")),
            auto_promote=bool(g.get("AutoPromote")),
            require_progress_by=rfc3339(g.get("RequireProgressBy")),
        )
    return DeploymentInfo(
        id=str(data.get("ID", "")),
        job_id=str(data.get("JobID", "")),
        namespace=str(data.get("Namespace") or "default"),
        job_version=_int(data.get("JobVersion")),
        status=str(data.get("Status", "")),
        status_description=str(data.get("StatusDescription") or ""),
        groups=groups,
        create_index=_int(data.get("CreateIndex")),
        modify_index=_int(data.get("ModifyIndex")),
    )


def node_metadata(node_id: str, data: Mapping[str, Any]) -> NodeMetadata:
    return NodeMetadata(
        node_id=node_id,
        meta={str(k): str(v) for k, v in _map(data.get("Meta")).items() if v is not None},
        dynamic={
            str(k): (None if v is None else str(v)) for k, v in _map(data.get("Dynamic")).items()
        },
        static={str(k): str(v) for k, v in _map(data.get("Static")).items() if v is not None},
    )
