"""Replay a trace through nomadscale's forecast and sizing stages, causally.

The forecaster is fed the warm-up, then one cycle at a time: the decision at boundary d
sees only the steps that ended at or before d. It is the same ``Forecaster`` the live
``forecast()`` builds, so the backtest measures the code that runs in production.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from nomadscale.backtest.anchors import anchor_decisions, tuned_decisions
from nomadscale.backtest.outputs import write_files
from nomadscale.backtest.protocol import Metrics, Params, oracle, score
from nomadscale.core.values import Forecast
from nomadscale.stages.forecast import ForecastConfig, Forecaster
from nomadscale.stages.sizing import Bounds, size


@dataclass
class Replay:
    """nomadscale's decisions per boundary, with the forecasts behind them."""

    decisions: np.ndarray
    peak: np.ndarray
    upper: np.ndarray
    models: list[str] = field(default_factory=list)
    capped: int = 0  # cycles where bounds.max held the count below what the forecast needs


def replay(
    rate: np.ndarray, p: Params, *, config: ForecastConfig, bounds: Bounds | None = None
) -> Replay:
    bounds = bounds or Bounds(min=p.min_workers)
    if config.capacity_rpm is None:
        config = replace(config, capacity_rpm=p.capacity_rpm, min_workers=bounds.min)
    f = Forecaster(origin=p.start, step_s=p.step_s, config=config)
    b = p.boundaries
    nb = len(b)
    dec = np.zeros(nb, dtype=np.int64)
    peak = np.zeros(nb)
    upper = np.zeros(nb)
    models: list[str] = []
    f.feed(rate[: int(b[0])])
    # every forecast is made when its bucket closes, from buckets that ended before it
    fcs = [f.predict(), *f.feed(rate[int(b[0]) : int(b[-1])])]
    current: int | None = None
    last_scale: datetime | None = None
    capped = 0
    for i in range(nb):
        d = int(b[i])
        fc: Forecast = fcs[i]
        now = p.time_of(d)
        hours_min = fc.meta.get("min_workers")  # business hours may raise the minimum
        bd = bounds
        if isinstance(hours_min, int) and hours_min > bounds.min:
            bd = replace(bounds, min=hours_min, max=max(bounds.max, hours_min))
        s = size(
            forecast=fc,
            capacity_rpm=p.capacity_rpm,
            current=current,
            bounds=bd,
            now=now,
            last_scale_at=last_scale,
        )
        if current is not None and s.count != current:
            last_scale = now
        current = s.count
        capped += "max" in s.bounds_hit
        dec[i] = s.count
        peak[i] = fc.peak
        upper[i] = fc.upper
        models.append(fc.model)
    return Replay(decisions=dec, peak=peak, upper=upper, models=models, capped=capped)


@dataclass
class Report:
    params: Params
    rows: dict[str, Metrics]
    decisions: dict[str, np.ndarray]
    replay: Replay


def run_backtest(
    rate: np.ndarray,
    p: Params,
    *,
    config: ForecastConfig,
    bounds: Bounds | None = None,
    anchors: bool = True,
) -> Report:
    rep = replay(rate, p, config=config, bounds=bounds)
    orc = oracle(rate, p)
    rows_dec: dict[str, np.ndarray] = {"nomadscale": rep.decisions, "oracle": orc}
    if anchors:
        rows_dec.update(anchor_decisions(rate, p))
        rows_dec.update(tuned_decisions(rate, p, target=config.target))
    base = score(rate, orc, p, ideal=True).worker_hours
    rows: dict[str, Metrics] = {}
    for name, d in rows_dec.items():
        m = score(rate, d, p, ideal=(name == "oracle"))
        rows[name] = Metrics(
            m.availability, m.served, m.worker_hours, m.worker_hours / base if base else math.nan
        )
    return Report(params=p, rows=rows, decisions=rows_dec, replay=rep)


def decisions_csv(p: Params, decisions: np.ndarray) -> str:
    """``decided_at,workers``, one row per boundary (the reference scorer's decisions file)."""
    lines = ["decided_at,workers"]
    for d, n in zip(p.boundaries, decisions, strict=True):
        t = p.time_of(int(d)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"{t},{int(n)}")
    return "\n".join(lines) + "\n"


def write_decisions(path: str | Path, p: Params, decisions: np.ndarray) -> None:
    """Write :func:`decisions_csv` to ``path`` atomically (never half a file)."""
    write_files([("", path, decisions_csv(p, decisions).encode("utf-8"))])
