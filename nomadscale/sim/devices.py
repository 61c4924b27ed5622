"""GPU devices: a node's instances and the ones each allocation holds.

The NVIDIA device plugin fingerprints every GPU under its UUID (hashicorp/nomad-device-nvidia
fingerprint.go deviceGroupFromFingerprintData: ``ID: dev.UUID``, ``GPU-`` and a UUID), in one
device group per model (``Vendor`` nvidia, ``Type`` gpu, ``Name`` the model). The scheduler
gives an allocation, per device request of a task, ``Count`` instances of a matching group
that no other allocation on the node holds (scheduler/device.go AssignDevice over
structs.DeviceAccounter), recorded as that task's ``AllocatedResources.Tasks[t].Devices``
(``AllocatedDeviceResource{Vendor, Type, Name, DeviceIDs}``). A stopping allocation's
instances are free for the scheduler, as its room is (it reads non-terminal allocations).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.model import Node

VENDOR, TYPE = "nvidia", "gpu"


def gpu_uuid() -> str:
    """An NVIDIA GPU UUID as nvidia-smi and NVML print it."""
    return f"GPU-{uuid.uuid4()}"


def group_name(node: Node) -> str:
    return node.meta.get("gpu", TYPE)


def node_devices(node: Node) -> list[dict[str, Any]] | None:
    """``NodeResources.Devices`` of ``node``: one healthy group of its GPUs (null without)."""
    if not node.gpu_ids:
        return None
    return [
        {
            "Vendor": VENDOR,
            "Type": TYPE,
            "Name": group_name(node),
            "Instances": [{"ID": i, "Healthy": True} for i in node.gpu_ids],
        }
    ]


def assign(
    c: Cluster, node: Node, tg: dict[str, Any], gpu_request: Any
) -> dict[str, list[dict[str, Any]]]:
    """Per task of ``tg``, the GPU instances of ``node`` an allocation placed there gets:
    ``Count`` free instances per GPU request (``gpu_request(name)``: whether a device request
    names the node's GPUs)."""
    held = {
        i
        for a in c.allocs_by_node.get(node.id, ())
        if a.live
        for devs in a.devices.values()
        for d in devs
        for i in d["DeviceIDs"]
    }
    free = [i for i in node.gpu_ids if i not in held]
    out: dict[str, list[dict[str, Any]]] = {}
    for task in tg.get("Tasks") or []:
        for dev in (task.get("Resources") or {}).get("Devices") or []:
            if not gpu_request(str(dev.get("Name", ""))):
                continue
            count = int(dev.get("Count") or 1)
            ids, free = free[:count], free[count:]
            out.setdefault(str(task.get("Name", "task")), []).append(
                {"Vendor": VENDOR, "Type": TYPE, "Name": group_name(node), "DeviceIDs": ids}
            )
    return out
