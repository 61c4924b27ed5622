"""The live loop's forecasters: one ``Forecaster`` per policy, fed only the new buckets, on an
origin every process agrees on.

``stages.forecast.forecast()`` rebuilds a forecaster from the whole history every call (about
1 ms per cycle bucket). The service instead keeps one per policy and feeds it the steps that
ended since the previous cycle. What a forecaster says depends on where its history starts,
so the start is not "when this process warmed up" but a pure function of the history's end
``E`` (``Anchor.origin``): the latest point at or before ``E - lookback`` of a grid shared by
every process (period = the lookback, counted from the Unix epoch, shifted by a phase fixed
per policy name so that a fleet of policies does not re-warm in the same cycle), moved back to
the bucket grid that ends at ``E``; never before the first step the source has (a trace's
start). The period is never shorter than the history the forecaster needs to calibrate
(``stages.forecast.warmup_s``: 6 h 40 min at 20-minute cycles), so a short lookback does not
fall back to the recent peak after every re-warm. Every forecast is thus made from one to two
periods of history (plus at most a cycle when the slots are not on the grid), and the
service's leader and standbys, whenever each started, ``plan`` and ``forecast`` all give the
same forecast for the same ``now`` and data: ``forecast_at`` is what the commands run, and the kept forecaster equals it every cycle
(``tests/service/test_anchor.py``).

The kept forecaster re-warms exactly when the origin moves (once a period), from the steps it
has already read (kept in memory: at most a lookback and a cycle of them), so a cycle only ever
reads the steps that ended since the previous one. A cycle that is not a whole number of
buckets after the kept one (an "apply now" kick between slots) gets a one-off forecast on its
own bucket grid (``forecast_at``) and leaves the kept forecaster untouched. Steps are frozen
once read: a value revised later by the source (a late scrape) is not re-read until the next
warm start.

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
from datetime import UTC, datetime, timedelta

import numpy as np

from nomadscale.config.policy import Policy
from nomadscale.core.clock import utc
from nomadscale.core.errors import ConfigError
from nomadscale.core.ports import DemandSeries, DemandSource
from nomadscale.core.values import Forecast
from nomadscale.stages.decide import forecast_config_from, lookback_s
from nomadscale.stages.forecast import ForecastConfig, Forecaster, warmup_s
from nomadscale.stages.history import clean

__all__ = ["Anchor", "ForecastInfo", "LiveForecaster", "forecast_at", "lookback_s"]

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _us(t: datetime) -> int:
    """``t`` in whole microseconds since the epoch (exact: no float rounding on the grid)."""
    return (utc(t) - _EPOCH) // _US


@dataclass(frozen=True)
class Anchor:
    """Where a policy's forecasts start: the shared grid (period = the lookback, epoch-based,
    ``phase_us`` after each multiple of it) and the cycle's bucket grid."""

    lookback_us: int
    cycle_us: int
    phase_us: int

    @classmethod
    def of(cls, policy: Policy) -> Anchor:
        config = forecast_config_from(policy)
        # a lookback shorter than the forecaster's calibration would fall back to the recent
        # peak for a cycle or two after every re-warm: history is never shorter than that
        need = warmup_s(config)
        look_s = max(lookback_s(policy), need if math.isfinite(need) else 0.0)
        look = max(round(look_s * 1e6), 1)
        cycle = max(round(config.cycle_s * 1e6), 1)
        # a fraction of the period fixed by the name, on whole cycles: a fleet of policies
        # re-warms spread over the lookback instead of in one cycle
        share = zlib.crc32(policy.name.encode()) % 1000
        return cls(lookback_us=look, cycle_us=cycle, phase_us=share * look // 1000 // cycle * cycle)

    @property
    def read_s(self) -> float:
        """What a warm start reads: enough for any origin (``end - origin`` < 2 lookbacks +
        a cycle)."""
        return (2 * self.lookback_us + self.cycle_us) / 1e6

    def origin(self, end: datetime, *, data_start: datetime | None = None) -> datetime:
        """The first bucket of the forecast whose history ends at ``end``: the latest bucket
        boundary (``end`` minus whole cycles) at or before the latest grid point at or before
        ``end - lookback``; not before the bucket that holds ``data_start`` (a source with
        nothing earlier: feeding empty buckets would only cost time)."""
        e, look, c = _us(end), self.lookback_us, self.cycle_us
        g = (e - look - self.phase_us) // look * look + self.phase_us
        back = -((g - e) // c)  # ceil((e - g) / c): whole cycles
        if data_start is not None:
            back = min(back, max(-((_us(data_start) - e) // c), 0))
        return utc(end) - back * self.cycle_us * _US


def _steps_from(series: DemandSeries, *, start: datetime, n: int) -> np.ndarray:
    """``n`` steps of ``series`` starting at ``start``; NaN where the series has none."""
    out = np.full(n, np.nan)
    v = clean(series).values
    off = round((utc(series.start) - start).total_seconds() / series.step_s)
    lo, hi = max(off, 0), min(off + len(v), n)
    if hi > lo:
        out[lo:hi] = v[lo - off : hi - off]
    return out


def _history_end(series: DemandSeries, now: datetime) -> datetime:
    """The end of the last step of ``series``' grid that ended at or before ``now`` (as
    ``stages.forecast.forecast`` counts them; a source gone stale leaves gaps up to it)."""
    start = utc(series.start)
    n_done = math.floor((utc(now) - start).total_seconds() / series.step_s + 1e-9)
    return start + timedelta(seconds=max(n_done, 0) * series.step_s)


@dataclass
class ForecastInfo:
    """How the forecast was made (recorded with the cycle)."""

    mode: str  # warm | incremental | rewarm | one-off
    steps: int  # steps read from the demand source
    history_steps: int  # steps behind the forecast
    history_end: datetime
    seconds: float


@dataclass
class _Built:
    forecaster: Forecaster
    values: np.ndarray  # the steps fed, from forecaster.origin to forecaster.end
    data_start: datetime  # the first step the source had
    read: int  # steps read to build it


class LiveForecaster:
    """One policy's kept forecaster. Not thread-safe: the service runs one cycle of a policy
    at a time."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.config: ForecastConfig = forecast_config_from(policy)
        self.step_s = float(policy.demand.step_s)
        self.lookback_s = lookback_s(policy)
        self.anchor = Anchor.of(policy)
        self._f: Forecaster | None = None
        self._data_start = _EPOCH
        # the steps fed since ``_kept_from`` (a re-warm's origin is never earlier), to re-warm
        # without reading them again
        self._kept = np.empty(0)
        self._kept_from = _EPOCH

    def reset(self) -> None:
        """Forget the kept forecaster: the next cycle warm-starts."""
        self._f = None
        self._kept = np.empty(0)

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
            on_grid = n >= 0 and n % f.S == 0
            if on_grid and new_s <= self.lookback_s:
                return self._advance(source, n=n, t0=t0)
            if not on_grid and 0 <= new_s <= self.lookback_s:  # a kick between slots
                b = self.build(source, now=now)
                return b.forecaster.predict(), self._info("one-off", b, t0)
        b = self.build(source, now=now)
        self._keep(b)
        log.info(
            "%s: forecaster warm-started from %d steps since %s (%.1fs)",
            self.policy.name, len(b.values), b.forecaster.origin.isoformat(),
            time.perf_counter() - t0,
        )  # fmt: skip
        return b.forecaster.predict(), self._info("warm", b, t0)

    def build(self, source: DemandSource, *, now: datetime) -> _Built:
        """A forecaster from the anchored origin to the last step ended at ``now``, reading
        up to two lookbacks and a cycle (what ``plan``, ``forecast`` and a warm start do)."""
        series = self._history(source, end=now, lookback_s=self.anchor.read_s)
        end = _history_end(series, now)
        origin = self.anchor.origin(end, data_start=series.start)
        return self._fed(origin, end, series, read=len(series.values))

    def _fed(self, origin: datetime, end: datetime, series: DemandSeries, *, read: int) -> _Built:
        n = round((end - origin).total_seconds() / self.step_s)
        values = _steps_from(series, start=origin, n=n)
        f = Forecaster(origin=origin, step_s=self.step_s, config=self.config)
        f.feed(values)
        return _Built(f, values, utc(series.start), read)

    def _keep(self, b: _Built) -> None:
        self._f, self._data_start = b.forecaster, b.data_start
        self._kept, self._kept_from = b.values, b.forecaster.origin
        self._trim()

    def _trim(self) -> None:
        """Drop the kept steps no later origin starts at or after: the origin moves next to
        the bucket boundary at or before the first grid point at least a cycle after it."""
        f = self._f
        assert f is not None
        a = self.anchor
        o, c, look = _us(f.origin), a.cycle_us, a.lookback_us
        nxt = -((a.phase_us - o - c) // look) * look + a.phase_us  # first grid point >= o + c
        until = o + (nxt - o) // c * c
        drop = (until - _us(self._kept_from)) // round(self.step_s * 1e6)
        drop = min(max(drop, 0), len(self._kept))
        if drop:
            self._kept = self._kept[drop:]
            self._kept_from += timedelta(seconds=drop * self.step_s)

    def _advance(self, source: DemandSource, *, n: int, t0: float) -> tuple[Forecast, ForecastInfo]:
        """The kept forecaster ``n`` steps (whole buckets) on: fed them, or re-warmed from the
        kept steps when the anchored origin moved."""
        f = self._f
        assert f is not None
        end = f.end + timedelta(seconds=n * self.step_s)
        new = np.empty(0)
        if n:
            series = self._history(source, end=end, lookback_s=n * self.step_s)
            new = _steps_from(series, start=f.end, n=n)
        origin = self.anchor.origin(end, data_start=self._data_start)
        if origin <= f.origin:
            f.feed(new)
            self._kept = np.concatenate([self._kept, new])
            b = _Built(f, self._kept, self._data_start, n)
            return f.predict(), self._info("incremental", b, t0)
        kept = np.concatenate([self._kept, new])
        skip = round((origin - self._kept_from).total_seconds() / self.step_s)
        assert 0 <= skip <= len(kept), (origin, self._kept_from)
        values = kept[skip:]
        g = Forecaster(origin=origin, step_s=self.step_s, config=self.config)
        g.feed(values)
        b = _Built(g, values, self._data_start, n)
        self._keep(b)
        log.info("%s: forecaster re-warmed from %d kept steps since %s (%.1fs)",
                 self.policy.name, len(values), origin.isoformat(),
                 time.perf_counter() - t0)  # fmt: skip
        return g.predict(), self._info("rewarm", b, t0)

    def _history(self, source: DemandSource, *, end: datetime, lookback_s: float) -> DemandSeries:
        try:
            return source.history(end=end, lookback_s=lookback_s, step_s=self.step_s)
        except ConfigError as e:
            where = self.policy.source
            if where is None or str(e).startswith(str(where)):
                raise
            raise ConfigError(f"{where}: {e}") from None

    def _info(self, mode: str, b: _Built, t0: float) -> ForecastInfo:
        f = b.forecaster
        steps = round((f.end - f.origin).total_seconds() / self.step_s)
        return ForecastInfo(mode, b.read, steps, f.end, time.perf_counter() - t0)


def forecast_at(
    policy: Policy, source: DemandSource, *, now: datetime
) -> tuple[Forecast, DemandSeries, ForecastInfo]:
    """The forecast the service makes for ``policy`` at ``now`` (``plan`` and ``forecast``),
    with the history it is made from."""
    t0 = time.perf_counter()
    live = LiveForecaster(policy)
    b = live.build(source, now=now)
    f = b.forecaster
    series = DemandSeries(start=f.origin, step_s=live.step_s, values=b.values)
    return f.predict(), series, live._info("one-off", b, t0)
