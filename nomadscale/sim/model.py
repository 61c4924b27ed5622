"""Records of the Nomad twin's state (nodes, allocations, deployments, jobs) and their JSON.

JSON follows Nomad's encoding: durations are int nanoseconds, ``time.Time`` values are
RFC 3339 strings, ``*Time`` int fields (ModifyTime, SubmitTime, ...) are Unix nanoseconds.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nomadscale.sim import devices, resources

NS = 1_000_000_000
ZERO_TIME = "0001-01-01T00:00:00Z"
TERMINAL_CLIENT = frozenset({"complete", "failed", "lost"})
OS_NAME = "ubuntu"


def new_uuid() -> str:
    return str(uuid.uuid4())


class RawJSON(bytes):
    """Already-encoded JSON; the server writes it as is."""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return ZERO_TIME
    return _rfc3339(ts)


@functools.lru_cache(maxsize=65536)
def _rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}Z"


def unix_ns(ts: float) -> int:
    return round(ts * NS)


@dataclass(slots=True)
class Node:
    id: str
    name: str
    datacenter: str
    node_pool: str
    node_class: str
    meta: dict[str, str]
    images: set[str]
    status: str
    gpus: int = 1
    eligibility: str = "eligible"
    dynamic_meta: dict[str, str | None] = field(default_factory=dict)
    drain_strategy: dict[str, Any] | None = None
    last_drain: dict[str, Any] | None = None
    drain_force_at: float | None = None  # the drain's ForceDeadline (twin seconds)
    create_index: int = 0
    modify_index: int = 0
    status_updated_at: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    address: str = "10.0.0.1"
    _stub_cache: tuple[int, bytes] | None = None
    # live (non-terminal) allocations on the node, kept by the scheduler
    n_live: int = 0
    gpu_used: int = 0
    jobs_live: dict[tuple[str, str], int] = field(default_factory=dict)
    gpu_ids: list[str] = field(default_factory=list)  # its GPUs' UUIDs (devices.py)

    def __post_init__(self) -> None:
        self.gpu_ids = self.gpu_ids or [devices.gpu_uuid() for _ in range(self.gpus)]

    def track(self, alloc: Alloc, delta: int) -> None:
        key = (alloc.namespace, alloc.job_id)
        self.n_live += delta
        self.gpu_used += delta * alloc.gpus
        left = self.jobs_live.get(key, 0) + delta
        if left > 0:
            self.jobs_live[key] = left
        else:
            self.jobs_live.pop(key, None)

    def stub_json(self) -> bytes:
        """The stub's JSON, cached per ModifyIndex (every stub change bumps it)."""
        if self._stub_cache is None or self._stub_cache[0] != self.modify_index:
            self._stub_cache = (self.modify_index, dumps(self.stub()))
        return self._stub_cache[1]

    @property
    def draining(self) -> bool:
        return self.drain_strategy is not None

    def merged_meta(self) -> dict[str, str]:
        out = dict(self.meta)
        for k, v in self.dynamic_meta.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = v
        return out

    def schedulable(self) -> bool:
        return self.status == "ready" and self.eligibility == "eligible" and not self.draining

    def stub(self, *, with_resources: bool = False, with_os: bool = False) -> dict[str, Any]:
        """structs.Node.Stub: NodeResources and ReservedResources with ``resources=true``,
        ``Attributes: {"os.name"}`` with ``os=true``; otherwise absent (omitempty)."""
        out: dict[str, Any] = {
            "Address": self.address,
            "ID": self.id,
            "Datacenter": self.datacenter,
            "Name": self.name,
            "NodeClass": self.node_class,
            "NodePool": self.node_pool,
            "Version": "1.9.7",
            "Drain": self.draining,
            "SchedulingEligibility": self.eligibility,
            "Status": self.status,
            "StatusDescription": "",
            "Drivers": {"docker": {"Detected": True, "Healthy": True, "HealthDescription": ""}},
            "HostVolumes": None,
            "LastDrain": copy.deepcopy(self.last_drain),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if with_resources:
            out["NodeResources"] = resources.node_resources(self)
            out["ReservedResources"] = resources.reserved_resources()
        if with_os:
            out["Attributes"] = {"os.name": OS_NAME}
        return out

    def full(self) -> dict[str, Any]:
        out = self.stub(with_resources=True)
        out.update(
            {
                "SecretID": "",
                "HTTPAddr": f"{self.address}:4646",
                "TLSEnabled": False,
                "Meta": self.merged_meta(),
                "Attributes": {
                    "unique.hostname": self.name,
                    "driver.docker": "1",
                    "kernel.name": "linux",
                    "os.name": OS_NAME,
                    "cpu.arch": "amd64",
                },
                "DrainStrategy": copy.deepcopy(self.drain_strategy),
                "Events": list(self.events),
                "StatusUpdatedAt": int(self.status_updated_at),
                "CSIControllerPlugins": None,
                "CSINodePlugins": None,
            }
        )
        return out


@dataclass(slots=True)
class Alloc:
    id: str
    eval_id: str
    name: str
    namespace: str
    node_id: str
    node_name: str
    job_id: str
    job_version: int
    task_group: str
    job: dict[str, Any]
    create_index: int
    create_time: float
    image: str = ""
    image_size_gb: float = 7.0
    gpus: int = 0
    spec_hash: str = ""
    desired_status: str = "run"
    desired_description: str = ""
    client_status: str = "pending"
    client_description: str = ""
    deployment_id: str = ""
    canary: bool = False
    healthy: bool | None = None
    health_time: float | None = None
    health_since: float | None = None  # health watch restarted (in-place move to a deployment)
    health_index: int = 0  # DeploymentStatus.ModifyIndex: the index the health was set at
    was_healthy: bool = False  # turned healthy once since it started (a re-watch keeps it)
    started_at: float | None = None
    finished_at: float | None = None
    modify_index: int = 0
    modify_time: float = 0.0
    previous_allocation: str = ""
    next_allocation: str = ""
    migrating: bool = False  # DesiredTransition.Migrate (set by the node drainer)
    reschedule_ok: bool = False  # DesiredTransition.Reschedule (set by the deployment watcher)
    reschedule_events: list[dict[str, Any]] = field(default_factory=list)  # RescheduleTracker
    followup_at: float | None = None  # when a follow-up evaluation will reschedule it
    task_names: tuple[str, ...] = ()
    task_events: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per task
    gen: int = 0  # bumped on each transition; stale timers are ignored
    _stub_cache: dict[tuple[bool, bool], tuple[int, bytes]] = field(default_factory=dict)

    def stub_json(self, *, task_states: bool = True, with_resources: bool = False) -> bytes:
        """The stub's JSON, cached per ModifyIndex (every stub change bumps it)."""
        key = (task_states, with_resources)
        hit = self._stub_cache.get(key)
        if hit is None or hit[0] != self.modify_index:
            stub = self.stub(task_states=task_states, with_resources=with_resources)
            hit = (self.modify_index, dumps(stub))
            self._stub_cache[key] = hit
        return hit[1]

    @property
    def live(self) -> bool:
        """Non-terminal: still wanted and not finished."""
        return self.desired_status == "run" and self.client_status not in TERMINAL_CLIENT

    @property
    def serving(self) -> bool:
        """Serves traffic now (the twin's ground truth for capacity): running, turned healthy
        once, and not marked unhealthy since. A new deployment's health re-watch after an
        in-place update does not stop a worker that keeps running from serving."""
        return (
            self.live
            and self.client_status == "running"
            and self.healthy is not False
            and (self.healthy is True or self.was_healthy)
        )

    @property
    def terminal(self) -> bool:
        """structs.Allocation.TerminalStatus: stopped by the server, or done on its client."""
        return self.desired_status != "run" or self.client_status in TERMINAL_CLIENT

    def _task_states(self) -> dict[str, Any]:
        if self.client_status == "pending":
            state = "pending"
        elif self.client_status == "running":
            state = "running"
        else:
            state = "dead"
        events = [
            {"Type": e["Type"], "Time": unix_ns(e["at"]), "DisplayMessage": e.get("msg", "")}
            for e in self.task_events
        ]
        return {
            t: {
                "State": state,
                "Failed": self.client_status == "failed",
                "Restarts": 0,
                "StartedAt": rfc3339(self.started_at) if self.started_at else None,
                "FinishedAt": rfc3339(self.finished_at) if self.finished_at else None,
                "LastRestart": None,
                "Events": events,
            }
            for t in self.task_names
        }

    def _deployment_status(self) -> dict[str, Any] | None:
        """Nil until the client sets the health, except for a canary, which the scheduler
        places with ``{Canary: true}`` (scheduler/generic_sched.go computePlacements; the
        client's state only gets a DeploymentStatus in SetHealth, client/allocrunner/
        health_hook.go and state.SetDeploymentStatus). An in-place move to another deployment
        sets it back to nil (generic_sched.go computeJobAllocs)."""
        if self.healthy is None and not self.canary:
            return None
        return {
            "Healthy": self.healthy,
            "Timestamp": rfc3339(self.health_time),
            "Canary": self.canary,
            "ModifyIndex": self.health_index,
        }

    def _desired_transition(self) -> dict[str, Any]:
        return {
            "Migrate": self.migrating or None,
            "Reschedule": self.reschedule_ok or None,
            "ForceReschedule": None,
            "NoShutdownDelay": None,
        }

    def stub(self, *, task_states: bool = True, with_resources: bool = False) -> dict[str, Any]:
        """structs.Allocation.Stub: AllocatedResources with ``resources=true`` (omitempty),
        TaskStates unless ``task_states=false``."""
        out: dict[str, Any] = {
            "ID": self.id,
            "EvalID": self.eval_id,
            "Name": self.name,
            "Namespace": self.namespace,
            "NodeID": self.node_id,
            "NodeName": self.node_name,
            "JobID": self.job_id,
            "JobType": self.job.get("Type", "service"),
            "JobVersion": self.job_version,
            "TaskGroup": self.task_group,
            "DesiredStatus": self.desired_status,
            "DesiredDescription": self.desired_description,
            "ClientStatus": self.client_status,
            "ClientDescription": self.client_description,
            "DesiredTransition": self._desired_transition(),
            "TaskStates": self._task_states() if task_states else None,
            "DeploymentStatus": self._deployment_status(),
            "FollowupEvalID": "",
            "NextAllocation": self.next_allocation,
            "RescheduleTracker": (
                {"Events": [dict(e) for e in self.reschedule_events]}
                if self.reschedule_events
                else None
            ),
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "CreateTime": unix_ns(self.create_time),
            "ModifyTime": unix_ns(self.modify_time),
        }
        if with_resources:
            out["AllocatedResources"] = resources.alloc_resources(self)
        return out

    def full(self) -> dict[str, Any]:
        out = self.stub(with_resources=True)
        out.update(
            {
                "Job": self.job,
                "DeploymentID": self.deployment_id,
                "PreviousAllocation": self.previous_allocation,
            }
        )
        return out


@dataclass(slots=True)
class GroupDeploy:
    auto_revert: bool
    auto_promote: bool
    progress_deadline_s: float
    desired_canaries: int
    desired_total: int
    require_progress_by: float | None = None
    promoted: bool = False
    placed_canaries: list[str] = field(default_factory=list)
    placed_allocs: int = 0
    healthy_allocs: int = 0
    unhealthy_allocs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "AutoRevert": self.auto_revert,
            "AutoPromote": self.auto_promote,
            "ProgressDeadline": int(self.progress_deadline_s * NS),
            "RequireProgressBy": rfc3339(self.require_progress_by),
            "Promoted": self.promoted,
            "PlacedCanaries": list(self.placed_canaries) or None,
            "DesiredCanaries": self.desired_canaries,
            "DesiredTotal": self.desired_total,
            "PlacedAllocs": self.placed_allocs,
            "HealthyAllocs": self.healthy_allocs,
            "UnhealthyAllocs": self.unhealthy_allocs,
        }


ACTIVE_DEPLOYMENT = frozenset(
    {"running", "paused", "pending", "blocked", "unblocking", "initializing"}
)


@dataclass(slots=True)
class Deployment:
    id: str
    namespace: str
    job_id: str
    job_version: int
    job_modify_index: int
    job_create_index: int
    groups: dict[str, GroupDeploy]
    create_index: int
    status: str = "running"
    description: str = "Deployment is running"
    modify_index: int = 0
    eval_priority: int = 50
    destructive: bool = False  # replaces allocations (new spec), not just placements

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_DEPLOYMENT

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Namespace": self.namespace,
            "JobID": self.job_id,
            "JobVersion": self.job_version,
            "JobModifyIndex": self.job_modify_index,
            "JobSpecModifyIndex": self.job_modify_index,
            "JobCreateIndex": self.job_create_index,
            "IsMultiregion": False,
            "TaskGroups": {g: s.to_json() for g, s in self.groups.items()},
            "Status": self.status,
            "StatusDescription": self.description,
            "EvalPriority": self.eval_priority,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(slots=True)
class JobRecord:
    """A job and its versions. ``spec`` is the current version's Nomad JSON."""

    id: str
    namespace: str
    spec: dict[str, Any]
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    scaling_events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0
    dispatch_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return int(self.spec["Version"])

    @property
    def type(self) -> str:
        return str(self.spec.get("Type") or "service")

    @property
    def stopped(self) -> bool:
        return bool(self.spec.get("Stop"))

    @property
    def parameterized(self) -> bool:
        return self.spec.get("ParameterizedJob") is not None

    @property
    def periodic(self) -> bool:
        return self.spec.get("Periodic") is not None

    def group(self, name: str) -> dict[str, Any] | None:
        for tg in self.spec.get("TaskGroups") or []:
            if tg.get("Name") == name:
                return tg  # type: ignore[no-any-return]
        return None


class ApiError(Exception):
    """An HTTP error answer: ``status`` and Nomad's plain-text message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NotFound(ApiError):
    """A read found nothing: 404 ``message`` once the blocking query on ``index`` (the
    index of the table the object would be in) returns."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(404, message)
        self.index = index
