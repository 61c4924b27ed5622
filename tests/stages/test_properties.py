"""Properties of the decision stages that must hold for any input."""

from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomadscale.core.ports import DemandSeries
from nomadscale.core.values import Forecast
from nomadscale.stages.overrides import Override, apply_overrides
from nomadscale.stages.sizing import Bounds, size
from nomadscale.stages.zones import split
from tests.stages.test_decide import POLICY, SAT, run

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@st.composite
def bounds(draw):
    lo = draw(st.integers(0, 20))
    hi = draw(st.integers(lo, 60))
    return Bounds(
        min=lo,
        max=hi,
        max_step_up=draw(st.none() | st.integers(1, 10)),
        max_step_down=draw(st.none() | st.integers(1, 10)),
        scale_down_cooldown_s=draw(st.sampled_from([0.0, 1200.0, 2400.0])),
    )


def fc(upper, *, ok=True):
    return Forecast(
        peak=upper, upper=upper, model="test", horizon_s=1800, target=0.99, headroom=0.0, data_ok=ok
    )


uppers = st.floats(0, 50_000, allow_nan=False)
lasts = st.none() | st.integers(1, 7200).map(lambda s: NOW - timedelta(seconds=s))


@given(
    b=bounds(), upper=uppers, current=st.none() | st.integers(0, 80), ok=st.booleans(), last=lasts
)
def test_count_is_within_bounds(b, upper, current, ok, last):
    s = size(
        forecast=fc(upper, ok=ok),
        capacity_rpm=240,
        current=current,
        bounds=b,
        now=NOW,
        last_scale_at=last,
    )
    assert b.min <= s.count <= b.max


@given(b=bounds(), upper=uppers, data=st.data(), ok=st.booleans(), last=lasts)
def test_step_limits_hold_from_any_count_inside_the_bounds(b, upper, data, ok, last):
    current = data.draw(st.integers(b.min, b.max))
    s = size(
        forecast=fc(upper, ok=ok),
        capacity_rpm=240,
        current=current,
        bounds=b,
        now=NOW,
        last_scale_at=last,
    )
    if b.max_step_up is not None:
        assert s.count <= current + b.max_step_up
    if b.max_step_down is not None:
        assert s.count >= current - b.max_step_down
    if not ok:
        assert s.count >= current  # never down on missing data


@given(b=bounds(), u1=uppers, u2=uppers, current=st.none() | st.integers(0, 80), last=lasts)
def test_more_demand_never_fewer_workers(b, u1, u2, current, last):
    lo, hi = sorted((u1, u2))
    kw = dict(capacity_rpm=240, current=current, bounds=b, now=NOW, last_scale_at=last)
    assert size(forecast=fc(lo), **kw).count <= size(forecast=fc(hi), **kw).count


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rpm=st.floats(0, 12_000), k=st.floats(1, 4), current=st.integers(2, 40))
def test_decide_is_monotone_in_demand(rpm, k, current):
    def series(level):
        return DemandSeries(start=SAT - timedelta(days=1), step_s=60, values=np.full(1440, level))

    low = run(series(rpm), SAT, current=current)
    high = run(series(rpm * k), SAT, current=current)
    assert low.desired <= high.desired
    for d in (low, high):
        assert POLICY.bounds.min <= d.desired <= POLICY.bounds.max
        assert sum(z.count for z in d.zones) == d.desired


zone_names = ("a", "b")


@given(total=st.integers(0, 500))
def test_healthy_zones_sum_to_total_and_differ_by_at_most_one(total):
    s = split(total, zones=zone_names)
    counts = [z.count for z in s.counts]
    assert sum(counts) == total
    assert 0 <= counts[0] - counts[1] <= 1
    assert s.moved == 0


@given(
    total=st.integers(0, 200),
    caps=st.tuples(st.none() | st.integers(0, 150), st.none() | st.integers(0, 150)),
    degraded=st.sets(st.sampled_from(zone_names)),
)
def test_split_never_loses_workers_and_respects_capacity_when_it_can(total, caps, degraded):
    s = split(
        total,
        zones=zone_names,
        healthy_capacity=dict(zip(zone_names, caps, strict=True)),
        degraded=degraded,
    )
    assert s.total == total
    assert s.unplaced >= 0
    room = sum(
        (total if c is None else c) * (0 if (z in degraded and len(degraded) < 2) else 1)
        for z, c in zip(zone_names, caps, strict=True)
    )
    assert s.unplaced == max(0, total - room)
    if s.unplaced == 0:
        for z, c in zip(s.counts, caps, strict=True):
            if c is not None:
                assert z.count <= c
            if z.zone in degraded and len(degraded) < 2:
                assert z.count == 0


@st.composite
def overrides(draw, *, expired=False):
    kind = draw(st.sampled_from(["min", "max", "fixed", "pause"]))
    created = NOW - timedelta(minutes=draw(st.integers(1, 600)))
    if expired:
        expires = NOW - timedelta(minutes=draw(st.integers(0, 600)))
        created = min(created, expires - timedelta(minutes=1))
    else:
        expires = NOW + timedelta(minutes=draw(st.integers(1, 600)))
    return Override(
        policy="p",
        kind=kind,
        value=None if kind == "pause" else draw(st.integers(0, 100)),
        reason="r",
        who="w",
        created_at=created,
        expires_at=expires,
        source=draw(st.sampled_from(["cli", "schedule", "scale"])),
    )


@given(count=st.integers(0, 100), ovs=st.lists(overrides(), max_size=6))
def test_overrides_are_respected(count, ovs):
    new, why = apply_overrides(count, ovs, now=NOW)
    if not ovs:
        assert (new, why) == (count, None)
        return
    assert why
    if any(o.kind == "pause" for o in ovs):
        assert new == count
        return
    fixed = [o for o in ovs if o.kind == "fixed"]
    if fixed:
        assert new == max(fixed, key=lambda o: o.created_at).value
        return
    mins = [o.value for o in ovs if o.kind == "min"]
    maxes = [o.value for o in ovs if o.kind == "max"]
    if mins:
        assert new >= max(mins)
    if maxes and not (mins and max(mins) > min(maxes)):
        assert new <= min(maxes)
    if mins and maxes and max(mins) > min(maxes):
        assert new == max(mins)  # availability first


@given(
    count=st.integers(0, 100),
    live=st.lists(overrides(), max_size=4),
    dead=st.lists(overrides(expired=True), min_size=1, max_size=4),
)
def test_expired_overrides_are_ignored(count, live, dead):
    assert apply_overrides(count, live + dead, now=NOW) == apply_overrides(count, live, now=NOW)
