"""Resource JSON: a node's NodeResources and ReservedResources, an allocation's
AllocatedResources (nomad/structs/structs.go NodeResources, NodeReservedResources,
AllocatedResources{Tasks, TaskLifecycles, Shared}, AllocatedTaskResources{Cpu, Memory,
Networks, Devices}, AllocatedSharedResources{Networks, DiskMB, Ports}).

The list endpoints carry them only when asked: structs.Node.Stub copies NodeResources and
ReservedResources, structs.Allocation.Stub copies AllocatedResources, when the query has
``resources=true`` (NodeStubFields / AllocStubFields); the stub fields are ``omitempty``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from nomadscale.sim import devices

if TYPE_CHECKING:
    from nomadscale.sim.model import Alloc, Node

CPU_SHARES, CPU_CORES, MEMORY_MB, DISK_MB = 32000, 16, 65536, 200000
DEFAULT_DISK_MB = 300  # structs.DefaultEphemeralDisk


def node_resources(node: Node) -> dict[str, Any]:
    """What the client fingerprinted: CPU, memory, disk, its network, its GPUs."""
    return {
        "Cpu": {
            "CpuShares": CPU_SHARES,
            "TotalCpuCores": CPU_CORES,
            "ReservableCpuCores": list(range(CPU_CORES)),
        },
        "Memory": {"MemoryMB": MEMORY_MB},
        "Disk": {"DiskMB": DISK_MB},
        "Networks": [
            {
                "Mode": "host",
                "Device": "ens4",
                "CIDR": f"{node.address}/32",
                "IP": node.address,
                "MBits": 1000,
                "DNS": None,
                "ReservedPorts": None,
                "DynamicPorts": None,
            }
        ],
        "Devices": devices.node_devices(node),
        "MinDynamicPort": 20000,
        "MaxDynamicPort": 32000,
    }


def reserved_resources() -> dict[str, Any]:
    """The client's ``reserved`` block (nothing reserved, the agent's default)."""
    return {
        "Cpu": {"CpuShares": 0},
        "Memory": {"MemoryMB": 0},
        "Disk": {"DiskMB": 0},
        "Networks": {"ReservedHostPorts": ""},
    }


def _group(a: Alloc) -> dict[str, Any]:
    for tg in a.job.get("TaskGroups") or []:
        if tg.get("Name") == a.task_group:
            return tg  # type: ignore[no-any-return]
    return {}


def alloc_resources(a: Alloc) -> dict[str, Any]:
    """The allocation's AllocatedResources: each task's CPU and memory as asked, the GPU
    instances the scheduler gave it (devices.assign), the group's ephemeral disk."""
    tg = _group(a)
    tasks = {str(t.get("Name", "task")): t for t in tg.get("Tasks") or []}
    out_tasks: dict[str, Any] = {}
    lifecycles: dict[str, Any] = {}
    for name in a.task_names:
        res = (tasks.get(name) or {}).get("Resources") or {}
        out_tasks[name] = {
            "Cpu": {"CpuShares": int(res.get("CPU") or 0), "ReservedCores": None},
            "Memory": {
                "MemoryMB": int(res.get("MemoryMB") or 0),
                "MemoryMaxMB": int(res.get("MemoryMaxMB") or 0),
            },
            "Networks": None,
            "Devices": copy.deepcopy(a.devices.get(name)) or None,
        }
        lifecycles[name] = copy.deepcopy((tasks.get(name) or {}).get("Lifecycle"))
    disk = (tg.get("EphemeralDisk") or {}).get("SizeMB") or DEFAULT_DISK_MB
    return {
        "Tasks": out_tasks,
        "TaskLifecycles": lifecycles,
        "Shared": {"Networks": None, "DiskMB": int(disk), "Ports": None},
    }
