"""Service commands that inspect and rehearse: status, plan, forecast, simulate.

``run``/``serve`` live in ``cmd_run``; manual control (override, pause, resume, scale) in
``cmd_control``.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from nomadscale.cli.service_common import (
    consul_kv,
    find_policy,
    get_settings,
    lock_holder,
    policies_for,
)
from nomadscale.config.policy import Policy, load_policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.durations import format_duration
from nomadscale.core.errors import NomadscaleError, PermanentError, UsageError
from nomadscale.service.control import Control

# --- status / plan / forecast -------------------------------------------------------------


class PlanFailed(PermanentError):
    """``plan``: the dry-run cycle failed (exit 1; its decision, if any, printed first)."""


def _status_doc(
    settings: Settings, policies: list[Policy], *, clock: Clock | None = None
) -> dict[str, Any]:
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.service.records import Recorder

    kv = consul_kv(settings)
    control = Control(kv, prefix=settings.kv_prefix)
    recorder = Recorder(kv=kv, prefix=settings.kv_prefix)
    now = (clock or SystemClock()).now()
    holder = lock_holder(settings)  # None once released or expired, whatever the key says
    leader = holder.describe() if holder is not None else None
    nomad = NomadClient.from_settings(settings)
    doc: dict[str, Any] = {"time": now.isoformat(), "leader": leader, "policies": {}}
    for p in policies:
        zones: dict[str, Any] = {}
        try:
            st = nomad.job_status(p.target.job, namespace=p.target.namespace)
            for z in p.zones.items:
                g = st.groups.get(z.group)
                zones[z.name] = {
                    "group": z.group,
                    "desired": g.desired if g else None,
                    "running": g.running if g else None,
                }
            job_error = None
        except NomadscaleError as e:
            job_error = str(e)
        doc["policies"][p.name] = {
            "job": f"{p.target.namespace}/{p.target.job}",
            "zones": zones,
            "job_error": job_error,
            "paused": (lambda o: o.label() if o else None)(control.paused(p.name, now=now)),
            "overrides": [o.to_dict() for o in control.overrides(p.name, now=now)],
            "decisions": recorder.history(p.name, limit=3),
        }
    return doc


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Leader, policies, desired vs actual per zone, overrides and last decisions."""
    settings = get_settings()
    doc = _status_doc(settings, policies_for(settings))
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console()
    con.print(Text(f"leader: {doc['leader'] or 'none'}"))
    t = Table("policy")
    # zone names often share a long prefix (asia-southeast2-a/-b): never cut them short
    widest = max((len(z) for p in doc["policies"].values() for z in p["zones"]), default=4)
    t.add_column("zone", min_width=widest)
    for head in ("desired", "running", "overrides", "last decision"):
        t.add_column(head)
    for name, p in doc["policies"].items():
        last = p["decisions"][0] if p["decisions"] else None
        last_txt = "-"
        if last:
            explain = (last.get("decision") or {}).get("explain") or last.get("reason", "")
            # who decided and why the cycle ran (records stored before these fields: neither)
            by = (f" ({last.get('trigger') or '?'} on {last.get('host') or '?'})"
                  if last.get("trigger") or last.get("host") else "")  # fmt: skip
            last_txt = f"{last['started_at'][:16]} [{last['outcome']}]{by} {explain}"
        ovr = ", ".join(
            f"{o['kind']} {o['value'] if o['value'] is not None else ''} ({o['who']})".replace(
                "  ", " "
            )
            for o in p["overrides"]
        )
        rows = p["zones"] or {"?": {"desired": None, "running": None}}
        for i, (zone, z) in enumerate(rows.items()):
            cells = (
                name if i == 0 else "", zone, str(z["desired"]), str(z["running"]),
                (ovr or "-") if i == 0 else "", last_txt if i == 0 else "",
            )  # fmt: skip
            t.add_row(*(Text(c) for c in cells))  # plain text: "[applied]" is no markup
        if p["job_error"]:
            t.add_row("", "", "", "", "", Text(f"job: {p['job_error']}"))
    con.print(t)


@click.command("plan")
@click.argument("policy")
@click.option("--json", "as_json", is_flag=True)
def plan(policy: str, as_json: bool) -> None:
    """One dry-run cycle of POLICY (name or file): the decision, why, and the actions."""
    from nomadscale.integrations.tracefile import read_time
    from nomadscale.service.control import Control as _Control
    from nomadscale.service.cycle import CycleRunner
    from nomadscale.service.records import PLAN, Recorder
    from nomadscale.service.runtime import build_ports

    settings = get_settings()
    pol = find_policy(settings, policy)
    clock = SystemClock()
    ports = build_ports(settings, [pol], clock=clock, dry_run=True)
    control = _Control(ports.kv, prefix=settings.kv_prefix)
    runner = CycleRunner(policy=pol, ports=ports, control=control,
                         recorder=Recorder(kv=None), clock=clock)  # fmt: skip
    now = read_time(ports.demand(pol), clock.now())  # a trace: right after its last step
    res = runner.run(leader=False, dry_run=True, now=now, trigger=PLAN)
    rec = res.record
    if as_json:
        click.echo(json.dumps(rec.to_dict(), indent=2, default=str))
        return
    if rec.outcome == "failed":
        if res.decision:
            click.echo(res.decision.explain())
        raise PlanFailed(f"{pol.name}: plan failed: {' | '.join(rec.errors) or rec.reason}")
    if rec.skipped and not res.decision:
        click.echo(f"{pol.name}: skipped: {rec.reason}")
        return
    click.echo(res.decision.explain() if res.decision else f"{pol.name}: {rec.reason}")
    if rec.skipped:
        click.echo(f"skipped: {rec.reason}")
    for a in rec.actions:
        click.echo(f"  would {a}")
    if res.decision and not rec.actions:
        click.echo("  nothing to change")


@click.command("forecast")
@click.argument("policy")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Write a PNG plot.")
def forecast_cmd(policy: str, plot_file: str | None) -> None:
    """Forecast POLICY's next cycle from its demand history (the live loop's forecast: the
    same config, lookback and sizing)."""
    from nomadscale.integrations.tracefile import read_time
    from nomadscale.service.runtime import demand_for
    from nomadscale.stages.decide import bounds_from, forecast_config_from, lookback_s
    from nomadscale.stages.forecast import forecast
    from nomadscale.stages.sizing import size

    settings = get_settings()
    pol = find_policy(settings, policy)
    fmt = "png"
    if plot_file:  # before any work: never the policy or its trace, a folder that exists
        from nomadscale.backtest.outputs import check_output
        from nomadscale.backtest.plot import plot_format

        trace = getattr(pol.demand, "trace", None)
        inputs = {"policy": str(pol.source) if pol.source else None, "trace": trace}
        check_output("--plot", plot_file, inputs=inputs)
        fmt = plot_format("--plot", plot_file)
    src = demand_for(settings)(pol)
    now = read_time(src, SystemClock().now())  # a trace: right after its last step
    series = src.history(end=now, lookback_s=lookback_s(pol), step_s=pol.demand.step_s)
    fc = forecast(series, now=now, config=forecast_config_from(pol))
    sized = size(forecast=fc, capacity_rpm=pol.capacity.rpm_per_worker, current=None,
                 bounds=bounds_from(pol), now=now, last_scale_at=None)  # fmt: skip
    within = "" if sized.count == sized.raw else f" ({sized.count} within bounds)"
    click.echo(
        f"{pol.name}: next {format_duration(fc.horizon_s)} peak {fc.peak:.1f} rpm by {fc.model}, "
        f"upper {fc.upper:.1f} rpm (+{fc.headroom * 100:.0f}% for {fc.target:.3g}) "
        f"-> {sized.raw} workers{within}{'' if fc.data_ok else ' (history incomplete)'}"
    )
    if plot_file:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(len(series.values), int(3 * 86400 / series.step_s))
        times = [
            series.start + timedelta(seconds=series.step_s * i) for i in range(len(series.values))
        ]
        fig, ax = plt.subplots(figsize=(11, 4))
        ax.plot(times[-n:], series.values[-n:], lw=1, label="demand (rpm)")
        end = now + timedelta(seconds=fc.horizon_s)
        from matplotlib.dates import date2num

        span = date2num([now, end])
        ax.plot(span, [fc.peak, fc.peak], color="tab:orange", label=f"peak {fc.peak:.0f}")
        ax.plot(span, [fc.upper, fc.upper], color="tab:red", label=f"upper {fc.upper:.0f}")
        ax.set_title(f"{pol.name} forecast at {now:%Y-%m-%d %H:%M} UTC")
        ax.legend(loc="upper left")
        fig.autofmt_xdate()
        fig.tight_layout()
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format=fmt, dpi=100)
        finally:
            plt.close(fig)
        from nomadscale.backtest.outputs import write_files

        write_files([("--plot", plot_file, buf.getvalue())])
        click.echo(f"plot written to {plot_file}")


# --- simulate -----------------------------------------------------------------------------


@click.command("simulate")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Demand trace CSV.")
@click.option("--days", type=click.FloatRange(min=0.1), default=7.0, show_default=True)
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="simulate-out",
              show_default=True)  # fmt: skip
@click.option("--consul", "consul_addr", default=None, help="Use this Consul for KV and lock.")
@click.option("--json", "as_json", is_flag=True)
def simulate_cmd(
    trace: str | None, days: float, policy_file: str | None, out_dir: str,
    consul_addr: str | None, as_json: bool,
) -> None:  # fmt: skip
    """A week of the real autoscaler against an in-process Nomad twin, in virtual time."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from nomadscale.service.simulate import simulate

    logging.getLogger("nomadscale").setLevel(logging.WARNING)
    pol = load_policy(policy_file) if policy_file else None
    try:  # before the run, not after minutes of it
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out_dir}: cannot create the folder: {e.strerror or e}") from None
    con = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=con,
                  disable=as_json) as bar:  # fmt: skip
        task = bar.add_task("cycles", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        res = simulate(trace=trace, days=days, policy=pol, out_dir=out_dir,
                       consul_addr=consul_addr, progress=tick)  # fmt: skip
    s = res.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(
        f"{s['policy_note']}\n"
        f"{s['policy']}: {s['days']} days from {s['start'][:16]}, {s['cycles']} cycles "
        f"({s['applied']} applied, {s['failed']} failed) in {s['wall_seconds']:.0f}s\n"
        f"  availability  {s['availability']:.2%} of steps served\n"
        f"  worker-hours  {s['worker_hours']:.0f} (peak {s['peak_workers']} workers)\n"
        f"  node-hours    {s['node_hours']:.0f} vs {s['static_peak_node_hours']:.0f} holding the "
        f"peak ({s['static_peak_workers']} workers) all along: {s['cost_vs_static_peak']:.0%}\n"
        f"  plot          {s['plot']}"
    )


COMMANDS: list[click.Command] = [status, plan, forecast_cmd, simulate_cmd]

__all__ = ["COMMANDS"]
