"""Day by day: how wide the forecast errors were, and how much headroom the online calibration
issued, for each development trace (>= 100 scored cycles).

The calibrated quantity is what ``Forecaster`` learns from: per demand step, the multiplier
(in its noise units, see ``stages/forecast.py``) that the step needed on the point forecast to
be served. Per day it prints that quantity's 90% and 99% quantiles, the multiplier the
forecaster issued (mean over the day's cycles, miss-rate feedback included) and the share of
steps above it. The pooled rows compare the warm-up (all the forecaster knows when scoring
starts) with the scored period (what a hindsight-tuned constant is fitted to): where they
differ, no causal calibration can match a constant tuned on the scored period.

    python benchmarks/bench_calibration_days.py [TRACE.csv ...]
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from devtraces import scored_traces

from nomadscale.backtest.protocol import Params
from nomadscale.stages.forecast import ForecastConfig, Forecaster


def needed_and_issued(rate: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray, int]:
    """Per cycle (from the first calibrated one): the steps' needed multipliers (cycles x
    steps) and the multiplier issued for that cycle; and the index of the first scored cycle."""
    cfg = replace(ForecastConfig(), capacity_rpm=p.capacity_rpm, min_workers=p.min_workers)
    f = Forecaster(origin=p.start, step_s=p.step_s, config=cfg)
    needed: list[np.ndarray] = []
    issued: list[float] = []
    update = f.cal.update
    state = {"m": math.nan}

    def record(ratios: np.ndarray, preds: np.ndarray) -> None:
        needed.append(ratios[0].copy())
        issued.append(state["m"])
        update(ratios, preds)

    f.cal.update = record  # type: ignore[method-assign]
    S = p.cycle_steps
    first_scored = None
    for k in range(len(rate) // S):
        if first_scored is None and k * S >= int(p.boundaries[0]):
            first_scored = len(needed)
        state["m"] = float(f.cal.multipliers(cfg.target)[0]) * math.exp(f._offset)
        f.feed(rate[k * S : (k + 1) * S])
    return np.array(needed), np.array(issued), first_scored or len(needed)


def row(label: str, need: np.ndarray, issued: np.ndarray) -> str:
    x = need[np.isfinite(need)]
    if not len(x):
        return f"  {label:16s} (no data)"
    m = issued[np.isfinite(issued)]
    rep = np.repeat(issued, need.shape[1]).reshape(need.shape)
    ok = np.isfinite(need) & np.isfinite(rep)
    miss = float(np.mean(need[ok] > np.maximum(rep[ok], 1.0))) if ok.any() else math.nan
    return (
        f"  {label:16s} steps {len(x):5d}  q90 {np.quantile(x, 0.9):6.3f}  "
        f"q99 {np.quantile(x, 0.99):6.3f}  issued {np.mean(m) if len(m) else math.nan:6.3f}  "
        f"above {miss * 100:5.2f}%"
    )


def main() -> None:
    for path, rate, p in scored_traces(sys.argv[1:]):
        need, issued, s0 = needed_and_issued(rate, p)
        per_day = round(86400 / (p.cycle_steps * p.step_s))
        print(f"{Path(path).name}: {len(need)} calibrated cycles, scoring from cycle {s0}")
        for d in range(math.ceil(len(need) / per_day)):
            sl = slice(d * per_day, (d + 1) * per_day)
            phase = (
                "warm-up" if (d + 1) * per_day <= s0 else "scored" if d * per_day >= s0 else "both"
            )
            print(row(f"day {d:3d} {phase}", need[sl], issued[sl]))
        print(row("pooled warm-up", need[:s0], issued[:s0]))
        print(row("pooled scored", need[s0:], issued[s0:]))


if __name__ == "__main__":
    main()
