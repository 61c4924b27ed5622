"""Total sizing: ceil(upper / capacity) within the bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nomadscale.core.errors import InputError
from nomadscale.core.values import Forecast
from nomadscale.stages.sizing import Bounds, size

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def fc(upper: float, *, data_ok: bool = True) -> Forecast:
    return Forecast(
        peak=upper / 1.2, upper=upper, model="t", horizon_s=1800, target=0.99,
        headroom=0.2, data_ok=data_ok,
    )  # fmt: skip


def test_workers_cover_the_upper_bound() -> None:
    s = size(forecast=fc(1000), capacity_rpm=240, current=None, bounds=Bounds(),
             now=NOW, last_scale_at=None)  # fmt: skip
    assert (s.count, s.raw, s.bounds_hit) == (5, 5, ())
    exact = size(forecast=fc(960), capacity_rpm=240, current=None, bounds=Bounds(),
                 now=NOW, last_scale_at=None)  # fmt: skip
    assert exact.count == 4


def test_min_and_max() -> None:
    lo = size(forecast=fc(10), capacity_rpm=240, current=3, bounds=Bounds(min=2),
              now=NOW, last_scale_at=None)  # fmt: skip
    assert lo.count == 2 and lo.bounds_hit == ("min",)
    hi = size(forecast=fc(10_000), capacity_rpm=240, current=40, bounds=Bounds(max=40),
              now=NOW, last_scale_at=None)  # fmt: skip
    assert hi.count == 40 and "max" in hi.bounds_hit and hi.raw == 42


def test_step_limits() -> None:
    b = Bounds(max_step_up=8, max_step_down=4)
    up = size(forecast=fc(240 * 30), capacity_rpm=240, current=10, bounds=b, now=NOW,
              last_scale_at=None)  # fmt: skip
    assert up.count == 18 and up.bounds_hit == ("max_step_up",)
    down = size(forecast=fc(240 * 2), capacity_rpm=240, current=10, bounds=b, now=NOW,
                last_scale_at=None)  # fmt: skip
    assert down.count == 6 and down.bounds_hit == ("max_step_down",)


def test_scale_down_cooldown_from_last_scale_event() -> None:
    b = Bounds(scale_down_cooldown_s=2400)
    recent = size(forecast=fc(240 * 3), capacity_rpm=240, current=10, bounds=b, now=NOW,
                  last_scale_at=NOW - timedelta(minutes=20))  # fmt: skip
    assert recent.count == 10 and recent.bounds_hit == ("scale_down_cooldown",)
    old = size(forecast=fc(240 * 3), capacity_rpm=240, current=10, bounds=b, now=NOW,
               last_scale_at=NOW - timedelta(minutes=41))  # fmt: skip
    assert old.count == 3
    up = size(forecast=fc(240 * 12), capacity_rpm=240, current=10, bounds=b, now=NOW,
              last_scale_at=NOW)  # fmt: skip
    assert up.count == 12  # the cooldown never blocks scaling up


def test_never_scales_down_on_missing_data() -> None:
    s = size(forecast=fc(240, data_ok=False), capacity_rpm=240, current=9, bounds=Bounds(),
             now=NOW, last_scale_at=None)  # fmt: skip
    assert s.count == 9 and "no_data_hold" in s.bounds_hit
    up = size(forecast=fc(240 * 12, data_ok=False), capacity_rpm=240, current=9,
              bounds=Bounds(), now=NOW, last_scale_at=None)  # fmt: skip
    assert up.count == 12


def test_bad_input() -> None:
    with pytest.raises(InputError, match="capacity"):
        size(forecast=fc(10), capacity_rpm=0, current=None, bounds=Bounds(), now=NOW,
             last_scale_at=None)  # fmt: skip
    with pytest.raises(InputError, match="min <= max"):
        Bounds(min=5, max=2)
