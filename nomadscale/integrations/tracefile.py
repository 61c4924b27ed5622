"""A trace file as a ``DemandSource``.

Trace CSVs have the header ``timestamp,requests``: ``timestamp`` (ISO-8601, ``Z``) starts a
step, ``requests`` counts the requests that arrived in that step. Demand is reported in
requests per minute. ``shift`` maps the caller's time axis onto the trace's: trace time =
caller time - ``shift`` (the simulator runs "now" in its own virtual week).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries
from nomadscale.stages.history import load_trace


@dataclass(frozen=True)
class Trace:
    start: datetime
    step_s: float
    rpm: np.ndarray  # requests per minute per step; NaN = gap

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.step_s * len(self.rpm))

    @property
    def duration_s(self) -> float:
        return self.step_s * len(self.rpm)


def read_trace(path: str | Path) -> Trace:
    """Read a ``timestamp,requests`` CSV (``stages.history.load_trace``: the same checks and
    limits as the backtest); gaps (absent steps) become NaN."""
    series = load_trace(path).series
    return Trace(start=series.start, step_s=series.step_s, rpm=np.asarray(series.values))


class TraceDemandSource:
    """``DemandSource`` reading a trace file (in memory after the first read)."""

    def __init__(
        self,
        path: str | Path,
        *,
        shift: timedelta = timedelta(0),
        max_lookback_s: float | None = None,
    ) -> None:
        self.path = str(path)
        self.trace = read_trace(path)
        self.shift = shift
        self.max_lookback_s = max_lookback_s

    def __repr__(self) -> str:
        return f"TraceDemandSource({self.path!r}, shift={self.shift})"

    def rpm_at(self, when: datetime) -> float:
        """Demand (rpm) of the trace step covering ``when`` (caller's time axis)."""
        tr = self.trace
        i = math.floor(((when - self.shift) - tr.start).total_seconds() / tr.step_s)
        if 0 <= i < len(tr.rpm):
            return float(tr.rpm[i])
        return float("nan")

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        if step_s <= 0 or lookback_s <= 0:
            raise InputError("trace demand: step and lookback must be positive")
        tr = self.trace
        end_tr = end - self.shift
        offset = (end_tr - tr.start).total_seconds()
        last = math.floor(offset / step_s)  # steps that ended at or before `end`
        if self.max_lookback_s is not None:
            lookback_s = min(lookback_s, self.max_lookback_s)
        n = max(0, int(lookback_s // step_s))
        first = max(last - n, min(0, last))  # nothing before the trace starts
        start = tr.start + timedelta(seconds=first * step_s) + self.shift
        # Sample each output step at up to k points and average what the trace covers.
        k = max(1, math.ceil(step_s / tr.step_s))
        idx = np.arange(first, last, dtype=float)
        subs = (idx[:, None] + (np.arange(k)[None, :] + 0.5) / k) * step_s
        ti = np.floor(subs / tr.step_s).astype(np.int64)
        valid = (ti >= 0) & (ti < len(tr.rpm))
        vals = np.where(valid, tr.rpm[np.clip(ti, 0, len(tr.rpm) - 1)], np.nan)
        with np.errstate(all="ignore"):
            counted = np.sum(~np.isnan(vals), axis=1)
            sums = np.nansum(vals, axis=1)
            out = np.where(counted > 0, sums / np.maximum(counted, 1), np.nan)
        return DemandSeries(start=start, step_s=step_s, values=out.astype(float))


def read_time(demand: object, now: datetime) -> datetime:
    """When ``demand`` is read at ``now``: ``now``, except for a trace that ends before it (a
    trace-based policy run against the wall clock), read right after its last step: at
    ``now`` it would hold no recent data. ``plan``, ``forecast`` and the rollout's planning
    read it so."""
    if isinstance(demand, TraceDemandSource):
        return min(now, demand.trace.end + demand.shift)
    return now
