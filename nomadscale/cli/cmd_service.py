"""Service commands: run, status, plan, forecast, override, pause, resume, scale, simulate.

Manual control lives in Consul KV (check-and-set, audited with who/when/why/expiry); the
leader picks it up on its next cycle, or at once with ``--now`` (a "kick" key it watches).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from nomadscale.config.policy import Policy, load_policies, load_policy
from nomadscale.config.settings import Settings, load_settings
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.durations import format_duration, parse_duration
from nomadscale.core.errors import ConfigError, NomadscaleError, UsageError
from nomadscale.core.ports import KVPort
from nomadscale.service.control import Control

log = logging.getLogger(__name__)

# --- helpers ------------------------------------------------------------------------------


def _settings() -> Settings:
    return load_settings()


def _policies(settings: Settings, files: tuple[str, ...] = ()) -> list[Policy]:
    if files:
        return [load_policy(f) for f in files]
    return load_policies([settings.policies])


def _policy(settings: Settings, name_or_file: str) -> Policy:
    if name_or_file.endswith((".yaml", ".yml")) and Path(name_or_file).is_file():
        return load_policy(name_or_file)
    found = {p.name: p for p in _policies(settings)}
    if name_or_file not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UsageError(f"policy {name_or_file!r}: not found in {settings.policies} ({known})")
    return found[name_or_file]


def _kv(settings: Settings) -> KVPort:
    if not settings.consul_addr:
        raise UsageError("CONSUL_HTTP_ADDR: not set (manual control state lives in Consul KV)")
    from nomadscale.integrations.consul import ConsulKV

    token = settings.consul_token.reveal() if settings.consul_token else None
    return ConsulKV(addr=settings.consul_addr, token=token, cacert=settings.consul_cacert)


def _control(settings: Settings) -> Control:
    return Control(_kv(settings), prefix=settings.kv_prefix)


def _duration(text: str | None, option: str) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _known_policy(settings: Settings, name: str) -> None:
    """Refuse an unknown policy name when the policies folder can be read."""
    if not Path(settings.policies).exists():
        return
    names = {p.name for p in _policies(settings)}
    if names and name not in names:
        raise UsageError(f"policy {name!r}: unknown (known: {', '.join(sorted(names))})")


def _kick(control: Control, policy: str, reason: str) -> None:
    kid = control.request_kick(policy, reason=reason, now=SystemClock().now())
    click.echo(f"asked the leader to apply {policy} now (kick {kid})")


# --- run / serve --------------------------------------------------------------------------

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RESUME_QUIET_S = 120.0  # a rollout record written more recently is being driven elsewhere


def _logging(settings: Settings) -> None:
    from nomadscale.core.logs import setup_logging

    if settings.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(
            f"NOMADSCALE_LOG_LEVEL: unknown level {settings.log_level!r} "
            f"(use {', '.join(lv.lower() for lv in _LOG_LEVELS)})"
        )
    setup_logging(level=settings.log_level, json_logs=settings.log_json)


@dataclass
class Healing:
    """The healing engine and its HTTP routes, built here: service must not import healing."""

    engine: Any
    routes: list[Any]


def build_healing(settings: Settings) -> Healing | None:
    """PagerDuty webhooks + maintenance reports, when a webhook secret or report token is set."""
    if not settings.webhook_secrets and not settings.report_token:
        return None
    from nomadscale.cli.cmd_runbook import build_engine
    from nomadscale.healing.webhooks import routes

    engine = build_engine(settings)
    return Healing(
        engine=engine,
        routes=routes(engine=engine, secrets=settings.webhook_secrets,
                      report_token=settings.report_token, kv=engine.kv),
    )  # fmt: skip


def resume_rollouts(
    settings: Settings, policies: list[Policy], ports: Any, clock: Clock, *,
    quiet_s: float = RESUME_QUIET_S,
) -> list[Callable[[], object]]:  # fmt: skip
    """One task per policy with a ``deploy:`` section: resume its interrupted rollout."""
    from datetime import datetime

    from nomadscale.deploy.rollout import Rollout

    tasks: list[Callable[[], object]] = []
    for pol in policies:
        if pol.deploy is None:
            continue

        def resume(pol: Policy = pol) -> None:
            r = Rollout(policy=pol, nomad=ports.nomad, kv=ports.kv, clock=clock,
                        prefix=settings.kv_prefix, alerts=ports.alerts)  # fmt: skip
            st = r.status()
            if st is None or not st.active:
                return
            age = (clock.now() - datetime.fromisoformat(st.updated_at)).total_seconds()
            if age < quiet_s:
                log.info("deploy %s: rollout %s updated %.0fs ago: another process drives it",
                         pol.name, st.id, age)  # fmt: skip
                return
            log.info("deploy %s: resuming interrupted rollout %s of %s", pol.name, st.id,
                     st.image)  # fmt: skip
            done = r.resume()
            log.info("deploy %s: rollout %s ended %s", pol.name, st.id,
                     done.status if done else "?")  # fmt: skip

        resume.__name__ = f"resume-rollout-{pol.name}"
        tasks.append(resume)
    return tasks


def warm_up_gate(settings: Settings, ports: Any, clock: Clock) -> Callable[[Policy], object]:
    """After each cycle: prefetch the policy's golden image on nodes that joined its pools."""
    from nomadscale.deploy.prefetch import warm_up_new_nodes
    from nomadscale.deploy.state import StateStore

    store = StateStore(ports.kv, prefix=settings.kv_prefix)

    def gate(pol: Policy) -> None:
        if pol.target.node_pool is None:
            return
        image = store.golden_image(pol.name)
        if not image:
            return
        job = (pol.deploy.prefetch_job if pol.deploy else None) or "image-prefetch"
        retries = pol.deploy.prefetch_retries if pol.deploy else 2
        for pool in sorted({z.node_pool for z in pol.zones.items}):
            res = warm_up_new_nodes(ports.nomad, image=image, node_pool=pool, job_id=job,
                                    namespace=pol.target.namespace, clock=clock,
                                    retries=retries)  # fmt: skip
            if res.ok or res.failed:
                log.info("%s: warm-up of %s in %s: %d ok, %d failed", pol.name, image, pool,
                         len(res.ok), len(res.failed))  # fmt: skip

    return gate


@click.command("run")
@click.option("--once", is_flag=True, help="Run one cycle of every policy and exit.")
@click.option("--dry-run", is_flag=True, help="Decide and record, write nothing to Nomad/cloud.")
@click.option("--policy", "policy_files", multiple=True, type=click.Path(exists=True),
              help="Policy file (repeatable); default: every policy in NOMADSCALE_POLICIES.")  # fmt: skip
@click.option("--no-http", is_flag=True,
              help="Do not serve HTTP (/metrics, /status, /healthz and the healing webhooks).")  # fmt: skip
def run(once: bool, dry_run: bool, policy_files: tuple[str, ...], no_http: bool) -> None:
    """Run the autoscaler (leader-elected, one cycle per policy every `cycle`).

    One process for systemd: it also serves the PagerDuty webhooks and maintenance reports
    when NOMADSCALE_WEBHOOK_SECRETS / NOMADSCALE_REPORT_TOKEN are set, resumes interrupted
    runbook runs and rollouts when it becomes the leader, and warms up new nodes with the
    golden image after each cycle."""
    from nomadscale.service.runtime import build_ports, run_service

    settings = _settings()
    _logging(settings)
    policies = _policies(settings, policy_files)
    clock = SystemClock()
    ports = build_ports(settings, policies, clock=clock, dry_run=dry_run)
    if once or dry_run:
        run_service(settings, policies, once=once, dry_run=dry_run, serve_http=not no_http,
                    ports=ports, clock=clock)  # fmt: skip
        return
    healing = None if no_http else build_healing(settings)
    on_leader: list[Callable[[], object]] = []
    on_stop: list[Callable[[], object]] = []
    if healing is not None:
        healing.engine.start()
        on_leader.append(healing.engine.resume_all)
        on_stop.append(healing.engine.stop)
    on_leader.extend(resume_rollouts(settings, policies, ports, clock))
    run_service(
        settings, policies, serve_http=not no_http, ports=ports, clock=clock,
        extra_routes=healing.routes if healing else (), on_leader=on_leader,
        after_cycle=warm_up_gate(settings, ports, clock), on_stop=on_stop,
    )  # fmt: skip


@click.command("serve")
def serve() -> None:
    """Serve HTTP only: PagerDuty webhooks, maintenance reports, /metrics, /status, /healthz.

    For hosts that heal but do not autoscale; `run` serves the same routes itself, so do not
    run both against one Consul prefix."""
    import signal
    import threading

    from nomadscale.service import systemd
    from nomadscale.service.http import HttpServer, create_app
    from nomadscale.service.records import Metrics

    settings = _settings()
    _logging(settings)
    healing = build_healing(settings)
    if healing is None:
        raise ConfigError(
            "NOMADSCALE_WEBHOOK_SECRETS / NOMADSCALE_REPORT_TOKEN: neither is set, "
            "so there is nothing to serve"
        )
    engine = healing.engine.start()
    resumed = engine.resume_all()
    metrics = Metrics()

    def status() -> dict[str, Any]:
        runs = engine.list_runs()
        return {
            "mode": "serve",
            "time": SystemClock().now().isoformat(),
            "resumed_at_start": resumed,
            "runbook_runs": [
                {k: r.get(k) for k in ("id", "runbook", "status", "trigger")} for r in runs[-20:]
            ],
        }

    http = HttpServer(
        create_app(registry=metrics.registry, status=status, extra_routes=healing.routes),
        host=settings.http_host, port=settings.http_port,
    ).start()  # fmt: skip
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: stopping.set())
    systemd.notify("READY=1")
    ping = min(systemd.watchdog_interval_s() or 10.0, 10.0)
    try:
        while not stopping.wait(ping):
            systemd.notify("WATCHDOG=1")
    finally:
        systemd.notify("STOPPING=1")
        engine.stop()
        http.stop()


# --- status / plan / forecast -------------------------------------------------------------


def _status_doc(
    settings: Settings, policies: list[Policy], *, clock: Clock | None = None
) -> dict[str, Any]:
    from nomadscale.integrations.consul import LockHolder
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.service.records import Recorder
    from nomadscale.service.runtime import lock_key

    kv = _kv(settings)
    control = Control(kv, prefix=settings.kv_prefix)
    recorder = Recorder(kv=kv, prefix=settings.kv_prefix)
    now = (clock or SystemClock()).now()
    entry = kv.get(lock_key(settings))
    leader = LockHolder.from_json(entry.value).describe() if entry and entry.value else None
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
    settings = _settings()
    doc = _status_doc(settings, _policies(settings))
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"leader: {doc['leader'] or 'none'}")
    t = Table("policy", "zone", "desired", "running", "overrides", "last decision")
    for name, p in doc["policies"].items():
        last = p["decisions"][0] if p["decisions"] else None
        last_txt = "-"
        if last:
            explain = (last.get("decision") or {}).get("explain") or last.get("reason", "")
            last_txt = f"{last['started_at'][:16]} [{last['outcome']}] {explain}"
        ovr = ", ".join(
            f"{o['kind']} {o['value'] if o['value'] is not None else ''} ({o['who']})".replace(
                "  ", " "
            )
            for o in p["overrides"]
        )
        rows = p["zones"] or {"?": {"desired": None, "running": None}}
        for i, (zone, z) in enumerate(rows.items()):
            t.add_row(
                name if i == 0 else "", zone, str(z["desired"]), str(z["running"]),
                (ovr or "-") if i == 0 else "", last_txt if i == 0 else "",
            )  # fmt: skip
        if p["job_error"]:
            t.add_row("", "", "", "", "", f"job: {p['job_error']}")
    con.print(t)


@click.command("plan")
@click.argument("policy")
@click.option("--json", "as_json", is_flag=True)
def plan(policy: str, as_json: bool) -> None:
    """One dry-run cycle of POLICY (name or file): the decision, why, and the actions."""
    from nomadscale.service.control import Control as _Control
    from nomadscale.service.cycle import CycleRunner
    from nomadscale.service.records import Recorder
    from nomadscale.service.runtime import build_ports

    settings = _settings()
    pol = _policy(settings, policy)
    clock = SystemClock()
    ports = build_ports(settings, [pol], clock=clock, dry_run=True)
    control = _Control(ports.kv, prefix=settings.kv_prefix)
    runner = CycleRunner(policy=pol, ports=ports, control=control,
                         recorder=Recorder(kv=None), clock=clock)  # fmt: skip
    now = clock.now()
    if pol.demand.source == "trace":  # a trace: decide right after its last step
        now = min(now, ports.demand(pol).trace.end)  # type: ignore[attr-defined]
    res = runner.run(leader=False, dry_run=True, now=now)
    rec = res.record
    if as_json:
        click.echo(json.dumps(rec.to_dict(), indent=2, default=str))
        return
    click.echo(res.decision.explain() if res.decision else f"{pol.name}: {rec.reason}")
    if rec.skipped:
        click.echo(f"skipped: {rec.reason}")
    for a in rec.actions:
        click.echo(f"  would {a}")
    if res.decision and not rec.actions:
        click.echo("  nothing to change")
    for e in rec.errors:
        click.echo(f"error: {e}", err=True)


@click.command("forecast")
@click.argument("policy")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Write a PNG plot.")
def forecast_cmd(policy: str, plot_file: str | None) -> None:
    """Forecast POLICY's next cycle from its demand history."""
    from nomadscale.service.runtime import demand_for
    from nomadscale.stages.decide import forecast_config_from
    from nomadscale.stages.forecast import forecast

    settings = _settings()
    pol = _policy(settings, policy)
    now = SystemClock().now()
    src = demand_for(settings)(pol)
    if pol.demand.source == "trace":  # a trace: forecast right after its last step
        now = src.trace.end
    lookback = getattr(pol.demand, "lookback_s", 28 * 86400.0)
    series = src.history(end=now, lookback_s=lookback, step_s=pol.demand.step_s)
    fc = forecast(series, now=now, config=forecast_config_from(pol))
    workers = math.ceil(fc.upper / pol.capacity.rpm_per_worker) if fc.upper > 0 else 0
    click.echo(
        f"{pol.name}: next {format_duration(fc.horizon_s)} peak {fc.peak:.1f} rpm by {fc.model}, "
        f"upper {fc.upper:.1f} rpm (+{fc.headroom * 100:.0f}% for {fc.target:.3g}) "
        f"-> {workers} workers{'' if fc.data_ok else ' (history incomplete)'}"
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
        fig.savefig(plot_file, dpi=100)
        plt.close(fig)
        click.echo(f"plot written to {plot_file}")


# --- manual control -----------------------------------------------------------------------


@click.group("override")
def override() -> None:
    """Set, list and clear manual overrides (stored in Consul KV)."""


@override.command("set")
@click.argument("policy")
@click.option("--min", "min_", type=click.IntRange(min=0))
@click.option("--max", "max_", type=click.IntRange(min=0))
@click.option("--fixed", type=click.IntRange(min=0))
@click.option("--for", "for_", default=None, help="How long, e.g. 2h (default: until cleared).")
@click.option("--reason", required=True, help="Why (recorded with the override).")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def override_set(
    policy: str, min_: int | None, max_: int | None, fixed: int | None, for_: str | None,
    reason: str, apply_now: bool,
) -> None:  # fmt: skip
    """Override POLICY's worker count: --min N, --max N or --fixed N."""
    given = [(k, v) for k, v in (("min", min_), ("max", max_), ("fixed", fixed)) if v is not None]
    if len(given) != 1:
        raise UsageError("override set: give exactly one of --min, --max, --fixed")
    settings = _settings()
    _known_policy(settings, policy)
    control = _control(settings)
    kind, value = given[0]
    o = control.set_override(policy, kind=kind, value=value, reason=reason,
                             now=SystemClock().now(), duration=_duration(for_, "--for"))  # fmt: skip
    until = o.expires_at.isoformat(timespec="seconds") if o.expires_at else "cleared"
    click.echo(f"{policy}: override {o.label()} until {until}: {o.reason}")
    if apply_now:
        _kick(control, policy, f"override {o.label()}")


@override.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include expired entries.")
def override_list(as_json: bool, show_all: bool) -> None:
    """Active overrides and pauses of every policy."""
    control = _control(_settings())
    now = SystemClock().now()
    items = control.all_overrides(now=None if show_all else now)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in items], indent=2))
        return
    if not items:
        click.echo("no overrides")
        return
    for o in items:
        until = o.expires_at.isoformat(timespec="seconds") if o.expires_at else "until cleared"
        click.echo(f"{o.policy}: {o.label()} since {o.created_at.isoformat(timespec='seconds')} "
                   f"until {until}: {o.reason}")  # fmt: skip


@override.command("clear")
@click.argument("policy")
def override_clear(policy: str) -> None:
    """Remove every override (and pause) of POLICY."""
    n = _control(_settings()).clear(policy, now=SystemClock().now())
    click.echo(f"{policy}: cleared {n} override(s)")


@click.command("pause")
@click.argument("policy", required=False)
@click.option("--reason", default="paused by operator", show_default=True)
@click.option("--for", "for_", default=None, help="How long, e.g. 1h (default: until resumed).")
def pause(policy: str | None, reason: str, for_: str | None) -> None:
    """Stop scaling POLICY (all policies without one) until resumed."""
    settings = _settings()
    if policy:
        _known_policy(settings, policy)
    o = _control(settings).pause(policy, reason=reason, now=SystemClock().now(),
                                 duration=_duration(for_, "--for"))  # fmt: skip
    click.echo(f"{policy or 'all policies'}: paused ({o.who}): {reason}")


@click.command("resume")
@click.argument("policy", required=False)
def resume(policy: str | None) -> None:
    """Undo ``pause`` for POLICY (all policies without one)."""
    n = _control(_settings()).resume(policy, now=SystemClock().now())
    click.echo(f"{policy or 'all policies'}: resumed ({n} pause(s) removed)")


@click.command("scale")
@click.argument("policy")
@click.option("--count", type=click.IntRange(min=0), required=True)
@click.option("--reason", required=True)
@click.option("--for", "for_", default="1h", show_default=True, help="How long to hold it.")
@click.option("--now", "apply_now", is_flag=True, help="Ask the leader to apply it at once.")
def scale(policy: str, count: int, reason: str, for_: str, apply_now: bool) -> None:
    """Hold POLICY at COUNT workers for a while (a fixed override)."""
    settings = _settings()
    _known_policy(settings, policy)
    control = _control(settings)
    o = control.set_override(policy, kind="fixed", value=count, reason=reason, source="scale",
                             now=SystemClock().now(), duration=_duration(for_, "--for"))  # fmt: skip
    click.echo(f"{policy}: held at {count} until {o.expires_at:%Y-%m-%d %H:%M} UTC: {reason}")
    if apply_now:
        _kick(control, policy, f"scale to {count}")


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


COMMANDS: list[click.Command] = [
    run, serve, status, plan, forecast_cmd, override, pause, resume, scale, simulate_cmd,
]  # fmt: skip

__all__ = ["COMMANDS"]
