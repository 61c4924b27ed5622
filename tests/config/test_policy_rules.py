"""Each policy rule, as a one-change edit of the shipped policy: the error names the field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from nomadscale.config.policy import Policy, cross_field_problems
from nomadscale.config.validate import load_policy
from tests.config.helpers import SHIPPED, edited, errors_of, shipped_data

BH = ("forecast", "business_hours")
NP = ("target", "node_pool")

RULES: list[tuple[tuple[str | int, ...], Any, str, str]] = [
    (("name",), "Ekyc_ML", "name", "not a valid name"),
    (("name",), "-x", "name", "not a valid name"),
    (("cycle",), "20 minutes", "cycle", "not a duration: '20 minutes' (use e.g. 90s"),
    (("cycle",), "25m", "cycle", "must be whole minutes that divide a day"),
    (("cycle",), "20m30s", "cycle", "must be whole minutes that divide a day"),
    (("cycle",), "0s", "cycle", "must be longer than 0s"),
    (("lead_time",), "30m", "lead_time", "must be shorter than cycle (30m >= 20m)"),
    (("lead_time",), "20m", "lead_time", "must be shorter than cycle (20m >= 20m)"),
    (("demand", "source"), "graphite", "demand", "source must be one of"),
    (("demand", "query"), "", "demand.query", "must not be empty"),
    (("demand", "step"), "soon", "demand.step", "not a duration"),
    (("demand", "lookback"), "30s", "demand.lookback", "must be longer than step"),
    (("forecast", "model"), "magic", "forecast.model", "must be one of"),
    (("forecast", "target_availability"), 1.0, "forecast.target_availability", "must be <"),
    (("forecast", "target_availability"), 0.5, "forecast.target_availability", "must be >"),
    (("forecast", "target_availability"), True, "forecast.target_availability", "a number"),
    ((*BH, "days"), ["mon", "funday"], "forecast.business_hours.days[1]", "must be one of"),
    ((*BH, "days"), ["mon", "mon"], "forecast.business_hours.days", "twice"),
    ((*BH, "start"), "8am", "forecast.business_hours.start", '"HH:MM"'),
    ((*BH, "start"), 1200, "forecast.business_hours.start", "quoted"),
    ((*BH, "end"), "08:00", "forecast.business_hours.end", "must differ from start"),
    ((*BH, "timezone"), "Asia/Jakata", f"{'.'.join(BH)}.timezone", "unknown time zone"),
    ((*BH, "min_workers"), 41, "forecast.business_hours.min_workers", "<= bounds.max (41 > 40)"),
    ((*BH, "target_availability"), 2, "forecast.business_hours.target_availability", "<"),
    (("capacity", "rpm_per_worker"), 0, "capacity.rpm_per_worker", "must be > 0"),
    (("capacity", "rpm_per_worker"), "fast", "capacity.rpm_per_worker", "must be a number"),
    (("bounds", "min"), 50, "bounds.min", "must be <= bounds.max (50 > 40)"),
    (("bounds", "min"), -1, "bounds.min", "must be >= 0"),
    (("bounds", "max"), 2.5, "bounds.max", "whole number"),
    (("bounds", "max_step_up"), 0, "bounds.max_step_up", "must be >= 1"),
    (("bounds", "max_step_down"), 0, "bounds.max_step_down", "must be >= 1"),
    (("bounds", "scale_down_cooldown"), "later", "bounds.scale_down_cooldown", "not a duration"),
    (("zones", "split"), "round-robin", "zones.split", "must be one of"),
    (("zones", "list", 1, "name"), "asia-southeast2-a", "zones.list[1].name", "duplicate zone"),
    (("zones", "list", 1, "group"), "ml-worker-a", "zones.list[1].group", "duplicate zone"),
    (("zones", "list", 0, "group"), None, "zones.list[0].group", "must be text, got nothing"),
    (("zones", "list", 0, "instance_group"), None, "zones.list[0].instance_group", "required"),
    (("target", "job"), ["a"], "target.job", "must be text"),
    ((*NP, "provider"), "aws-asg", "target.node_pool.provider", "must be one of"),
    ((*NP, "workers_per_node"), 0, "target.node_pool.workers_per_node", "must be >= 1"),
    ((*NP, "scale_in_order"), "newest", "target.node_pool.scale_in_order", "must be one of"),
    ((*NP, "drain_deadline"), "-5m", "target.node_pool.drain_deadline", "not a duration"),
    (("schedules", 0, "cron"), "0 7 32 * *", "schedules[0].cron", "bad cron expression"),
    (("schedules", 0, "cron"), "0 7 * *", "schedules[0].cron", "need 5 fields"),
    (("schedules", 0, "timezone"), "Mars/Base", "schedules[0].timezone", "unknown time zone"),
    (("schedules", 0, "max"), 12, "schedules[0].min", "exactly one of min, max, fixed"),
    (("schedules", 1, "fixed"), None, "schedules[1].min", "exactly one of"),
    (("schedules", 1, "name"), "month-end-close", "schedules[1].name", "duplicate schedule"),
    (("schedules", 0, "min"), 99, "schedules[0].min", "<= bounds.max (99 > 40)"),
    (("alerting", "failed_cycles_before_alert"), 0, "alerting.failed_cycles_before_alert", ">="),
    (("deploy", "on_prefetch_failure"), "retry", "deploy.on_prefetch_failure", "one of"),
    (("deploy", "prefetch_retries"), -1, "deploy.prefetch_retries", "must be >= 0"),
    (("deploy", "image_size"), "huge", "deploy.image_size", "not a size"),
    (("deploy", "min_healthy_time"), "10m", "deploy.min_healthy_time", "shorter than healthy"),
    (("deploy", "healthy_deadline"), "30m", "deploy.healthy_deadline", "shorter than progress"),
    (("deploy", "sli", "max_error_rate"), 1.5, "deploy.sli.max_error_rate", "must be <= 1"),
    (("deploy", "sli", "window"), "0s", "deploy.sli.window", "longer than 0s"),
]


@pytest.mark.parametrize(("path", "value", "field", "fragment"), RULES)
def test_rule_reports_field_and_reason(
    tmp_path: Path, path: tuple[str | int, ...], value: Any, field: str, fragment: str
) -> None:
    errors = errors_of(tmp_path, edited(path, value))
    assert [e.field for e in errors] == [field], [str(e) for e in errors]
    assert fragment in errors[0].message
    assert errors[0].line >= 1


@pytest.mark.parametrize(
    "path",
    [
        ("name",),
        ("demand", "query"),
        ("capacity",),
        ("bounds", "max"),
        ("target", "job"),
        ("zones", "list", 0, "node_pool"),
        ("schedules", 0, "duration"),
        ("deploy", "image"),
    ],
)
def test_missing_required_key(tmp_path: Path, path: tuple[str | int, ...]) -> None:
    errors = errors_of(tmp_path, edited(path, None, delete=True))
    shown = ".".join(str(p) for p in path).replace(".0", "[0]")
    assert [(e.field, e.message) for e in errors] == [(shown, "required")]


def test_routing_key_must_be_an_env_name_and_is_never_echoed(tmp_path: Path) -> None:
    key = "R0ut1ngK3ySecret0123456789abcdef"
    errors = errors_of(tmp_path, edited(("alerting", "pagerduty_routing_key_env"), key))
    assert [e.field for e in errors] == ["alerting.pagerduty_routing_key_env"]
    assert "NAME of an environment variable" in errors[0].message
    assert key not in str(errors[0])


def test_shipped_policy_loads_with_its_values() -> None:
    p = load_policy(SHIPPED)
    assert p.name == "ekyc-ml"
    assert (p.cycle, p.cycle_s, p.lead_time_s, p.horizon_s) == (
        timedelta(minutes=20),
        1200,
        600,
        1800,
    )
    assert p.demand.source == "prometheus" and p.demand.lookback == timedelta(days=35)
    assert p.forecast.business_hours is not None
    assert p.forecast.business_hours.start_minute == 8 * 60
    assert p.forecast.business_hours.timezone == "Asia/Jakarta"
    assert [z.group for z in p.zones.items] == ["ml-worker-a", "ml-worker-b"]
    assert p.target.node_pool is not None and p.target.node_pool.drain_deadline_s == 900
    assert [s.name for s in p.schedules] == ["month-end-close", "weekly-maintenance-freeze"]
    assert p.schedules[1].fixed == 6
    assert p.deploy is not None and p.deploy.image_size_bytes == 7 * 10**9
    assert p.deploy.sli is not None and p.deploy.sli.max_latency == timedelta(milliseconds=800)
    assert p.source == SHIPPED


def test_defaults_fill_in_optional_sections(tmp_path: Path) -> None:
    data = shipped_data()
    for key in ("cycle", "lead_time", "forecast", "schedules", "alerting", "deploy"):
        del data[key]
    del data["target"]["namespace"]
    del data["target"]["node_pool"]["scale_in_order"]
    p = Policy.model_validate(data)
    assert (p.cycle, p.lead_time) == (timedelta(minutes=20), timedelta(minutes=10))
    assert p.forecast.model == "auto" and p.forecast.target_availability == 0.99
    assert p.target.namespace == "default"
    assert p.target.node_pool is not None
    assert p.target.node_pool.scale_in_order == "empty-then-oldest"
    assert p.schedules == () and p.deploy is None and p.alerting.failed_cycles_before_alert == 3
    assert p.source is None


def test_policy_is_frozen() -> None:
    p = load_policy(SHIPPED)
    with pytest.raises(Exception, match="frozen"):
        p.name = "other"  # type: ignore[misc]


def test_trace_source_resolves_relative_to_policy_file(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "demand.csv").write_text("time,rpm\n", encoding="utf-8")
    data = edited(("demand",), {"source": "trace", "trace": "traces/demand.csv"})
    (tmp_path / "p.yaml").write_text(__import__("yaml").safe_dump(data), encoding="utf-8")
    p = load_policy(tmp_path / "p.yaml")
    assert p.demand.source == "trace"
    assert p.demand.trace == str((tmp_path / "traces" / "demand.csv").resolve())
    missing = errors_of(tmp_path, edited(("demand",), {"source": "trace", "trace": "nope.csv"}))
    assert [(e.field, "trace file not found" in e.message) for e in missing] == [
        ("demand.trace", True)
    ]


def test_cross_field_rules_also_hold_when_built_in_code() -> None:
    data = edited(("lead_time",), "25m")
    with pytest.raises(ValueError, match="must be shorter than cycle"):
        Policy.model_validate(data)
    assert cross_field_problems(shipped_data()) == []
