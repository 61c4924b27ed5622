"""Demand history: reading trace files and validating demand series.

A trace is a CSV ``timestamp,requests`` with one row per fixed step (``timestamp`` = start of
the step, ISO-8601, ``Z`` or offset). A missing row is a gap (NaN), not a zero. The demand
rate of a step is ``requests / step minutes`` (req/min). Errors name the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from nomadscale.core.errors import InputError
from nomadscale.core.files import read_small_text
from nomadscale.core.ports import DemandSeries

#: Largest trace file read (about two million 1-minute rows: nearly four years).
MAX_TRACE_BYTES = 64 * 1024 * 1024
#: Largest time grid a trace may span (gaps included): 7.6 years of 1-minute steps.
MAX_GRID_STEPS = 4_000_000


@dataclass(frozen=True)
class TraceData:
    """A trace on its fixed grid: ``requests[i]`` counts [start + i*step, +step); NaN = gap."""

    path: str
    start: datetime
    step_s: float
    requests: np.ndarray

    @property
    def series(self) -> DemandSeries:
        """Demand rate in requests per minute."""
        return DemandSeries(
            start=self.start, step_s=self.step_s, values=self.requests / (self.step_s / 60.0)
        )

    @property
    def gaps(self) -> int:
        return int(np.count_nonzero(np.isnan(self.requests)))


def _parse_time(text: str) -> datetime:
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def load_trace(path: str | Path) -> TraceData:
    """Read a ``timestamp,requests`` CSV; raise InputError("file:line: what is wrong")."""
    name = str(path)
    try:
        text = read_small_text(path, limit=MAX_TRACE_BYTES)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise InputError(f"{name}: not a text (UTF-8) CSV file") from None
    except ValueError as e:
        if str(e).startswith("file too large"):
            raise InputError(
                f"{name}: trace is larger than the {MAX_TRACE_BYTES // 2**20} MiB nomadscale "
                "reads (about 2 million rows); cut it to the period you need"
            ) from None
        raise InputError(f"{name}: {e}") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    lines = text.splitlines()
    if not lines or [c.strip().lower() for c in lines[0].split(",")[:2]] != [
        "timestamp",
        "requests",
    ]:
        raise InputError(f"{name}:1: header must be 'timestamp,requests'")
    secs: list[float] = []
    vals: list[float] = []
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) < 2:
            raise InputError(f"{name}:{no}: expected 'timestamp,requests', got {line.strip()!r}")
        try:
            t = _parse_time(parts[0])
        except ValueError:
            raise InputError(f"{name}:{no}: bad timestamp {parts[0].strip()!r}") from None
        try:
            v = float(parts[1])
        except ValueError:
            raise InputError(
                f"{name}:{no}: requests is not a number: {parts[1].strip()!r}"
            ) from None
        if not np.isfinite(v):
            raise InputError(f"{name}:{no}: requests must be finite, got {parts[1].strip()!r}")
        if v < 0:
            raise InputError(f"{name}:{no}: requests must not be negative, got {v:g}")
        ts = t.timestamp()
        if secs and ts <= secs[-1]:
            raise InputError(
                f"{name}:{no}: timestamp {parts[0].strip()} is not after the previous row"
            )
        secs.append(ts)
        vals.append(v)
    if len(secs) < 2:
        raise InputError(f"{name}: needs at least 2 data rows, found {len(secs)}")
    tsec = np.asarray(secs)
    diffs = np.diff(tsec)
    step = float(np.median(diffs))  # as the reference scorer; the smallest if that is off-grid
    if diffs.min() < step * (1 - 1e-9) or np.any(
        np.abs(diffs / step - np.rint(diffs / step)) > 1e-6
    ):
        step = float(diffs.min())
    offs = (tsec - tsec[0]) / step
    idx = np.rint(offs).astype(np.int64)
    bad = np.nonzero(np.abs(offs - idx) > 1e-6)[0]
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"{name}:{i + 2}: timestamp is off the {step:g}s grid started by the first row"
        )
    if int(idx[-1]) + 1 > MAX_GRID_STEPS:
        raise InputError(
            f"{name}: the rows span {int(idx[-1]) + 1:,} steps of {step:g}s, more than "
            f"{MAX_GRID_STEPS:,}; check the timestamps or cut the trace"
        )
    grid = np.full(int(idx[-1]) + 1, np.nan)
    grid[idx] = np.asarray(vals)
    start = datetime.fromtimestamp(secs[0], tz=UTC)
    return TraceData(path=name, start=start, step_s=step, requests=grid)


def clean(series: DemandSeries, *, cumulative: bool = False) -> DemandSeries:
    """Validate a demand series; return a float copy.

    Negative or infinite values raise InputError (NaN is a gap and is kept). With
    ``cumulative=True`` the values are a monotonic counter: they are differenced, and a drop
    (a counter reset) counts the new value as the increase since the reset.
    """
    if series.step_s <= 0:
        raise InputError(f"demand series: step must be positive, got {series.step_s:g}s")
    v = np.asarray(series.values, dtype=float)
    if v.ndim != 1:
        raise InputError("demand series: values must be one-dimensional")
    if np.isinf(v).any():
        i = int(np.nonzero(np.isinf(v))[0][0])
        raise InputError(f"demand series: value at {_at(series, i)} is not finite")
    neg = np.nonzero(v < 0)[0]
    if len(neg):
        i = int(neg[0])
        raise InputError(f"demand series: value at {_at(series, i)} is negative ({v[i]:g})")
    if cumulative:
        d = np.full_like(v, np.nan)
        if len(v) > 1:
            diff = v[1:] - v[:-1]
            d[1:] = np.where(diff < 0, v[1:], diff)  # reset: counter restarted from zero
        v = d / (series.step_s / 60.0)
    return DemandSeries(start=series.start, step_s=series.step_s, values=v.copy())


def _at(series: DemandSeries, i: int) -> str:
    return (series.start + timedelta(seconds=series.step_s * i)).isoformat()
