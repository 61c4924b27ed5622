"""Robustness: nomadscale's defaults on sub-windows of every development trace.

The quality target is also checked on traces the team does not have. Sub-windows (later
starts, and 10-day cuts) stand in for them: each has its own warm-up (SCORING.md's rule), its
own capacity unit and its own hindsight-tuned anchors. Prints, per window, availability,
cost/oracle against the cheapest tuned anchor, and a summary: OK (>= target and no dearer
than that anchor), LOW (below the target) or COST (dearer).

    python benchmarks/bench_windows.py [TRACE.csv ...]
"""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
from devtraces import MIN_CYCLES, cheapest_tuned, trace_files

from nomadscale.backtest.protocol import make_params
from nomadscale.backtest.runner import run_backtest
from nomadscale.core.errors import InputError
from nomadscale.stages.forecast import ForecastConfig
from nomadscale.stages.history import load_trace


def main() -> None:
    cfg = ForecastConfig()
    tally = {"OK": 0, "LOW": 0, "COST": 0}
    avails: list[float] = []
    ratios: list[float] = []
    for path in trace_files(sys.argv[1:]):
        tr = load_trace(path)
        n, day = len(tr.requests), round(86400 / tr.step_s)
        seen: set[tuple[int, int]] = set()
        print(Path(path).name)
        for cut in range(0, max(n - 5 * day, 0), max(day, (n - 5 * day) // 8)):
            for length in (n - cut, min(n - cut, 10 * day)):
                if (cut, length) in seen:
                    continue
                seen.add((cut, length))
                sub = dataclasses.replace(
                    tr,
                    requests=tr.requests[cut : cut + length],
                    start=tr.start + timedelta(seconds=cut * tr.step_s),
                )
                try:
                    p = make_params(sub)
                except InputError:
                    continue
                if len(p.boundaries) < MIN_CYCLES:
                    continue
                rate = sub.requests / (tr.step_s / 60.0)
                rep = run_backtest(rate, p, config=cfg, anchors=True)
                m = rep.rows["nomadscale"]
                best = cheapest_tuned(rep.rows)[1]
                ok_a = m.availability >= cfg.target
                verdict = "OK" if ok_a and m.cost_vs_oracle <= best else "COST" if ok_a else "LOW"
                tally[verdict] += 1
                avails.append(m.availability)
                ratios.append(m.cost_vs_oracle / best)
                print(
                    f"  from day {cut // day:3d}, {length // day:3d} days: "
                    f"avail {m.availability * 100:6.2f}%  cost/oracle {m.cost_vs_oracle:6.3f}  "
                    f"cheapest tuned {best:6.3f}  {verdict}"
                )
    if avails:
        print(
            f"windows {len(avails)}: {tally}; availability min {min(avails) * 100:.2f}% "
            f"median {np.median(avails) * 100:.2f}%; cost / cheapest tuned anchor median "
            f"{np.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
