"""``nomadscale backtest``: replay a demand trace through the forecast and sizing stages.

    nomadscale backtest                       # the bundled trace
    nomadscale backtest demand.csv --policy policies/ekyc-ml.yaml --plot out.png

Follows the scoring protocol (capacity per worker = p99 demand / 24 unless given, warm-up,
20-min cycles, 10-min lead, at least 2 workers) and prints nomadscale beside the anchors,
their hindsight-tuned rows and the oracle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from nomadscale.backtest.protocol import make_params
from nomadscale.backtest.runner import Report, run_backtest, write_decisions
from nomadscale.core.clock import utc
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import UsageError
from nomadscale.data import bundled_trace_path
from nomadscale.stages.decide import bounds_from, forecast_config_from
from nomadscale.stages.forecast import ForecastConfig
from nomadscale.stages.history import load_trace
from nomadscale.stages.sizing import Bounds


def _seconds(option: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    if value.strip().replace(".", "", 1).isdigit():
        raise UsageError(f"{option}: {value!r} has no unit (write e.g. {value.strip()}m)")
    try:
        return parse_duration(value).total_seconds()
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _check_cycle_and_lead(
    cycle: str | None, cycle_s: float, lead: str | None, lead_s: float, *, from_policy: bool
) -> None:
    """The policy's rule (lead_time < cycle) on the options, naming where each value came from."""
    if cycle_s <= 0:
        raise UsageError(f"--cycle: must be longer than 0s, got {cycle!r}")
    if lead_s >= cycle_s:
        origin = "the policy's" if from_policy else "default"

        def shown(option: str, text: str | None, seconds: float) -> str:
            given = f"{option} {text.strip()}" if text is not None else None
            return given or f"{option} {format_duration(seconds)} ({origin})"

        raise UsageError(
            f"{shown('--lead', lead, lead_s)} must be shorter than "
            f"{shown('--cycle', cycle, cycle_s)}"
        )


def policy_settings(policy: Any) -> tuple[ForecastConfig, Bounds, float]:
    """Forecast config, bounds and capacity per worker from a loaded policy: the same
    adapters as the live loop's (``stages.decide``)."""
    return (
        forecast_config_from(policy),
        bounds_from(policy),
        float(policy.capacity.rpm_per_worker),
    )


def _table(report: Report, title: str) -> Table:
    t = Table(title=title)
    for col in ("strategy", "availability", "served", "worker-hours", "cost/oracle"):
        if col == "strategy":
            t.add_column(col, no_wrap=True, min_width=30)
        else:
            t.add_column(col, justify="right")
    for name, m in report.rows.items():
        style = "bold green" if name == "nomadscale" else None
        t.add_row(
            name,
            f"{m.availability * 100:.2f}%",
            f"{m.served * 100:.3f}%",
            f"{m.worker_hours:.1f}",
            f"{m.cost_vs_oracle:.3f}",
            style=style,
        )
    return t


@click.command("backtest")
@click.argument("trace", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False),
    help="Policy YAML: cycle, lead time, forecast model/target, bounds, capacity.",
)
@click.option(
    "--capacity-per-worker",
    type=float,
    help="req/min one worker serves "
    "(default: the policy's, else p99 demand / 24 as in the scoring protocol).",
)
@click.option("--cycle", help="Decision cycle (default 20m, or the policy's).")
@click.option("--lead", help="Scale-up lead time (default 10m, or the policy's).")
@click.option("--min-workers", type=int, help="Fleet minimum (default 2, or the policy's).")
@click.option("--target-availability", type=float, help="Default 0.99, or the policy's.")
@click.option("--start", help="First decision (ISO-8601); default: after the warm-up.")
@click.option(
    "--decisions-out",
    type=click.Path(dir_okay=False),
    help="Write nomadscale's decisions as decided_at,workers CSV.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the replay.")
def backtest(
    trace: str | None,
    policy_path: str | None,
    capacity_per_worker: float | None,
    cycle: str | None,
    lead: str | None,
    min_workers: int | None,
    target_availability: float | None,
    start: str | None,
    decisions_out: str | None,
    as_json: bool,
    plot: str | None,
) -> None:
    """Replay TRACE.csv (default: the bundled trace) and compare with the anchors."""
    cfg, bounds, cap = ForecastConfig(), Bounds(min=2), None
    if policy_path:
        from nomadscale.config.policy import load_policy

        cfg, bounds, cap = policy_settings(load_policy(policy_path))
    if capacity_per_worker is not None:
        if not capacity_per_worker > 0:
            raise UsageError("--capacity-per-worker: must be positive")
        cap = capacity_per_worker
    if target_availability is not None:
        if not 0.5 <= target_availability < 1:
            raise UsageError("--target-availability: must be in [0.5, 1)")
        cfg = replace(cfg, target=target_availability)
    cyc = _seconds("--cycle", cycle, cfg.cycle_s)
    ld = _seconds("--lead", lead, cfg.lead_s)
    _check_cycle_and_lead(cycle, cyc, lead, ld, from_policy=bool(policy_path))
    cfg = replace(cfg, cycle_s=cyc, lead_s=ld)
    if min_workers is not None:
        if min_workers < 0:
            raise UsageError("--min-workers: must not be negative")
        bounds = replace(bounds, min=min_workers, max=max(bounds.max, min_workers))
    start_dt: datetime | None = None
    if start:
        try:
            start_dt = utc(datetime.fromisoformat(start.replace("Z", "+00:00")))
        except ValueError:
            raise UsageError(f"--start: not an ISO-8601 time: {start!r}") from None
    path = trace or str(bundled_trace_path())
    tr = load_trace(path)
    p = make_params(tr, cycle_s=cyc, lead_s=ld, min_workers=bounds.min, capacity_rpm=cap,
                    start=start_dt)  # fmt: skip
    rate = tr.series.values
    # headroom is calibrated on the whole workers of this replay (after the options)
    cfg = replace(cfg, capacity_rpm=p.capacity_rpm, min_workers=bounds.min)
    report = run_backtest(rate, p, config=cfg, bounds=bounds)
    if decisions_out:
        write_decisions(decisions_out, p, report.decisions["nomadscale"])
    if plot:
        from nomadscale.backtest.plot import plot_report

        plot_report(report, rate, plot)
    if report.replay.capped:
        # the policy cannot follow this trace: say so, not just a low availability figure
        click.echo(
            f"warning: bounds.max {bounds.max} held nomadscale below its forecast in "
            f"{report.replay.capped} of {len(p.boundaries)} cycles (capacity/worker "
            f"{p.capacity_rpm:g} req/min): raise bounds.max or --capacity-per-worker",
            err=True,
        )
    if as_json:
        out = {k: asdict(m) for k, m in report.rows.items()}
        click.echo(json.dumps(out, indent=1))
        return
    title = (
        f"{Path(path).name}: step {p.step_min:g} min, {len(p.boundaries)} cycles scored, "
        f"capacity/worker {p.capacity_rpm:.2f} req/min"
    )
    Console(width=max(Console().width, 100)).print(_table(report, title))
