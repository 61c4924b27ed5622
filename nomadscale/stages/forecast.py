"""Forecast the peak demand of the next decision window and its calibrated upper bound.

The window a decision must cover is [now, now + cycle + lead]: until the next decision's
capacity is ready. Work is done at cycle resolution: the history is cut into cycle buckets
ending at ``now`` (peak, mean and lead-part peak of each), every point model predicts each
bucket's horizon peak causally, and the chosen model's headroom is calibrated online against
the steps it would have had to serve (``calibration.RatioCalibrator``). ``auto`` uses the
online log-space regression (``forecast_models.LogRegression``), which weighs persistence,
levels and yesterday's rise by their recent accuracy; switching between models whose errors
differ was measured to cost more than it saved. An adaptive-conformal feedback on the
realised misses of the issued bound keeps long-run availability at the target. When the
capacity of a worker is known, headroom grows with the square root of demand (in worker
units, like counting noise) rather than in proportion to it: the trough, where relative noise
is larger and a worker is cheap, gets more of it, the peak less (``noise_exponent``).

``Forecaster`` is fed history incrementally (the backtest feeds it cycle by cycle);
``forecast()`` builds one from a series and asks it once: the same code both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from nomadscale.core.clock import utc
from nomadscale.core.errors import InputError
from nomadscale.core.ports import DemandSeries
from nomadscale.core.values import Forecast
from nomadscale.stages.calibration import RatioCalibrator
from nomadscale.stages.forecast_models import (
    BASE_MODELS,
    MODELS,
    Buckets,
    LogRegression,
    predict_all,
)
from nomadscale.stages.history import clean

MODEL_CHOICES = ("auto", *MODELS)
_ALIASES = {"dyte": "weighted", "reactive": "recent"}
_REGRESS = MODELS.index("regress")
FALLBACK_HEADROOM = 0.5  # used only before any model has been calibrated (short history)
# the miss-rate feedback aims at this share of the allowed misses: a margin for the noise of
# a finite run (a few hundred cycles decide a month's availability)
MISS_AIM = 0.8


@dataclass(frozen=True)
class BusinessHours:
    """Hours with their own availability target / minimum. ``days``: 0 = Monday."""

    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    start: time = time(8, 0)
    end: time = time(20, 0)
    tz: str = "UTC"
    target: float | None = None
    min_workers: int | None = None
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_zone", ZoneInfo(self.tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise InputError(f"business_hours.timezone: unknown time zone {self.tz!r}") from None

    def in_hours(self, dt: datetime) -> bool:
        local = utc(dt).astimezone(self._zone)
        if local.weekday() not in self.days:
            return False
        t = local.time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # window over midnight


@dataclass(frozen=True)
class ForecastConfig:
    cycle_s: float = 1200
    lead_s: float = 600
    target: float = 0.99
    model: str = "auto"
    business_hours: BusinessHours | None = None
    calibration_window_s: float = 14 * 86400.0  # exponential forgetting of past errors
    tracking_rate: float = 0.05  # log-multiplier step per missed cycle (0 = off)
    min_calibration_s: float = 6 * 3600.0
    # capacity of one worker (req/min) and the fleet minimum, when known: headroom is then
    # calibrated on whole workers (what sizing will provision), not on raw demand
    capacity_rpm: float | None = None
    min_workers: int = 0
    # how headroom grows with demand, when the capacity of a worker is known: the bound is
    # peak + h * peak**e * capacity**(1 - e), h calibrated online. 0.5: noise like counting
    # noise, relatively larger at low demand (where a worker of headroom is cheap) than at the
    # peak; 1: proportional headroom (also used when the capacity is unknown)
    noise_exponent: float = 0.5


def warmup_s(config: ForecastConfig) -> float:
    """Seconds of gap-free history a ``Forecaster`` needs before its calibrated model speaks
    (before that it falls back to the recent peak and a fixed headroom): the first cycle has
    no forecast to score, then the calibrator's decayed count of scored cycles must reach
    ``min_calibration_s``. ``inf`` when the calibration window is too short ever to get there.
    """
    min_cycles = max(3.0, config.min_calibration_s / config.cycle_s)
    decay = 1.0 - 1.0 / max(config.calibration_window_s / config.cycle_s, 1.0)
    # count after n scored cycles = (1 - decay**n) / (1 - decay)
    reach = 1.0 - min_cycles * (1.0 - decay)
    if decay <= 0.0 or reach <= 0.0:
        return math.inf
    n = math.ceil(math.log(reach) / math.log(decay) - 1e-9)
    return (n + 1) * config.cycle_s


class Forecaster:
    """Incremental forecaster. ``feed`` steps of demand (req/min, NaN = gap) starting at
    ``origin`` (the start of a cycle bucket); ``predict`` covers the cycle that starts where
    the fed history ends."""

    def __init__(self, *, origin: datetime, step_s: float, config: ForecastConfig) -> None:
        c = config
        if not 0.5 <= c.target < 1.0:
            raise InputError(f"forecast target must be in [0.5, 1), got {c.target}")
        if not 0.0 <= c.noise_exponent <= 1.0:
            raise InputError(f"forecast noise exponent must be in [0, 1], got {c.noise_exponent}")
        model = _ALIASES.get(c.model, c.model)
        if model not in MODEL_CHOICES:
            raise InputError(
                f"forecast model: unknown {c.model!r} (choose from {', '.join(MODEL_CHOICES)})"
            )
        steps = c.cycle_s / step_s
        if step_s <= 0 or steps < 1 or abs(steps - round(steps)) > 1e-9:
            raise InputError(f"cycle {c.cycle_s:g}s is not a multiple of the step {step_s:g}s")
        self.config = c
        self.model = model
        self.origin = utc(origin)
        self.step_s = step_s
        self.S = round(steps)
        self.lead = min(max(round(c.lead_s / step_s), 0), self.S)
        per_hour = max(1, round(3600 / c.cycle_s))
        self.b = Buckets(
            per_hour=per_hour,
            per_day=max(1, round(86400 / c.cycle_s)),
            per_week=max(1, round(604800 / c.cycle_s)),
        )
        nm = len(MODELS)
        window = c.calibration_window_s / c.cycle_s
        # only the models that can be chosen are calibrated (the blend needs all of them)
        if model == "auto":
            self.active = np.array([_REGRESS])
        elif model == "blend":
            self.active = np.arange(nm)
        else:
            self.active = np.array([MODELS.index(model)])
        na = len(self.active)
        self.cal = RatioCalibrator(n_models=na, window=window)
        self.cal_bh = RatioCalibrator(n_models=na, window=window)
        self.reg = LogRegression(window=window)
        self.min_cycles = max(3.0, c.min_calibration_s / c.cycle_s)
        self._buf = np.empty(0)
        self._pred = np.full(nm, np.nan)  # point forecasts for the next bucket
        self._pred_prev = np.full(nm, np.nan)
        self._upper = math.nan  # issued upper bound for the next bucket
        self._floored = False  # the issued bound is the point forecast (multiplier < 1)
        self._upper_prev = math.nan
        self._offset = 0.0  # quantile tracking: log of the correction to the multipliers
        self._next: Forecast | None = None
        # calibrated quantity: (demand - p) / scale(p) + 1, scale(p) = p**e * unit**(1 - e);
        # with e = 1 that is the plain ratio demand / p
        self._e = c.noise_exponent if c.capacity_rpm else 1.0
        self._unit = float(c.capacity_rpm or 1.0)
        self._plan()

    def _scale(self, p: np.ndarray) -> np.ndarray:
        if self._e == 1.0:
            return p
        return np.power(p, self._e) * self._unit ** (1.0 - self._e)

    def _ratios(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        """(models, steps): what each step needed, as the multiplier ``_bound`` applies."""
        return (x[None, :] - p[:, None]) / self._scale(p)[:, None] + 1.0

    def _bound(self, peak: float, m: float) -> float:
        """The upper bound for point forecast ``peak`` at calibrated multiplier ``m``."""
        if self._e == 1.0:
            return peak * m
        return peak + (m - 1.0) * float(self._scale(np.array(max(peak, 1e-9))))

    # -- feeding -------------------------------------------------------------------------

    @property
    def end(self) -> datetime:
        """End of the last complete bucket fed."""
        return self.origin + timedelta(seconds=len(self.b) * self.S * self.step_s)

    def feed(self, values: np.ndarray) -> list[Forecast]:
        """Append steps; return the forecast made at the end of each bucket completed."""
        v = np.asarray(values, dtype=float)
        if len(self._buf):
            v = np.concatenate([self._buf, v])
        nb = len(v) // self.S
        self._buf = v[nb * self.S :].copy()
        if nb == 0:
            return []
        x = v[: nb * self.S].reshape(nb, self.S)
        valid = ~np.isnan(x)
        n = valid.sum(axis=1)
        with np.errstate(invalid="ignore"):
            peak = np.where(n > 0, np.nanmax(np.where(valid, x, -np.inf), axis=1), 0.0)
            mean = np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), 0.0)
            if self.lead:
                lx = np.where(valid[:, : self.lead], x[:, : self.lead], -np.inf)
                lp = np.maximum(lx.max(axis=1), 0.0)
            else:
                lp = np.zeros(nb)
            tl = max(self.lead, 1)
            tn = valid[:, -tl:].sum(axis=1)
            tail = np.where(tn > 0, np.nansum(x[:, -tl:], axis=1) / np.maximum(tn, 1), -1.0)
        out = []
        pk, mn, lpk, tl_, nn = peak.tolist(), mean.tolist(), lp.tolist(), tail.tolist(), n.tolist()
        for i in range(nb):
            self._close(x[i], pk[i], mn[i], lpk[i], tl_[i], nn[i])
            assert self._next is not None
            out.append(self._next)
        return out

    def _close(
        self, x: np.ndarray, peak: float, mean: float, lead_peak: float, tail: float, n: int
    ) -> None:
        b = self.b
        k = len(b)
        b.append(peak=peak, mean=mean, lead_peak=lead_peak, tail=tail, n=n)
        self.reg.update(b)
        if n:
            self._calibrate(k, x)
        self._pred_prev = self._pred
        self._upper_prev = self._upper
        self._plan()

    def _calibrate(self, k: int, x: np.ndarray) -> None:
        cap = self.config.capacity_rpm
        if cap:
            # demand x is served by w workers iff w >= ceil(x / cap): the bound needs only to
            # exceed (ceil(x / cap) - 1) * cap; the fleet minimum serves small demand anyway
            need = np.ceil(x / cap - 1e-9)
            x = np.where(need <= self.config.min_workers, 0.0, (need - 1.0) * cap * (1 + 1e-9))
            x[need != need] = np.nan
        pred = self._pred[self.active]
        p = np.maximum(pred, 1e-9)
        with np.errstate(invalid="ignore"):
            ratios = self._ratios(x, p)
            if self.lead:
                den = np.maximum(np.fmin(self._pred_prev[self.active], pred), 1e-9)
                ratios[:, : self.lead] = self._ratios(x[: self.lead], den)
        ratios[np.isnan(pred)] = np.nan
        bh = self.config.business_hours
        in_hours = bh is not None and bh.in_hours(self._bucket_start(k))
        self.cal.update(ratios, pred)
        if in_hours:
            self.cal_bh.update(ratios, pred)
        # adaptive conformal inference on the bound actually issued for this bucket
        if self.config.tracking_rate > 0 and not math.isnan(self._upper):
            thr = np.full(self.S, self._upper)
            if self.lead and not math.isnan(self._upper_prev):
                thr[: self.lead] = min(self._upper, self._upper_prev)
            ok = ~np.isnan(x)
            err = float(np.mean(x[ok] > thr[ok] + 1e-9))
            target = self._target(in_hours)
            step = self.config.tracking_rate * (err - MISS_AIM * (1.0 - target))
            # a bound floored at the point forecast did not use the offset: tightening it
            # further while demand is flat would only store up misses for when it moves
            if step > 0 or not self._floored:
                self._offset += step
            self._offset = min(max(self._offset, -0.7), 0.7)

    def _bucket_start(self, k: int) -> datetime:
        return self.origin + timedelta(seconds=k * self.S * self.step_s)

    def _target(self, in_hours: bool) -> float:
        bh = self.config.business_hours
        if in_hours and bh is not None and bh.target is not None:
            return bh.target
        return self.config.target

    # -- planning the next bucket --------------------------------------------------------

    def _plan(self) -> None:
        b, c = self.b, self.config
        k = len(b)
        horizon = c.cycle_s + self.lead * self.step_s
        bh = c.business_hours
        in_hours = bh is not None and bh.in_hours(self._bucket_start(k))
        target = self._target(in_hours)
        cal = self.cal
        if in_hours and self.cal_bh.count.max(initial=0.0) >= self.min_cycles:
            cal = self.cal_bh
        data_ok = k > 0 and b.n[-1] > 0
        pts: dict[str, float | None] = {}
        if k:
            if self.model != "auto":
                pts = predict_all(b, k, self.lead / self.S)
            pts["regress"] = self.reg.predict(b, k)
        q = target
        nm = len(MODELS)
        mult = np.full(nm, np.nan)
        mult[self.active] = cal.multipliers(q) * math.exp(self._offset)
        eligible = np.zeros(nm, dtype=bool)
        eligible[self.active] = cal.count >= self.min_cycles
        cost = np.full(nm, np.nan)
        cost[self.active] = mult[self.active] * cal.mean_pred()
        preds = np.full(len(MODELS), np.nan)
        for i, name in enumerate(BASE_MODELS):
            v = pts.get(name)
            if v is not None:
                preds[i] = v
        # blend: mean of the three base models with the cheapest calibrated bound
        base_ok = [i for i in range(len(BASE_MODELS)) if eligible[i] and not np.isnan(preds[i])]
        if base_ok:
            best = sorted(base_ok, key=lambda i: cost[i])[:3]
            preds[-1] = sum(float(preds[i]) for i in best) / len(best)
        self._pred = preds
        meta: dict[str, object] = {"in_business_hours": in_hours, "quantile": q}
        if in_hours and bh is not None and bh.min_workers is not None:
            meta["min_workers"] = bh.min_workers
        usable = eligible & ~np.isnan(preds) & ~np.isnan(mult)
        if self.model == "auto":
            # the regression nests the persistence and seasonal models and weighs them
            # online: switching between models whose errors differ costs availability
            choice = _REGRESS if usable[_REGRESS] else None
        else:
            j = MODELS.index(self.model)
            choice = j if usable[j] else None
        if choice is not None:
            name, peak, m = MODELS[choice], float(preds[choice]), float(mult[choice])
            meta["costs"] = {
                MODELS[i]: round(float(cost[i]), 3) for i in range(len(MODELS)) if usable[i]
            }
        else:
            lv = b.level(k - b.per_hour, k)
            recent = [b.peak[i] for i in range(max(k - b.per_hour, 0), k) if b.n[i]]
            peak = max(recent) if recent else (lv or 0.0)
            name, m = "fallback:recent-peak", 1.0 + FALLBACK_HEADROOM
        peak = max(peak, 0.0)
        # never plan below the point forecast: a multiplier under 1 (whole-worker calibration
        # on flat demand, or the miss-rate feedback after a long calm) would size the fleet
        # below the demand the forecast itself expects
        self._floored = m < 1.0
        m = max(m, 1.0)
        upper = self._bound(peak, m)
        self._upper = upper if data_ok else math.nan
        self._next = Forecast(
            peak=peak,
            upper=upper,
            model=name,
            horizon_s=horizon,
            target=target,
            headroom=(upper / peak - 1.0) if peak > 0 else 0.0,
            data_ok=data_ok,
            meta=meta,
        )

    def predict(self) -> Forecast:
        assert self._next is not None
        return self._next


def forecast(series: DemandSeries, *, now: datetime, config: ForecastConfig) -> Forecast:
    """Forecast the window starting at ``now`` from the steps that ended at or before it."""
    now = utc(now)
    series = clean(series)
    step = float(series.step_s)
    if step <= 0:
        raise InputError(f"demand series: step must be positive, got {step:g}s")
    start = utc(series.start)
    S = config.cycle_s / step
    if S < 1 or abs(S - round(S)) > 1e-9:
        raise InputError(f"cycle {config.cycle_s:g}s is not a multiple of the step {step:g}s")
    S_i = round(S)
    n_done = math.floor((now - start).total_seconds() / step + 1e-9)  # steps ended <= now
    v = np.asarray(series.values, dtype=float)[: max(n_done, 0)]
    if n_done > len(v):
        v = np.concatenate([v, np.full(n_done - len(v), np.nan)])  # stale source: gaps
    pad = (-len(v)) % S_i
    origin = start - timedelta(seconds=pad * step)
    if len(v) == 0:
        origin = start
    f = Forecaster(origin=origin, step_s=step, config=config)
    f.feed(np.concatenate([np.full(pad, np.nan), v]) if pad else v)
    return f.predict()
