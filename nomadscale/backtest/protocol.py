"""The scoring protocol (SCORING.md): parameters, replay of worker counts, the oracle.

Capacity per worker = p99 of the demand rate / 24; a decision every cycle from the end of a
warm-up of min(7 days, 35% of the trace) rounded up to a cycle; a count above the current
one serves from ``lead`` after the boundary but is paid from the boundary; at least
``min_workers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from nomadscale.core.durations import format_duration
from nomadscale.core.errors import InputError, UsageError
from nomadscale.stages.history import TraceData

PEAK_WORKERS = 24


@dataclass(frozen=True)
class Params:
    start: datetime
    step_s: float
    capacity_rpm: float
    cycle_steps: int
    lead_steps: int
    warmup_steps: int
    boundaries: np.ndarray  # step index of each decision
    min_workers: int

    @property
    def step_min(self) -> float:
        return self.step_s / 60.0

    def time_of(self, step: int) -> datetime:
        return self.start + timedelta(seconds=self.step_s * int(step))


@dataclass(frozen=True)
class Metrics:
    availability: float
    served: float
    worker_hours: float
    cost_vs_oracle: float = math.nan


def make_params(
    trace: TraceData,
    *,
    cycle_s: float = 1200,
    lead_s: float = 600,
    min_workers: int = 2,
    capacity_rpm: float | None = None,
    start: datetime | None = None,
) -> Params:
    step_s = trace.step_s
    for what, v in (("cycle", cycle_s), ("lead", lead_s)):
        if abs(v / step_s - round(v / step_s)) > 1e-9:
            raise InputError(
                f"{trace.path}: {what} {format_duration(v)} is not a multiple of the trace step "
                f"{format_duration(step_s)}"
            )
    cyc = round(cycle_s / step_s)
    lead = round(lead_s / step_s)
    rate = trace.requests / (step_s / 60.0)
    if not np.any(~np.isnan(rate)):
        raise InputError(f"{trace.path}: no data")
    _check_median_step(trace)
    cap = capacity_rpm if capacity_rpm is not None else float(np.nanpercentile(rate, 99)) / 24
    if not cap > 0:
        raise InputError(f"{trace.path}: capacity per worker must be positive (p99 demand is 0)")
    n = len(rate)
    if start is None:
        warm = _warmup(n, cyc, step_s)
        if warm == 0 or warm + cyc > n:
            need = next(m for m in range(2, 4 * cyc + 8) if 0 < _warmup(m, cyc, step_s) <= m - cyc)
            raise InputError(
                f"{trace.path}: too short for a backtest: {n} steps of {format_duration(step_s)}; "
                f"the warm-up (35% of the trace, at most 7 days, rounded up to a "
                f"{format_duration(cycle_s)} cycle) and one cycle after it need {need} steps"
            )
    else:
        warm = _start_step(trace, start, n=n, cyc=cyc)
    bounds = np.arange(warm, n - cyc + 1, cyc)
    return Params(
        start=trace.start,
        step_s=step_s,
        capacity_rpm=cap,
        cycle_steps=cyc,
        lead_steps=lead,
        warmup_steps=warm,
        boundaries=bounds,
        min_workers=min_workers,
    )


def _warmup(n: int, cyc: int, step_s: float) -> int:
    """SCORING.md: min(7 days, 35% of the trace), rounded up to a whole cycle."""
    warm = min(int(7 * 86400 / step_s), int(0.35 * n))
    return int(math.ceil(warm / cyc) * cyc)


def _check_median_step(trace: TraceData) -> None:
    """The reference scorer takes the median spacing of the rows as the step; where most rows
    are more than one step apart it would read another grid than ours."""
    spacing = np.diff(np.flatnonzero(~np.isnan(trace.requests)))
    if len(spacing) and float(np.median(spacing)) != 1.0:
        raise InputError(
            f"{trace.path}: most rows are more than one step apart (median spacing "
            f"{format_duration(float(np.median(spacing)) * trace.step_s)}, smallest "
            f"{format_duration(trace.step_s)}): the scoring protocol takes the median spacing "
            "as the step; fill the gaps or resample the trace to one step"
        )


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _start_step(trace: TraceData, start: datetime, *, n: int, cyc: int) -> int:
    """The step of the first decision at ``--start``: a cycle boundary (every cycle from the
    trace's first row) with at least one cycle of history before it and one to score."""
    step = trace.step_s
    end = trace.start + timedelta(seconds=step * n)
    if n // cyc < 2:
        raise InputError(
            f"{trace.path}: too short for a backtest: {n} steps of {format_duration(step)}, "
            f"less than a {format_duration(step * cyc)} cycle of history and one to score"
        )
    at = f"--start {_iso(start)}"
    span = f"the trace, which runs from {_iso(trace.start)} to {_iso(end)}"
    off = (start - trace.start).total_seconds() / step
    if off < 0:
        raise UsageError(f"{at}: before {span}")
    if off >= n:
        raise UsageError(f"{at}: after {span}")
    k = off / cyc
    if abs(k - round(k)) > 1e-9:
        lo, hi = (
            trace.start + timedelta(seconds=step * cyc * c) for c in (math.floor(k), math.ceil(k))
        )
        raise UsageError(
            f"{at}: not on a cycle boundary (every {format_duration(step * cyc)} from "
            f"{_iso(trace.start)}): use {_iso(lo)} or {_iso(hi)}"
        )
    warm = round(k) * cyc
    if warm == 0:
        first = trace.start + timedelta(seconds=step * cyc)
        raise UsageError(
            f"{at}: leaves no history before the first decision; start at {_iso(first)} or later"
        )
    if warm + cyc > n:
        last = trace.start + timedelta(seconds=step * ((n // cyc) - 1) * cyc)
        raise UsageError(
            f"{at}: leaves no whole cycle to score before the trace ends at {_iso(end)}; "
            f"start at {_iso(last)} or earlier"
        )
    return warm


def effective_workers(
    decisions: np.ndarray, p: Params, *, ideal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Workers serving and workers paid per scored step."""
    n = np.maximum(np.asarray(decisions, dtype=np.int64), p.min_workers)
    cyc, lead = p.cycle_steps, p.lead_steps
    paid = np.repeat(n, cyc).astype(float)
    eff = paid.reshape(-1, cyc).copy()
    if not ideal and lead and len(n) > 1:
        prev = n[:-1]
        up = n[1:] > prev
        rows = np.nonzero(up)[0] + 1
        eff[rows, :lead] = prev[up][:, None]
    return eff.ravel(), paid


def score(rate: np.ndarray, decisions: np.ndarray, p: Params, *, ideal: bool = False) -> Metrics:
    eff, paid = effective_workers(decisions, p, ideal=ideal)
    b0 = int(p.boundaries[0])
    r = rate[b0 : b0 + len(eff)]
    ok = ~np.isnan(r)
    cap = eff * p.capacity_rpm
    avail = float(np.mean(r[ok] <= cap[ok] + 1e-9)) if ok.any() else 1.0
    served = float(np.sum(np.minimum(r[ok], cap[ok])) / max(float(np.sum(r[ok])), 1e-9))
    return Metrics(avail, served, float(np.sum(paid) * p.step_min / 60.0))


def window_peaks(rate: np.ndarray, p: Params) -> np.ndarray:
    """Peak demand of each scored cycle (0 for a cycle with no data)."""
    b0 = int(p.boundaries[0])
    w = rate[b0 : b0 + len(p.boundaries) * p.cycle_steps].reshape(-1, p.cycle_steps)
    with np.errstate(invalid="ignore"):
        filled = np.where(np.isnan(w), -np.inf, w)
    pk = filled.max(axis=1)
    return np.where(np.isfinite(pk), pk, 0.0)


def counts(demand: np.ndarray, mult: float, cap: float) -> np.ndarray:
    return np.ceil(np.asarray(demand) * mult / cap - 1e-9).astype(np.int64)


def oracle(rate: np.ndarray, p: Params) -> np.ndarray:
    return np.maximum(counts(window_peaks(rate, p), 1.0, p.capacity_rpm), p.min_workers)
