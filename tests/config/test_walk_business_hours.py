"""Business hours over midnight (a night shift, ``22:00``-``06:00``): the forecaster supports
them (``stages.forecast.BusinessHours.in_hours``), so validation accepts them, and a policy
file carries such a window end to end (policy file -> forecast config -> in_hours), also over
the nights its time zone changes between winter and summer time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.validate import load_policy, validate_files
from nomadscale.stages.decide import forecast_config_from
from tests.config.helpers import SHIPPED

ALL_DAYS = "[mon, tue, wed, thu, fri, sat, sun]"


def _night_policy(
    tmp: Path, *, start: str, end: str, days: str = ALL_DAYS, tz: str = "Europe/Berlin"
) -> Path:
    text = SHIPPED.read_text(encoding="utf-8")
    for old, new in (
        ("days: [mon, tue, wed, thu, fri]", f"days: {days}"),
        ('start: "08:00"', f'start: "{start}"'),
        ('end: "20:00"', f'end: "{end}"'),
        ("timezone: Asia/Jakarta", f"timezone: {tz}"),
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp / "night.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def test_night_window_is_valid_and_reaches_the_forecaster(tmp_path: Path) -> None:
    path = _night_policy(tmp_path, start="22:00", end="06:00")
    assert validate_files([path]) == []
    _register()
    res = CliRunner().invoke(cli, ["policy", "validate", str(path)])
    assert res.exit_code == 0, res.output
    bh = forecast_config_from(load_policy(path)).business_hours
    assert bh is not None
    # Berlin in winter (CET, UTC+1)
    assert bh.in_hours(_utc(2026, 1, 14, 21, 0))  # 22:00: the window opens
    assert bh.in_hours(_utc(2026, 1, 14, 23, 30))  # 00:30, past midnight
    assert bh.in_hours(_utc(2026, 1, 15, 4, 59))  # 05:59
    assert not bh.in_hours(_utc(2026, 1, 15, 5, 0))  # 06:00: closed
    assert not bh.in_hours(_utc(2026, 1, 15, 11, 0))  # noon
    assert not bh.in_hours(_utc(2026, 1, 14, 20, 59))  # 21:59


def test_night_window_follows_the_clock_change_of_its_time_zone(tmp_path: Path) -> None:
    bh = forecast_config_from(
        load_policy(_night_policy(tmp_path, start="22:00", end="06:00"))
    ).business_hours
    assert bh is not None
    # Sun 29 Mar 2026: Berlin springs forward at 02:00 CET -> 03:00 CEST (UTC+2), mid-window.
    assert bh.in_hours(_utc(2026, 3, 29, 0, 30))  # 01:30 CET
    assert bh.in_hours(_utc(2026, 3, 29, 1, 0))  # 03:00 CEST (02:00 CET never happens)
    assert bh.in_hours(_utc(2026, 3, 29, 3, 59))  # 05:59 CEST
    assert not bh.in_hours(_utc(2026, 3, 29, 4, 0))  # 06:00 CEST: closed (05:00 at UTC+1)
    assert not bh.in_hours(_utc(2026, 3, 29, 19, 30))  # 21:30 CEST
    assert bh.in_hours(_utc(2026, 3, 29, 20, 0))  # 22:00 CEST (21:00 at UTC+1)
    # Sun 25 Oct 2026: back from 03:00 CEST to 02:00 CET; the night is an hour longer.
    assert bh.in_hours(_utc(2026, 10, 24, 20, 0))  # Sat 22:00 CEST
    assert bh.in_hours(_utc(2026, 10, 25, 0, 30))  # 02:30 CEST, the first time
    assert bh.in_hours(_utc(2026, 10, 25, 1, 30))  # 02:30 CET, the second time
    assert bh.in_hours(_utc(2026, 10, 25, 4, 59))  # 05:59 CET
    assert not bh.in_hours(_utc(2026, 10, 25, 5, 0))  # 06:00 CET: closed
    assert bh.in_hours(_utc(2026, 10, 25, 21, 0))  # 22:00 CET


def test_night_window_days_are_the_local_days_of_each_moment(tmp_path: Path) -> None:
    """``days`` names the local day of each moment (as the forecaster checks it): with
    mon-fri, Friday 23:00 is in hours, the early hours of Saturday are not, and those of
    Monday are."""
    path = _night_policy(
        tmp_path, start="22:00", end="06:00", days="[mon, tue, wed, thu, fri]", tz="Asia/Jakarta"
    )
    bh = forecast_config_from(load_policy(path)).business_hours
    assert bh is not None
    assert bh.in_hours(_utc(2026, 1, 9, 16, 0))  # Fri 23:00 WIB (UTC+7)
    assert not bh.in_hours(_utc(2026, 1, 9, 19, 0))  # Sat 02:00
    assert bh.in_hours(_utc(2026, 1, 11, 19, 0))  # Mon 02:00


@pytest.mark.parametrize(
    ("start", "end", "says"),
    [
        ("08:00", "08:00", "must differ from start (08:00): the window would be empty"),
        ("00:00", "00:00", "must differ from start (00:00)"),
        ("24:00", "06:00", None),
    ],
)
def test_empty_window_stays_an_error(tmp_path: Path, start: str, end: str, says: str) -> None:
    path = _night_policy(tmp_path, start=start, end=end)
    errors = [str(e) for e in validate_files([path])]
    assert len(errors) == 1, errors
    if says is None:  # 24:00 ends a day; a window starting then starts at 00:00
        assert ":19: forecast.business_hours.start: 24:00 is only an end" in errors[0], errors
    else:
        assert f":20: forecast.business_hours.end: {says}" in errors[0], errors
    _register()
    res = CliRunner().invoke(cli, ["policy", "validate", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
