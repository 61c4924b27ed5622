"""Feasibility and node choice: datacenters, node pool, constraints, GPUs, distinct hosts."""

from __future__ import annotations

import fnmatch
import heapq
import re
from typing import TYPE_CHECKING, Any

from nomadscale.sim import devices
from nomadscale.sim.model import Node

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import JobRecord

_INTERP = re.compile(r"^\$\{(.+)\}$")
GPU_DEVICE = re.compile(r"^(nvidia/)?gpu(/.*)?$|^nvidia(/gpu)?(/.*)?$")


def node_value(node: Node, target: str) -> str | None:
    """Resolve ``${node.datacenter}``, ``${meta.x}``, ``${attr.x}``...; literals pass through."""
    m = _INTERP.match(target.strip())
    if not m:
        return target
    ref = m.group(1)
    if ref == "node.datacenter":
        return node.datacenter
    if ref in ("node.unique.name", "attr.unique.hostname"):
        return node.name
    if ref == "node.unique.id":
        return node.id
    if ref == "node.class":
        return node.node_class
    if ref == "node.pool":
        return node.node_pool
    if ref.startswith("meta."):
        return node.merged_meta().get(ref[5:])
    if ref == "attr.kernel.name":
        return "linux"
    if ref == "attr.driver.docker":
        return "1"
    return None


def _cmp(op: str, left: str | None, right: str) -> bool:
    if op in ("is_set",):
        return left is not None
    if op in ("is_not_set",):
        return left is None
    if op in ("distinct_hosts", "distinct_property", "version", "semver"):
        return True
    if left is None:
        return op in ("!=", "not")
    if op in ("=", "==", "is", ""):
        return left == right
    if op in ("!=", "not"):
        return left != right
    if op == "regexp":
        return re.search(right, left) is not None
    if op == "set_contains":
        have = {s.strip() for s in left.split(",")}
        return all(s.strip() in have for s in right.split(","))
    if op == "set_contains_any":
        have = {s.strip() for s in left.split(",")}
        return any(s.strip() in have for s in right.split(","))
    if op in ("<", "<=", ">", ">="):
        try:
            a: Any = float(left)
            b: Any = float(right)
        except ValueError:
            a, b = left, right
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    return True


def constraints_of(job: dict[str, Any], tg: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(job.get("Constraints") or []) + list(tg.get("Constraints") or [])
    for task in tg.get("Tasks") or []:
        out.extend(task.get("Constraints") or [])
    return out


def static_fit(node: Node, job: dict[str, Any], constraints: list[dict[str, Any]]) -> bool:
    dcs = job.get("Datacenters") or ["*"]
    if not any(fnmatch.fnmatchcase(node.datacenter, d) for d in dcs):
        return False
    pool = job.get("NodePool") or "default"
    if pool != "all" and node.node_pool != pool:
        return False
    for c in constraints:
        op = str(c.get("Operand") or "=")
        left = node_value(node, str(c.get("LTarget") or ""))
        right = str(c.get("RTarget") or "")
        right_v = node_value(node, right) if right.startswith("${") else right
        if not _cmp(op, left, right_v or ""):
            return False
    return True


def group_gpus(tg: dict[str, Any]) -> int:
    total = 0
    for task in tg.get("Tasks") or []:
        for dev in (task.get("Resources") or {}).get("Devices") or []:
            if GPU_DEVICE.match(str(dev.get("Name", ""))):
                total += int(dev.get("Count") or 1)
    return total


def gpu_models_fit(node: Node, tg: dict[str, Any]) -> bool:
    """Every GPU request of ``tg`` that names a model (``nvidia/gpu/NVIDIA L4``) names the
    model of ``node``'s GPUs (scheduler/feasible.go DeviceChecker: a device group matches a
    request when ``RequestedDevice.ID().Matches(group ID)``)."""
    for task in tg.get("Tasks") or []:
        for dev in (task.get("Resources") or {}).get("Devices") or []:
            name = str(dev.get("Name", ""))
            if GPU_DEVICE.match(name) and not devices.request_matches(name, node):
                return False
    return True


def distinct_hosts(job: dict[str, Any], tg: dict[str, Any]) -> bool:
    return any(c.get("Operand") == "distinct_hosts" for c in constraints_of(job, tg))


class Placer:
    """Chooses nodes for one task group during one evaluation (least loaded first)."""

    def __init__(
        self, c: Cluster, job: JobRecord, tg: dict[str, Any], spec: dict[str, Any] | None = None
    ) -> None:
        """``spec``: the job version placed (default: the current one)."""
        self.c = c
        self.job = job
        self.tg = tg
        spec = job.spec if spec is None else spec
        self.gpus = group_gpus(tg)
        self.distinct = distinct_hosts(spec, tg)
        cons = constraints_of(spec, tg)
        self.evaluated = 0
        self.filtered = 0
        self.exhausted = 0
        self.candidates: list[Node] = []
        for node in c.nodes.values():
            if not node.schedulable():
                continue
            self.evaluated += 1
            if static_fit(node, spec, cons) and (not self.gpus or gpu_models_fit(node, tg)):
                self.candidates.append(node)
            else:
                self.filtered += 1
        self._heap: list[tuple[int, int, str]] | None = None

    def _load(self, node: Node) -> tuple[int, int, bool]:
        key = (self.job.namespace, self.job.id)
        return node.n_live, node.gpu_used, key in node.jobs_live

    def fits(self, node: Node) -> bool:
        _, gpu_used, has_job = self._load(node)
        if self.gpus and gpu_used + self.gpus > node.gpus:
            return False
        return not (self.distinct and has_job)

    def choose(self, exclude: str = "") -> Node | None:
        if self._heap is None:
            self._heap = []
            for i, node in enumerate(self.candidates):
                live, _, _ = self._load(node)
                self._heap.append((live, i, node.id))
            heapq.heapify(self._heap)
        skipped: list[tuple[int, int, str]] = []
        chosen: Node | None = None
        while self._heap:
            load, i, node_id = heapq.heappop(self._heap)
            node = self.c.nodes[node_id]
            if node_id == exclude or not node.schedulable():
                skipped.append((load, i, node_id))
                continue
            if not self.fits(node):
                self.exhausted += 1
                continue  # full for this group for the rest of the evaluation
            chosen = node
            heapq.heappush(self._heap, (load + 1, i, node_id))
            break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return chosen

    def failure(self, missing: int) -> dict[str, Any]:
        dim = {"devices: nvidia/gpu": self.exhausted} if self.gpus and self.exhausted else None
        return {
            "NodesEvaluated": self.evaluated,
            "NodesFiltered": self.filtered,
            "NodesInPool": len(self.c.nodes),
            "NodesAvailable": None,
            "ClassFiltered": None,
            "ConstraintFiltered": {"${node.datacenter}": self.filtered} if self.filtered else None,
            "NodesExhausted": self.exhausted,
            "ClassExhausted": None,
            "DimensionExhausted": dim,
            "QuotaExhausted": None,
            "ResourcesExhausted": None,
            "Scores": None,
            "ScoreMetaData": None,
            "AllocationTime": 10000,
            "CoalescedFailures": max(0, missing - 1),
        }
