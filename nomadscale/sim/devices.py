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
DRIVER_VERSION = "550.90.07"
# The node's ``gpu`` meta value -> (NVML device name, memory MiB, power W, BAR1 MiB, cores
# clock MHz, memory clock MHz): what nvidia-smi / NVML report for the GCP accelerators
_MODELS: dict[str, tuple[str, int, int, int, int, int]] = {
    "l4": ("NVIDIA L4", 23034, 72, 32768, 2040, 6251),
    "t4": ("Tesla T4", 15360, 70, 256, 1590, 5001),
    "a100": ("NVIDIA A100-SXM4-40GB", 40960, 400, 65536, 1410, 1215),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", 81920, 400, 131072, 1410, 1593),
    "h100": ("NVIDIA H100 80GB HBM3", 81559, 700, 131072, 1980, 2619),
    "v100": ("Tesla V100-SXM2-16GB", 16384, 300, 16384, 1530, 877),
    "p4": ("Tesla P4", 7680, 75, 256, 1531, 3003),
    "p100": ("Tesla P100-PCIE-16GB", 16384, 250, 16384, 1328, 715),
    "a10g": ("NVIDIA A10G", 23028, 300, 32768, 1710, 6251),
}


def gpu_uuid() -> str:
    """An NVIDIA GPU UUID as nvidia-smi and NVML print it."""
    return f"GPU-{uuid.uuid4()}"


def group_name(node: Node) -> str:
    """The device group's name: the GPU model as NVML names it (DeviceName; the plugin groups
    devices by it, nomad-device-nvidia fingerprint.go writeFingerprintToChannel), from the
    node's ``gpu`` meta (``l4`` -> ``NVIDIA L4``, ``t4`` -> ``Tesla T4``)."""
    key = node.meta.get("gpu", "").lower()
    model = _MODELS.get(key)
    if model is not None:
        return model[0]
    return f"NVIDIA {key.upper()}" if key else "NVIDIA GPU"


def _attr(*, i: int | None = None, s: str | None = None, unit: str = "") -> dict[str, Any]:
    """A plugins/shared/structs Attribute as JSON."""
    return {"Int": i, "Float": None, "String": s, "Bool": None, "Unit": unit}


def _attributes(node: Node) -> dict[str, dict[str, Any]]:
    """fingerprint.go attributesFromFingerprintDeviceData plus the common driver_version."""
    out = {
        "display_state": _attr(s="Disabled"),
        "persistence_mode": _attr(s="Enabled"),
        "driver_version": _attr(s=DRIVER_VERSION),
    }
    model = _MODELS.get(node.meta.get("gpu", "").lower())
    if model is not None:
        _, mem, power, bar1, cores, memclock = model
        out["memory"] = _attr(i=mem, unit="MiB")
        out["power"] = _attr(i=power, unit="W")
        out["bar1"] = _attr(i=bar1, unit="MiB")
        out["cores_clock"] = _attr(i=cores, unit="MHz")
        out["memory_clock"] = _attr(i=memclock, unit="MHz")
        out["pci_bandwidth"] = _attr(i=15760, unit="MB/s")
    return out


def node_devices(node: Node) -> list[dict[str, Any]] | None:
    """``NodeResources.Devices`` of ``node``: one healthy group of its GPUs (null without):
    deviceGroupFromFingerprintData, each instance with its PCI bus ID."""
    if not node.gpu_ids:
        return None
    return [
        {
            "Vendor": VENDOR,
            "Type": TYPE,
            "Name": group_name(node),
            "Attributes": _attributes(node),
            "Instances": [
                {
                    "ID": gid,
                    "Healthy": True,
                    "HealthDescription": "",
                    "Locality": {"PciBusID": f"00000000:00:{4 + n:02X}.0"},
                }
                for n, gid in enumerate(node.gpu_ids)
            ],
        }
    ]


def request_matches(name: str, node: Node) -> bool:
    """Whether a device request ``name`` (``type``, ``vendor/type`` or ``vendor/type/model``,
    structs.RequestedDevice.ID) can be met by ``node``'s GPU group: a request naming a model
    needs that model (scheduler/device.go nodeDeviceMatches: ``ID().Matches``)."""
    parts = name.split("/")
    if len(parts) == 1:
        return parts[0] == TYPE
    if (parts[0], parts[1]) != (VENDOR, TYPE):
        return False
    return len(parts) == 2 or "/".join(parts[2:]) == group_name(node)


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
