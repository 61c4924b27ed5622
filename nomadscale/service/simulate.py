"""``nomadscale simulate``: a week of the real service against an in-process twin.

The REAL pieces run: ``Service.run_policy`` (lock, slot claim, cycle, actuator, records), the
``NomadClient`` over HTTP against the Nomad twin, ``GceMigPool`` over HTTP against the twin's
Compute endpoint, a trace file as demand, and an in-memory KV/lock (or Consul with
``consul_addr``). Time is virtual (``FakeClock``): the APScheduler trigger of the policy says
when each cycle fires, and the twin's clock advances between cycles (and while the actuator
waits for drains), timer by timer: every state change of the twin is recorded, and the
figures and the plot come from that timeline (``simulate_report`` says how they are
measured and how they differ from ``backtest`` on the same window). A cycle still running
when the next should fire makes that one miss, as APScheduler would (``missed_cycles``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import InputError, NomadscaleError, UsageError
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.cycle import Ports
from nomadscale.service.forecasts import lookback_s
from nomadscale.service.loop import Service
from nomadscale.service.simulate_report import Meter, SimResult, measure, plot
from nomadscale.stages.zones import even_shares

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


def sim_window(
    trace_start: datetime,
    span_s: float,
    *,
    days: float,
    cycle_s: float,
    step_s: float | None = None,
) -> tuple[datetime, datetime]:
    """The simulated window: after a warm-up of min(7 days, 35% of the trace) rounded up to
    a cycle (SCORING.md: the forecaster needs history to calibrate on), for ``days`` or to
    the end of the trace. With the trace's ``step_s`` the warm-up counts whole steps first,
    as ``backtest`` does (``backtest.protocol._warmup``): 35% of a 58-step trace is 20 steps,
    not 20.3, so both start at the same decision."""
    if step_s:
        n = round(span_s / step_s)
        warm = min(int(7 * 86400 / step_s), int(0.35 * n)) * step_s
    else:
        warm = min(7 * 86400.0, 0.35 * span_s)
    warm = math.ceil(warm / cycle_s - 1e-9) * cycle_s
    start = trace_start + timedelta(seconds=warm)
    left = max(0.0, span_s - warm)
    end = start + timedelta(seconds=min(days * 86400.0, left))
    return start, end


def _check_days(days: float) -> None:
    if not (math.isfinite(days) and days > 0):
        raise UsageError(f"--days {days:g}: must be a positive number of days")


def _fires(svc: Service, name: str, start: datetime, end: datetime) -> list[datetime]:
    """Every time the policy's cron trigger fires in ``[start, end)``."""
    out: list[datetime] = []
    fire = svc.next_fire(name, start - timedelta(microseconds=1))
    while fire < end:
        out.append(fire)
        fire = svc.next_fire(name, fire + timedelta(microseconds=1))
    return out


def _notes(policy: Policy, demand: TraceDemandSource, *, builtin: bool, trace: Path,
           days: float, start: datetime, end: datetime) -> list[str]:  # fmt: skip
    """What the reader must know to read the figures right."""
    out: list[str] = []
    d = policy.demand
    if not builtin and (d.source != "trace" or Path(d.trace).resolve() != trace.resolve()):
        was = "its Prometheus query" if d.source != "trace" else f"its trace {d.trace}"
        out.append(f"demand: the trace {trace}, not {was}")
    got = (end - start).total_seconds() / 86400
    if got < days - 1e-9:
        out.append(
            f"the trace ends {got:.2f} days ({got * 24:.1f} h) after the first decision: "
            f"simulated {got:.2f} of the {days:g} days asked"
        )
    rpm = demand.trace.rpm
    s = int((start - demand.trace.start).total_seconds() // demand.trace.step_s)
    e = math.ceil((end - demand.trace.start).total_seconds() / demand.trace.step_s)
    window = rpm[max(0, s) : max(0, e)]
    peak = float(np.nanmax(window)) if np.any(~np.isnan(window)) else 0.0
    need = math.ceil(peak / policy.capacity.rpm_per_worker - 1e-9)
    if need > policy.bounds.max:
        out.append(
            f"the trace's peak ({peak:.0f} rpm) needs {need} workers of "
            f"{policy.capacity.rpm_per_worker:g} rpm, above bounds.max {policy.bounds.max}: "
            "availability is capped by the policy, not the forecast"
        )
    return out


def simulate(
    *,
    trace: str | Path | None = None,
    days: float = 7.0,
    policy: Policy | None = None,
    out_dir: str | Path | None = None,
    consul_addr: str | None = None,
    consul_token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run the service against the twin over ``days`` of the trace (after its warm-up).

    ``progress(done, total)`` is called after every cycle (``total``: the cycles the
    policy's trigger fires in the window). With ``consul_addr`` the KV and the lock are in
    that Consul under a prefix of their own per run (``SimResult.notes`` names it), and the
    lock is released at the end. Ctrl-C (KeyboardInterrupt) stops the twin and the lock and
    propagates: nothing is written."""
    from google.auth.credentials import AnonymousCredentials

    from nomadscale.integrations.gce import GceMigPool
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.sim.cluster import Cluster
    from nomadscale.sim.compute import ComputeServer, ComputeSim
    from nomadscale.sim.server import TwinServer

    _check_days(days)
    trace_path = Path(trace) if trace else default_trace()
    builtin = policy is None
    policy = policy or default_policy(trace_path)
    if policy.demand.source == "trace" and trace is None:
        trace_path = Path(policy.demand.trace)
    # the policy's whole lookback: the service's forecaster is incremental
    demand = TraceDemandSource(trace_path)
    tr = demand.trace
    start, end = sim_window(tr.start, tr.duration_s, days=days, cycle_s=policy.cycle_s,
                            step_s=tr.step_s)  # fmt: skip
    if end <= start:
        raise InputError(
            f"{trace_path}: trace too short to simulate: {len(tr.rpm)} steps of "
            f"{tr.step_s / 60:g} min leave nothing after the warm-up (35% of the trace, at "
            f"most 7 days, rounded up to a {policy.cycle_s / 60:g} min cycle)"
        )
    rpm = policy.capacity.rpm_per_worker
    np_ = policy.target.node_pool
    wpn = np_.workers_per_node if np_ is not None else 1
    fake = FakeClock(start - timedelta(minutes=15))  # 15 min to place the initial fleet
    cluster = Cluster.build(nodes=0, zones=[z.name for z in policy.zones.items], clock=fake)
    # one GPU per worker: a node of the pool holds workers_per_node of them. The twin's MIGs
    # create nodes through Cluster.add_node, which has no per-MIG GPU count (reported).
    cluster.add_node = functools.partial(cluster.add_node, gpus=wpn)  # type: ignore[method-assign]
    cluster.add_namespace(policy.target.namespace)
    first = demand.rpm_at(start)
    want = math.ceil((0 if math.isnan(first) else first) / rpm)
    initial = min(policy.bounds.max, max(policy.bounds.min, want))
    nz = len(policy.zones.items)
    shares = even_shares(initial, nz)
    counts = {z.name: shares[i] for i, z in enumerate(policy.zones.items)}
    # without a node pool nomadscale scales only the task groups: a fixed fleet, room for
    # bounds.max; with one, the initial fleet's nodes (the MIGs adopt them)
    room = even_shares(policy.bounds.max, nz)
    for i, z in enumerate(policy.zones.items):
        n_nodes = math.ceil(counts[z.name] / wpn) if np_ is not None else room[i]
        for k in range(n_nodes):
            cluster.add_node(
                name=f"{z.instance_group or z.name}-init{k:03d}",
                datacenter=z.name,
                node_pool=z.node_pool,
                node_class="gpu-l4",
                meta={"zone": z.name},
            )
    project = np_.project if np_ is not None else PROJECT
    compute = ComputeSim(cluster, project=project)
    if np_ is not None:
        for z in policy.zones.items:
            if z.instance_group:
                compute.add_mig(name=z.instance_group, zone=z.name, node_pool=z.node_pool,
                                node_class="gpu-l4")  # fmt: skip
    meter = Meter(cluster, compute, policy, nodes=np_ is not None)
    clock = _SimClock(fake, meter.advance)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    prefix = f"nomadscale-sim/{run_id}" if consul_addr else "nomadscale-sim"
    twin = TwinServer(cluster, host="127.0.0.1", port=0).start()
    gce = ComputeServer(compute).start()
    lock: Any = None
    try:
        nomad = NomadClient(address=twin.address, namespace=policy.target.namespace, clock=clock)
        image = policy.deploy.image if policy.deploy else "registry.example.com/ml-worker:sim"
        job = worker_job(policy, counts=counts, image=image)
        # the zones' Nomad node pool, target.node_pool or not (that one is the GCE side);
        # zones in different pools: "all", each group pinned to its zone's datacenter
        pools = {z.node_pool for z in policy.zones.items}
        job["NodePool"] = pools.pop() if len(pools) == 1 else "all"
        nomad.register_job(job)
        meter.advance((start - fake.now()).total_seconds())
        settings = Settings(consul_addr=consul_addr, lock_ttl_s=30.0, kv_prefix=prefix)
        if consul_addr:
            from nomadscale.integrations.consul import ConsulKV, ConsulLock

            kv: Any = ConsulKV(addr=consul_addr, token=consul_token)
            lock = ConsulLock(addr=consul_addr, key=f"{prefix}/leader", ttl_s=30,
                              token=consul_token)  # fmt: skip
            try:  # now, in one line: not a run of cycles all skipped for want of the lock
                held = lock.acquire()
            except NomadscaleError as e:
                raise InputError(f"--consul {consul_addr}: {e}") from None
            if not held:
                raise InputError(f"--consul {consul_addr}: the lock {prefix}/leader is held "
                                 "by another session")  # fmt: skip
        else:
            from nomadscale.integrations.memkv import MemoryKV, MemoryLock

            kv = MemoryKV(clock=clock)
            lock = MemoryLock(kv=kv, key=f"{prefix}/leader", ttl_s=30, lock_delay_s=0)
        pool = GceMigPool(project=project, credentials=AnonymousCredentials(),
                          base_url=gce.base_url, clock=clock, poll_s=1.0)  # fmt: skip
        ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: demand,
                      pool_for=lambda _p: pool)  # fmt: skip
        svc = Service(settings=settings, policies=[policy], ports=ports, clock=clock,
                      poll_s=30.0)  # fmt: skip
        clock.on_tick = lock.acquire
        t0 = time.perf_counter()
        res = _drive(svc, policy, demand, meter, clock, start=start, days=days,
                     progress=progress)  # fmt: skip
        res.note = describe_policy(policy, builtin=builtin)
        res.days_asked = days
        res.trace = str(trace_path)
        res.notes = _notes(policy, demand, builtin=builtin, trace=trace_path, days=days,
                           start=res.start, end=res.end)  # fmt: skip
        if np_ is None:
            res.notes.append(
                "no target.node_pool: nodes are not scaled (a fixed fleet of "
                f"{sum(room)}), so the cost is in worker-hours"
            )
        if consul_addr:
            res.notes.append(f"decision records in Consul {consul_addr} under {prefix}/")
        res.events = cluster.events
        if out_dir is not None:
            where = Path(out_dir) / f"simulate-{policy.name}.png"
            try:
                res.plot = str(plot(res, where, rpm=rpm))
            except OSError as e:
                raise InputError(f"{where}: cannot write the plot: {e.strerror or e}") from None
        res.wall_s = time.perf_counter() - t0
        return res
    finally:
        clock.on_tick = None
        if lock is not None and consul_addr:
            with contextlib.suppress(NomadscaleError):
                lock.release()  # the next run, or a rerun, need not wait for the TTL
        gce.stop()
        twin.stop()


def _drive(
    svc: Service,
    policy: Policy,
    demand: TraceDemandSource,
    meter: Meter,
    clock: _SimClock,
    *,
    start: datetime,
    days: float,
    progress: Callable[[int, int], None] | None,
) -> SimResult:
    name = policy.name
    rpm = policy.capacity.rpm_per_worker
    tr = demand.trace
    last = tr.end
    first_fire = _fires(svc, name, start, min(start + timedelta(seconds=policy.cycle_s), last))
    if not first_fire:
        raise InputError(
            f"{demand.path}: no {policy.cycle_s / 60:g} min cycle fires between "
            f"{start:%Y-%m-%dT%H:%M}Z and the end of the trace at {last:%Y-%m-%dT%H:%M}Z"
        )
    # scored from the first decision on, as backtest scores (the trace's warm-up ends off
    # the wall-clock cycle grid when its rows are: ELB's at :04, :09...)
    start = first_fire[0]
    end = start + timedelta(seconds=min(days * 86400.0, (last - start).total_seconds()))
    fires = _fires(svc, name, start, end)
    res = SimResult(name, start, end)
    for i, fire in enumerate(fires):
        if fire < clock.now():  # the cycle before was still running: APScheduler misfires
            res.missed += 1
            if progress is not None:
                progress(i + 1, len(fires))
            continue
        meter.advance((fire - clock.now()).total_seconds())
        out = svc.run_policy(name)
        meter.record()
        res.cycles += 1
        if out is not None:
            res.applied += out.record.outcome == "applied"
            res.failed += out.record.outcome == "failed"
            if out.record.skipped:
                res.skipped[out.record.skipped] = res.skipped.get(out.record.skipped, 0) + 1
            d = out.decision
            if d is not None and d.forecast is not None:
                f = d.forecast
                res.forecasts.append((fire, f.peak, f.upper, d.desired, f.horizon_s))
        if progress is not None:
            progress(i + 1, len(fires))
    if clock.now() < end:
        meter.advance((end - clock.now()).total_seconds())
    # the first trace step starting at or after the window's start
    k = math.ceil((start - tr.start).total_seconds() / tr.step_s - 1e-9)
    first = tr.start + timedelta(seconds=k * tr.step_s)
    measure(res, meter.timeline, demand_at=demand.rpm_at, step_s=tr.step_s, first_step=first,
            rpm=rpm)  # fmt: skip
    peak = max((d for d in res.demand if not math.isnan(d)), default=0.0)
    static = math.ceil(peak / rpm - 1e-9)
    hours = (end - start).total_seconds() / 3600
    res.static_peak_workers = static
    res.static_peak_worker_hours = static * hours
    np_ = policy.target.node_pool
    if np_ is None:
        res.static_peak_node_hours = None
    else:
        shares = even_shares(static, len(policy.zones.items))
        nodes = sum(math.ceil(s / np_.workers_per_node) for s in shares)
        res.static_peak_node_hours = nodes * hours
    return res
