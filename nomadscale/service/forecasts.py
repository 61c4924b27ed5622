"""The live loop's forecasters: one ``Forecaster`` per policy, fed only the new buckets.

``stages.forecast.forecast()`` rebuilds a forecaster from the whole lookback every call
(about 1 ms per cycle bucket: 35 days of 20-minute buckets cost ~2.5 s per policy). The
service instead keeps one per policy: warm-started from the policy's lookback on the first
cycle (and after a restart, a leadership change, a gap longer than the lookback, a policy
change, or when it has absorbed two to three times the lookback: the share of a third is
fixed per policy name, so that a fleet of policies started together does not re-warm in the
same cycle), then fed the steps that ended since the
previous cycle. Its forecast equals ``forecast()`` over the same steps (the history from the
warm start to now), which ``tests/service/test_forecasts.py`` proves.

The bucket grid is anchored where the warm start ended (on the source's step grid): a cycle
that is not a whole number of buckets later (an "apply now" kick between slots) gets a
one-off from-scratch forecast and leaves the kept forecaster untouched. Steps are frozen once fed: a value revised later by
the source (a late scrape) is not re-read until the next warm start.

A demand source's ``ConfigError`` (a query Prometheus refuses, or whose result is not one
series) is about the policy's ``demand`` section: it reaches the cycle record, ``plan`` and
the log as one line naming the policy file.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from nomadscale.config.policy import Policy
from nomadscale.core.clock import utc
from nomadscale.core.errors import ConfigError
from nomadscale.core.ports import DemandSeries, DemandSource
from nomadscale.core.values import Forecast
from nomadscale.stages.decide import forecast_config_from, lookback_s
from nomadscale.stages.forecast import ForecastConfig, Forecaster, forecast
from nomadscale.stages.history import clean

log = logging.getLogger(__name__)


def warm_forecaster(series: DemandSeries, *, now: datetime, config: ForecastConfig) -> Forecaster:
    """A forecaster fed ``series`` exactly as ``forecast()`` feeds it (same origin, padding
    and stale-source gaps), so that its ``predict()`` is ``forecast(series, now=now)``."""
    now = utc(now)
    series = clean(series)
    step = float(series.step_s)
    start = utc(series.start)
    S = round(config.cycle_s / step)
    n_done = math.floor((now - start).total_seconds() / step + 1e-9)
    v = np.asarray(series.values, dtype=float)[: max(n_done, 0)]
    if n_done > len(v):
        v = np.concatenate([v, np.full(n_done - len(v), np.nan)])
    pad = (-len(v)) % S
    origin = start - timedelta(seconds=pad * step) if len(v) else start
    f = Forecaster(origin=origin, step_s=step, config=config)
    f.feed(np.concatenate([np.full(pad, np.nan), v]) if pad else v)
    return f


def _steps_from(series: DemandSeries, *, start: datetime, n: int) -> np.ndarray:
    """``n`` steps of ``series`` starting at ``start``; NaN where the series has none."""
    out = np.full(n, np.nan)
    v = clean(series).values
    off = round((utc(series.start) - start).total_seconds() / series.step_s)
    lo, hi = max(off, 0), min(off + len(v), n)
    if hi > lo:
        out[lo:hi] = v[lo - off : hi - off]
    return out


@dataclass
class ForecastInfo:
    """How the forecast was made (recorded with the cycle)."""

    mode: str  # warm | incremental | one-off
    steps: int  # steps read from the demand source
    history_steps: int  # steps behind the forecast
    history_end: datetime
    seconds: float


class LiveForecaster:
    """One policy's kept forecaster. Not thread-safe: the service runs one cycle of a policy
    at a time."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.config = forecast_config_from(policy)
        self.step_s = float(policy.demand.step_s)
        self.lookback_s = lookback_s(policy)
        # history kept before a re-warm (bounded memory): 2-3 lookbacks, spread by name
        spread = zlib.crc32(policy.name.encode()) % 1000 / 1000.0
        self.max_span_s = (2.0 + spread) * self.lookback_s
        self._f: Forecaster | None = None
        self._steps = 0

    def reset(self) -> None:
        """Forget the kept forecaster: the next cycle warm-starts from the lookback."""
        self._f = None
        self._steps = 0

    @property
    def warm(self) -> bool:
        return self._f is not None

    def forecast(self, source: DemandSource, *, now: datetime) -> tuple[Forecast, ForecastInfo]:
        t0 = time.perf_counter()
        f, step = self._f, self.step_s
        if f is not None:
            # whole steps since the last fed one (a scheduler firing a little early still
            # counts the step that is about to end: up to 5% of a step or 3 s)
            tol = min(0.05, 3.0 / step)
            n = math.floor((utc(now) - f.end).total_seconds() / step + tol)
            new_s = n * step
            span_s = (f.end - f.origin).total_seconds() + new_s
            on_grid = n >= 0 and n % f.S == 0
            if on_grid and new_s <= self.lookback_s and span_s <= self.max_span_s:
                if n:
                    end = f.end + timedelta(seconds=new_s)
                    series = self._history(source, end=end, lookback_s=new_s)
                    f.feed(_steps_from(series, start=f.end, n=n))
                    self._steps += n
                return f.predict(), self._info("incremental", n, f.end, t0)
            if not on_grid and 0 <= new_s <= self.lookback_s:  # a kick between slots
                series = self._history(source, end=now, lookback_s=self.lookback_s)
                fc = forecast(series, now=now, config=self.config)
                return fc, ForecastInfo(
                    "one-off", len(series.values), len(series.values), series.end,
                    time.perf_counter() - t0,
                )  # fmt: skip
        series = self._history(source, end=now, lookback_s=self.lookback_s)
        self._f = warm_forecaster(series, now=now, config=self.config)
        self._steps = len(series.values)
        log.info(
            "%s: forecaster warm-started from %d steps (%.1fs)",
            self.policy.name, len(series.values), time.perf_counter() - t0,
        )  # fmt: skip
        return self._f.predict(), self._info("warm", len(series.values), self._f.end, t0)

    def _history(self, source: DemandSource, *, end: datetime, lookback_s: float) -> DemandSeries:
        try:
            return source.history(end=end, lookback_s=lookback_s, step_s=self.step_s)
        except ConfigError as e:
            where = self.policy.source
            if where is None or str(e).startswith(str(where)):
                raise
            raise ConfigError(f"{where}: {e}") from None

    def _info(self, mode: str, n: int, end: datetime, t0: float) -> ForecastInfo:
        return ForecastInfo(mode, n, self._steps, end, time.perf_counter() - t0)
