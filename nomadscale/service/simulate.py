"""``nomadscale simulate``: a week of the real service against an in-process twin.

The REAL pieces run: ``Service.run_policy`` (lock, slot claim, cycle, actuator, records), the
``NomadClient`` over HTTP against the Nomad twin, ``GceMigPool`` over HTTP against the twin's
Compute endpoint, a trace file as demand, and an in-memory KV/lock (or Consul with
``consul_addr``). Time is virtual (``FakeClock``): the APScheduler trigger of the policy says
when each cycle fires, and the twin's clock advances between cycles (and while the actuator
waits for drains). Between cycles the served capacity is sampled at every trace step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import InputError, NomadscaleError
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.cycle import Ports
from nomadscale.service.forecasts import lookback_s
from nomadscale.service.loop import Service

log = logging.getLogger(__name__)

PROJECT = "nomadscale-sim"


def default_trace() -> Path:
    """The real trace shipped as package data (see nomadscale/data/ATTRIBUTION.md)."""
    from nomadscale.data import bundled_trace_path

    return bundled_trace_path()


def capacity_per_worker(trace: str | Path) -> float:
    """req/min one worker serves, as SCORING.md derives it: p99 of the demand rate / 24."""
    rpm = TraceDemandSource(trace).trace.rpm
    return float(np.percentile(rpm[~np.isnan(rpm)], 99) / 24.0)


def default_policy(trace: str | Path) -> Policy:
    """The built-in simulate policy: the eKYC policy's shape (2 zones of GCE MIG GPU nodes,
    20-minute cycles, 10-minute lead time, 99% target; a trace's history is read 35 days
    back) with trace demand,
    capacity per worker = p99 demand / 24 (SCORING.md) and NO maintenance-freeze schedule
    (a fixed count for 2 h a week would measure the freeze, not the autoscaler)."""
    src = TraceDemandSource(trace)
    rpm = capacity_per_worker(trace)
    peak = float(np.nanmax(src.trace.rpm))
    top = max(4, math.ceil(1.5 * peak / rpm))
    zones = [
        {"name": "zone-a", "group": "ml-worker-a", "node_pool": "gpu-l4",
         "instance_group": "ekyc-gpu-a"},
        {"name": "zone-b", "group": "ml-worker-b", "node_pool": "gpu-l4",
         "instance_group": "ekyc-gpu-b"},
    ]  # fmt: skip
    step = f"{round(src.trace.step_s)}s"
    doc = {
        "name": "ekyc-ml-sim",
        "cycle": "20m",
        "lead_time": "10m",
        "demand": {"source": "trace", "trace": str(Path(trace).resolve()), "step": step},
        "forecast": {"model": "auto", "target_availability": 0.99},
        "capacity": {"rpm_per_worker": round(rpm, 3)},
        "bounds": {"min": 2, "max": top},
        "zones": {"split": "odd-even", "list": zones},
        "target": {
            "job": "ml-worker", "namespace": "ekyc",
            "node_pool": {"provider": "gce-mig", "project": PROJECT, "workers_per_node": 1,
                          "drain_deadline": "15m", "scale_in_order": "empty-then-oldest"},
        },
        "alerting": {"failed_cycles_before_alert": 3},
    }  # fmt: skip
    return Policy.model_validate(doc)


def describe_policy(policy: Policy, *, builtin: bool) -> str:
    """One line for the summary: which policy ran, and what it leaves out."""
    s = policy.schedules
    what = "built-in simulate policy" if builtin else "policy"
    return (
        f"{what} {policy.name}: {policy.capacity.rpm_per_worker:g} rpm/worker"
        f"{' (p99 demand / 24)' if builtin else ''}, bounds {policy.bounds.min}-"
        f"{policy.bounds.max}, target {policy.forecast.target_availability:g}, lead "
        f"{policy.lead_time_s / 60:g}m, lookback {lookback_s(policy) / 86400:g}d, "
        + (f"{len(s)} schedule(s)" if s else "no maintenance freeze or other schedules")
    )


def worker_job(
    policy: Policy,
    *,
    counts: dict[str, int],
    image: str,
    update: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Nomad Job JSON for the policy's target: one group per zone, one GPU per worker.
    ``update`` is the job's update block (``{"MaxParallel": 0}``: no deployments)."""
    np_ = policy.target.node_pool
    groups = []
    for z in policy.zones.items:
        groups.append(
            {
                "Name": z.group,
                "Count": counts.get(z.name, 0),
                "Constraints": [
                    {"LTarget": "${node.datacenter}", "RTarget": z.name, "Operand": "="}
                ],
                "Tasks": [
                    {
                        "Name": "worker",
                        "Driver": "docker",
                        "Config": {"image": image},
                        "Resources": {
                            "CPU": 2000,
                            "MemoryMB": 8192,
                            "Devices": [{"Name": "nvidia/gpu", "Count": 1}],
                        },
                    }
                ],
            }
        )
    job: dict[str, Any] = {
        "ID": policy.target.job,
        "Name": policy.target.job,
        "Namespace": policy.target.namespace,
        "Type": "service",
        "NodePool": policy.zones.items[0].node_pool if np_ is not None else "default",
        "Datacenters": [z.name for z in policy.zones.items],
        "TaskGroups": groups,
    }
    if update is not None:
        job["Update"] = dict(update)
    return job


class _SimClock:
    """The cluster's FakeClock, where sleeping advances the whole twin."""

    def __init__(
        self, fake: FakeClock, advance: Callable[[float], None], *, chunk_s: float = 10.0
    ) -> None:
        self._fake = fake
        self._advance = advance
        self.chunk_s = chunk_s
        self.on_tick: Callable[[], object] | None = None  # the lock-renewal job

    def now(self) -> datetime:
        return self._fake.now()

    def monotonic(self) -> float:
        return self._fake.monotonic()

    def sleep(self, seconds: float) -> None:
        """Advance the twin; renew the lock every ``chunk_s`` as the service's job would."""
        left = seconds
        while left > 0:
            step = min(left, self.chunk_s)
            self._advance(step)
            left -= step
            if self.on_tick is not None:
                self.on_tick()


@dataclass
class SimResult:
    policy: str
    start: datetime
    end: datetime
    cycles: int
    applied: int
    failed: int
    availability: float  # share of trace steps whose demand the running workers served
    worker_hours: float
    node_hours: float
    static_peak_node_hours: float
    peak_workers: int
    static_peak_workers: int = 0  # ceil(peak demand / rpm_per_worker), held all the time
    plot: str | None = None
    note: str = ""  # which policy ran (the built-in one has no maintenance freeze)
    wall_s: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    times: list[datetime] = field(default_factory=list, repr=False)
    demand: list[float] = field(default_factory=list, repr=False)
    capacity: list[float] = field(default_factory=list, repr=False)
    zones: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def cost_vs_static(self) -> float:
        return self.node_hours / self.static_peak_node_hours if self.static_peak_node_hours else 0

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "policy_note": self.note,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "days": round((self.end - self.start).total_seconds() / 86400, 2),
            "cycles": self.cycles,
            "applied": self.applied,
            "failed": self.failed,
            "skipped": dict(self.skipped),
            "availability": round(self.availability, 4),
            "worker_hours": round(self.worker_hours, 1),
            "node_hours": round(self.node_hours, 1),
            "static_peak_node_hours": round(self.static_peak_node_hours, 1),
            "static_peak_workers": self.static_peak_workers,
            "cost_vs_static_peak": round(self.cost_vs_static, 3),
            "peak_workers": self.peak_workers,
            "plot": self.plot,
            "wall_seconds": round(self.wall_s, 1),
        }


def sim_window(
    trace_start: datetime, span_s: float, *, days: float, cycle_s: float
) -> tuple[datetime, datetime]:
    """The simulated window: after a warm-up of min(7 days, 35% of the trace) rounded up to
    a cycle (SCORING.md: the forecaster needs history to calibrate on), for ``days`` or to
    the end of the trace."""
    warm = min(7 * 86400.0, 0.35 * span_s)
    warm = math.ceil(warm / cycle_s - 1e-9) * cycle_s
    start = trace_start + timedelta(seconds=warm)
    end = min(start + timedelta(days=days), trace_start + timedelta(seconds=span_s))
    return start, end


def simulate(
    *,
    trace: str | Path | None = None,
    days: float = 7.0,
    policy: Policy | None = None,
    out_dir: str | Path | None = None,
    consul_addr: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    from google.auth.credentials import AnonymousCredentials

    from nomadscale.integrations.gce import GceMigPool
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.compute import ComputeServer, ComputeSim
    from nomadscale.sim.server import TwinServer

    trace_path = Path(trace) if trace else default_trace()
    builtin = policy is None
    policy = policy or default_policy(trace_path)
    if policy.demand.source == "trace" and trace is None:
        trace_path = Path(policy.demand.trace)
    # the policy's whole lookback: the service's forecaster is incremental
    demand = TraceDemandSource(trace_path)
    tr = demand.trace
    if days <= 0:
        raise InputError("--days: must be positive")
    start, end = sim_window(tr.start, tr.duration_s, days=days, cycle_s=policy.cycle_s)
    if end <= start:
        raise InputError(f"{trace_path}: trace too short to simulate")
    rpm = policy.capacity.rpm_per_worker
    fake = FakeClock(start - timedelta(minutes=15))  # 15 min to place the initial fleet
    cluster = Cluster.build(nodes=0, zones=[z.name for z in policy.zones.items], clock=fake)
    clock = _SimClock(fake, cluster.advance)
    cluster.add_namespace(policy.target.namespace)
    first = demand.rpm_at(start)
    initial = max(policy.bounds.min, math.ceil((0 if math.isnan(first) else first) / rpm))
    from nomadscale.stages.zones import even_shares

    shares = even_shares(initial, len(policy.zones.items))
    counts = {z.name: shares[i] for i, z in enumerate(policy.zones.items)}
    for z in policy.zones.items:
        for i in range(counts[z.name]):
            cluster.add_node(
                name=f"{z.instance_group or z.name}-init{i:03d}",
                datacenter=z.name,
                node_pool=z.node_pool,
                node_class="gpu-l4",
                meta={"zone": z.name},
            )
    np_ = policy.target.node_pool
    project = np_.project if np_ is not None else PROJECT
    compute = ComputeSim(cluster, project=project)
    for z in policy.zones.items:
        if z.instance_group:
            compute.add_mig(name=z.instance_group, zone=z.name, node_pool=z.node_pool,
                            node_class="gpu-l4")  # fmt: skip
    twin = TwinServer(cluster, host="127.0.0.1", port=0).start()
    gce = ComputeServer(compute).start()
    try:
        nomad = NomadClient(address=twin.address, namespace=policy.target.namespace, clock=clock)
        image = policy.deploy.image if policy.deploy else "registry.example.com/ml-worker:sim"
        nomad.register_job(worker_job(policy, counts=counts, image=image))
        cluster.advance((start - fake.now()).total_seconds())
        settings = Settings(consul_addr=consul_addr, lock_ttl_s=30.0, kv_prefix="nomadscale-sim")
        if consul_addr:
            from nomadscale.integrations.consul import ConsulKV, ConsulLock

            kv: Any = ConsulKV(addr=consul_addr)
            lock: Any = ConsulLock(addr=consul_addr, key="nomadscale-sim/leader", ttl_s=30)
            try:  # now, in one line: not a run of cycles all skipped for want of the lock
                lock.acquire()
            except NomadscaleError as e:
                raise InputError(f"--consul {consul_addr}: {e}") from None
        else:
            from nomadscale.integrations.memkv import MemoryKV, MemoryLock

            kv = MemoryKV(clock=clock)
            lock = MemoryLock(kv=kv, key="nomadscale-sim/leader", ttl_s=30, lock_delay_s=0)
        pool = GceMigPool(project=project, credentials=AnonymousCredentials(),
                          base_url=gce.base_url, clock=clock, poll_s=1.0)  # fmt: skip
        ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: demand,
                      pool_for=lambda _p: pool)  # fmt: skip
        svc = Service(settings=settings, policies=[policy], ports=ports, clock=clock,
                      poll_s=30.0)  # fmt: skip
        clock.on_tick = lock.acquire
        t0 = time.perf_counter()
        res = _drive(svc, policy, demand, cluster, compute, nomad, clock,
                     start=start, end=end, out_dir=out_dir, progress=progress)  # fmt: skip
        res.note = describe_policy(policy, builtin=builtin)
        res.wall_s = time.perf_counter() - t0
        return res
    finally:
        gce.stop()
        twin.stop()


def _drive(
    svc: Service,
    policy: Policy,
    demand: TraceDemandSource,
    cluster: Any,
    compute: Any,
    nomad: Any,
    clock: _SimClock,
    *,
    start: datetime,
    end: datetime,
    out_dir: str | Path | None,
    progress: Callable[[int, int], None] | None,
) -> SimResult:
    name = policy.name
    rpm = policy.capacity.rpm_per_worker
    step = demand.trace.step_s
    total_cycles = int((end - start).total_seconds() // policy.cycle_s)
    res = SimResult(name, start, end, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0)
    res.zones = {z.name: [] for z in policy.zones.items}
    next_sample = start
    fire = svc.next_fire(name, start - timedelta(microseconds=1))
    while fire < end:
        while next_sample <= fire and next_sample < end:  # sample served capacity
            gap = (next_sample - clock.now()).total_seconds()
            if gap > 0:
                cluster.advance(gap)
            _sample(res, policy, demand, cluster, compute, at=next_sample, step_s=step, rpm=rpm)
            next_sample += timedelta(seconds=step)
        gap = (fire - clock.now()).total_seconds()
        if gap > 0:
            cluster.advance(gap)
        out = svc.run_policy(name)
        res.cycles += 1
        if out is not None:
            res.applied += out.record.outcome == "applied"
            res.failed += out.record.outcome == "failed"
            if out.record.skipped:
                res.skipped[out.record.skipped] = res.skipped.get(out.record.skipped, 0) + 1
        if progress is not None:
            progress(res.cycles, total_cycles)
        fire = svc.next_fire(name, max(fire + timedelta(microseconds=1), clock.now()))
    while next_sample < end:
        gap = (next_sample - clock.now()).total_seconds()
        if gap > 0:
            cluster.advance(gap)
        _sample(res, policy, demand, cluster, compute, at=next_sample, step_s=step, rpm=rpm)
        next_sample += timedelta(seconds=step)
    served = [c >= d for c, d in zip(res.capacity, res.demand, strict=True) if not math.isnan(d)]
    res.availability = sum(served) / len(served) if served else 0.0
    peak = max((d for d in res.demand if not math.isnan(d)), default=0.0)
    static_nodes = math.ceil(peak / rpm)
    res.static_peak_workers = static_nodes
    res.static_peak_node_hours = static_nodes * (end - start).total_seconds() / 3600
    if out_dir is not None:
        res.plot = str(plot(res, Path(out_dir) / f"simulate-{name}.png", rpm=rpm))
    return res


def _sample(
    res: SimResult,
    policy: Policy,
    demand: TraceDemandSource,
    cluster: Any,
    compute: Any,
    *,
    at: datetime,
    step_s: float,
    rpm: float,
) -> None:
    """Measure (in-process, not through the service's API) what was running at ``at``."""
    with cluster.lock:
        allocs = cluster.job_allocs((policy.target.namespace, policy.target.job))
        per_group: dict[str, int] = {}
        for a in allocs:
            if a.client_status == "running" and a.desired_status == "run":
                per_group[a.task_group] = per_group.get(a.task_group, 0) + 1
        nodes = sum(len(m.instances) for m in compute.migs.values())
    running = 0
    for z in policy.zones.items:
        n = per_group.get(z.group, 0)
        res.zones[z.name].append(n)
        running += n
    hours = step_s / 3600
    res.times.append(at)
    res.demand.append(demand.rpm_at(at))
    res.capacity.append(running * rpm)
    res.worker_hours += running * hours
    res.node_hours += nodes * hours
    res.peak_workers = max(res.peak_workers, running)


def plot(res: SimResult, path: Path, *, rpm: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ax1.plot(res.times, res.demand, label="demand (rpm)", color="tab:red", lw=1)
    ax1.plot(res.times, res.capacity, label="served capacity (rpm)", color="tab:blue", lw=1)
    ax1.set_ylabel("requests / min")
    ax1.legend(loc="upper left")
    ax1.set_title(
        f"{res.policy}: availability {res.availability:.2%}, "
        f"cost {res.cost_vs_static:.0%} of static peak"
    )
    bottom = [0] * len(res.times)
    for zone, counts in res.zones.items():
        top = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax2.fill_between(res.times, bottom, top, step="post", alpha=0.6, label=zone)
        bottom = top
    ax2.set_ylabel("running workers")
    ax2.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
