"""How much of the cost is the forecast and how much the online headroom, per trace.

For every development trace (>= 100 scored cycles) prints nomadscale's online result next to
two hindsight figures on the same point forecasts:

* ``hindsight x``: the smallest constant multiplier on nomadscale's point forecast that
  reaches the target on this very trace, and its cost/oracle. No online calibration can do
  better than this with a constant multiplier: it is the cost floor of the forecast itself.
* the cheapest ``tuned:`` anchor (also tuned in hindsight).

``floor/anchor`` below 1 is the room the online calibration has to beat the anchor; the gap
between ``online`` and ``floor`` is what learning the headroom causally costs.

    python benchmarks/bench_headroom.py [TRACE.csv ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from devtraces import cheapest_tuned, scored_traces

from nomadscale.backtest.protocol import Params, counts, score
from nomadscale.backtest.runner import run_backtest
from nomadscale.stages.forecast import ForecastConfig


def hindsight_multiplier(
    rate: np.ndarray, p: Params, peak: np.ndarray, *, target: float
) -> float | None:
    """Smallest multiplier on ``peak`` (to 0.1%) whose counts reach ``target``."""

    def ok(m: float) -> bool:
        return score(rate, counts(peak, m, p.capacity_rpm), p).availability >= target

    lo, hi = 0.1, 100.0
    if not ok(hi):
        return None
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def main() -> None:
    cfg = ForecastConfig()
    print(
        f"{'trace':40s} {'online':>15s} {'hindsight x':>12s} {'floor':>7s} "
        f"{'cheapest tuned':>30s} {'floor/anchor':>12s}"
    )
    for path, rate, p in scored_traces(sys.argv[1:]):
        rep = run_backtest(rate, p, config=cfg, anchors=True)
        base = rep.rows["oracle"].worker_hours
        m = rep.rows["nomadscale"]
        name, best = cheapest_tuned(rep.rows)
        peak = np.maximum(rep.replay.peak, 0.0)
        mult = hindsight_multiplier(rate, p, peak, target=cfg.target)
        if mult is None:
            floor_txt, ratio_txt, floor = "-", "-", float("nan")
        else:
            d = np.maximum(counts(peak, mult, p.capacity_rpm), p.min_workers)
            floor = score(rate, d, p).worker_hours / base
            floor_txt, ratio_txt = f"x{mult:.3f}", f"{floor / best:.3f}"
        print(
            f"{Path(path).name:40s} {m.availability * 100:6.2f}% {m.cost_vs_oracle:7.3f} "
            f"{floor_txt:>12s} {floor:7.3f} {name:>24s} {best:5.3f} {ratio_txt:>12s}"
        )


if __name__ == "__main__":
    main()
