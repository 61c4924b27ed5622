"""Policy mistakes an operator makes, and scheduled windows in zones with and without DST.

``policy validate`` must report every broken rule in one pass, also a section's own rules
while another field of that section is wrong; a duration without a unit is a mistake, not
seconds; a schedule window fires like cron across DST changes and lasts its duration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nomadscale.cli.main import _register, cli
from nomadscale.stages.overrides import active_schedules
from tests.config.helpers import SHIPPED, errors_of

SHIPPED_TEXT = SHIPPED.read_text(encoding="utf-8")


def _lines(tmp_path: Path, edits: list[tuple[str, str]]) -> list[str]:
    text = SHIPPED_TEXT
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return [f"{e.line}: {e.field}: {e.message}" for e in errors_of(tmp_path, text)]


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (  # bounds: min > max is reported with the bad step limit, not after fixing it
            [("  min: 2\n  max: 40\n  max_step_up: 8", "  min: 50\n  max: 40\n  max_step_up: 0")],
            ["29: bounds.min: must be <= bounds.max (50 > 40)",
             "31: bounds.max_step_up: must be >= 1, got 0"],
        ),
        (  # a schedule with a bad duration and two kinds
            [("    min: 10\n", "    min: 10\n    max: 12\n"), ("duration: 14h", "duration: 14x")],
            ["61: schedules[0].duration: not a duration: '14x' (use e.g. 90s, 20m, 1h30m, 2d)",
             "62: schedules[0].min: needs exactly one of min, max, fixed (got min and max)"],
        ),
        (  # two schedules named alike while one of them is broken
            [("name: weekly-maintenance-freeze", "name: month-end-close"),
             ("    min: 10\n", "    min: 10\n    max: 12\n")],
            ["62: schedules[0].min: needs exactly one of min, max, fixed (got min and max)",
             "64: schedules[1].name: duplicate schedule name 'month-end-close'"],
        ),
        (  # business hours: a day twice, an empty window, and a bad minimum
            [("days: [mon, tue, wed, thu, fri]", "days: [mon, mon]"),
             ('end: "20:00"', 'end: "08:00"'), ("min_workers: 4", "min_workers: -1")],
            ["18: forecast.business_hours.days: lists a day twice",
             "20: forecast.business_hours.end: must differ from start (08:00): the window would be empty",
             "23: forecast.business_hours.min_workers: must be >= 0, got -1"],
        ),
        (  # zones: both the name and the group repeated, and a bad capacity elsewhere
            [("name: asia-southeast2-b", "name: asia-southeast2-a"),
             ("group: ml-worker-b", "group: ml-worker-a"), ("rpm_per_worker: 240", "rpm_per_worker: 0")],
            ["26: capacity.rpm_per_worker: must be > 0.0, got 0",
             "42: zones.list[1].name: duplicate zone name 'asia-southeast2-a'",
             "43: zones.list[1].group: duplicate zone group 'ml-worker-a'"],
        ),
        (  # demand: an unknown key hid lookback <= step
            [("lookback: 35d", "lookback: 1m"), ("  step: 1m\n", "  step: 1m\n  foo: 1\n")],
            ["12: demand.foo: unknown key (expected one of: source, query, step, lookback)",
             "13: demand.lookback: must be longer than step (1m <= 1m)"],
        ),
        (  # deploy: both deadline rules at once, next to an unknown key
            [("min_healthy_time: 30s", "min_healthy_time: 15m\n  canaries: 2"),
             ("progress_deadline: 20m", "progress_deadline: 5m")],
            ["81: deploy.canaries: unknown key, did you mean 'canary'?",
             "80: deploy.min_healthy_time: must be shorter than healthy_deadline (15m >= 10m)",
             "82: deploy.healthy_deadline: must be shorter than progress_deadline (10m >= 5m)"],
        ),
    ],
)  # fmt: skip
def test_validate_reports_section_rules_next_to_other_errors(
    tmp_path: Path, edits: list[tuple[str, str]], expected: list[str]
) -> None:
    assert sorted(_lines(tmp_path, edits)) == sorted(expected)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("duration: 14h", "duration: 14", "61: schedules[0].duration: 14 has no unit"),
        ("lead_time: 10m", "lead_time: 600", "6: lead_time: 600 has no unit"),
        ("scale_down_cooldown: 40m", 'scale_down_cooldown: "90"', "33: bounds.scale_down_cooldown: 90 has no unit"),
        ("window: 5m", "window: 2.5", "88: deploy.sli.window: 2.5 has no unit"),
    ],
)  # fmt: skip
def test_a_duration_without_a_unit_is_an_error_not_seconds(
    tmp_path: Path, old: str, new: str, where: str
) -> None:
    (line,) = _lines(tmp_path, [(old, new)])
    assert line.startswith(where) and "(write e.g." in line


def test_zero_needs_no_unit(tmp_path: Path) -> None:
    assert _lines(tmp_path, [("scale_down_cooldown: 40m", "scale_down_cooldown: 0")]) == []


# --- scheduled windows across DST changes ------------------------------------------------------


def _window(cron: str, tz: str, duration: str) -> dict[str, object]:
    return {"name": "w", "cron": cron, "timezone": tz, "duration": duration, "min": 5}


def _starts(window: dict[str, object], times: list[datetime]) -> list[datetime | None]:
    out: list[datetime | None] = []
    for now in times:
        found = active_schedules([window], now=now, policy="p")
        out.append(found[0].created_at if found else None)
    return out


def test_fixed_time_window_opens_once_on_the_night_clocks_go_back() -> None:
    # New York falls back on Sun 1 Nov 2026: 01:00-02:00 local happens twice (EDT, then EST).
    w = _window("30 1 * * *", "America/New_York", "1h")
    first = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT
    times = [first + timedelta(minutes=m) for m in (0, 59, 60, 61, 90, 119)]
    # cron runs a fixed-time entry once; the window lasts its 1h of elapsed time, not 2h
    assert _starts(w, times) == [first, first, None, None, None, None]


def test_window_at_a_skipped_local_time_still_opens_on_the_night_clocks_go_forward() -> None:
    # New York springs forward on Sun 8 Mar 2026: 02:00-03:00 local does not exist.
    w = _window("30 2 * * *", "America/New_York", "1h")
    opens = datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 02:30 read with EST = 03:30 EDT
    times = [opens - timedelta(minutes=1), opens, opens + timedelta(minutes=30)]
    assert _starts(w, times) == [None, opens, opens]
    assert _starts(w, [opens + timedelta(hours=1)]) == [None]


def test_frequent_window_keeps_firing_through_the_repeated_hour() -> None:
    w = _window("*/20 * * * *", "America/New_York", "20m")
    t = datetime(2026, 11, 1, 6, 10, tzinfo=UTC)  # 01:10 EST, the second 01:xx
    assert _starts(w, [t]) == [datetime(2026, 11, 1, 6, 0, tzinfo=UTC)]


def test_jakarta_window_across_midnight_and_month_end() -> None:
    # Asia/Jakarta has no DST; 22:00 for 4h runs over midnight into the next day.
    w = _window("0 22 * * fri", "Asia/Jakarta", "4h")
    opens = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)  # Fri 22:00 WIB
    times = [opens, opens + timedelta(hours=3, minutes=59), opens + timedelta(hours=4)]
    assert _starts(w, times) == [opens, opens, None]
    # "28-31" in February: the 28th opens it; 1 March does not
    month_end = _window("0 7 28-31 * *", "Asia/Jakarta", "14h")
    feb28 = datetime(2026, 2, 28, 0, 0, tzinfo=UTC)  # 07:00 WIB
    mar1 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
    assert _starts(month_end, [feb28, mar1]) == [feb28, None]


# --- capacity and backtest: user mistakes are one clear line ---------------------------------

CATALOG = str(SHIPPED.parent / "catalog" / "gcp-gpu-shapes.yaml")
TRACE = str(SHIPPED.parents[1] / "nomadscale" / "data" / "llm_alibaba_servegen_msmall_10min.csv")


def _cli(*args: str) -> Result:
    _register()
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--worker-gpus", "0", "--worker-gpus: must be greater than or equal to 1, got 0"),
        ("--worker-ram", "-1", "--worker-ram: must be greater than 0"),
        ("--worker-ram", "inf", "--worker-ram: must be a finite number"),
        ("--cycle", "90", "--cycle: '90' has no unit"),
    ],
)
def test_capacity_names_the_bad_option(option: str, value: str, says: str) -> None:
    res = _cli("capacity", "--catalog", CATALOG, "--trace", TRACE, option, value)
    assert res.exit_code == 2, res.output
    assert says in res.stderr and "pydantic" not in res.stderr


def test_capacity_fails_when_no_shape_fits_a_worker() -> None:
    res = _cli("capacity", "--catalog", CATALOG, "--trace", TRACE, "--worker-gpus", "100", "--json")
    assert res.exit_code == 1, res.output
    assert "no shape in the catalog fits" in res.stderr


def test_backtest_and_capacity_show_every_policy_error(tmp_path: Path) -> None:
    text = SHIPPED_TEXT.replace(
        "  min: 2\n  max: 40\n  max_step_up: 8", "  min: 50\n  max: 40\n  max_step_up: 0"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    for args in (
        ("backtest", "--policy", str(bad)),
        ("capacity", "--catalog", CATALOG, "--policy", str(bad)),
        ("plan", str(bad)),
        ("run", "--once", "--dry-run", "--no-http", "--policy", str(bad)),
    ):
        res = _cli(*args)
        assert res.exit_code == 1, res.output
        assert "bounds.min: must be <= bounds.max" in res.stderr
        assert "bounds.max_step_up: must be >= 1" in res.stderr
        assert "more)" not in res.stderr
    res = _cli("backtest", "--cycle", "90")
    assert res.exit_code == 2 and "'90' has no unit" in res.stderr
