"""Online calibration of forecast headroom (conformal-style, exponentially weighted).

For every model and every finished cycle, each demand step is turned into the ratio
``demand / point forecast`` that the step would have needed to be served. A weighted
histogram of those log-ratios (older cycles fade with a window of ``window`` cycles) gives,
for any availability target q, the smallest multiplier that would have served a share q of
recent steps: the model's calibrated headroom. Cost of a model = multiplier x its mean
recent forecast, which is what ``auto`` minimises.
"""

from __future__ import annotations

import math

import numpy as np

_LO = 0.1  # smallest ratio told apart; anything below counts as "served at any multiplier"
_RES = 0.01  # relative width of a bin: multipliers are exact to 1%
_G = math.ceil(math.log(1000.0 / _LO) / math.log1p(_RES))
_EDGES = _LO * np.power(1.0 + _RES, np.arange(_G + 1))
_LOG_STEP = math.log1p(_RES)


class RatioCalibrator:
    """Weighted histograms of demand/forecast ratios, one row per model."""

    def __init__(self, *, n_models: int, window: float) -> None:
        self.n_models = n_models
        self.decay = 1.0 - 1.0 / max(window, 1.0)
        self.hist = np.zeros((_G, n_models))  # bins x models: cumsum runs along rows
        self.count = np.zeros(n_models)  # weighted number of cycles seen per model
        self.steps = np.zeros(n_models)  # weighted number of steps seen per model
        self.pred_sum = np.zeros(n_models)  # weighted sum of point forecasts

    def update(self, ratios: np.ndarray, preds: np.ndarray) -> None:
        """Add one cycle. ``ratios``: (n_models, steps), NaN where unknown; ``preds``: the
        point forecasts the ratios were taken against (NaN = model had none)."""
        self.hist *= self.decay
        self.count *= self.decay
        self.steps *= self.decay
        self.pred_sum *= self.decay
        ok = np.isfinite(ratios)
        if not ok.any():
            return
        r = np.where(ok, ratios, 1.0)
        g = np.floor(np.log(np.maximum(r, _LO) / _LO) / _LOG_STEP).astype(np.int64)
        np.clip(g, 0, _G - 1, out=g)
        flat = (g * self.n_models + np.arange(self.n_models)[:, None])[ok]
        self.hist += np.bincount(flat, minlength=self.n_models * _G).reshape(_G, self.n_models)
        has = ok.any(axis=1)
        self.count[has] += 1.0
        self.steps += ok.sum(axis=1)
        self.pred_sum[has] += preds[has]

    def multipliers(self, q: float) -> np.ndarray:
        """Per model, the smallest multiplier serving a share ``q`` of the recent steps, with
        the conformal finite-sample correction; NaN for a model with no history."""
        cum = np.cumsum(self.hist, axis=0)
        tot = cum[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            qa = np.minimum(q * (1.0 + 1.0 / np.maximum(self.steps, 1e-9)), 1.0)
        need = qa * tot * (1.0 - 1e-12)
        g = (cum >= need[None, :]).argmax(axis=0)
        out = _EDGES[g + 1]
        out[tot <= 0] = np.nan
        return out

    def mean_pred(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 0, self.pred_sum / np.maximum(self.count, 1e-12), np.nan)
