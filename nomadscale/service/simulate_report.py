"""What ``nomadscale simulate`` measured: the timeline of the twin, the figures, the plot.

The figures come from a piecewise-constant TIMELINE of the twin: the running workers of each
zone and the GCE instances, recorded at every instant the twin's state changes (every timer
it fires and every write the service makes), not sampled now and then. So:

* availability: the share of trace steps (with data) whose demand the workers running
  THROUGHOUT the step serve (the fewest running at any instant of the step, times
  ``rpm_per_worker``). A worker counts from the moment its task runs (after the VM booted
  and pulled the image) until the server stops it (``DesiredStatus`` stop);
* worker-hours and node-hours: the exact integrals over the simulated window. A node is paid
  from the moment its MIG creates it (booting, pulling the image) until it is deleted (after
  its drain), as GCE bills VMs.

Against ``nomadscale backtest`` on the same trace window (SCORING.md protocol) the figures
differ by construction where the twin is more real than the protocol: the protocol lets a
scale-up serve ``lead_time`` after the decision and pays it from the decision, while here new
capacity serves once its VM booted and pulled the image (about 3 minutes in the twin) and is
paid from the resize; a scale-down stops workers at the decision but pays each node until its
drain ends; decisions fire on the wall-clock grid of the policy's cycle (``:00/:20/:40``),
not on the trace's first row; and the fleet is split odd/even over the zones, whole nodes of
``workers_per_node`` each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nomadscale.config.policy import Policy


@dataclass
class Timeline:
    """What ran: from ``t[i]`` (epoch seconds) until ``t[i+1]``, ``running[i]`` workers per
    zone (in ``zones`` order) and ``nodes[i]`` GCE instances (None: no node pool)."""

    zones: tuple[str, ...]
    t: list[float] = field(default_factory=list)
    running: list[tuple[int, ...]] = field(default_factory=list)
    nodes: list[int | None] = field(default_factory=list)
    _cache: np.ndarray | None = field(default=None, repr=False, compare=False)

    def add(self, t: float, running: tuple[int, ...], nodes: int | None) -> None:
        if self.t and t <= self.t[-1]:  # the same instant: its last state is what holds
            self.running[-1], self.nodes[-1] = running, nodes
            return
        if self.running and running == self.running[-1] and nodes == self.nodes[-1]:
            return
        self.t.append(t)
        self.running.append(running)
        self.nodes.append(nodes)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.asarray(self.t, dtype=float)
        total = np.asarray([sum(r) for r in self.running], dtype=float)
        nodes = np.asarray([n if n is not None else 0 for n in self.nodes], dtype=float)
        return t, total, nodes

    def _times(self) -> np.ndarray:
        if self._cache is None or len(self._cache) != len(self.t):
            self._cache = np.asarray(self.t, dtype=float)
        return self._cache

    def integral_h(self, values: np.ndarray, a: float, b: float) -> float:
        """Hours-weighted integral of ``values`` over ``[a, b)``."""
        t = self._times()
        i0 = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
        i1 = max(int(np.searchsorted(t, b, side="left")), i0 + 1)
        edges = np.concatenate([[a], t[i0 + 1 : i1], [b]])
        return float(np.sum(values[i0:i1] * np.diff(edges)) / 3600.0)

    def min_over(self, values: np.ndarray, a: float, b: float) -> float:
        """The lowest value in effect at any instant of ``[a, b)``."""
        t = self._times()
        i0 = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
        i1 = max(int(np.searchsorted(t, b, side="left")), i0 + 1)
        return float(np.min(values[i0:i1]))


class Meter:
    """Moves the twin's clock timer by timer and records, at every instant its state
    changes, the running workers per zone and the GCE instances (``simulate_report``)."""

    def __init__(self, cluster: Any, compute: Any, policy: Policy, *, nodes: bool) -> None:
        self.cluster = cluster
        self.compute = compute
        self.key = (policy.target.namespace, policy.target.job)
        self.groups = [z.group for z in policy.zones.items]
        self.nodes = nodes
        self.timeline = Timeline(zones=tuple(z.name for z in policy.zones.items))

    def record(self) -> None:
        c = self.cluster
        with c.lock:
            per: dict[str, int] = {}
            for a in c.job_allocs(self.key):
                if a.client_status == "running" and a.desired_status == "run":
                    per[a.task_group] = per.get(a.task_group, 0) + 1
            nodes = (
                sum(len(m.instances) for m in self.compute.migs.values()) if self.nodes else None
            )
            self.timeline.add(c.now_s(), tuple(per.get(g, 0) for g in self.groups), nodes)

    def advance(self, seconds: float) -> None:
        """``Cluster.advance``, stopping at every due timer to record what changed."""
        c = self.cluster
        self.record()  # the writes made at this instant
        target = c.now_s() + seconds
        while True:
            nxt = c.next_due()
            if nxt is None or nxt > target:
                break
            c.advance(max(0.0, nxt - c.now_s()))
            self.record()
        left = target - c.now_s()
        if left > 0:
            c.advance(left)
        self.record()


@dataclass
class SimResult:
    policy: str
    start: datetime
    end: datetime
    cycles: int = 0
    applied: int = 0
    failed: int = 0
    availability: float = 0.0  # share of trace steps whose demand was served throughout
    worker_hours: float = 0.0
    node_hours: float | None = 0.0  # None: the policy has no node pool (nodes not scaled)
    static_peak_node_hours: float | None = 0.0
    peak_workers: int = 0
    static_peak_workers: int = 0  # ceil(peak demand / rpm_per_worker), held all the time
    static_peak_worker_hours: float = 0.0
    plot: str | None = None
    note: str = ""  # which policy ran (the built-in one has no maintenance freeze)
    wall_s: float = 0.0
    days_asked: float = 0.0
    step_s: float = 60.0  # the trace's step
    trace: str = ""
    missed: int = 0  # cycles that did not fire: the one before was still running
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    times: list[datetime] = field(default_factory=list, repr=False)  # trace step starts
    demand: list[float] = field(default_factory=list, repr=False)
    capacity: list[float] = field(default_factory=list, repr=False)  # served through the step
    zones: dict[str, list[int]] = field(default_factory=dict, repr=False)  # at step starts
    # (decided at, forecast peak, forecast upper, desired workers, horizon s) per cycle
    forecasts: list[tuple[datetime, float, float, int, float]] = field(
        default_factory=list, repr=False
    )
    timeline: Timeline | None = field(default=None, repr=False)
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the twin's log

    @property
    def days(self) -> float:
        return (self.end - self.start).total_seconds() / 86400

    @property
    def cost_vs_static(self) -> float:
        if self.node_hours is not None and self.static_peak_node_hours:
            return self.node_hours / self.static_peak_node_hours
        if self.node_hours is None and self.static_peak_worker_hours:
            return self.worker_hours / self.static_peak_worker_hours
        return 0.0

    def summary(self) -> dict[str, Any]:
        """The ``--json`` document (every field is listed in ``simulate --help``)."""
        nh, snh = self.node_hours, self.static_peak_node_hours
        return {
            "policy": self.policy,
            "policy_note": self.note,
            "trace": self.trace,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "days": round(self.days, 2),
            "days_asked": self.days_asked,
            "cycles": self.cycles,
            "missed_cycles": self.missed,
            "applied": self.applied,
            "failed": self.failed,
            "skipped": dict(self.skipped),
            "availability": round(self.availability, 4),
            "worker_hours": round(self.worker_hours, 1),
            "node_hours": None if nh is None else round(nh, 1),
            "static_peak_node_hours": None if snh is None else round(snh, 1),
            "static_peak_worker_hours": round(self.static_peak_worker_hours, 1),
            "static_peak_workers": self.static_peak_workers,
            "cost_vs_static_peak": round(self.cost_vs_static, 3),
            "peak_workers": self.peak_workers,
            "notes": list(self.notes),
            "plot": self.plot,
            "wall_seconds": round(self.wall_s, 1),
        }


def measure(
    res: SimResult,
    timeline: Timeline,
    *,
    demand_at: Any,
    step_s: float,
    first_step: datetime,
    rpm: float,
) -> None:
    """Fill ``res``'s figures from ``timeline``: per trace step from ``first_step`` (the
    first step starting at or after ``res.start``) to ``res.end``."""
    t, total, nodes = timeline.arrays()
    a, b = res.start.timestamp(), res.end.timestamp()
    res.worker_hours = timeline.integral_h(total, a, b)
    has_nodes = any(n is not None for n in timeline.nodes)
    res.node_hours = timeline.integral_h(nodes, a, b) if has_nodes else None
    lo = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
    hi = max(int(np.searchsorted(t, b, side="left")), lo + 1)
    res.peak_workers = int(np.max(total[lo:hi]))
    res.timeline = timeline
    res.step_s = step_s
    res.zones = {z: [] for z in timeline.zones}
    served: list[bool] = []
    at = first_step
    while at < res.end:
        s = at.timestamp()
        e = min(s + step_s, b)
        d = float(demand_at(at))
        cap = timeline.min_over(total, s, e) * rpm
        i = max(int(np.searchsorted(t, s, side="right")) - 1, 0)
        for z, n in zip(timeline.zones, timeline.running[i], strict=True):
            res.zones[z].append(n)
        res.times.append(at)
        res.demand.append(d)
        res.capacity.append(cap)
        if not math.isnan(d):
            served.append(cap >= d)
        at += timedelta(seconds=step_s)
    res.availability = sum(served) / len(served) if served else 0.0


def plot(res: SimResult, path: Path, *, rpm: float) -> Path:
    """Demand vs the capacity served through each step vs the forecast band (top), running
    workers per zone and the desired count (bottom); time axis in UTC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(res, rpm=rpm)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def figure(res: SimResult, *, rpm: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    step = timedelta(seconds=res.step_s)
    edges = [*res.times, min(res.times[-1] + step, res.end)] if res.times else []
    if res.forecasts:
        xs: list[datetime] = []
        lo: list[float] = []
        hi: list[float] = []
        for i, (at, peak, upper, _d, _h) in enumerate(res.forecasts):
            until = res.forecasts[i + 1][0] if i + 1 < len(res.forecasts) else res.end
            xs += [at, until]
            lo += [peak, peak]
            hi += [upper, upper]
        ax1.fill_between(xs, lo, hi, color="tab:orange", alpha=0.3, lw=0,
                         label="forecast: peak to upper bound (rpm)")  # fmt: skip
    if res.times:
        ax1.stairs(
            res.demand,
            edges,
            baseline=None,
            color="tab:red",
            lw=1,
            label="demand (rpm, per trace step)",
        )
        ax1.stairs(res.capacity, edges, baseline=None, color="tab:blue", lw=1,
                   label=f"capacity served through the step (rpm, {rpm:g}/worker)")  # fmt: skip
    ax1.set_ylabel("requests / min")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left", fontsize="small")
    nh = "" if res.node_hours is None else f", {res.node_hours:.0f} node-hours"
    ax1.set_title(
        f"{res.policy}: {res.days:.2f} days from {res.start:%Y-%m-%d %H:%M} UTC, availability "
        f"{res.availability:.2%}{nh}, cost {res.cost_vs_static:.0%} of static peak"
    )
    tl = res.timeline
    if tl is not None and tl.t:
        a, b = res.start.timestamp(), res.end.timestamp()
        t = np.asarray(tl.t)
        keep = (t < b) & (np.concatenate([t[1:], [np.inf]]) > a)
        ts = [datetime.fromtimestamp(max(x, a), tz=UTC) for x in t[keep]] + [res.end]
        bottom = np.zeros(int(keep.sum()))
        for j, zone in enumerate(tl.zones):
            vals = np.asarray([r[j] for r, k in zip(tl.running, keep, strict=True) if k], float)
            ax2.stairs(bottom + vals, ts, baseline=bottom, fill=True, alpha=0.6, label=zone)
            bottom = bottom + vals
    if res.forecasts:
        dx = [f[0] for f in res.forecasts] + [res.end]
        ax2.stairs([f[3] for f in res.forecasts], dx, baseline=None, color="black", lw=1,
                   label="desired (decision)")  # fmt: skip
    ax2.set_ylabel("running workers")
    ax2.set_xlabel("time (UTC)")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper left", fontsize="small")
    loc = mdates.AutoDateLocator(tz=UTC)
    ax2.xaxis.set_major_locator(loc)
    ax2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc, tz=UTC))
    fig.tight_layout()
    return fig
