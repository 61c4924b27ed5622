"""Service commands that run the autoscaler: ``run`` (the systemd process) and ``serve``
(HTTP only: PagerDuty webhooks and maintenance reports for hosts that heal but do not scale).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from nomadscale.cli.service_common import get_settings, policies_for
from nomadscale.config.policy import Policy, load_policies
from nomadscale.config.settings import Settings
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ConfigError, NomadscaleError

log = logging.getLogger(__name__)

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
    from nomadscale.service.runtime import rollout_prometheus

    tasks: list[Callable[[], object]] = []
    for pol in policies:
        if pol.deploy is None:
            continue

        def resume(pol: Policy = pol) -> None:
            # the demand source lets a resumed rollout re-plan on current demand; without
            # one it re-plans on the bound saved with the rollout
            try:
                demand = ports.demand(pol)
            except NomadscaleError as e:
                log.warning("%s: resuming the rollout without a demand source: %s", pol.name, e)
                demand = None
            try:
                prometheus, ungated = rollout_prometheus(settings, pol, gated=True), False
            except ConfigError:
                prometheus, ungated = None, True
            r = Rollout(policy=pol, nomad=ports.nomad, kv=ports.kv, clock=clock,
                        prefix=settings.kv_prefix, alerts=ports.alerts,
                        demand=demand, prometheus=prometheus)  # fmt: skip
            st = r.status()
            if st is None or not st.active:
                return
            if ungated:
                # never drive a gated rollout ungated: leave it for `deploy resume`
                log.error("deploy %s: rollout %s not resumed: PROMETHEUS_URL is not set and "
                          "deploy.sli gates it", pol.name, st.id)  # fmt: skip
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
    golden image after each cycle.

    SIGHUP (systemctl reload nomadscale) reloads the policies without a restart: the files
    are validated first (one log line per error) and, when one is invalid, the running
    policies stay as they are; else new policies start, removed ones stop and changed ones
    take effect from their next cycle (a running cycle finishes first), and the leader lock
    is kept. The settings file (/etc/nomadscale/nomadscale.yaml) and the environment are not
    reloaded: restart for those. /status shows the policies and when they were loaded.

    Exits 0 on SIGTERM/SIGINT, 1 on a configuration error or (--once) when a cycle failed
    or the leader lock was unavailable, 2 on a usage error."""
    from nomadscale.service.runtime import StopSignals, build_ports, check_lock_ttl, run_service

    # first: a SIGTERM during start-up then stops the service once it is built (exit 0)
    # instead of killing it half-started; with --once it stops the cycle at a safe point.
    # A SIGHUP during start-up is a reload once the service runs (ignored with --once)
    signals = StopSignals().install()
    settings = get_settings()
    _logging(settings)
    policies = policies_for(settings, policy_files)
    check_lock_ttl(settings, policies)
    clock = SystemClock()
    ports = build_ports(settings, policies, clock=clock, dry_run=dry_run)
    source = ", ".join(policy_files) or str(settings.policies)

    def reload() -> list[Policy]:  # every file checked in one pass, each error on a line
        return load_policies(list(policy_files) or [settings.policies])

    if once or dry_run:
        run_service(settings, policies, once=once, dry_run=dry_run, serve_http=not no_http,
                    ports=ports, clock=clock, signals=signals, reload=reload,
                    reload_from=source)  # fmt: skip
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
        after_cycle=warm_up_gate(settings, ports, clock), on_stop=on_stop, signals=signals,
        reload=reload, reload_from=source,
    )  # fmt: skip


@click.command("serve")
def serve() -> None:
    """Serve HTTP only: PagerDuty webhooks, maintenance reports, /metrics, /status, /healthz.

    For hosts that heal but do not autoscale; `run` serves the same routes itself, so do not
    run both against one Consul prefix. SIGHUP is ignored (it has no policies to reload)."""
    from nomadscale.service import systemd
    from nomadscale.service.http import HttpServer, create_app
    from nomadscale.service.ops_metrics import DeployCollector
    from nomadscale.service.records import Metrics
    from nomadscale.service.runtime import (
        StopSignals,
        stopping,
        watchdog_until_stopped,
    )

    signals = StopSignals().install()  # never logs or locks in the handler: see there
    settings = get_settings()
    _logging(settings)
    log.info("effective settings: %s", settings.describe())
    healing = build_healing(settings)
    if healing is None:
        raise ConfigError(
            "NOMADSCALE_WEBHOOK_SECRETS / NOMADSCALE_REPORT_TOKEN: neither is set, "
            "so there is nothing to serve"
        )
    engine = healing.engine.start()
    http = None
    try:  # from here on the engine's workers run: stopped however this ends
        resumed = engine.resume_all()
        metrics = Metrics()
        metrics.registry.register(DeployCollector(engine.kv, prefix=settings.kv_prefix))

        def status() -> dict[str, Any]:
            runs = engine.list_runs()
            return {
                "mode": "serve",
                "time": SystemClock().now().isoformat(),
                "resumed_at_start": resumed,
                "runbook_runs": [
                    {k: r.get(k) for k in ("id", "runbook", "status", "trigger")}
                    for r in runs[-20:]
                ],
            }

        http = HttpServer(
            create_app(registry=metrics.registry, status=status, extra_routes=healing.routes),
            host=settings.http_host, port=settings.http_port,
        ).start()  # fmt: skip
        systemd.notify("READY=1")
        watchdog_until_stopped(signals, healthy=lambda: True)
    finally:
        stopping(signals)
        engine.stop()
        if http is not None:
            http.stop()


COMMANDS: list[click.Command] = [run, serve]

__all__ = ["COMMANDS"]
