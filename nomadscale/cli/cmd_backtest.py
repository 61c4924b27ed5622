"""``nomadscale backtest``: replay a demand trace through the forecast and sizing stages.

    nomadscale backtest                       # the bundled trace
    nomadscale backtest demand.csv --policy policies/ekyc-ml.yaml --plot out.png

Follows the scoring protocol (capacity per worker = p99 demand / 24 unless given, warm-up,
20-min cycles, 10-min lead, at least 2 workers) and prints nomadscale beside the anchors,
their hindsight-tuned rows and the oracle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from nomadscale.backtest.outputs import check_output, same_file, write_files
from nomadscale.backtest.plot import plot_format
from nomadscale.backtest.protocol import make_params
from nomadscale.backtest.runner import Report, decisions_csv, run_backtest
from nomadscale.core.clock import utc
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import UsageError
from nomadscale.data import bundled_trace_path
from nomadscale.integrations.tracefile import load_trace_file
from nomadscale.stages.decide import bounds_from, forecast_config_from
from nomadscale.stages.forecast import ForecastConfig
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
        raise UsageError(
            f"{_shown('--lead', lead, lead_s, from_policy=from_policy)} must be shorter than "
            f"{_shown('--cycle', cycle, cycle_s, from_policy=from_policy)}"
        )


def _shown(option: str, text: str | None, seconds: float, *, from_policy: bool) -> str:
    """How an option's value is named in an error: as typed, else where it came from."""
    if text is not None:
        return f"{option} {text.strip()}"
    origin = "the policy's" if from_policy else "default"
    return f"{option} {format_duration(seconds)} ({origin})"


def _start(start: str | None) -> datetime | None:
    if not start:
        return None
    try:
        dt = datetime.fromisoformat(start.strip())
    except ValueError:
        raise UsageError(f"--start: not an ISO-8601 time: {start!r}") from None
    if dt.tzinfo is None:
        raise UsageError(
            f"--start: give a time zone: {start.strip()}Z for UTC, or an offset (+02:00)"
        )
    return utc(dt)


def _check_outputs(
    trace: str, policy: str | None, *, decisions_out: str | None, plot: str | None
) -> None:
    """Refuse, before any work, an output that would replace an input or the other output,
    or that cannot be written (``backtest.outputs``)."""
    inputs = {"trace": trace, "policy": policy}
    if decisions_out and plot and same_file(decisions_out, plot):
        raise UsageError(f"--plot and --decisions-out are the same file: {plot}")
    for option, out in (("--decisions-out", decisions_out), ("--plot", plot)):
        if out:
            check_output(option, out, inputs=inputs)


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
    path = trace or str(bundled_trace_path())
    _check_outputs(path, policy_path, decisions_out=decisions_out, plot=plot)
    plot_fmt = plot_format("--plot", plot) if plot else "png"
    cfg, bounds, cap = ForecastConfig(), Bounds(min=2), None
    if policy_path:
        from nomadscale.config.policy import load_policy

        cfg, bounds, cap = policy_settings(load_policy(policy_path))
    if capacity_per_worker is not None:
        if not (capacity_per_worker > 0 and math.isfinite(capacity_per_worker)):
            raise UsageError(
                f"--capacity-per-worker: must be a positive finite number, "
                f"got {capacity_per_worker:g}"
            )
        cap = capacity_per_worker
    if target_availability is not None:
        if not 0.5 <= target_availability < 1:
            raise UsageError(
                "--target-availability: must be at least 0.5 and below 1, "
                f"got {target_availability:g}"
            )
        cfg = replace(cfg, target=target_availability)
    cyc = _seconds("--cycle", cycle, cfg.cycle_s)
    ld = _seconds("--lead", lead, cfg.lead_s)
    _check_cycle_and_lead(cycle, cyc, lead, ld, from_policy=bool(policy_path))
    cfg = replace(cfg, cycle_s=cyc, lead_s=ld)
    if min_workers is not None:
        if min_workers < 0:
            raise UsageError("--min-workers: must not be negative")
        bounds = replace(bounds, min=min_workers, max=max(bounds.max, min_workers))
    start_dt = _start(start)
    tr = load_trace_file(path)
    for option, text, seconds in (("--cycle", cycle, cyc), ("--lead", lead, ld)):
        if abs(seconds / tr.step_s - round(seconds / tr.step_s)) > 1e-9:
            raise UsageError(
                f"{_shown(option, text, seconds, from_policy=bool(policy_path))} is not a "
                f"multiple of the trace step {format_duration(tr.step_s)} ({path})"
            )
    p = make_params(tr, cycle_s=cyc, lead_s=ld, min_workers=bounds.min, capacity_rpm=cap,
                    start=start_dt)  # fmt: skip
    rate = tr.series.values
    # headroom is calibrated on the whole workers of this replay (after the options)
    cfg = replace(cfg, capacity_rpm=p.capacity_rpm, min_workers=bounds.min)
    report = run_backtest(rate, p, config=cfg, bounds=bounds)
    # every output is complete before any is written, and each is written whole
    files: list[tuple[str, str, bytes]] = []
    if decisions_out:
        csv = decisions_csv(p, report.decisions["nomadscale"])
        files.append(("--decisions-out", decisions_out, csv.encode("utf-8")))
    if plot:
        from nomadscale.backtest.plot import render_plot

        files.append(("--plot", plot, render_plot(report, rate, fmt=plot_fmt)))
    write_files(files)
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
