"""The decide() pipeline on the shipped eKYC policy: forecast -> size -> business hours ->
overrides/schedules -> zones, and the one-line explanation a user reads."""

import copy
import math
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from nomadscale.config.policy import Policy
from nomadscale.core.ports import DemandSeries
from nomadscale.core.values import Direction
from nomadscale.stages.decide import bounds_from, decide, forecast_config_from
from nomadscale.stages.forecast import forecast
from nomadscale.stages.overrides import Override

POLICY_FILE = Path(__file__).resolve().parents[2] / "policies" / "ekyc-ml.yaml"
RAW = yaml.safe_load(POLICY_FILE.read_text())
ZA, ZB = "asia-southeast2-a", "asia-southeast2-b"

# Sat 21 Nov 2026 10:00 UTC = 17:00 Jakarta: weekend, no schedule window, not month end.
SAT = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
# Mon 23 Nov 2026 03:00 UTC = 10:00 Jakarta: business hours.
MON = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def policy(**patch):
    data = copy.deepcopy(RAW)
    for dotted, value in patch.items():
        *head, last = dotted.split("__")
        node = data
        for k in head:
            node = node[k]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return Policy.model_validate(data)


POLICY = policy()


def flat(rpm, *, end, days=2.0, gap_tail_min=0):
    n = int(days * 1440)
    v = np.full(n, float(rpm))
    if gap_tail_min:
        v[-gap_tail_min:] = np.nan
    return DemandSeries(start=end - timedelta(minutes=n), step_s=60, values=v)


def expected_workers(pol, series, now):
    fc = forecast(series, now=now, config=forecast_config_from(pol))
    return math.ceil(fc.upper / pol.capacity.rpm_per_worker - 1e-9)


def run(series, now, *, pol=POLICY, current=None, **kw):
    kw.setdefault("current_zones", None)
    kw.setdefault("last_scale_at", None)
    return decide(policy=pol, series=series, now=now, current=current, **kw)


def test_adapters_map_the_policy_onto_stage_configs():
    cfg = forecast_config_from(POLICY)
    assert (cfg.cycle_s, cfg.lead_s, cfg.target, cfg.model) == (1200, 600, 0.99, "auto")
    bh = cfg.business_hours
    assert bh is not None
    assert bh.days == (0, 1, 2, 3, 4)
    assert (bh.start, bh.end, bh.tz) == (time(8), time(20), "Asia/Jakarta")
    assert (bh.target, bh.min_workers) == (0.995, 4)
    b = bounds_from(POLICY)
    assert (b.min, b.max, b.max_step_up, b.max_step_down) == (2, 40, 8, 4)
    assert b.scale_down_cooldown_s == 2400


def test_decision_is_filled_in_and_explains_itself():
    s = flat(3000, end=SAT)
    want = expected_workers(POLICY, s, SAT)
    d = run(s, SAT, current=want - 2, current_zones={ZA: 6, ZB: 5})
    assert d.desired == want
    assert d.direction is Direction.UP
    assert d.decided_at == SAT
    assert d.forecast is not None and d.forecast.data_ok
    assert sum(z.count for z in d.zones) == want
    assert [(z.zone, z.group) for z in d.zones] == [(ZA, "ml-worker-a"), (ZB, "ml-worker-b")]
    assert abs(d.zones[0].count - d.zones[1].count) <= 1
    assert d.meta["capacity_per_worker"] == 240
    assert d.meta["raw"] == want
    assert d.meta["model"] == d.forecast.model
    assert d.meta["moved"] == 0
    assert d.override is None
    line = d.explain()
    assert "\n" not in line
    assert f"-> {want} (up)" in line and "240 rpm per worker" in line


def test_step_up_limit_caps_a_jump():
    d = run(flat(6000, end=SAT), SAT, current=3)  # wants ~26, step up is 8
    assert d.desired == 11
    assert "max_step_up" in d.bounds_hit


def test_bounds_max_caps_and_min_floors():
    assert run(flat(50_000, end=SAT), SAT, current=40).desired == 40
    d = run(flat(10, end=SAT), SAT, current=2)
    assert d.desired == 2
    assert "min" in d.bounds_hit


def test_scale_down_waits_for_the_cooldown():
    s = flat(500, end=SAT)
    held = run(s, SAT, current=10, last_scale_at=SAT - timedelta(minutes=20))
    assert held.desired == 10
    assert "scale_down_cooldown" in held.bounds_hit
    later = run(s, SAT, current=10, last_scale_at=SAT - timedelta(minutes=41))
    assert later.desired == 6  # 10 - max_step_down 4
    assert later.direction is Direction.DOWN


def test_missing_recent_data_never_scales_down():
    s = flat(500, end=SAT, gap_tail_min=180)
    d = run(s, SAT, current=12)
    assert d.desired == 12
    assert "no_data_hold" in d.bounds_hit
    assert d.meta["data_ok"] is False


def test_business_hours_minimum_only_applies_in_hours():
    quiet_mon = run(flat(10, end=MON), MON, current=2)
    assert quiet_mon.desired == 4
    assert "business_hours_min" in quiet_mon.bounds_hit
    assert "business hours: at least 4" in quiet_mon.reason
    assert run(flat(10, end=SAT), SAT, current=2).desired == 2


def test_month_end_schedule_raises_the_count():
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)  # Sat 28 Nov, 10:00 Jakarta
    d = run(flat(10, end=now), now, current=2)
    assert d.desired == 10
    assert d.override is not None and "month-end-close" in d.override


def test_weekly_freeze_schedule_fixes_the_count():
    now = datetime(2026, 11, 28, 18, 30, tzinfo=UTC)  # Sun 29 Nov 01:30 Jakarta
    d = run(flat(6000, end=now), now, current=20)
    assert d.desired == 6
    assert d.override is not None and d.override.startswith("fixed 6")


def ov(kind, value=None, *, pol="ekyc-ml", created=SAT - timedelta(minutes=5), minutes=60):
    return Override(
        policy=pol,
        kind=kind,
        value=value,
        reason="incident",
        who="alice",
        created_at=created,
        expires_at=created + timedelta(minutes=minutes),
    )


def test_cli_overrides_apply_and_others_are_ignored():
    s = flat(3000, end=SAT)
    base = run(s, SAT, current=10).desired
    capped = run(s, SAT, current=10, overrides=[ov("max", 5)])
    assert capped.desired == 5
    assert capped.override is not None and "max 5" in capped.override
    other_policy = run(s, SAT, current=10, overrides=[ov("max", 5, pol="other")])
    assert other_policy.desired == base
    expired = run(s, SAT, current=10, overrides=[ov("max", 5, minutes=5)])
    assert expired.desired == base and expired.override is None


def test_pause_holds_current_count_and_zones():
    d = run(
        flat(6000, end=SAT),
        SAT,
        current=7,
        current_zones={ZA: 2, ZB: 5},
        overrides=[ov("pause"), ov("fixed", 30)],
    )
    assert d.desired == 7
    assert d.reason == "paused"
    assert d.direction is Direction.HOLD
    assert [z.count for z in d.zones] == [2, 5]
    assert d.override is not None and d.override.startswith("pause")
    assert d.meta["would_be"] > 7


def test_degraded_zone_moves_its_share_and_says_so():
    s = flat(3000, end=SAT)
    d = run(s, SAT, current=10, degraded=frozenset({ZB}))
    assert [z.count for z in d.zones] == [d.desired, 0]
    assert d.meta["moved"] == d.desired // 2
    assert f"{ZB} degraded" in d.reason


def test_zone_capacity_shortfall_moves_to_the_other_zone():
    s = flat(3000, end=SAT)
    d = run(s, SAT, current=10, zone_capacity={ZA: 3, ZB: None})
    assert d.zones[0].count == 3
    assert sum(z.count for z in d.zones) == d.desired


@pytest.mark.parametrize("k", [1, 2, 4])
def test_more_demand_never_fewer_workers(k):
    low = run(flat(800, end=SAT), SAT, current=5).desired
    high = run(flat(800 * k, end=SAT), SAT, current=5).desired
    assert high >= low
