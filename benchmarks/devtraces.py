"""What the quality benchmarks share: the development traces, the ones the quality target
counts (at least 100 scored cycles under SCORING.md), and the cheapest ``tuned:`` anchor of
a backtest report."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from nomadscale.backtest.protocol import Metrics, Params, make_params
from nomadscale.stages.history import load_trace

TRACES = Path("/work/shared/traces")
MIN_CYCLES = 100


def trace_files(argv: Sequence[str]) -> list[str]:
    """The traces named on the command line, else every development trace."""
    return list(argv) or sorted(str(p) for p in TRACES.glob("*.csv"))


def scored_traces(argv: Sequence[str]) -> Iterator[tuple[str, np.ndarray, Params]]:
    """(path, demand rate, scoring params) of each trace with enough scored cycles."""
    for path in trace_files(argv):
        tr = load_trace(path)
        p = make_params(tr)
        if len(p.boundaries) >= MIN_CYCLES:
            yield path, tr.series.values, p


def cheapest_tuned(rows: Mapping[str, Metrics]) -> tuple[str, float]:
    """Name and cost/oracle of the cheapest hindsight-tuned anchor ("none", inf if absent)."""
    tuned = [(r.cost_vs_oracle, k) for k, r in rows.items() if k.startswith("tuned:")]
    best, name = min(tuned) if tuned else (float("inf"), "none")
    return name, best
