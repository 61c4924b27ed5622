"""Capacity planning: which GPU VM shape serves a demand profile for the least money.

Two steps, both pure (the CLI reads the files):

1. **Fit.** For each VM shape in a catalog, how many workers fit on one VM: the smallest of
   GPUs / worker GPUs, CPU and RAM left after the per-VM reservation / worker needs; a shape
   whose GPUs have less memory than the worker needs (per worker, across its GPUs) hosts none.
   A shape without a measured ``rpm_per_worker`` cannot be planned and is listed as unusable.

2. **Oracle plan.** The demand profile (requests per minute at a fixed step) is cut into
   cycles (the policy's 20 minutes). Each cycle is sized as if the forecast were perfect:
   ``workers = ceil(q-quantile of the cycle's steps / rpm_per_worker)`` with ``q`` the target
   availability and the "higher" quantile (an actual step value), so at least ``q`` of the
   steps in every cycle are served and hence at least ``q`` overall. Workers are split
   odd/even over the zones and each zone rounds up to whole VMs. Cost = VM-hours x price.
   This is a lower bound: a real forecast needs headroom on top (see ``nomadscale backtest``).
   A cycle with no data repeats the previous cycle's size; the policy's ``bounds.min`` (if
   given) is a floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries

# --- catalog --------------------------------------------------------------------------------


class _M(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Shape(_M):
    name: str = Field(min_length=1)
    gpu: str = ""  # accelerator model, e.g. nvidia-l4
    gpus: int = Field(ge=0)
    gpu_memory_gb: float = Field(ge=0)  # per GPU
    vcpus: float = Field(gt=0)
    ram_gb: float = Field(gt=0)
    price_per_hour: float = Field(gt=0)
    rpm_per_worker: float | None = Field(default=None, gt=0)  # measured on this shape
    note: str = ""


class WorkerNeeds(_M):
    gpus: int = Field(default=1, ge=1)
    gpu_memory_gb: float = Field(default=0, ge=0)  # total across the worker's GPUs
    vcpus: float = Field(default=1, gt=0)
    ram_gb: float = Field(default=1, gt=0)


class Reserved(_M):
    vcpus: float = Field(default=0, ge=0)  # OS + Nomad client on every VM
    ram_gb: float = Field(default=0, ge=0)


class Catalog(_M):
    currency: str = "USD"
    prices_note: str = ""
    reserved: Reserved = Reserved()
    worker: WorkerNeeds | None = None
    shapes: tuple[Shape, ...] = Field(min_length=1)


def parse_catalog(data: Any, *, where: str = "catalog") -> Catalog:
    """Validate catalog data; raise InputError('<where>: field.path: message') on the first
    problem."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping with 'shapes:', got {type(data).__name__}")
    try:
        cat = Catalog.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise InputError(f"{where}: {path}: {err['msg']}") from None
    names = [s.name for s in cat.shapes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{where}: shapes: duplicate shape name {dup[0]!r}")
    return cat


Loc = tuple[str | int, ...]


def catalog_problems(data: Any, *, check_worker: bool = True) -> list[tuple[Loc, str]]:
    """Every problem of catalog data at once, each as (path, message): the fields pydantic
    refuses, duplicate shape names, and (``check_worker``) a worker that needs more GPU
    memory than any shape's GPUs hold. Empty when ``parse_catalog`` will accept it."""
    from nomadscale.config.validate import error_message

    if not isinstance(data, Mapping):
        return [((), f"expected a mapping with 'shapes:', got {type(data).__name__}")]
    out: list[tuple[Loc, str]] = []
    try:
        Catalog.model_validate(data)
    except ValidationError as e:
        out.extend((tuple(err["loc"]), error_message(err)) for err in e.errors())
    raw_shapes = data.get("shapes")
    shapes = raw_shapes if isinstance(raw_shapes, list) else []
    first: dict[str, int] = {}
    for i, raw in enumerate(shapes):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in first:
            message = f"duplicate shape name {name!r} (first at shapes[{first[name]}])"
            out.append((("shapes", i, "name"), message))
        else:
            first[name] = i
    if check_worker and isinstance(data.get("worker"), Mapping):
        try:
            worker = WorkerNeeds.model_validate(data["worker"])
        except ValidationError:
            return out  # its fields are reported above
        valid = []
        for raw in shapes:
            try:
                valid.append(Shape.model_validate(raw))
            except ValidationError:
                continue
        short = memory_shortfall(valid, worker)
        if short:
            out.append((("worker", "gpu_memory_gb"), f"{worker.gpu_memory_gb:g} GB is {short}"))
    return out


def memory_shortfall(shapes: Sequence[Shape], worker: WorkerNeeds) -> str | None:
    """Why no shape can host ``worker`` for GPU memory (a worker's memory is spread over its
    own GPUs), or None when one can."""
    if not shapes:
        return None
    best = max(s.gpu_memory_gb * worker.gpus for s in shapes)
    if worker.gpu_memory_gb <= best:
        return None
    names = ", ".join(s.name for s in shapes if s.gpu_memory_gb * worker.gpus == best)
    return f"more than any shape's GPUs hold for one worker (at most {best:g} GB, on {names})"


# --- fit ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fit:
    workers: int  # workers per VM
    limit: str  # what bounds it: gpus, gpu memory, vcpus, ram
    reason: str  # why a shape hosts none (empty when workers > 0)


def workers_per_vm(shape: Shape, worker: WorkerNeeds, *, reserved: Reserved | None = None) -> Fit:
    res = reserved or Reserved()
    if shape.gpus < worker.gpus:
        return Fit(0, "gpus", f"has {shape.gpus} GPU(s), a worker needs {worker.gpus}")
    if worker.gpu_memory_gb > shape.gpu_memory_gb * worker.gpus:
        have = shape.gpu_memory_gb * worker.gpus
        return Fit(
            0,
            "gpu memory",
            f"{have:g} GB GPU memory per worker, a worker needs {worker.gpu_memory_gb:g} GB",
        )
    cpu = shape.vcpus - res.vcpus
    ram = shape.ram_gb - res.ram_gb
    limits = {
        "gpus": shape.gpus // worker.gpus,
        "vcpus": math.floor(cpu / worker.vcpus + 1e-9) if cpu > 0 else 0,
        "ram": math.floor(ram / worker.ram_gb + 1e-9) if ram > 0 else 0,
    }
    limit = min(limits, key=lambda k: (limits[k], k != "gpus"))
    n = limits[limit]
    if n <= 0:
        have = cpu if limit == "vcpus" else ram
        need = worker.vcpus if limit == "vcpus" else worker.ram_gb
        unit = "vCPUs" if limit == "vcpus" else "GB RAM"
        return Fit(
            0, limit, f"{max(have, 0):g} {unit} left after reservation, a worker needs {need:g}"
        )
    return Fit(n, limit, "")


# --- planning -------------------------------------------------------------------------------


def workers_per_cycle(
    series: DemandSeries,
    *,
    cycle_s: float,
    rpm_per_worker: float,
    target: float,
    min_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Oracle workers for each cycle, and the demand each cycle was sized for."""
    if not 0 < target < 1:
        raise InputError(f"target availability must be between 0 and 1, got {target:g}")
    if rpm_per_worker <= 0:
        raise InputError(f"rpm_per_worker must be positive, got {rpm_per_worker:g}")
    per = max(1, round(cycle_s / series.step_s))
    v = np.asarray(series.values, dtype=float)
    n_cycles = math.ceil(len(v) / per)
    if n_cycles == 0:
        raise InputError("demand profile is empty")
    padded = np.full(n_cycles * per, np.nan)
    padded[: len(v)] = v
    cycles = padded.reshape(n_cycles, per)
    demand = np.full(n_cycles, np.nan)
    has = ~np.all(np.isnan(cycles), axis=1)
    if not has.any():
        raise InputError("demand profile has no data (all gaps)")
    demand[has] = np.nanquantile(cycles[has], target, axis=1, method="higher")
    # A cycle without data repeats the previous one (the first known one at the start).
    idx = np.where(has, np.arange(n_cycles), 0)
    np.maximum.accumulate(idx, out=idx)
    first = int(np.argmax(has))
    idx[:first] = first
    demand = demand[idx]
    workers = np.maximum(np.ceil(demand / rpm_per_worker - 1e-9), min_workers).astype(np.int64)
    return workers, demand


def vms_for(workers: np.ndarray, *, per_vm: int, zones: int) -> np.ndarray:
    """VMs per cycle when workers are split odd/even over ``zones`` (each zone rounds up)."""
    out = np.zeros(len(workers), dtype=np.int64)
    for j in range(zones):
        share = workers // zones + (j < workers % zones)
        out += -(-share // per_vm)
    return out


@dataclass(frozen=True, slots=True)
class ShapePlan:
    shape: Shape
    fit: Fit
    usable: bool
    reason: str  # why unusable, empty otherwise
    avg_vms: float = 0.0
    peak_vms: int = 0
    peak_workers: int = 0
    vm_hours: float = 0.0
    cost: float = 0.0  # over the whole profile
    cost_per_day: float = 0.0
    availability: float = 0.0  # fraction of known steps served by the planned workers

    @property
    def cost_per_month(self) -> float:
        return self.cost_per_day * 30.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.name,
            "gpu": self.shape.gpu,
            "price_per_hour": self.shape.price_per_hour,
            "rpm_per_worker": self.shape.rpm_per_worker,
            "workers_per_vm": self.fit.workers,
            "limited_by": self.fit.limit,
            "usable": self.usable,
            "reason": self.reason,
            "avg_vms": round(self.avg_vms, 3),
            "peak_vms": self.peak_vms,
            "peak_workers": self.peak_workers,
            "vm_hours": round(self.vm_hours, 3),
            "cost": round(self.cost, 2),
            "cost_per_day": round(self.cost_per_day, 2),
            "cost_per_month": round(self.cost_per_month, 2),
            "availability": round(self.availability, 5),
        }


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    plans: tuple[ShapePlan, ...]  # usable cheapest first, then unusable
    days: float  # length of the demand profile
    cycle_s: float
    target: float
    zones: int
    currency: str
    prices_note: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": round(self.days, 3),
            "cycle_s": self.cycle_s,
            "target_availability": self.target,
            "zones": self.zones,
            "currency": self.currency,
            "prices_note": self.prices_note,
            "method": self.method,
            "shapes": [p.to_dict() for p in self.plans],
        }


METHOD = (
    "oracle: each cycle sized to its own {q:g}-quantile step (perfect forecast), workers "
    "split odd/even over {z} zones, each zone rounded up to whole VMs; a lower bound, a real "
    "forecast adds headroom"
)


def plan_capacity(
    catalog: Catalog,
    series: DemandSeries,
    *,
    worker: WorkerNeeds | None = None,
    cycle_s: float = 1200.0,
    target: float = 0.99,
    zones: int = 2,
    min_workers: int = 0,
) -> CapacityPlan:
    """Rank the catalog's shapes by the cost of serving ``series`` (cheapest first)."""
    need = worker or catalog.worker
    if need is None:
        raise InputError("worker needs are missing: add 'worker:' to the catalog or pass them")
    if zones < 1:
        raise InputError(f"zones must be at least 1, got {zones}")
    if cycle_s < series.step_s:
        raise InputError(
            f"cycle ({cycle_s:g}s) is shorter than the demand step ({series.step_s:g}s)"
        )
    per = max(1, round(cycle_s / series.step_s))
    values = np.asarray(series.values, dtype=float)
    days = len(values) * series.step_s / 86400.0
    # hours of each cycle: the last one only as far as the profile goes (VMs are paid for the
    # profile's length, as its cost per day is spread over it)
    steps = np.full(math.ceil(len(values) / per), per)
    if len(steps):
        steps[-1] = len(values) - per * (len(steps) - 1)
    hours = steps * series.step_s / 3600.0
    usable: list[ShapePlan] = []
    unusable: list[ShapePlan] = []
    for shape in catalog.shapes:
        fit = workers_per_vm(shape, need, reserved=catalog.reserved)
        if fit.workers == 0:
            unusable.append(ShapePlan(shape=shape, fit=fit, usable=False, reason=fit.reason))
            continue
        if shape.rpm_per_worker is None:
            unusable.append(
                ShapePlan(shape=shape, fit=fit, usable=False, reason="no measured rpm_per_worker")
            )
            continue
        workers, _ = workers_per_cycle(
            series,
            cycle_s=cycle_s,
            rpm_per_worker=shape.rpm_per_worker,
            target=target,
            min_workers=min_workers,
        )
        vms = vms_for(workers, per_vm=fit.workers, zones=zones)
        served_cap = np.repeat(workers * shape.rpm_per_worker, per)[: len(values)]
        known = ~np.isnan(values)
        availability = (
            float(np.mean(values[known] <= served_cap[known] + 1e-9)) if known.any() else 1.0
        )
        vm_hours = float(np.dot(vms, hours))
        cost = vm_hours * shape.price_per_hour
        usable.append(
            ShapePlan(
                shape=shape,
                fit=fit,
                usable=True,
                reason="",
                avg_vms=float(vms.mean()),
                peak_vms=int(vms.max()),
                peak_workers=int(workers.max()),
                vm_hours=vm_hours,
                cost=cost,
                cost_per_day=cost / days if days > 0 else 0.0,
                availability=availability,
            )
        )
    usable.sort(key=lambda p: (p.cost, p.shape.name))
    return CapacityPlan(
        plans=tuple(usable + unusable),
        days=days,
        cycle_s=per * series.step_s,
        target=target,
        zones=zones,
        currency=catalog.currency,
        prices_note=catalog.prices_note,
        method=METHOD.format(q=target, z=zones),
    )
