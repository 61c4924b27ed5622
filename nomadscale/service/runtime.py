"""Wiring the service from settings, and ``run`` (the daemon's main loop).

``build_ports`` turns settings + policies into the real adapters: NomadClient, Consul KV and
lock (or the in-memory ones for a dry run without Consul), Prometheus or trace demand, GCE
MIGs and PagerDuty. ``run_service`` logs the effective config, starts the scheduler and the
HTTP endpoints, tells systemd READY=1, pings the watchdog and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Secret, Settings
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ConfigError
from nomadscale.core.ports import AlertPort, DemandSource, NodePoolPort
from nomadscale.service import systemd
from nomadscale.service.cycle import Ports
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.loop import Service

log = logging.getLogger(__name__)


def lock_key(settings: Settings) -> str:
    return f"{settings.kv_prefix.strip('/')}/leader"


def demand_for(settings: Settings) -> Any:
    def build(policy: Policy) -> DemandSource:
        d = policy.demand
        if d.source == "trace":
            from nomadscale.integrations.tracefile import TraceDemandSource

            return TraceDemandSource(d.trace)
        if not settings.prometheus_url:
            raise ConfigError(
                f"policy {policy.name}: demand.source is prometheus but PROMETHEUS_URL is not set"
            )
        from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource

        client = PrometheusClient(url=settings.prometheus_url)
        return PrometheusDemandSource(client=client, query=d.query)

    return build


def pool_for(settings: Settings, *, clock: Clock) -> Any:
    def build(policy: Policy) -> NodePoolPort | None:
        np_ = policy.target.node_pool
        if np_ is None:
            return None
        from nomadscale.integrations.gce import GceMigPool

        return GceMigPool(project=np_.project, base_url=settings.gce_api_url, clock=clock)

    return build


def alerts_for(policies: Sequence[Policy]) -> AlertPort | None:
    for p in policies:
        env = p.alerting.pagerduty_routing_key_env
        if env and os.environ.get(env):
            from nomadscale.integrations.pagerduty import PagerDutyAlerts

            return PagerDutyAlerts(Secret(os.environ[env]))
    return None


def build_ports(
    settings: Settings, policies: Sequence[Policy], *, clock: Clock, dry_run: bool = False
) -> Ports:
    from nomadscale.integrations.nomad import NomadClient

    nomad = NomadClient.from_settings(settings, clock=clock)
    if settings.consul_addr:
        from nomadscale.integrations.consul import ConsulKV, ConsulLock

        token = settings.consul_token.reveal() if settings.consul_token else None
        kv: Any = ConsulKV(addr=settings.consul_addr, token=token, cacert=settings.consul_cacert)
        lock: Any = ConsulLock(
            addr=settings.consul_addr,
            key=lock_key(settings),
            token=token,
            cacert=settings.consul_cacert,
            ttl_s=settings.lock_ttl_s,
        )
    elif dry_run:
        from nomadscale.integrations.memkv import MemoryKV, MemoryLock

        kv = MemoryKV(clock=clock)
        lock = MemoryLock(kv=kv, key=lock_key(settings), ttl_s=settings.lock_ttl_s)
    else:
        raise ConfigError("CONSUL_HTTP_ADDR: not set (the service needs Consul for its lock)")
    return Ports(
        nomad=nomad,
        kv=kv,
        lock=lock,
        demand_for=demand_for(settings),
        pool_for=pool_for(settings, clock=clock),
        alerts=alerts_for(policies),
    )


def run_service(
    settings: Settings,
    policies: Sequence[Policy],
    *,
    once: bool = False,
    dry_run: bool = False,
    serve_http: bool = True,
    ports: Ports | None = None,
    clock: Clock | None = None,
) -> Service:
    """Run until SIGTERM/SIGINT (or one cycle of every policy with ``once``)."""
    clock = clock or SystemClock()
    log.info("effective settings: %s", settings.describe())
    ports = ports or build_ports(settings, policies, clock=clock, dry_run=dry_run)
    svc = Service(settings=settings, policies=policies, ports=ports, clock=clock, dry_run=dry_run)
    if once:
        for r in svc.run_once():
            log.info("once: %s", r.record.line())
        if not dry_run:
            svc.stop()
        return svc
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    http = None
    if serve_http:
        app = create_app(registry=svc.metrics.registry, status=svc.status)
        http = HttpServer(app, host=settings.http_host, port=settings.http_port).start()
    svc.start()
    systemd.notify("READY=1")
    ping = systemd.watchdog_interval_s() or 10.0
    try:
        while not stopping.wait(ping):
            systemd.notify("WATCHDOG=1")
    finally:
        systemd.notify("STOPPING=1")
        svc.stop()
        if http is not None:
            http.stop()
    return svc
