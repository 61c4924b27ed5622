"""Schedule windows and the cycle/lead options an operator gets wrong.

A cron that can never fire is a validation error on its ``cron`` field (not a window that
silently never opens); the day-of-month/day-of-week "either" rule treats a field starting
with ``*`` (``*/2``) as unrestricted, like Vixie cron, in the one engine (``core.cron``) that
validation, ``plan`` and the live loop share; ``backtest`` refuses a lead time not shorter
than the cycle, as a policy does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nomadscale.cli.main import _register, cli
from nomadscale.config.validate import check_file
from nomadscale.core import cron as cron_engine
from nomadscale.stages.overrides import Schedule, active_schedules, last_start
from tests.config.helpers import SHIPPED, errors_of

SHIPPED_TEXT = SHIPPED.read_text(encoding="utf-8")
MONTH_END = 'cron: "0 7 28-31 * *"'
CRON_LINE = SHIPPED_TEXT[: SHIPPED_TEXT.index(MONTH_END)].count("\n") + 1


def _with_cron(cron: str) -> str:
    assert MONTH_END in SHIPPED_TEXT
    return SHIPPED_TEXT.replace(MONTH_END, f'cron: "{cron}"', 1)


def _cli(*args: str) -> Result:
    _register()
    return CliRunner().invoke(cli, list(args))


# --- 1. a cron that can never fire ---------------------------------------------------------


@pytest.mark.parametrize("cron", ["0 7 31 2 *", "0 0 30 2 *", "15 3 31 4,6,9,11 *"])
def test_cron_that_never_fires_is_an_error_on_its_cron_field(tmp_path: Path, cron: str) -> None:
    errors = errors_of(tmp_path, _with_cron(cron))
    assert [(e.line, e.field) for e in errors] == [(CRON_LINE, "schedules[0].cron")]
    assert "never fires" in errors[0].message and cron in errors[0].message


def test_never_firing_cron_is_reported_with_the_other_errors_in_one_pass(tmp_path: Path) -> None:
    text = _with_cron("0 7 31 2 *").replace("duration: 14h", "duration: 14x", 1)
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    res = _cli("policy", "validate", str(path))
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}:{CRON_LINE}: schedules[0].cron: ")
    assert "never fires" in lines[0]
    assert ": schedules[0].duration: " in lines[1]


@pytest.mark.parametrize("cron", ["0 0 29 2 *", "0 7 28-31 * *", "0 0 31 2 mon", "0 0 1 1 *"])
def test_rare_but_real_crons_still_pass(tmp_path: Path, cron: str) -> None:
    assert errors_of(tmp_path, _with_cron(cron)) == []


def test_leap_day_fires_on_the_next_leap_day() -> None:
    after = datetime(2026, 3, 1, tzinfo=UTC)
    assert cron_engine.first_fire("0 0 29 2 *", "UTC", after=after) == datetime(
        2028, 2, 29, tzinfo=UTC
    )
    assert cron_engine.first_fire("0 7 31 2 *", "UTC", after=after) is None


# --- 2. the "either day field" rule, one engine for validation and runtime -----------------

# January 2026: the 3rd is a Saturday, the 5th a Monday, the 12th a Monday
SAT_3RD, MON_5TH, MON_12TH = (datetime(2026, 1, d, 0, 30, tzinfo=UTC) for d in (3, 5, 12))


def _window(cron: str) -> Schedule:
    return Schedule(name="w", cron=cron, timezone="UTC", duration_s=3600, kind="min", value=3)


def test_star_step_day_of_month_is_unrestricted_for_the_either_rule() -> None:
    # Vixie cron: dom "*/2" starts with "*", so the day must match both fields (odd Mondays)
    w = _window("0 0 */2 * 1")
    assert active_schedules([w], now=MON_5TH)
    assert not active_schedules([w], now=SAT_3RD)  # odd day, not a Monday
    assert not active_schedules([w], now=MON_12TH)  # a Monday, even day


def test_star_step_day_of_week_is_unrestricted_for_the_either_rule() -> None:
    # dow "*/2" (Sun, Tue, Thu, Sat) starts with "*": the 3rd (a Saturday) only
    w = _window("0 0 3,5 * */2")
    assert active_schedules([w], now=SAT_3RD)
    assert not active_schedules([w], now=MON_5TH)  # the 5th, but a Monday
    assert not active_schedules([w], now=MON_12TH)


def test_both_days_restricted_still_match_either() -> None:
    w = _window("0 0 3 * 1")
    assert active_schedules([w], now=SAT_3RD)
    assert active_schedules([w], now=MON_5TH)
    assert active_schedules([w], now=MON_12TH)


@pytest.mark.parametrize(
    "cron",
    ["0 0 31 2 */1", "0 0 31 2 1", "0 0 30 2 *", "0 0 29 2 *", "0 0 */2 * 1", "0 0 31 */2 *"],
)
def test_validation_and_runtime_agree_on_whether_a_window_ever_opens(
    tmp_path: Path, cron: str
) -> None:
    """``policy validate`` rejects a cron exactly when the live loop would never open it."""
    path = tmp_path / "p.yaml"
    path.write_text(_with_cron(cron), encoding="utf-8")
    policy, _ = check_file(path)
    five_years = timedelta(days=5 * 366)
    now = datetime(2026, 1, 1, tzinfo=UTC) + five_years
    opens = last_start(_window(cron), now=now, within_s=five_years.total_seconds()) is not None
    assert (policy is not None) == opens


# --- 3. backtest: lead time not shorter than the cycle --------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--lead", "30m", "--cycle", "20m"], ["--lead", "20m", "--cycle", "20m"], ["--lead", "20m"]],
)
def test_backtest_lead_not_shorter_than_cycle_is_a_usage_error(args: list[str]) -> None:
    res = _cli("backtest", "--json", *args)
    assert res.exit_code == 2, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1, lines
    assert "--lead" in lines[0] and "--cycle" in lines[0] and "shorter" in lines[0]
    assert "Traceback" not in res.output


def test_backtest_lead_from_the_policy_is_checked_against_the_cycle_option(
    tmp_path: Path,
) -> None:
    res = _cli("backtest", "--json", "--policy", str(SHIPPED), "--cycle", "10m")
    assert res.exit_code == 2, res.output
    assert len(res.output.splitlines()) == 1 and "--cycle" in res.output
