"""Whether a node has room for one more worker of a group, the way Nomad's scheduler sees the
scarce dimension of a GPU pool: the devices the group asks for (``device "nvidia/gpu"``).

A node runs more than the workers: the maintenance watcher (a system job), the image prefetch
(a sysbatch job), now and then another team's job. What keeps a worker off a node is its GPU
held by another allocation, not an allocation as such. So a node has room when, for every
device the group asks for, one of the node's device groups matching the request
(``type``, ``vendor/type`` or ``vendor/type/name``) has that many healthy instances that no
live allocation holds (``AllocatedResources``: Nomad's own bookkeeping of who holds which
instance). Conservatively: an allocation whose devices are not reported may hold any of
them; when the node's devices are not reported, or the group asks for none, the node has room
only when no service or batch allocation runs there (system and sysbatch jobs run on every
node and are sized to leave it to the workers); a ``distinct_hosts`` group has no room on a
node that runs one of its job's allocations. CPU and memory are not compared: GPU nodes are
sized for their GPUs, and a placement Nomad refuses all the same shows as a blocked
evaluation (``surge.placement_failure``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nomadscale.core.ports import AllocInfo, NodeInfo

COUNTED_TYPES = frozenset({"service", "batch", ""})  # "": not reported, counted


def _group(spec: Mapping[str, Any], group: str) -> Mapping[str, Any]:
    return next((tg for tg in spec.get("TaskGroups") or [] if tg.get("Name") == group), {})


def device_requests(spec: Mapping[str, Any], group: str) -> dict[str, int]:
    """The devices one allocation of ``group`` asks for: request name -> count."""
    out: dict[str, int] = {}
    for task in _group(spec, group).get("Tasks") or []:
        for dev in (task.get("Resources") or {}).get("Devices") or []:
            name = str(dev.get("Name") or "")
            if name:
                out[name] = out.get(name, 0) + int(dev.get("Count") or 1)
    return out


def distinct_hosts(spec: Mapping[str, Any], group: str) -> bool:
    tg = _group(spec, group)
    cons = list(spec.get("Constraints") or []) + list(tg.get("Constraints") or [])
    for task in tg.get("Tasks") or []:
        cons += list(task.get("Constraints") or [])
    return any(c.get("Operand") == "distinct_hosts" for c in cons)


def has_room(
    node: NodeInfo,
    allocs: Sequence[AllocInfo],
    *,
    wants: Mapping[str, int],
    job_id: str,
    distinct: bool = False,
) -> bool:
    """``node`` (with its devices, ``NomadClient.node``) can take one more allocation asking
    for ``wants``, given the allocations on it (``NomadClient.node_allocations``)."""
    live = [a for a in allocs if not a.terminal]
    if distinct and any(a.job_id == job_id for a in live):
        return False
    if not wants or node.devices is None:
        return not any(a.job_type in COUNTED_TYPES for a in live)
    if any(a.devices is None for a in live):
        return False  # holdings not reported: any device may be taken
    held = [(d, i) for a in live for d in a.devices or () for i in (d.ids or ("",))]
    for request, count in wants.items():
        groups = [g for g in node.devices if g.matches(request)]
        known = {i for g in groups for i in g.ids}
        # a held instance the node does not list (or none named) may be any of them
        elsewhere = sum(1 for d, i in held if d.matches(request) and i not in known)
        if not any(len(g.ids) - sum(1 for _, i in held if i in g.ids) - elsewhere >= count
                   for g in groups):  # fmt: skip
            return False
    return True


def free_node(
    nomad: Any, nodes: Sequence[NodeInfo], *, spec: Mapping[str, Any], group: str
) -> NodeInfo | None:
    """The first of ``nodes`` with room for one more worker of ``group`` (two calls per node
    looked at: the node, its allocations), or None."""
    wants = device_requests(spec, group)
    distinct = distinct_hosts(spec, group)
    job_id = str(spec.get("ID") or "")
    for n in nodes:
        full = nomad.node(n.id)
        if has_room(full, nomad.node_allocations(n.id), wants=wants, job_id=job_id,
                    distinct=distinct):  # fmt: skip
            return n
    return None


def wants_text(spec: Mapping[str, Any], group: str) -> str:
    """What one worker of ``group`` needs on a node, for messages: ``1 nvidia/gpu``."""
    wants = device_requests(spec, group)
    return ", ".join(f"{n} {d}" for d, n in sorted(wants.items())) or "an empty node"
