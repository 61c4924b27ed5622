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

from nomadscale.core.durations import format_duration
from nomadscale.core.errors import InputError
from nomadscale.core.files import read_small_text
from nomadscale.core.ports import DemandSeries
from nomadscale.stages.history import MAX_TRACE_BYTES, TraceData, load_trace

#: Rows in a row at the same multiple of the step: the trace changed its step there (a
#: coarser export), not a run of gaps. Shorter runs are read as gaps.
MIXED_STEP_RUN = 12


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


def load_trace_file(path: str | Path) -> TraceData:
    """Read a ``timestamp,requests`` CSV onto its grid, for every command that reads a trace
    file (``backtest``, ``capacity``, a policy's trace demand).

    ``stages.history.load_trace`` parses it; before that, mistakes it would read wrongly get
    their own line: an empty file, a byte-order mark (the reference scorer refuses it as a
    header), a timestamp without a time zone (UTC or local time?); and after it, a trace whose
    step changes (rows from some line on a multiple of the step apart: a coarser export read
    as gaps would count each of its rows as one step's requests)."""
    name = str(path)
    try:
        text = read_small_text(path, limit=MAX_TRACE_BYTES)
    except (OSError, ValueError):  # UnicodeDecodeError too: load_trace words each of them
        return load_trace(path)
    if not text.strip():
        raise InputError(f"{name}: the file is empty (expected the header 'timestamp,requests')")
    if text.startswith("\ufeff"):
        raise InputError(
            f"{name}:1: starts with a byte-order mark (BOM, as spreadsheet 'CSV UTF-8' exports "
            "write); save it as plain UTF-8 CSV"
        )
    data = load_trace(path)  # the header and every row first, in line order
    _check_one_step(data, _row_lines(name, text))
    return data


def _row_lines(name: str, text: str) -> list[int]:
    """Line number of each data row, in order (blank lines are skipped, as ``load_trace``
    skips them); refuses a timestamp without a time zone."""
    out: list[int] = []
    for no, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        out.append(no)
        stamp = line.split(",", 1)[0].strip()
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            continue  # load_trace names the bad timestamp
        if when.tzinfo is None:
            raise InputError(
                f"{name}:{no}: timestamp {stamp!r} has no time zone: write UTC with Z "
                f"({when:%Y-%m-%dT%H:%M:%S}Z) or the offset (+02:00)"
            )
    return out


def _check_one_step(data: TraceData, lines: list[int]) -> None:
    idx = np.flatnonzero(~np.isnan(data.requests))  # grid step of each row, in file order
    gaps = np.diff(idx)
    if len(gaps) < MIXED_STEP_RUN or len(lines) != len(idx):
        return
    # start of each run of equal spacings, and its length
    change = np.flatnonzero(np.diff(gaps) != 0) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(gaps)]]))
    for s, n in zip(starts, lengths, strict=True):
        k = int(gaps[s])
        if k >= 2 and n >= MIXED_STEP_RUN:
            raise InputError(
                f"{data.path}:{lines[s]}: rows from here on are "
                f"{format_duration(k * data.step_s)} apart, but the trace's step is "
                f"{format_duration(data.step_s)} (its closest rows): a trace has one fixed "
                "step, where a missing row is a gap; resample it to one step"
            )


def read_trace(path: str | Path) -> Trace:
    """Read a ``timestamp,requests`` CSV (``load_trace_file``: the same checks and limits as
    the backtest); gaps (absent steps) become NaN."""
    series = load_trace_file(path).series
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
