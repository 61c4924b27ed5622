"""The anchor strategies every result is compared with (nomadscale's own implementation).

* static-peak: the warm-up history's peak, +20%.
* reactive-target: nomad-autoscaler target-value tracking at 70% of the last 10 min mean.
* seed-slope: least-squares slope of the last 2 h extrapolated to the end of the next
  window (never below the last value), +10%: the eKYC team's first autoscaler.
* dyte-weighted: 0.5 x last hour mean + 0.3 x same window yesterday + 0.2 x same window
  last week (peaks), +10%.

``tuned`` rows give each anchor, in hindsight, the smallest multiplier reaching the target
availability on the trace being scored.
"""

from __future__ import annotations

import numpy as np

from nomadscale.backtest.protocol import Params, counts, score

DEFAULT_MULT = {
    "static-peak": 1.2,
    "reactive-target": 1 / 0.7,
    "seed-slope": 1.1,
    "dyte-weighted": 1.1,
}
TUNE_GRID = np.concatenate([np.arange(0.5, 3, 0.02), np.arange(3, 40, 0.25)])


def _mean_valid(w: np.ndarray) -> float | None:
    w = w[~np.isnan(w)]
    return float(w.mean()) if len(w) else None


def predictions(rate: np.ndarray, p: Params) -> dict[str, np.ndarray]:
    """Demand (req/min) each anchor provisions for, before its headroom, per boundary."""
    sm = p.step_min
    cyc, lead = p.cycle_steps, p.lead_steps
    b = p.boundaries
    day, week, hour = int(1440 / sm), int(10080 / sm), max(1, int(60 / sm))
    ten, two_h = max(1, int(10 / sm)), int(120 / sm)
    static = np.full(len(b), float(np.nanmax(rate[: b[0]])))
    react = np.zeros(len(b))
    slope = np.zeros(len(b))
    dyte = np.zeros(len(b))
    for i, d in enumerate(b):
        d = int(d)
        react[i] = _mean_valid(rate[max(0, d - ten) : d]) or 0.0
        h = rate[max(0, d - two_h) : d]
        ok = ~np.isnan(h)
        if ok.sum() >= 2:
            x = np.arange(len(h), dtype=float)[ok]
            y = h[ok]
            xm, ym = x.mean(), y.mean()
            m = float(np.sum((x - xm) * (y - ym)) / np.sum((x - xm) ** 2))
            c = ym - m * xm
            slope[i] = max(c + m * (len(h) - 1 + lead + cyc), float(y[-1]))
        parts: list[tuple[float, float]] = []
        lvl = _mean_valid(rate[max(0, d - hour) : d])
        if lvl is not None:
            parts.append((0.5, lvl))
        for wgt, back in ((0.3, day), (0.2, week)):
            if d + lead - back >= 0:
                w = rate[d + lead - back : d + lead + cyc - back]
                w = w[~np.isnan(w)]
                if len(w):
                    parts.append((wgt, float(w.max())))
        dyte[i] = sum(a * v for a, v in parts) / sum(a for a, _ in parts) if parts else 0.0
    return {"static-peak": static, "reactive-target": react, "seed-slope": slope,
            "dyte-weighted": dyte}  # fmt: skip


def anchor_decisions(rate: np.ndarray, p: Params) -> dict[str, np.ndarray]:
    preds = predictions(rate, p)
    return {k: counts(v, DEFAULT_MULT[k], p.capacity_rpm) for k, v in preds.items()}


def tuned_decisions(rate: np.ndarray, p: Params, *, target: float = 0.99) -> dict[str, np.ndarray]:
    """Each anchor at the smallest grid multiplier reaching ``target`` on this trace."""
    out: dict[str, np.ndarray] = {}
    for name, pred in predictions(rate, p).items():

        def avail(i: int, pred: np.ndarray = pred) -> float:
            return score(rate, counts(pred, float(TUNE_GRID[i]), p.capacity_rpm), p).availability

        lo, hi = 0, len(TUNE_GRID) - 1
        if avail(hi) < target:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if avail(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        out[f"tuned:{name}@x{TUNE_GRID[lo]:.2f}"] = counts(
            pred, float(TUNE_GRID[lo]), p.capacity_rpm
        )
    return out
