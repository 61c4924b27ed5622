"""Service commands that inspect and rehearse: status, plan, forecast, simulate.

``run``/``serve`` live in ``cmd_run``; manual control (override, pause, resume, scale) in
``cmd_control``.
"""

from __future__ import annotations

import contextlib
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
from nomadscale.core.errors import NomadscaleError, NotFoundError, PermanentError, UsageError
from nomadscale.service.control import Control

# --- status / plan / forecast -------------------------------------------------------------


class StatusIncomplete(PermanentError):
    """``status``: a policy's job could not be read (exit 1, after the table)."""


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
            job_error, unreadable = None, False
        except NotFoundError as e:  # not deployed (yet): status says so, that is all
            job_error, unreadable = str(e), False
        except NomadscaleError as e:  # Nomad down, a token it refuses...: status is partial
            job_error, unreadable = str(e), True
        doc["policies"][p.name] = {
            "job": f"{p.target.namespace}/{p.target.job}",
            "zones": zones,
            "job_error": job_error,
            "job_unreadable": unreadable,
            "paused": (lambda o: o.label() if o else None)(control.paused(p.name, now=now)),
            "overrides": [o.to_dict() for o in control.overrides(p.name, now=now)],
            "decisions": recorder.history(p.name, limit=3),
        }
    # what each running service loaded (nomadscale run keeps it at <prefix>/loaded/<host>)
    doc["loaded"] = {}
    try:
        for kv_entry in kv.list(f"{settings.kv_prefix}/loaded/"):
            with contextlib.suppress(ValueError):
                entry = json.loads(kv_entry.value)
                if isinstance(entry, dict):
                    doc["loaded"][kv_entry.key.rsplit("/", 1)[-1]] = entry
    except NomadscaleError as err:
        doc["loaded_error"] = str(err)
    return doc


def _loaded_line(host: str, entry: dict[str, Any]) -> str:
    n = len(entry.get("policies") or {})
    line = f"{host}: {n} polic{'y' if n == 1 else 'ies'} loaded at {entry.get('loaded_at')}"
    last = entry.get("last_reload")
    if isinstance(last, dict):
        line += f"; last reload {last.get('at')} {last.get('result')}"
        if last.get("result") == "failed" and last.get("errors"):
            line += f": {last['errors'][0]}"
            more = len(last["errors"]) - 1
            line += f" (+{more} more)" if more > 0 else ""
    return line


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Leader, policies, desired vs actual per zone, overrides and last decisions, and what
    each running service loaded.

    Exits 0, or 1 when a policy's job could not be read from Nomad (unreachable, token
    refused: its row says why; a job not deployed yet is shown, exit 0)."""
    settings = get_settings()
    doc = _status_doc(settings, policies_for(settings))
    unread = [n for n, p in doc["policies"].items() if p["job_unreadable"]]
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        if unread:
            raise StatusIncomplete(f"cannot read the job of {', '.join(unread)} from Nomad")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console()
    con.print(Text(f"leader: {doc['leader'] or 'none'}"))
    for host, entry in sorted(doc["loaded"].items()):
        con.print(Text(_loaded_line(host, entry)))
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
                name if i == 0 else "", zone, _count(z["desired"]), _count(z["running"]),
                (ovr or "-") if i == 0 else "", last_txt if i == 0 else "",
            )  # fmt: skip
            t.add_row(*(Text(c) for c in cells))  # plain text: "[applied]" is no markup
        if p["job_error"]:
            t.add_row("", "", "", "", "", Text(f"job: {p['job_error']}"))
    con.print(t)
    if unread:
        raise StatusIncomplete(f"cannot read the job of {', '.join(unread)} from Nomad")


def _count(v: int | None) -> str:
    return "-" if v is None else str(v)


@click.command("plan")
@click.argument("policy")
@click.option("--json", "as_json", is_flag=True)
def plan(policy: str, as_json: bool) -> None:
    """One dry-run cycle of POLICY (name or file): the decision, why, and the actions:
    what the running service decides now.

    Its forecast is the service's: made from the history since an origin shared by every
    process (one to two lookbacks back, fixed per policy), so it reads up to twice the
    policy's lookback (plus a cycle)."""
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
    """Forecast POLICY's next cycle from its demand history: exactly the running service's
    forecast for now (the same config, history and sizing).

    Like the service, it forecasts from the history since an origin shared by every process
    (one to two lookbacks back, fixed per policy), so it reads up to twice the policy's
    lookback (plus a cycle)."""
    from nomadscale.integrations.tracefile import read_time
    from nomadscale.service.forecasts import forecast_at
    from nomadscale.service.runtime import demand_for
    from nomadscale.stages.decide import bounds_from
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
    fc, series, _how = forecast_at(pol, src, now=now)
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
        from matplotlib.dates import date2num

        ax.plot(date2num(times[-n:]), series.values[-n:], lw=1, label="demand (rpm)")
        end = now + timedelta(seconds=fc.horizon_s)
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


SIMULATE_EPILOG = """\b
The figures come from the twin's exact timeline (every state change):
  availability = share of trace steps whose demand the workers running throughout the
  step serve; worker-hours and node-hours integrate what ran and what GCE billed (a
  node from its creation, booting included, to its deletion, drain included).
  They differ from `nomadscale backtest` on the same window where the twin is more real
  than the scoring protocol: real boot and image pull instead of the lead time, drains,
  decisions on the wall-clock cycle grid, whole nodes per zone.

\b
--json prints one object (nothing else on stdout):
  policy, policy_note     the policy that ran and what it leaves out
  trace                   the demand trace
  start, end, days        the window, from the first decision after the warm-up
  days_asked              --days (more than the trace holds: see notes)
  cycles, missed_cycles   cycles run / not fired (the one before still ran)
  applied, failed         cycles that changed the fleet / that failed
  skipped                 skipped cycles by reason (paused, not-leader...)
  availability            share of trace steps served throughout (0-1)
  worker_hours            running workers, integrated
  node_hours              GCE instances, integrated (null: no target.node_pool)
  static_peak_workers     ceil(peak demand / rpm_per_worker)
  static_peak_node_hours  those workers' nodes held all along (null: no node pool)
  static_peak_worker_hours  those workers held all along
  cost_vs_static_peak     node-hours (worker-hours without a node pool) / the static peak's
  peak_workers            most workers running at once
  notes                   what to know to read the figures (one line each)
  plot                    the PNG written
  wall_seconds            real time the run took

\b
Exit status: 0 done; 1 an input file or value is invalid (trace, policy, Consul); 2 a usage
error (an option's value, --out not a folder); 130 interrupted (Ctrl-C: nothing written).
Errors are one line on stderr."""


@click.command("simulate", epilog=SIMULATE_EPILOG)
@click.option("--trace", type=click.Path(exists=True, dir_okay=False),
              help="Demand trace CSV (timestamp,requests). Default: the policy's trace, else "
                   "the bundled one.")  # fmt: skip
@click.option("--days", type=click.FloatRange(min=0.1), default=7.0, show_default=True,
              help="Virtual days to simulate after the warm-up (at most what the trace holds).")  # fmt: skip
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="Policy YAML (default: the built-in simulate policy).")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="simulate-out",
              show_default=True, help="Folder for the plot.")  # fmt: skip
@click.option("--consul", "consul_addr", default=None,
              help="Use this Consul for KV and lock (CONSUL_HTTP_TOKEN for its ACL); each run "
                   "writes under its own nomadscale-sim/<run>/ prefix.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (below).")
def simulate_cmd(
    trace: str | None, days: float, policy_file: str | None, out_dir: str,
    consul_addr: str | None, as_json: bool,
) -> None:  # fmt: skip
    """The real autoscaling service against an in-process Nomad twin, in virtual time:
    --days of a demand trace from the first decision after its warm-up (the bundled trace
    holds 4.65 days after it), then a summary and a plot."""
    import logging
    import math
    import sys
    import time

    from nomadscale.service.simulate import simulate

    logging.getLogger("nomadscale").setLevel(logging.WARNING)
    if not math.isfinite(days):
        raise UsageError(f"--days {days}: must be a positive number of days")
    pol = load_policy(policy_file) if policy_file else None
    try:  # before the run, not after minutes of it
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out_dir}: cannot create the folder: {e.strerror or e}") from None
    token = None
    if consul_addr:
        secret = get_settings().consul_token  # CONSUL_HTTP_TOKEN(_FILE), as every command
        token = secret.reveal() if secret is not None else None
    state = {"done": 0, "total": 0}
    t0 = time.monotonic()
    tty = sys.stderr.isatty()

    def plain(done: int, total: int) -> None:  # a pipe or a log: a line per quarter
        quarter = [math.ceil(total * q / 4) for q in (1, 2, 3, 4)]
        if done in quarter:
            click.echo(f"simulate: {done}/{total} cycles ({done / total:.0%}) in "
                       f"{time.monotonic() - t0:.0f}s", err=True)  # fmt: skip

    def run(tick: Any) -> Any:
        def progress(done: int, total: int) -> None:
            state["done"], state["total"] = done, total
            tick(done, total)

        return simulate(trace=trace, days=days, policy=pol, out_dir=out_dir,
                        consul_addr=consul_addr, consul_token=token, progress=progress)  # fmt: skip

    try:
        if as_json or not tty:
            res = run(plain if not as_json else (lambda _d, _t: None))
        else:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True) as bar:  # fmt: skip
                task = bar.add_task("cycles", total=None)
                res = run(lambda done, total: bar.update(task, completed=done, total=total))
    except KeyboardInterrupt:
        done, total = state["done"], state["total"]
        click.echo(f"simulate: interrupted after {done} of {total or '?'} cycles: no summary, "
                   "no plot", err=True)  # fmt: skip
        sys.exit(130)
    s = res.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    nodes = (
        f"  node-hours    {s['node_hours']:.0f} vs {s['static_peak_node_hours']:.0f} holding the "
        f"peak ({s['static_peak_workers']} workers) all along: {s['cost_vs_static_peak']:.0%}"
        if s["node_hours"] is not None
        else f"  node-hours    n/a; worker-hours vs {s['static_peak_worker_hours']:.0f} holding "
        f"the peak ({s['static_peak_workers']} workers) all along: {s['cost_vs_static_peak']:.0%}"
    )
    hours = f" ({res.days * 24:.1f} h)" if res.days < 1 else ""
    skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items())
    missed = f", {s['missed_cycles']} missed" if s["missed_cycles"] else ""
    click.echo(
        f"{s['policy_note']}\n"
        f"{s['policy']}: {s['days']} days{hours} from {s['start'][:16]}, {s['cycles']} cycles "
        f"({s['applied']} applied, {s['failed']} failed{missed}) in {s['wall_seconds']:.0f}s\n"
        f"  availability  {s['availability']:.2%} of trace steps served throughout\n"
        f"  worker-hours  {s['worker_hours']:.0f} (peak {s['peak_workers']} workers)\n"
        f"{nodes}\n"
        + (f"  skipped       {skipped}\n" if skipped else "")
        + "".join(f"  note          {n}\n" for n in s["notes"])
        + f"  plot          {s['plot']}"
    )


COMMANDS: list[click.Command] = [status, plan, forecast_cmd, simulate_cmd]

__all__ = ["COMMANDS"]
