"""Test data for the real Prometheus: series, OpenMetrics text, traces as series.

Convention (what ``series_from_trace`` produces and what a range query gives back):

* one sample per trace row, stamped at the step's START timestamp (the row's ``timestamp``);
* value = requests per minute over that step: ``requests * 60 / step_s`` (so the 1-min trace
  keeps its counts, the 5-min ELB trace is divided by 5);
* a row absent from the trace (a gap) is no sample at all, so with the harness' short
  ``--query.lookback-delta`` a ``query_range`` on the trace grid returns NaN there.

``query_range(name, start=<first row>, end=<last row>, step_s=<trace step>)`` therefore
returns the trace's per-minute values exactly, with NaN at the gaps, and the DemandSeries
convention (``values[i]`` covers ``[start + i*step, +step)``) holds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

TRACES = Path(__file__).resolve().parent.parent / "data"  # real traces, see ATTRIBUTION.md


@dataclass(frozen=True)
class Series:
    """One Prometheus series. ``timestamps`` in Unix seconds; NaN values are left out."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    timestamps: Sequence[float] | np.ndarray = ()
    values: Sequence[float] | np.ndarray = ()

    def __post_init__(self) -> None:
        if len(self.timestamps) != len(self.values):
            raise ValueError(
                f"series {self.name}: {len(self.timestamps)} timestamps but "
                f"{len(self.values)} values"
            )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def openmetrics_text(series: Iterable[Series]) -> str:
    """OpenMetrics exposition of ``series`` (grouped per metric family, ``# EOF`` at the end)."""
    by_name: dict[str, list[Series]] = {}
    for s in series:
        by_name.setdefault(s.name, []).append(s)
    lines: list[str] = []
    for name, group in by_name.items():
        lines.append(f"# TYPE {name} gauge")
        for s in group:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(s.labels.items()))
            head = f"{name}{{{label_text}}}" if label_text else name
            for ts, v in zip(s.timestamps, s.values, strict=True):
                fv = float(v)
                if math.isnan(fv):
                    continue
                lines.append(f"{head} {fv!r} {float(ts)!r}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()


@dataclass(frozen=True)
class Trace:
    """A trace file read as is: row timestamps (s), request counts, and its fixed step."""

    timestamps: np.ndarray
    requests: np.ndarray
    step_s: float

    def grid(self) -> np.ndarray:
        """Requests per minute on the full step grid from first to last row, NaN at gaps."""
        n = int(np.rint((self.timestamps[-1] - self.timestamps[0]) / self.step_s)) + 1
        out = np.full(n, np.nan)
        idx = np.rint((self.timestamps - self.timestamps[0]) / self.step_s).astype(int)
        out[idx] = self.requests * 60.0 / self.step_s
        return out


def read_trace(csv_path: str | Path, *, rows: slice | None = None) -> Trace:
    """Read a ``timestamp,requests`` trace; ``rows`` keeps a slice of the rows."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        data = [(_parse_ts(r["timestamp"]), float(r["requests"])) for r in reader]
    if rows is not None:
        data = data[rows]
    if len(data) < 2:
        raise ValueError(f"{csv_path}: need at least two rows")
    ts = np.array([d[0] for d in data])
    step = float(np.min(np.diff(ts)))
    return Trace(timestamps=ts, requests=np.array([d[1] for d in data]), step_s=step)


def series_from_trace(
    csv_path: str | Path,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    rows: slice | None = None,
) -> Series:
    """The trace as a requests-per-minute series (see the module docstring)."""
    tr = read_trace(csv_path, rows=rows)
    return Series(
        name=name,
        labels=dict(labels or {}),
        timestamps=tr.timestamps,
        values=tr.requests * 60.0 / tr.step_s,
    )
