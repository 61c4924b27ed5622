"""The twin's cluster model: nodes, jobs, allocations, evaluations and deployments.

All state lives behind one re-entrant lock. A global Raft-like index increases on every
change; pending state changes (image pulls, health, deadlines, node boots) sit in a time
queue and are applied when ``clock.now()`` reaches them (at the start of every HTTP request,
in ``advance`` and while blocking queries wait).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from nomadscale.core.clock import Clock, FakeClock, SystemClock
from nomadscale.sim import blocked, lifecycle, sched
from nomadscale.sim.faults import FaultInjector
from nomadscale.sim.model import (
    ZERO_TIME,
    Alloc,
    Deployment,
    JobRecord,
    Node,
    new_uuid,
    unix_ns,
)

log = logging.getLogger(__name__)

NODE_STATUSES = ("initializing", "ready", "down", "disconnected")
JobKey = tuple[str, str]  # (namespace, job id)


class Cluster:
    """A simulated Nomad cluster. Use ``Cluster.build`` for a fleet of GPU nodes."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        image_pull_mbps: float = 800.0,
        boot_s: float = 90.0,
        acl_token: str | None = None,
        start_s: float = 2.0,
        batch_run_s: float = 5.0,
        reschedule_delay_s: float = 30.0,
        default_image_gb: float = 7.0,
        seed: int = 0,
        max_kill_timeout_s: float = 30.0,
    ) -> None:
        """``max_kill_timeout_s``: the clients' ``max_kill_timeout`` (agent config, default
        30 s), the cap on every task's kill_timeout."""
        self.clock: Clock = clock or SystemClock()
        self.image_pull_mbps = float(image_pull_mbps)
        self.boot_s = float(boot_s)
        self.acl_token = acl_token
        self.start_s = start_s
        self.batch_run_s = batch_run_s
        self.reschedule_delay_s = reschedule_delay_s
        self.default_image_gb = default_image_gb
        self.max_kill_timeout_s = float(max_kill_timeout_s)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.index = 1
        self.table_index: dict[str, int] = defaultdict(lambda: 1)
        self.nodes: dict[str, Node] = {}
        self.jobs: dict[JobKey, JobRecord] = {}
        self.allocs: dict[str, Alloc] = {}
        self.allocs_by_job: dict[JobKey, list[Alloc]] = defaultdict(list)
        self.allocs_by_node: dict[str, list[Alloc]] = defaultdict(list)
        self.evals: dict[str, dict[str, Any]] = {}
        self.evals_by_job: dict[JobKey, list[dict[str, Any]]] = defaultdict(list)
        self.deployments: dict[str, Deployment] = {}
        self.deployments_by_job: dict[JobKey, list[Deployment]] = defaultdict(list)
        self.blocked: dict[JobKey, str] = {}  # job -> its tracked blocked eval (blocked.py)
        self.awaiting_previous: dict[str, str] = {}  # alloc id -> its waiting replacement
        self.draining: set[str] = set()  # ids of nodes with a drain strategy (drain.py)
        self.drain_dirty: set[JobKey] = set()  # jobs the drainer has to look at again
        self.status_dirty: set[JobKey] = set()  # jobs whose status may have changed (sched)
        self.queued: dict[tuple[JobKey, str], int] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.faults = FaultInjector()
        self._timers: list[tuple[float, int, str, str, int]] = []
        self._seq = itertools.count()
        self._node_seq = itertools.count(1)
        self._now_override: float | None = None
        self._processing = False
        self._capacity_changed = False
        self.seed = seed
        self.add_namespace("default", "Default shared namespace")

    # --- construction ----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        nodes: int = 6,
        zones: Iterable[str] = ("zone-a", "zone-b"),
        node_pool: str = "gpu",
        node_class: str = "gpu-l4",
        clock: Clock | None = None,
        image_pull_mbps: float = 800.0,
        boot_s: float = 90.0,
        acl_token: str | None = None,
        gpu: str = "l4",
        name_prefix: str = "gpu",
        images: Iterable[str] = (),
        default_image_gb: float = 7.0,
        max_kill_timeout_s: float = 30.0,
    ) -> Cluster:
        """A fleet of ready GPU nodes spread round-robin over ``zones`` (Datacenter = zone,
        Meta ``{"zone": zone, "gpu": gpu}``, one GPU each). ``images`` are already in every
        node's docker cache; ``default_image_gb`` sizes images without an ``image_size_gb``
        meta key (pull time = size * 8000 / image_pull_mbps seconds)."""
        zones = tuple(zones)
        if not zones:
            raise ValueError("zones must not be empty")
        c = cls(
            clock=clock,
            image_pull_mbps=image_pull_mbps,
            boot_s=boot_s,
            acl_token=acl_token,
            default_image_gb=default_image_gb,
            max_kill_timeout_s=max_kill_timeout_s,
        )
        for i in range(nodes):
            zone = zones[i % len(zones)]
            c.add_node(
                name=f"{name_prefix}-{zone}-{i:04d}",
                datacenter=zone,
                node_pool=node_pool,
                node_class=node_class,
                meta={"zone": zone, "gpu": gpu},
                images=images,
            )
        return c

    def add_namespace(self, name: str, description: str = "") -> None:
        with self.lock:
            idx = self.bump("namespaces")
            self.namespaces[name] = {
                "Name": name,
                "Description": description,
                "Quota": "",
                "Meta": None,
                "Capabilities": None,
                "NodePoolConfiguration": None,
                "CreateIndex": idx,
                "ModifyIndex": idx,
            }

    # --- time and bookkeeping ---------------------------------------------------------

    def now_s(self) -> float:
        if self._now_override is not None:
            return self._now_override
        return self.clock.now().timestamp()

    def now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.now_s(), tz=UTC)

    def bump(self, *tables: str) -> int:
        self.index += 1
        for t in tables:
            self.table_index[t] = self.index
        self.cond.notify_all()
        return self.index

    def emit(self, type_: str, **fields: Any) -> None:
        self.events.append({"time": self.now_dt(), "type": type_, **fields})

    def schedule(self, at: float, kind: str, key: str, gen: int = 0) -> None:
        heapq.heappush(self._timers, (at, next(self._seq), kind, key, gen))

    def capacity_changed(self) -> None:
        self._capacity_changed = True

    def process_due(self) -> None:
        """Apply every pending state change due at ``clock.now()``."""
        with self.lock:
            if self._processing:
                return
            self._processing = True
            try:
                now = self.clock.now().timestamp()
                while self._timers and self._timers[0][0] <= now:
                    at, _, kind, key, gen = heapq.heappop(self._timers)
                    self._now_override = at
                    try:
                        lifecycle.handle(self, kind, key, gen)
                        if self.drain_dirty and not (self._timers and self._timers[0][0] <= at):
                            lifecycle.drain_pending(self)  # once the instant's changes are in
                    finally:
                        self._now_override = None
                    self._unblock()
                    sched.sync_dirty(self)
                self._unblock()
                sched.sync_dirty(self)
            finally:
                self._processing = False

    def settle(self) -> None:
        """Let the node drainer see the write's changes and place queued allocations if
        capacity appeared (called after every write)."""
        with self.lock:
            if self.drain_dirty:
                lifecycle.drain_pending(self)
            self._unblock()
            sched.sync_dirty(self)

    def _unblock(self) -> None:
        while self._capacity_changed and self.blocked:
            self._capacity_changed = False
            blocked.unblock(self)
        self._capacity_changed = False

    def advance(self, seconds: float) -> None:
        """With a FakeClock: move virtual time forward, processing every change on the way."""
        if not isinstance(self.clock, FakeClock):
            raise TypeError("Cluster.advance needs a FakeClock")
        with self.lock:
            target = self.clock.now().timestamp() + seconds
            while True:
                nxt = self._timers[0][0] if self._timers else None
                if nxt is None or nxt > target:
                    break
                cur = self.clock.now().timestamp()
                if nxt > cur:
                    self.clock.advance(nxt - cur)
                self.process_due()
            cur = self.clock.now().timestamp()
            if target > cur:
                self.clock.advance(target - cur)
            self.process_due()
            self.cond.notify_all()

    def next_due(self) -> float | None:
        with self.lock:
            return self._timers[0][0] if self._timers else None

    # --- nodes ------------------------------------------------------------------------

    def add_node(
        self,
        *,
        name: str,
        datacenter: str,
        node_pool: str,
        node_class: str = "",
        meta: Mapping[str, str] | None = None,
        images: Iterable[str] = (),
        status: str = "ready",
        gpus: int = 1,
    ) -> str:
        if status not in NODE_STATUSES:
            raise ValueError(f"invalid node status {status!r}")
        with self.lock:
            seq = next(self._node_seq)
            node = Node(
                id=new_uuid(),
                name=name,
                datacenter=datacenter,
                node_pool=node_pool,
                node_class=node_class,
                meta=dict(meta or {}),
                images=set(images),
                status=status,
                gpus=gpus,
                address=f"10.{(seq >> 16) & 255}.{(seq >> 8) & 255}.{seq & 255}",
                status_updated_at=self.now_s(),
            )
            node.create_index = node.modify_index = self.bump("nodes")
            node.events.append(self._node_event("Node registered"))
            self.nodes[node.id] = node
            self.emit("node_added", node_id=node.id, name=name, datacenter=datacenter)
            if status == "initializing":
                self.schedule(self.now_s() + self.boot_s, "node_boot", node.id)
            elif status == "ready":
                self.capacity_changed()
                lifecycle.node_ready(self, node)
            self._unblock()
            return node.id

    def _node_event(self, message: str) -> dict[str, Any]:
        return {
            "Message": message,
            "Subsystem": "Cluster",
            "Details": None,
            "Timestamp": self.now_dt().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "CreateIndex": self.index,
        }

    def node(self, node_id: str) -> Node:
        with self.lock:
            try:
                return self.nodes[node_id]
            except KeyError:
                raise KeyError(f"node {node_id!r} not found") from None

    def find_node(self, name_or_id: str) -> Node | None:
        with self.lock:
            if name_or_id in self.nodes:
                return self.nodes[name_or_id]
            for n in self.nodes.values():
                if n.name == name_or_id:
                    return n
            return None

    def set_node_status(self, node_id: str, status: str) -> None:
        if status not in NODE_STATUSES:
            raise ValueError(f"invalid node status {status!r}")
        with self.lock:
            self.process_due()
            node = self.node(node_id)
            if node.status == status:
                return
            old = node.status
            node.status = status
            node.status_updated_at = self.now_s()
            node.events.append(self._node_event(f"Node status changed to {status}"))
            node.modify_index = self.bump("nodes")
            self.emit("node_status", node_id=node_id, status=status, previous=old)
            if status in ("down", "disconnected"):
                lifecycle.node_lost(self, node)
            elif status == "ready":
                self.capacity_changed()
                lifecycle.node_ready(self, node)
            self._unblock()

    def lose_node(self, node_id: str) -> None:
        """The machine is gone (deleted, preempted): the node goes down and its allocations
        are lost and rescheduled elsewhere."""
        with self.lock:
            self.set_node_status(node_id, "down")
            self.emit("node_removed", node_id=node_id, name=self.nodes[node_id].name)

    # --- lookups ----------------------------------------------------------------------

    def job(self, job_id: str, namespace: str = "default") -> JobRecord | None:
        return self.jobs.get((namespace, job_id))

    def job_allocs(self, key: JobKey) -> list[Alloc]:
        return self.allocs_by_job.get(key, [])

    def active_deployment(self, key: JobKey) -> Deployment | None:
        for d in reversed(self.deployments_by_job.get(key, [])):
            if d.active:
                return d
        return None

    def new_eval(
        self,
        job: JobRecord,
        *,
        triggered_by: str,
        status: str = "complete",
        node_id: str = "",
        deployment_id: str = "",
        previous: str = "",
    ) -> dict[str, Any]:
        idx = self.bump("evals")
        now = self.now_s()
        ev: dict[str, Any] = {
            "ID": new_uuid(),
            "Namespace": job.namespace,
            "Priority": job.spec.get("Priority", 50),
            "Type": job.type,
            "TriggeredBy": triggered_by,
            "JobID": job.id,
            "JobModifyIndex": job.spec.get("JobModifyIndex", 0),
            "NodeID": node_id,
            "NodeModifyIndex": 0,
            "DeploymentID": deployment_id,
            "Status": status,
            "StatusDescription": "",
            "Wait": 0,
            "WaitUntil": ZERO_TIME,  # a zero time.Time
            "NextEval": "",
            "PreviousEval": previous,
            "BlockedEval": "",
            "RelatedEvals": None,  # only filled for GET /v1/evaluation/:id?related=true
            "FailedTGAllocs": None,
            "ClassEligibility": None,
            "QuotaLimitReached": "",
            "EscapedComputedClass": False,
            "AnnotatePlan": False,
            "QueuedAllocations": None,
            "SnapshotIndex": idx,
            "CreateIndex": idx,
            "ModifyIndex": idx,
            "CreateTime": unix_ns(now),
            "ModifyTime": unix_ns(now),
        }
        self.evals[ev["ID"]] = ev
        self.evals_by_job[(job.namespace, job.id)].append(ev)
        return ev

    def with_lock(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            self.process_due()
            out = fn()
            self._unblock()
            sched.sync_dirty(self)
            return out

    def __repr__(self) -> str:
        return (
            f"Cluster(nodes={len(self.nodes)}, jobs={len(self.jobs)}, "
            f"allocs={len(self.allocs)}, index={self.index})"
        )
