"""Overrides (min/max/fixed/pause), their JSON form, and cron-scheduled windows."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from nomadscale.core.errors import InputError
from nomadscale.stages.overrides import (
    Override,
    Schedule,
    active_schedules,
    apply_overrides,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def ov(kind, value=None, *, minutes=60, created=T0, source="cli", who="alice"):
    return Override(
        policy="ekyc-ml",
        kind=kind,
        value=value,
        reason="test",
        who=who,
        created_at=created,
        expires_at=created + timedelta(minutes=minutes),
        source=source,
    )


# --- JSON round trip -----------------------------------------------------------------------


def test_override_survives_a_json_round_trip():
    o = ov("min", 10)
    back = Override.from_dict(json.loads(json.dumps(o.to_dict())))
    assert back == o
    p = Override(
        policy="p",
        kind="pause",
        value=None,
        reason="incident",
        who="bob",
        created_at=T0,
        expires_at=None,
    )
    assert Override.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    ("patch", "msg"),
    [
        ({"kind": "double"}, "kind must be one of"),
        ({"value": -1}, "whole number"),
        ({"value": "5"}, "whole number"),
        ({"value": True}, "whole number"),
        ({"kind": "pause", "value": 3}, "pause takes no value"),
        ({"created_at": "yesterday"}, "created_at is not an ISO 8601"),
        ({"created_at": "2026-11-23T10:00:00"}, "needs a timezone"),
        ({"expires_at": 5}, "expires_at must be an ISO 8601"),
        ({"expires_at": "2026-11-23T09:00:00+00:00"}, "after created_at"),
        ({"source": "robot"}, "source must be one of"),
        ({"policy": 3}, "policy must be a string"),
    ],
)
def test_invalid_stored_override_is_an_input_error(patch, msg):
    data = {**ov("max", 5).to_dict(), **patch}
    with pytest.raises(InputError, match=msg):
        Override.from_dict(data)


def test_missing_fields_and_non_objects_are_input_errors():
    with pytest.raises(InputError, match="missing field"):
        Override.from_dict({"policy": "p"})
    with pytest.raises(InputError, match="expected an object"):
        Override.from_dict(["min", 3])  # type: ignore[arg-type]


# --- precedence ----------------------------------------------------------------------------


def test_no_active_override_leaves_count_alone():
    assert apply_overrides(7, [], now=T0) == (7, None)
    expired = ov("fixed", 1, minutes=10)
    assert apply_overrides(7, [expired], now=T0 + timedelta(minutes=10)) == (7, None)
    future = ov("fixed", 1, created=T0 + timedelta(hours=1))
    assert apply_overrides(7, [future], now=T0) == (7, None)


def test_min_raises_and_max_lowers_with_the_tightest_winning():
    now = T0 + timedelta(minutes=1)
    count, why = apply_overrides(3, [ov("min", 6), ov("min", 9), ov("min", 4)], now=now)
    assert count == 9
    assert why is not None and "min 9" in why and "raised 3 -> 9" in why
    count, why = apply_overrides(30, [ov("max", 20), ov("max", 12)], now=now)
    assert count == 12
    assert why is not None and "max 12" in why


def test_non_binding_override_is_reported_but_changes_nothing():
    count, why = apply_overrides(8, [ov("min", 4), ov("max", 20)], now=T0)
    assert count == 8
    assert why is not None and "not binding" in why


def test_min_above_max_keeps_the_min_and_says_so():
    count, why = apply_overrides(10, [ov("min", 15), ov("max", 12)], now=T0)
    assert count == 15
    assert why is not None and "min wins" in why


def test_fixed_beats_min_max_and_newest_fixed_wins():
    later = T0 + timedelta(minutes=5)
    ovs = [ov("min", 30), ov("max", 2), ov("fixed", 6), ov("fixed", 8, created=later)]
    count, why = apply_overrides(20, ovs, now=later)
    assert count == 8
    assert why is not None and why.startswith("fixed 8")


def test_pause_beats_everything_and_keeps_the_count():
    count, why = apply_overrides(20, [ov("fixed", 6), ov("pause")], now=T0)
    assert count == 20
    assert why is not None and "paused" in why


# --- schedules -----------------------------------------------------------------------------

MONTH_END = {
    "name": "month-end-close",
    "cron": "0 7 28-31 * *",
    "timezone": "Asia/Jakarta",
    "duration": "14h",
    "min": 10,
}
SUNDAY_FREEZE = {
    "name": "weekly-maintenance-freeze",
    "cron": "0 1 * * 0",  # cron's 0 is Sunday (APScheduler's would be Monday)
    "timezone": "Asia/Jakarta",
    "duration": "2h",
    "fixed": 6,
}


@pytest.mark.parametrize(
    ("now", "active"),
    [
        (datetime(2026, 11, 27, 23, 59, tzinfo=UTC), False),  # 06:59 Jakarta, not yet
        (datetime(2026, 11, 28, 0, 0, tzinfo=UTC), True),  # 07:00 Jakarta: window opens
        (datetime(2026, 11, 28, 13, 59, tzinfo=UTC), True),  # 20:59 Jakarta
        (datetime(2026, 11, 28, 14, 0, tzinfo=UTC), False),  # 21:00: 14h later, closed
        (datetime(2026, 11, 27, 0, 0, tzinfo=UTC), False),  # the 27th is not in 28-31
    ],
)
def test_month_end_window_opens_at_local_time_and_lasts_its_duration(now, active):
    got = active_schedules([MONTH_END], now=now, policy="ekyc-ml")
    assert bool(got) is active
    if active:
        (o,) = got
        assert (o.kind, o.value, o.source, o.policy) == ("min", 10, "schedule", "ekyc-ml")
        assert o.created_at == datetime(2026, 11, 28, 0, 0, tzinfo=UTC)
        assert o.expires_at == datetime(2026, 11, 28, 14, 0, tzinfo=UTC)


def test_numeric_sunday_means_sunday():
    sunday_0130_jkt = datetime(2026, 11, 28, 18, 30, tzinfo=UTC)  # Sun 29 Nov 01:30 Jakarta
    monday_0130_jkt = datetime(2026, 11, 29, 18, 30, tzinfo=UTC)
    assert [o.value for o in active_schedules([SUNDAY_FREEZE], now=sunday_0130_jkt)] == [6]
    assert active_schedules([SUNDAY_FREEZE], now=monday_0130_jkt) == []


def test_day_of_month_or_day_of_week_matches_either_like_cron():
    s = {**MONTH_END, "cron": "0 7 1 * mon", "duration": "1h"}
    first_thu = datetime(2026, 10, 1, 0, 30, tzinfo=UTC)  # Thu 1 Oct, 07:30 Jakarta
    a_monday = datetime(2026, 10, 5, 0, 30, tzinfo=UTC)
    a_tuesday = datetime(2026, 10, 6, 0, 30, tzinfo=UTC)
    assert active_schedules([s], now=first_thu)
    assert active_schedules([s], now=a_monday)
    assert not active_schedules([s], now=a_tuesday)


def test_window_across_dst_change_lasts_elapsed_duration():
    # Europe/Berlin falls back on Sun 25 Oct 2026 at 03:00 CEST -> 02:00 CET.
    s = {
        "name": "night",
        "cron": "0 0 * * *",
        "timezone": "Europe/Berlin",
        "duration": "4h",
        "max": 3,
    }
    start = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # 00:00 CEST on the 25th
    (o,) = active_schedules([s], now=start + timedelta(hours=3, minutes=59))
    assert o.expires_at == start + timedelta(hours=4)
    assert active_schedules([s], now=start + timedelta(hours=4)) == []


def test_later_window_of_a_frequent_cron_sets_the_expiry():
    s = {"name": "hourly", "cron": "0 * * * *", "timezone": "UTC", "duration": "90m", "min": 2}
    (o,) = active_schedules([s], now=T0 + timedelta(minutes=20))
    assert o.created_at == T0
    assert o.expires_at == T0 + timedelta(minutes=90)


@pytest.mark.parametrize(
    ("patch", "msg"),
    [
        ({"cron": "0 7 * *"}, "5 fields"),
        ({"cron": "0 25 * * *"}, "bad cron"),
        ({"cron": "0 1 * * 9"}, "bad day of week"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"duration": "soon"}, "duration"),
        ({"max": 3}, "exactly one of"),
    ],
)
def test_bad_schedule_is_a_one_line_input_error(patch, msg):
    with pytest.raises(InputError, match=msg):
        Schedule.coerce({**MONTH_END, **patch})
