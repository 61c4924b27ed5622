"""The small interfaces nomadscale needs from each external system.

Each has a real implementation in ``nomadscale.integrations`` and a simulated one (the Nomad
twin in ``nomadscale.sim``, an in-memory KV/lock, trace files as a demand source). Stages
and the actuator depend only on these protocols, never on an integration module.
All methods raise only ``nomadscale.core.errors`` exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np

# --- Nomad --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    time: datetime
    count: int | None
    previous_count: int | None
    message: str
    error: bool
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    name: str
    desired: int
    placed: int
    running: int
    healthy: int
    unhealthy: int
    events: tuple[ScaleEvent, ...] = ()  # newest first


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_id: str
    namespace: str
    stopped: bool
    groups: Mapping[str, GroupStatus]
    active_deployment: str | None = None  # deployment id when one is running
    job_modify_index: int = 0


@dataclass(frozen=True, slots=True)
class Devices:
    """Device instances of one kind (Nomad's ``vendor/type/name``): a node's healthy ones
    (``NodeResources.Devices``) or those an allocation holds (``AllocatedResources``)."""

    vendor: str
    type: str
    name: str
    ids: tuple[str, ...] = ()

    def matches(self, request: str) -> bool:
        """Nomad's device request names: ``type``, ``vendor/type`` or ``vendor/type/name``."""
        parts = request.split("/")
        if len(parts) == 1:
            return parts[0] == self.type
        if len(parts) == 2:
            return (parts[0], parts[1]) == (self.vendor, self.type)
        return (parts[0], parts[1], "/".join(parts[2:])) == (self.vendor, self.type, self.name)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    name: str
    datacenter: str
    node_pool: str
    status: str  # initializing / ready / down / disconnected
    eligibility: str  # eligible / ineligible
    draining: bool
    create_index: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    allocs_running: int = 0  # non-terminal allocations of service/batch jobs
    # healthy device instances; None when the response had no NodeResources (list stubs)
    devices: tuple[Devices, ...] | None = None
    # the node's last (or current) drain, Nomad's ``LastDrain`` (Nomad 1.1+; list stubs
    # too): the drainer's ``Meta`` (whose drain it is: the autoscaler's ``drained_by`` /
    # ``decision_id``, a healing run's ``nomadscale.run``), its ``Status`` (draining /
    # complete / canceled; "" when never drained) and start; the running drain's
    # ``DrainStrategy.ForceDeadline`` (full node only; None: no deadline or not draining)
    drain_meta: Mapping[str, str] = field(default_factory=dict)
    drain_status: str = ""
    drain_started: datetime | None = None
    drain_force_at: datetime | None = None

    def drain_owner(self) -> tuple[str, str]:
        """Whose drain the node is under (or was last), from its Meta: (``run``, run id) for
        a healing run's, (``autoscaler``, decision id) for the autoscaler's scale-in,
        (``other``, what the Meta says) otherwise (an operator's has none)."""
        meta = self.drain_meta
        if meta.get(RUN_DRAIN_KEY):
            return "run", meta[RUN_DRAIN_KEY]
        if meta.get("drained_by") == "nomadscale" and meta.get("decision_id"):
            return "autoscaler", meta["decision_id"]
        shown = ", ".join(f"{k}={v}"[:80] for k, v in sorted(meta.items())[:4]) or "no drain meta"
        return "other", shown


# the drain Meta nomadscale's drains carry (Nomad keeps it in the node's LastDrain): a
# healing run's names the run; the autoscaler's scale-in, its decision
RUN_DRAIN_KEY = "nomadscale.run"


def autoscaler_drain_meta(decision_id: str) -> dict[str, str]:
    return {"drained_by": "nomadscale", "decision_id": decision_id}


class NomadPort(Protocol):
    def job_status(self, job_id: str, *, namespace: str | None = None) -> JobStatus:
        """Scale status plus the active deployment; NotFoundError when the job is missing."""
        ...

    def get_job(self, job_id: str, *, namespace: str | None = None) -> JobInfo:
        """The job with its full spec; NotFoundError when it is missing."""
        ...

    def scale(
        self,
        job_id: str,
        group: str,
        count: int,
        *,
        message: str,
        meta: Mapping[str, Any] | None = None,
        namespace: str | None = None,
    ) -> str:
        """Set a group's count through the Scale API; returns the evaluation id."""
        ...

    def list_nodes(
        self, *, node_pool: str | None = None, datacenter: str | None = None
    ) -> list[NodeInfo]: ...

    def drain(
        self,
        node_id: str,
        *,
        deadline_s: float,
        meta: Mapping[str, str] | None = None,
        ignore_system_jobs: bool = True,
    ) -> None: ...

    def set_eligibility(self, node_id: str, eligible: bool) -> None: ...

    def allocations_by_prefix(self, prefix: str) -> list[AllocInfo]:
        """Allocations (list stubs) whose id starts with ``prefix``, in every namespace: one
        ``GET /v1/allocations?prefix=`` (an even-length hex prefix, e.g. the 8 characters
        the Nomad CLI shows)."""
        ...


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job (or one version of it). ``spec`` is Nomad's full Job JSON, for re-registering."""

    job_id: str
    namespace: str
    type: str  # service / batch / system / sysbatch
    status: str  # pending / running / dead
    stopped: bool
    version: int
    stable: bool
    job_modify_index: int
    groups: Mapping[str, int]  # task group name -> Count
    meta: Mapping[str, str] = field(default_factory=dict)
    node_pool: str = ""
    parameterized: bool = False
    spec: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def pinned_datacenter(spec: Mapping[str, Any], group: str) -> str | None:
    """The datacenter task group ``group`` of Job JSON ``spec`` is pinned to (a group
    constraint ``${node.datacenter} = X``, or the job's only datacenter); None when it can run
    in several. A policy zone may be named for the cloud zone (``asia-southeast2-a``) while
    its group runs in the Nomad datacenter ``zone-a``: this is how one finds the other."""
    for tg in spec.get("TaskGroups") or []:
        if tg.get("Name") != group:
            continue
        for c in tg.get("Constraints") or []:
            if (
                c.get("LTarget") == "${node.datacenter}"
                and c.get("Operand") in ("=", "==", "is", None, "")
                and c.get("RTarget")
            ):
                return str(c["RTarget"])
    dcs = [str(d) for d in spec.get("Datacenters") or []]
    return dcs[0] if len(dcs) == 1 and "*" not in dcs[0] else None


@dataclass(frozen=True, slots=True)
class AllocInfo:
    id: str
    job_id: str
    namespace: str
    task_group: str
    node_id: str
    node_name: str
    desired_status: str  # run / stop / evict
    client_status: str  # pending / running / complete / failed / lost / unknown
    job_version: int = 0
    deployment_id: str | None = None
    healthy: bool | None = None  # DeploymentStatus.Healthy
    canary: bool = False
    task_states: Mapping[str, str] = field(default_factory=dict)  # task -> pending/running/dead
    failed_tasks: tuple[str, ...] = ()
    create_index: int = 0
    modify_index: int = 0
    job_type: str = ""  # service / batch / system / sysbatch; "" when not reported
    # the device instances it holds; None when the response had no AllocatedResources (stubs)
    devices: tuple[Devices, ...] | None = None

    @property
    def terminal(self) -> bool:
        return self.desired_status in ("stop", "evict") or self.client_status in (
            "complete",
            "failed",
            "lost",
        )


@dataclass(frozen=True, slots=True)
class DeploymentGroup:
    name: str
    desired_total: int
    placed_allocs: int
    healthy_allocs: int
    unhealthy_allocs: int
    desired_canaries: int = 0
    placed_canaries: tuple[str, ...] = ()
    promoted: bool = False
    auto_revert: bool = False
    auto_promote: bool = False
    require_progress_by: datetime | None = None


DEPLOYMENT_TERMINAL = frozenset({"failed", "successful", "cancelled"})


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    id: str
    job_id: str
    namespace: str
    job_version: int
    status: str  # running / paused / failed / successful / cancelled / pending / blocked / ...
    status_description: str
    groups: Mapping[str, DeploymentGroup] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0

    @property
    def active(self) -> bool:
        return self.status not in DEPLOYMENT_TERMINAL

    @property
    def needs_promotion(self) -> bool:
        """Canaries are placed and waiting for a manual promotion."""
        return self.active and any(
            g.desired_canaries > 0 and not g.promoted for g in self.groups.values()
        )


@dataclass(frozen=True, slots=True)
class PlacementFailure:
    """Why the scheduler could not place a task group's allocations (Nomad's AllocMetric in
    an evaluation's ``FailedTGAllocs``)."""

    unplaced: int  # CoalescedFailures + 1
    nodes_evaluated: int = 0
    nodes_filtered: int = 0
    nodes_exhausted: int = 0
    constraint_filtered: Mapping[str, int] = field(default_factory=dict)
    dimension_exhausted: Mapping[str, int] = field(default_factory=dict)

    def explain(self) -> str:
        """One line, in the words of ``nomad job status``'s placement failures."""
        parts = [f"{self.unplaced} allocation(s) not placed"]
        parts += [f'dimension "{d}" exhausted on {n} node(s)'
                  for d, n in sorted(self.dimension_exhausted.items())]  # fmt: skip
        if self.nodes_exhausted and not self.dimension_exhausted:
            parts.append(f"resources exhausted on {self.nodes_exhausted} node(s)")
        parts += [f'constraint "{c}" filtered {n} node(s)'
                  for c, n in sorted(self.constraint_filtered.items())]  # fmt: skip
        if not self.nodes_evaluated:
            parts.append("no node evaluated")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class EvalInfo:
    """One evaluation of a job. A placement that failed leaves ``failed`` (per task group)
    and a ``blocked`` evaluation (``blocked_eval``) that Nomad re-runs when capacity frees."""

    id: str
    status: str  # pending / complete / failed / blocked / canceled
    triggered_by: str
    job_modify_index: int
    create_index: int
    modify_index: int = 0
    blocked_eval: str = ""
    deployment_id: str = ""
    failed: Mapping[str, PlacementFailure] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeMetadata:
    """Dynamic node metadata (``/v1/client/metadata``): merged, dynamic and static maps."""

    node_id: str
    meta: Mapping[str, str]
    dynamic: Mapping[str, str | None] = field(default_factory=dict)
    static: Mapping[str, str] = field(default_factory=dict)


# --- cloud node pools ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    name: str  # instance name, equal to the Nomad node name
    zone: str
    status: str  # e.g. RUNNING, PROVISIONING, STOPPING
    created: datetime | None = None


class NodePoolPort(Protocol):
    def size(self, group: str, *, zone: str) -> int: ...

    def resize(self, group: str, size: int, *, zone: str) -> None: ...

    def list_instances(self, group: str, *, zone: str) -> list[Instance]: ...

    def delete_instances(self, group: str, names: Sequence[str], *, zone: str) -> None: ...


# --- Consul (KV and leader lock) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int


class KVPort(Protocol):
    def get(self, key: str) -> KVEntry | None: ...

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        """Write; with ``cas`` the write only happens if the key's ModifyIndex matches
        (0 = only if absent). Returns False when the CAS check failed."""
        ...

    def delete(self, key: str, *, cas: int | None = None) -> bool: ...

    def list(self, prefix: str) -> list[KVEntry]: ...


class LockPort(Protocol):
    def acquire(self) -> bool:
        """Try to take (or keep) the lock; renews the session. True when held."""
        ...

    def held(self) -> bool:
        """Fencing check: ask the store, right now, whether this process holds the lock."""
        ...

    def release(self) -> None: ...


# --- demand history ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemandSeries:
    """Requests per minute at a fixed step. ``values[i]`` covers [start + i*step, +step).
    NaN marks an unknown step (gap)."""

    start: datetime
    step_s: float
    values: np.ndarray

    @property
    def end(self) -> datetime:
        from datetime import timedelta

        return self.start + timedelta(seconds=self.step_s * len(self.values))


class DemandSource(Protocol):
    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        """Demand steps that ended at or before ``end``."""
        ...


# --- alerts --------------------------------------------------------------------------------


class AlertPort(Protocol):
    def trigger(
        self, *, dedup_key: str, summary: str, severity: str, details: Mapping[str, Any]
    ) -> None: ...

    def resolve(self, *, dedup_key: str) -> None: ...
