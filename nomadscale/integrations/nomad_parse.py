"""Nomad JSON -> nomadscale's frozen port values. Pure functions.

Like Nomad's own Go client, a missing key or ``null`` is the zero value (Go encodes nil maps
and slices as ``null``); a value of the wrong shape (a list where a map belongs, ``inf`` or a
string where an integer belongs, a time out of range) is a malformed answer and raises
``ExternalPermanentError(system="nomad")`` with one line naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nomadscale.core.errors import ExternalPermanentError
from nomadscale.core.ports import (
    AllocInfo,
    DeploymentGroup,
    DeploymentInfo,
    Devices,
    EvalInfo,
    GroupStatus,
    JobInfo,
    JobStatus,
    NodeInfo,
    NodeMetadata,
    PlacementFailure,
    ScaleEvent,
)

_ZERO_TIME = "0001-01-01T00:00:00Z"


_MAX_INT = 2**64  # Nomad's indexes and counts are (u)int64


def _bad(field: str, value: Any, want: str) -> ExternalPermanentError:
    shown = repr(value) if not isinstance(value, (str, list, dict)) else type(value).__name__
    if isinstance(value, str):
        shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
    return ExternalPermanentError(
        f"malformed Nomad answer: {field}: expected {want}, got {shown}", system="nomad"
    )


def _int(value: Any, default: int = 0, *, field: str = "value") -> int:
    """A JSON integer; ``null`` (or missing) is ``default``. Integral floats are accepted
    (some proxies re-encode numbers); bools, strings, inf/nan and huge numbers are not."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise _bad(field, value, "an integer")
    if isinstance(value, int):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    else:
        raise _bad(field, value, "an integer")
    if not -_MAX_INT < out < _MAX_INT:
        raise _bad(field, value, "a 64-bit integer")
    return out


def _map(value: Any, field: str = "value") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(field, value, "an object")
    return dict(value)


def _list(value: Any, field: str = "value") -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise _bad(field, value, "a list")
    return list(value)


def _doc(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise _bad(what, data, "an object")
    return data


def _s(value: Any, field: str, default: str = "") -> str:
    """A JSON string; ``null`` is ``default``; numbers are printed; lists/objects are malformed."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        try:
            return str(value)
        except ValueError:  # an int over Python's 4300-digit str() limit
            raise _bad(field, value, "a string") from None
    raise _bad(field, value, "a string")


def _str_map(value: Any, field: str, *, drop_null: bool = False) -> dict[str, str]:
    return {
        str(k): _s(v, f"{field}.{k}")
        for k, v in _map(value, field).items()
        if not (drop_null and v is None)
    }


def ns_time(value: Any, field: str = "Time") -> datetime:
    """Unix nanoseconds -> aware UTC datetime (``null`` is the epoch, like Go's zero int)."""
    ns = _int(value, field=field)
    try:
        return datetime.fromtimestamp(ns / 1e9, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise _bad(field, value, "unix nanoseconds within years 1-9999") from None


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
    data = _doc(data, "job")
    groups: dict[str, int] = {}
    for i, g in enumerate(_list(data.get("TaskGroups"), "TaskGroups")):
        g = _map(g, f"TaskGroups[{i}]")
        groups[_s(g.get("Name"), f"TaskGroups[{i}].Name")] = _int(
            g.get("Count"), field=f"TaskGroups[{i}].Count"
        )
    return JobInfo(
        job_id=_s(data.get("ID"), "ID"),
        namespace=_s(data.get("Namespace"), "Namespace") or "default",
        type=_s(data.get("Type"), "Type") or "service",
        status=_s(data.get("Status"), "Status"),
        stopped=bool(data.get("Stop")),
        version=_int(data.get("Version"), field="Version"),
        stable=bool(data.get("Stable")),
        job_modify_index=_int(data.get("JobModifyIndex"), field="JobModifyIndex"),
        groups=groups,
        meta=_str_map(data.get("Meta"), "Meta"),
        node_pool=_s(data.get("NodePool"), "NodePool"),
        parameterized=bool(data.get("ParameterizedJob")),
        spec=dict(data),
    )


def scale_event(data: Mapping[str, Any], where: str = "") -> ScaleEvent:
    data = _doc(data, where or "scale event")
    pre = f"{where}." if where else ""
    count = data.get("Count")
    prev = data.get("PreviousCount")
    return ScaleEvent(
        time=ns_time(data.get("Time"), f"{pre}Time"),
        count=None if count is None else _int(count, field=f"{pre}Count"),
        previous_count=None if prev is None else _int(prev, field=f"{pre}PreviousCount"),
        message=_s(data.get("Message"), f"{pre}Message"),
        error=bool(data.get("Error")),
        meta=_map(data.get("Meta"), f"{pre}Meta"),
    )


def job_status(
    data: Mapping[str, Any], *, active_deployment: str | None, namespace: str
) -> JobStatus:
    data = _doc(data, "job scale status")
    groups: dict[str, GroupStatus] = {}
    for name, g in _map(data.get("TaskGroups"), "TaskGroups").items():
        at = f"TaskGroups.{name}"
        g = _map(g, at)
        events = tuple(
            scale_event(e, f"{at}.Events[{i}]")
            for i, e in enumerate(_list(g.get("Events"), f"{at}.Events"))
        )
        events = tuple(sorted(events, key=lambda e: e.time, reverse=True))
        groups[str(name)] = GroupStatus(
            name=str(name),
            desired=_int(g.get("Desired"), field=f"{at}.Desired"),
            placed=_int(g.get("Placed"), field=f"{at}.Placed"),
            running=_int(g.get("Running"), field=f"{at}.Running"),
            healthy=_int(g.get("Healthy"), field=f"{at}.Healthy"),
            unhealthy=_int(g.get("Unhealthy"), field=f"{at}.Unhealthy"),
            events=events,
        )
    return JobStatus(
        job_id=_s(data.get("JobID"), "JobID"),
        namespace=_s(data.get("Namespace"), "Namespace") or namespace,
        stopped=bool(data.get("JobStopped")),
        groups=groups,
        active_deployment=active_deployment,
        job_modify_index=_int(data.get("JobModifyIndex"), field="JobModifyIndex"),
    )


def _devices(value: Any, field: str, *, ids: str) -> tuple[Devices, ...]:
    """Device groups (``Vendor``/``Type``/``Name``) with their instance ids: a node's healthy
    ``Instances`` (``ids="Instances"``) or an allocation's ``DeviceIDs``."""
    out = []
    for i, d in enumerate(_list(value, field)):
        d = _map(d, f"{field}[{i}]")
        if ids == "Instances":
            insts = [_map(x, f"{field}[{i}].Instances") for x in _list(d.get("Instances"))]
            got = tuple(_s(x.get("ID"), f"{field}[{i}].Instances.ID")
                        for x in insts if x.get("Healthy") is not False)  # fmt: skip
        else:
            got = tuple(_s(x, f"{field}[{i}].DeviceIDs") for x in _list(d.get("DeviceIDs")))
        out.append(Devices(vendor=_s(d.get("Vendor"), f"{field}[{i}].Vendor"),
                           type=_s(d.get("Type"), f"{field}[{i}].Type"),
                           name=_s(d.get("Name"), f"{field}[{i}].Name"), ids=got))  # fmt: skip
    return tuple(out)


def _node_devices(data: Mapping[str, Any]) -> tuple[Devices, ...] | None:
    res = data.get("NodeResources")
    if not isinstance(res, Mapping):
        return None  # a list stub: not reported
    return _devices(res.get("Devices"), "NodeResources.Devices", ids="Instances")


def _alloc_devices(data: Mapping[str, Any]) -> tuple[Devices, ...] | None:
    res = data.get("AllocatedResources")
    if not isinstance(res, Mapping):
        return None  # a list stub: not reported
    out: list[Devices] = []
    for name, task in _map(res.get("Tasks"), "AllocatedResources.Tasks").items():
        at = f"AllocatedResources.Tasks.{name}"
        out.extend(_devices(_map(task, at).get("Devices"), f"{at}.Devices", ids="DeviceIDs"))
    return tuple(out)


def _time(value: Any, field: str) -> datetime | None:
    """An RFC 3339 time (Go's zero time and ``null`` are None); a bad one is malformed."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(field, value, "an RFC 3339 time")
    parsed = rfc3339(value)
    if parsed is None and value and not value.startswith("0001-01-01"):
        raise _bad(field, value, "an RFC 3339 time")
    return parsed


def node_info(data: Mapping[str, Any], *, allocs_running: int = 0) -> NodeInfo:
    """A node, full or list stub. Its drain: ``DrainStrategy`` (full node: a running drain,
    structs.DrainStrategy with its DrainSpec inlined) and ``LastDrain``
    (structs.DrainMetadata, full node and stub: the latest drain's Meta and Status, kept
    after it ends; nomad/state/state_store.go updateNodeDrainImpl)."""
    data = _doc(data, "node")
    drain = data.get("Drain")
    if drain is None:
        drain = data.get("DrainStrategy") is not None
    strategy = _map(data.get("DrainStrategy"), "DrainStrategy")
    last = _map(data.get("LastDrain"), "LastDrain")
    return NodeInfo(
        id=_s(data.get("ID"), "ID"),
        name=_s(data.get("Name"), "Name"),
        datacenter=_s(data.get("Datacenter"), "Datacenter"),
        node_pool=_s(data.get("NodePool"), "NodePool") or "default",
        status=_s(data.get("Status"), "Status"),
        eligibility=_s(data.get("SchedulingEligibility"), "SchedulingEligibility"),
        draining=bool(drain),
        create_index=_int(data.get("CreateIndex"), field="CreateIndex"),
        meta=_str_map(data.get("Meta"), "Meta"),
        allocs_running=allocs_running,
        devices=_node_devices(data),
        drain_meta=_str_map(last.get("Meta"), "LastDrain.Meta", drop_null=True),
        drain_status=_s(last.get("Status"), "LastDrain.Status"),
        drain_started=_time(last.get("StartedAt"), "LastDrain.StartedAt"),
        drain_force_at=_time(strategy.get("ForceDeadline"), "DrainStrategy.ForceDeadline"),
    )


def alloc_info(data: Mapping[str, Any]) -> AllocInfo:
    data = _doc(data, "allocation")
    ds = _map(data.get("DeploymentStatus"), "DeploymentStatus")
    healthy = ds.get("Healthy")
    states = {
        str(k): _map(v, f"TaskStates.{k}")
        for k, v in _map(data.get("TaskStates"), "TaskStates").items()
    }
    return AllocInfo(
        id=_s(data.get("ID"), "ID"),
        job_id=_s(data.get("JobID"), "JobID"),
        namespace=_s(data.get("Namespace"), "Namespace") or "default",
        task_group=_s(data.get("TaskGroup"), "TaskGroup"),
        node_id=_s(data.get("NodeID"), "NodeID"),
        node_name=_s(data.get("NodeName"), "NodeName"),
        desired_status=_s(data.get("DesiredStatus"), "DesiredStatus"),
        client_status=_s(data.get("ClientStatus"), "ClientStatus"),
        job_version=_int(data.get("JobVersion"), field="JobVersion"),
        deployment_id=_s(data.get("DeploymentID"), "DeploymentID") or None,
        healthy=None if healthy is None else bool(healthy),
        canary=bool(ds.get("Canary")),
        task_states={k: _s(v.get("State"), f"TaskStates.{k}.State") for k, v in states.items()},
        failed_tasks=tuple(sorted(k for k, v in states.items() if v.get("Failed"))),
        create_index=_int(data.get("CreateIndex"), field="CreateIndex"),
        modify_index=_int(data.get("ModifyIndex"), field="ModifyIndex"),
        # a list stub says JobType; a full allocation carries its Job
        job_type=_s(data.get("JobType"), "JobType")
        or _s(_map(data.get("Job"), "Job").get("Type"), "Job.Type"),
        devices=_alloc_devices(data),
    )


def deployment_info(data: Mapping[str, Any]) -> DeploymentInfo:
    data = _doc(data, "deployment")
    groups: dict[str, DeploymentGroup] = {}
    for name, g in _map(data.get("TaskGroups"), "TaskGroups").items():
        at = f"TaskGroups.{name}"
        g = _map(g, at)
        canaries = _list(g.get("PlacedCanaries"), f"{at}.PlacedCanaries")
        groups[str(name)] = DeploymentGroup(
            name=str(name),
            desired_total=_int(g.get("DesiredTotal"), field=f"{at}.DesiredTotal"),
            placed_allocs=_int(g.get("PlacedAllocs"), field=f"{at}.PlacedAllocs"),
            healthy_allocs=_int(g.get("HealthyAllocs"), field=f"{at}.HealthyAllocs"),
            unhealthy_allocs=_int(g.get("UnhealthyAllocs"), field=f"{at}.UnhealthyAllocs"),
            desired_canaries=_int(g.get("DesiredCanaries"), field=f"{at}.DesiredCanaries"),
            placed_canaries=tuple(_s(a, f"{at}.PlacedCanaries") for a in canaries),
            promoted=bool(g.get("Promoted")),
            auto_revert=bool(g.get("AutoRevert")),
            auto_promote=bool(g.get("AutoPromote")),
            require_progress_by=rfc3339(g.get("RequireProgressBy")),
        )
    return DeploymentInfo(
        id=_s(data.get("ID"), "ID"),
        job_id=_s(data.get("JobID"), "JobID"),
        namespace=_s(data.get("Namespace"), "Namespace") or "default",
        job_version=_int(data.get("JobVersion"), field="JobVersion"),
        status=_s(data.get("Status"), "Status"),
        status_description=_s(data.get("StatusDescription"), "StatusDescription"),
        groups=groups,
        create_index=_int(data.get("CreateIndex"), field="CreateIndex"),
        modify_index=_int(data.get("ModifyIndex"), field="ModifyIndex"),
    )


def _int_map(value: Any, field: str) -> dict[str, int]:
    return {str(k): _int(v, field=f"{field}.{k}") for k, v in _map(value, field).items()}


def placement_failure(data: Any, field: str = "FailedTGAllocs") -> PlacementFailure:
    m = _map(data, field)
    return PlacementFailure(
        unplaced=_int(m.get("CoalescedFailures"), field=f"{field}.CoalescedFailures") + 1,
        nodes_evaluated=_int(m.get("NodesEvaluated"), field=f"{field}.NodesEvaluated"),
        nodes_filtered=_int(m.get("NodesFiltered"), field=f"{field}.NodesFiltered"),
        nodes_exhausted=_int(m.get("NodesExhausted"), field=f"{field}.NodesExhausted"),
        constraint_filtered=_int_map(m.get("ConstraintFiltered"), f"{field}.ConstraintFiltered"),
        dimension_exhausted=_int_map(m.get("DimensionExhausted"), f"{field}.DimensionExhausted"),
    )


def eval_info(data: Any) -> EvalInfo:
    data = _doc(data, "evaluation")
    failed = _map(data.get("FailedTGAllocs"), "FailedTGAllocs")
    return EvalInfo(
        id=_s(data.get("ID"), "ID"),
        status=_s(data.get("Status"), "Status"),
        triggered_by=_s(data.get("TriggeredBy"), "TriggeredBy"),
        job_modify_index=_int(data.get("JobModifyIndex"), field="JobModifyIndex"),
        create_index=_int(data.get("CreateIndex"), field="CreateIndex"),
        modify_index=_int(data.get("ModifyIndex"), field="ModifyIndex"),
        blocked_eval=_s(data.get("BlockedEval"), "BlockedEval"),
        deployment_id=_s(data.get("DeploymentID"), "DeploymentID"),
        failed={str(g): placement_failure(m, f"FailedTGAllocs.{g}") for g, m in failed.items()},
    )


def node_metadata(node_id: str, data: Mapping[str, Any]) -> NodeMetadata:
    data = _doc(data, "node metadata")
    return NodeMetadata(
        node_id=node_id,
        meta=_str_map(data.get("Meta"), "Meta", drop_null=True),
        dynamic={
            str(k): (None if v is None else _s(v, f"Dynamic.{k}"))
            for k, v in _map(data.get("Dynamic"), "Dynamic").items()
        },
        static=_str_map(data.get("Static"), "Static", drop_null=True),
    )


def items(data: Any, what: str) -> list[Any]:
    """A list answer (``null`` is empty); anything else is a malformed answer."""
    return _list(data, what)


def job_versions(data: Any) -> list[JobInfo]:
    doc = _doc({} if data is None else data, "job versions")
    return [job_info(v) for v in _list(doc.get("Versions"), "Versions")]


def str_field(data: Any, key: str) -> str:
    """One string field of an object answer such as ``{"EvalID": ...}`` ("" when absent)."""
    return _s(_doc({} if data is None else data, "answer").get(key), key)
