"""Speed/memory: a backtest of one year of 1-minute data (525,600 steps, the bundled trace's
daily shape tiled and interpolated to 1 min), 20-min cycles, five weeks of lookback.
Prints seconds and peak RSS."""

from __future__ import annotations

import resource
import time
from datetime import timedelta

import numpy as np

from nomadscale.backtest.protocol import make_params
from nomadscale.backtest.runner import run_backtest
from nomadscale.data import bundled_trace_path
from nomadscale.stages.forecast import ForecastConfig
from nomadscale.stages.history import TraceData, load_trace


def year_of_minutes() -> TraceData:
    src = load_trace(bundled_trace_path())
    per_min = src.requests / (src.step_s / 60.0)
    x = np.arange(len(per_min) * int(src.step_s / 60))
    base = np.interp(x, np.arange(len(per_min)) * (src.step_s / 60.0), per_min)
    reps = int(np.ceil(525_600 / len(base)))
    rng = np.random.default_rng(7)
    year = np.tile(base, reps)[:525_600] * rng.lognormal(0.0, 0.1, 525_600)
    year[rng.random(525_600) < 0.001] = np.nan  # scattered gaps
    return TraceData(path="year-1min", start=src.start, step_s=60.0, requests=year)


def main() -> None:
    tr = year_of_minutes()
    rate = tr.series.values
    p = make_params(tr, start=tr.start + timedelta(days=35))
    t0, c0 = time.perf_counter(), time.process_time()
    rep = run_backtest(rate, p, config=ForecastConfig(), anchors=False)
    t1, c1 = time.perf_counter(), time.process_time()
    rep_all = run_backtest(rate, p, config=ForecastConfig(), anchors=True)
    t2 = time.perf_counter()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = rep.rows["nomadscale"]
    print(f"steps {len(rate)}, cycles scored {len(p.boundaries)}, lookback 35 days")
    print(
        f"nomadscale backtest: {t1 - t0:.2f} s wall, {c1 - c0:.2f} s CPU (availability {m.availability * 100:.2f}%, "
        f"cost/oracle {m.cost_vs_oracle:.3f})"
    )
    print(f"with anchors + tuned anchors: {t2 - t1:.2f} s ({len(rep_all.rows)} rows)")
    print(f"peak RSS: {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
