"""A trace file as a ``DemandSource``.

Trace CSVs have the header ``timestamp,requests``: ``timestamp`` (ISO-8601, ``Z``) starts a
step, ``requests`` counts the requests that arrived in that step. Demand is reported in
requests per minute. ``shift`` maps the caller's time axis onto the trace's: trace time =
caller time - ``shift`` (the simulator runs "now" in its own virtual week).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries


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


def _ts(path: str, line: int, raw: str) -> datetime:
    try:
        dt = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{path}:{line}: timestamp: not ISO-8601: {raw!r}") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def read_trace(path: str | Path) -> Trace:
    """Read a ``timestamp,requests`` CSV; gaps (absent steps) become NaN."""
    p = str(path)
    try:
        with open(p, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise InputError(f"{p}: cannot read trace: {e.strerror}") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["timestamp", "requests"]:
        raise InputError(f"{p}:1: header must be 'timestamp,requests'")
    times: list[datetime] = []
    counts: list[float] = []
    for i, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise InputError(f"{p}:{i}: expected 2 columns, got {len(row)}")
        times.append(_ts(p, i, row[0]))
        try:
            counts.append(float(row[1]))
        except ValueError:
            raise InputError(f"{p}:{i}: requests: not a number: {row[1]!r}") from None
    if len(times) < 2:
        raise InputError(f"{p}: a trace needs at least 2 rows")
    deltas = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    step = min(deltas)
    if step <= 0:
        raise InputError(f"{p}: timestamps must increase")
    n = round((times[-1] - times[0]).total_seconds() / step) + 1
    rpm = np.full(n, np.nan)
    for t, c in zip(times, counts, strict=True):
        rpm[round((t - times[0]).total_seconds() / step)] = c * 60.0 / step
    return Trace(start=times[0], step_s=step, rpm=rpm)


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
