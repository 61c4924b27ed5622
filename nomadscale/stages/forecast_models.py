"""Point forecasts of the next horizon's peak demand, at cycle resolution.

Every model reads per-cycle bucket statistics (peak, mean, lead-part peak, valid step count)
of buckets ``0 .. k-1`` and predicts the peak demand over the horizon starting at bucket
``k`` (bucket ``k`` plus the lead time into ``k+1``). They are plain Python on lists: the
backtest calls them once per cycle, so numpy's per-call overhead would dominate.
A model returns ``None`` when it lacks the history it needs. ``LogRegression`` keeps state
(its coefficients), so the forecaster owns one and updates it as buckets close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODELS = (
    "recent",
    "tail",
    "last",
    "smooth",
    "day",
    "slope",
    "daily",
    "weekly",
    "seasonal",
    "profile",
    "weighted",
    "regress",
    "blend",
)
BASE_MODELS = MODELS[:-1]


@dataclass
class Buckets:
    """Per-cycle statistics; NaN-free: a bucket with no valid step has ``n == 0``."""

    per_hour: int
    per_day: int
    per_week: int
    peak: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    lead_peak: list[float] = field(default_factory=list)
    tail: list[float] = field(default_factory=list)  # mean of the bucket's last lead part
    n: list[int] = field(default_factory=list)
    # prefix sums of mean * n and of n, so that a level over any range is O(1)
    csum: list[float] = field(default_factory=lambda: [0.0])
    cnt: list[int] = field(default_factory=lambda: [0])

    def append(self, *, peak: float, mean: float, lead_peak: float, tail: float, n: int) -> None:
        self.peak.append(peak)
        self.mean.append(mean)
        self.lead_peak.append(lead_peak)
        self.tail.append(tail)
        self.n.append(n)
        self.csum.append(self.csum[-1] + mean * n)
        self.cnt.append(self.cnt[-1] + n)

    def __len__(self) -> int:
        return len(self.n)

    def level(self, i0: int, i1: int) -> float | None:
        """Mean demand over buckets [i0, i1), weighted by valid steps."""
        i0 = max(i0, 0)
        i1 = min(i1, len(self.n))
        if i1 <= i0:
            return None
        c = self.cnt[i1] - self.cnt[i0]
        return (self.csum[i1] - self.csum[i0]) / c if c else None

    def horizon_peak(self, j: int) -> float | None:
        """Realized peak over the horizon of bucket j (its peak and the next lead part)."""
        if j < 0 or j >= len(self.n) or not self.n[j]:
            return None
        p = self.peak[j]
        if j + 1 < len(self.n) and self.n[j + 1]:
            p = max(p, self.lead_peak[j + 1])
        return p

    def recent_level(self, k: int) -> float | None:
        """Level of the last hour; if that is a gap, the latest valid bucket in a day."""
        lv = self.level(k - self.per_hour, k)
        if lv is not None:
            return lv
        for i in range(k - 1, max(k - self.per_day, 0) - 1, -1):
            if self.n[i]:
                return self.mean[i]
        return None


def _seasonal(b: Buckets, k: int, back: int, now_level: float | None) -> float | None:
    """Peak ``back`` buckets ago, scaled by the level now vs the level then."""
    h = b.horizon_peak(k - back)
    if h is None or now_level is None:
        return None
    then = b.level(k - back - b.per_hour, k - back)
    if then is None or then <= 0:
        return h
    ratio = min(max(now_level / then, 0.25), 4.0)
    return h * ratio


def _theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float]:
    slopes = sorted(
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
    )
    m = slopes[len(slopes) // 2]
    cs = sorted(y - m * x for x, y in zip(xs, ys, strict=True))
    return m, cs[len(cs) // 2]


def predict_all(b: Buckets, k: int, lead_frac: float) -> dict[str, float | None]:
    """Every base model's point forecast of the horizon peak starting at bucket k."""
    now = b.recent_level(k)
    out: dict[str, float | None] = {}
    last = k - 1
    have_last = last >= 0 and b.n[last] > 0
    out["recent"] = b.mean[last] if have_last else now
    out["tail"] = b.tail[last] if have_last and b.tail[last] >= 0 else out["recent"]
    out["last"] = now
    out["smooth"] = b.level(k - 6 * b.per_hour, k)
    out["day"] = b.level(k - b.per_day, k)
    # robust growth slope (Theil-Sen) over the last 2 hours of bucket means
    xs: list[float] = []
    ys: list[float] = []
    for i in range(max(k - max(2 * b.per_hour, 3), 0), k):
        if b.n[i]:
            xs.append(float(i))
            ys.append(b.mean[i])
    if len(xs) >= 3:
        m, c = _theil_sen(xs, ys)
        out["slope"] = max(c + m * (k + 0.5 + lead_frac), 0.0)
    else:
        out["slope"] = None
    out["daily"] = _seasonal(b, k, b.per_day, now)
    out["weekly"] = _seasonal(b, k, b.per_week, now)
    prof = [v for d in range(1, 8) if (v := _seasonal(b, k, d * b.per_day, now)) is not None]
    if len(prof) >= 2:
        prof.sort()
        mid = len(prof) // 2
        out["seasonal"] = prof[mid] if len(prof) % 2 else 0.5 * (prof[mid - 1] + prof[mid])
    else:
        out["seasonal"] = None
    # profile: the median level of the same time of day over the last 7 days
    lv = [
        v
        for d in range(1, 8)
        if (v := b.level(k - d * b.per_day - 1, k - d * b.per_day + 2)) is not None
    ]
    if len(lv) >= 2:
        lv.sort()
        mid = len(lv) // 2
        out["profile"] = lv[mid] if len(lv) % 2 else 0.5 * (lv[mid - 1] + lv[mid])
    else:
        out["profile"] = None
    parts = [(0.5, now)]
    parts.append((0.3, b.horizon_peak(k - b.per_day)))
    parts.append((0.2, b.horizon_peak(k - b.per_week)))
    got = [(w, v) for w, v in parts if v is not None]
    out["weighted"] = sum(w * v for w, v in got) / sum(w for w, _ in got) if got else None
    return out


class LogRegression:
    """Online ridge regression of the log horizon peak on log levels (exponentially weighted).

    Features at bucket k: the last bucket's tail, mean and peak, the levels of the last hour
    and the last day, the median level at this time of day over the past week, and
    yesterday's rise from the level before the same time to that window's horizon peak, all
    in log space (scale-free; demand ratios are what matter; +1% of the mean level keeps
    zeros finite). The ridge prior pulls the
    coefficients towards persistence (the last tail), so that a short history gives the
    reactive forecast. The target of bucket j is known once bucket j + 1 has closed.
    """

    N_FEATURES = 8

    def __init__(self, *, window: float, ridge: float = 0.3) -> None:
        d = self.N_FEATURES
        self.decay = 1.0 - 1.0 / max(window, 2.0)
        self.ridge = ridge
        self.prior = np.zeros(d)
        self.prior[1] = 1.0  # persistence on the last tail
        self.A = ridge * np.eye(d)
        self.v = ridge * self.prior
        self.coef: np.ndarray = self.prior.copy()
        self._feats: dict[int, np.ndarray] = {}

    def _eps(self, b: Buckets) -> float:
        c = b.cnt[-1]
        return 0.01 * b.csum[-1] / c if c else 0.0

    def features(self, b: Buckets, k: int) -> np.ndarray | None:
        last = k - 1
        if last < 0 or not b.n[last] or b.tail[last] < 0:
            return None
        hour = b.level(k - b.per_hour, k)
        eps = self._eps(b)
        if eps <= 0 or hour is None:
            return None
        lg = math.log
        seas = 0.0
        h = b.horizon_peak(k - b.per_day)
        j = k - b.per_day - 1
        if h is not None and j >= 0 and b.n[j]:
            seas = lg(h + eps) - lg(b.mean[j] + eps)
        day = b.level(k - b.per_day, k)
        day = hour if day is None else day
        prof = [
            v
            for d in range(1, 8)
            if (v := b.level(k - d * b.per_day - 1, k - d * b.per_day + 2)) is not None
        ]
        same = sorted(prof)[len(prof) // 2] if prof else day
        return np.array(
            [
                1.0,
                lg(b.tail[last] + eps),
                lg(b.mean[last] + eps),
                lg(hour + eps),
                seas,
                lg(b.peak[last] + eps),
                lg(day + eps),
                lg(same + eps),
            ]
        )

    def update(self, b: Buckets) -> None:
        """Learn from the bucket before the one just closed (its horizon is now complete)."""
        j = len(b) - 2
        x = self._feats.pop(j, None)
        for old in [i for i in self._feats if i < j]:
            del self._feats[old]
        h = b.horizon_peak(j)
        if x is None or h is None:
            return
        y = math.log(h + self._eps(b))
        a, r = self.decay, (1.0 - self.decay) * self.ridge
        self.A = a * self.A + np.outer(x, x)
        self.A[np.diag_indices_from(self.A)] += r
        self.v = a * self.v + x * y + r * self.prior
        self.coef = np.linalg.solve(self.A, self.v)

    def predict(self, b: Buckets, k: int) -> float | None:
        x = self.features(b, k)
        if x is None:
            return None
        self._feats[k] = x
        return max(math.exp(min(float(x @ self.coef), 700.0)) - self._eps(b), 0.0)
