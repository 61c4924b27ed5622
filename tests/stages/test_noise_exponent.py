"""Headroom that grows with the square root of demand (counting noise) serves the target at
the trough and at the peak of a daily cycle; proportional headroom under-serves the trough."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from nomadscale.backtest.protocol import Params, effective_workers, oracle, score
from nomadscale.backtest.runner import replay
from nomadscale.core.errors import InputError
from nomadscale.stages.forecast import ForecastConfig, Forecaster

STEP = 300.0
CAP = 10.0  # rpm per worker: 4 to 200 workers over the day


def _poisson_day_cycle() -> tuple[np.ndarray, Params]:
    rng = np.random.default_rng(11)
    n = int(14 * 86400 / STEP)
    t = np.arange(n) * STEP / 86400
    # requests per 5-minute step between 40 and 2000 (log-sinusoid), counted: Poisson
    lam = np.exp(np.log(40) + np.log(2000 / 40) * (0.5 + 0.5 * np.sin(2 * np.pi * t)))
    rate = rng.poisson(lam) / (STEP / 60)
    warm = 4 * 288  # 4 days
    p = Params(
        start=datetime(2026, 1, 5, tzinfo=UTC), step_s=STEP, capacity_rpm=CAP, cycle_steps=4,
        lead_steps=2, warmup_steps=warm, boundaries=np.arange(warm, n - 3, 4), min_workers=2,
    )  # fmt: skip
    return rate, p


def _run(rate: np.ndarray, p: Params, exponent: float) -> tuple[float, float, float]:
    """Served share of steps below / above the median demand, and cost / oracle."""
    dec = replay(rate, p, config=ForecastConfig(noise_exponent=exponent)).decisions
    eff, _ = effective_workers(dec, p)
    r = rate[p.warmup_steps : p.warmup_steps + len(eff)]
    ok = r <= eff * CAP + 1e-9
    low = r < np.median(r)
    base = score(rate, oracle(rate, p), p, ideal=True).worker_hours
    return float(ok[low].mean()), float(ok[~low].mean()), score(rate, dec, p).worker_hours / base


def test_square_root_headroom_serves_trough_and_peak_at_no_extra_cost() -> None:
    rate, p = _poisson_day_cycle()
    low, high, cost = _run(rate, p, 0.5)  # the default
    assert low >= 0.99 and high >= 0.99, (low, high)
    prop_low, prop_high, prop_cost = _run(rate, p, 1.0)
    # proportional headroom is set by the pooled errors: the trough's larger relative noise
    # is under-covered while the peak's smaller one is over-covered
    assert prop_low < 0.99 <= prop_high, (prop_low, prop_high)
    assert cost <= prop_cost * 1.01, (cost, prop_cost)


def test_noise_exponent_out_of_range_is_a_clear_error() -> None:
    cfg = ForecastConfig(noise_exponent=1.5, capacity_rpm=CAP)
    with pytest.raises(InputError, match="noise exponent must be in"):
        Forecaster(origin=datetime(2026, 1, 5, tzinfo=UTC), step_s=STEP, config=cfg)
