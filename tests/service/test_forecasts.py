"""The live loop's kept forecaster gives exactly what ``forecast()`` gives from scratch on the
same steps, while reading only the new steps each cycle."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import numpy as np

from nomadscale.core.ports import DemandSeries
from nomadscale.service.forecasts import LiveForecaster
from nomadscale.stages.decide import forecast_config_from
from nomadscale.stages.forecast import forecast
from tests.service.helpers import make_policy

STEP = 600.0
ORIGIN = datetime(2026, 1, 5, 0, 3, 17, tzinfo=UTC)  # the source's grid is not slot-aligned


def _demand(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(n) * STEP / 86400
    v = 1000 + 600 * np.sin(2 * np.pi * t) + 200 * np.sin(2 * np.pi * t / 7) + 5 * t
    v = v * rng.lognormal(0, 0.08, n)
    v[rng.random(n) < 0.02] = np.nan  # gaps
    return v


class Recording:
    """A demand source over a fixed array that records how many steps each call read."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.reads: list[int] = []

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        last = int((end - ORIGIN).total_seconds() // step_s)
        first = max(0, last - int(lookback_s // step_s))
        self.reads.append(last - first)
        start = ORIGIN + timedelta(seconds=first * step_s)
        return DemandSeries(start=start, step_s=step_s, values=self.values[first:last].copy())


def test_incremental_forecasts_equal_from_scratch_on_the_same_steps() -> None:
    policy = make_policy(demand={"source": "prometheus", "query": "q", "step": "10m",
                                 "lookback": "10d"})  # fmt: skip
    values = _demand(int(16 * 86400 / STEP))
    src = Recording(values)
    live = LiveForecaster(policy)
    cfg = forecast_config_from(policy)
    first = ORIGIN + timedelta(days=4, seconds=43)  # a slot a little after a step ended
    warm_start = None
    for i in range(0, 2 * 72, 9):  # two days of cycles, checked every 9th
        now = first + timedelta(seconds=1200 * i + (i % 3))  # scheduler jitter
        fc, how = live.forecast(src, now=now)
        if warm_start is None:
            assert how.mode == "warm" and src.reads[-1] == 4 * 72 * 2  # 4 days
            warm_start = how.history_end - timedelta(seconds=how.history_steps * STEP)
        else:
            assert how.mode == "incremental" and src.reads[-1] == 9 * 2, how
        # from scratch over every step since the warm start, ending at the same step
        end = how.history_end
        lo = int((warm_start - ORIGIN).total_seconds() // STEP)
        hi = int((end - ORIGIN).total_seconds() // STEP)
        series = DemandSeries(start=warm_start, step_s=STEP, values=values[lo:hi])
        want = forecast(series, now=end, config=cfg)  # the bucket grid of the warm start
        assert fc == want, (i, fc, want)
    assert fc.model == "regress" and fc.data_ok


def test_a_kick_between_slots_is_one_off_and_a_reset_warm_starts() -> None:
    policy = make_policy(demand={"source": "prometheus", "query": "q", "step": "10m",
                                 "lookback": "3d"})  # fmt: skip
    src = Recording(_demand(int(8 * 86400 / STEP)))
    live = LiveForecaster(policy)
    warm = live.forecast(src, now=ORIGIN + timedelta(days=4))[1]
    assert warm.mode == "warm"
    now = warm.history_end + timedelta(seconds=1)  # the last fed step ended just now
    kick = live.forecast(src, now=now + timedelta(minutes=10))  # half a cycle later
    assert kick[1].mode == "one-off"
    assert live.forecast(src, now=now + timedelta(minutes=20))[1].mode == "incremental"
    assert live.forecast(src, now=now + timedelta(days=5))[1].mode == "warm"  # gap > lookback
    live.reset()  # e.g. leadership changed hands
    assert live.forecast(src, now=now + timedelta(days=5, minutes=20))[1].mode == "warm"


def test_kept_forecasters_re_warm_once_a_lookback_from_kept_steps_not_in_the_same_cycle() -> None:
    """Memory stays bounded (the kept forecaster re-warms when its anchored origin moves, once
    a lookback, so it holds one to two lookbacks of history), a re-warm reads only the new
    steps (it starts from the steps already read), and a fleet of policies started together
    spreads its re-warms (each costs a lookback's forecast) over the lookback."""
    demand = {"source": "prometheus", "query": "q", "step": "10m", "lookback": "1d"}
    src = Recording(_demand(int(7 * 86400 / STEP)))
    start = ORIGIN + timedelta(days=2, seconds=43)
    re_warmed: dict[str, list[int]] = {}
    for name in ("ekyc", "ocr", "asr"):
        live = LiveForecaster(make_policy(name=name, demand=demand))
        info = live.forecast(src, now=start)[1]
        assert info.mode == "warm" and src.reads[-1] == 2 * 72 * 2  # up to 2 lookbacks + 1
        re_warmed[name] = []
        for i in range(1, 4 * 72):  # four days of 20-minute cycles
            info = live.forecast(src, now=start + timedelta(minutes=20 * i))[1]
            assert info.mode in ("incremental", "rewarm"), (i, info)
            assert src.reads[-1] == 2  # the new steps only, re-warm or not
            span = info.history_steps * STEP
            # one to two lookbacks (and less than a cycle: these slots are off the grid)
            assert 86400 <= span <= 2 * 86400 + 1200, (i, info)
            if info.mode == "rewarm":
                assert span <= 86400 + 1200  # from the new origin: one lookback back
                re_warmed[name].append(i)
    for at in re_warmed.values():  # a day (72 cycles) apart
        assert len(at) == 4 and {b - a for a, b in itertools.pairwise(at)} == {72}, at
    assert len({at[0] for at in re_warmed.values()}) == 3, re_warmed
