"""Wiring the service from settings, and ``run`` (the daemon's main loop).

``build_ports`` turns settings + policies into the real adapters: NomadClient, Consul KV and
lock (or the in-memory ones for a dry run without Consul), Prometheus or trace demand, GCE
MIGs and PagerDuty. ``run_service`` logs the effective config, starts the scheduler and the
HTTP endpoints, tells systemd READY=1, pings the watchdog and stops cleanly on SIGTERM.
``StopSignals`` turns SIGTERM/SIGINT into a stop request without ever blocking in the signal
handler, and bounds the whole shutdown; SIGHUP into a policy reload request, handed by the
main thread to the ``service.reload.Reloader`` worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Secret, Settings, url_password
from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ConfigError, PermanentError, UsageError
from nomadscale.core.ports import AlertPort, DemandSource, NodePoolPort
from nomadscale.service import systemd
from nomadscale.service.cycle import CycleResult, Ports
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.loop import Service
from nomadscale.service.ops_metrics import DeployCollector

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from nomadscale.service.reload import Reloader

log = logging.getLogger(__name__)


SHUTDOWN_DEADLINE_S = 60.0  # a stop request to process exit, at most (systemd: 90 s)
EXIT_FORCED = 1  # the exit status when the deadline or a second signal ends the process
_SIGNAMES = {int(s): s.name for s in (signal.SIGTERM, signal.SIGINT)}


class StopSignals:
    """SIGTERM/SIGINT as a stop request the main thread waits for.

    Python runs a signal handler in the main thread between two bytecodes, possibly while
    that thread holds a lock that is not reentrant: the log redaction lock while a line is
    formatted, an ``Event``'s condition while it waits. Logging or ``Event.set()`` from the
    handler then deadlocks the process for good (later signals cannot run either). So the
    handler only appends to a list; the C-level handler wakes ``wait()`` through the wakeup
    fd, and the main thread logs. A second signal exits at once; and a daemon thread ends the
    process ``deadline_s`` after the first one if it is still alive (a stuck shutdown, or an
    interpreter exit joining a thread that hangs). Both write one line straight to stderr:
    logging may be what is stuck."""

    def __init__(self, *, deadline_s: float = SHUTDOWN_DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self.received: list[int] = []  # list.append: atomic and lock-free
        self.reloads: list[int] = []  # SIGHUPs, the same way
        self._reloads_taken = 0
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)

    def install(self) -> StopSignals:
        """Take over SIGTERM/SIGINT, and SIGHUP (a reload request: ignored by a process that
        does not ask ``take_reloads``, instead of ending it) (main thread only: elsewhere only
        ``request()`` stops)."""
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._tx.fileno(), warn_on_full_buffer=False)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_reload)
        threading.Thread(target=self._deadline, name="stop-deadline", daemon=True).start()
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # no logging, no locks, no threads: see the class docstring
        self.received.append(signum)
        if len(self.received) > 1:
            self._force(f"second {_SIGNAMES.get(signum, signum)} while stopping")

    def _on_reload(self, signum: int, _frame: Any) -> None:
        self.reloads.append(signum)  # no logging, no locks: see the class docstring

    def take_reloads(self) -> int:
        """SIGHUPs received since the last call (the main thread's)."""
        n = len(self.reloads)
        new, self._reloads_taken = n - self._reloads_taken, n
        return new

    def _force(self, why: str) -> None:
        try:
            os.write(2, f"nomadscale: {why}: exiting now (status {EXIT_FORCED})\n".encode())
        finally:
            os._exit(EXIT_FORCED)

    def _deadline(self) -> None:
        while not self.received:
            time.sleep(0.25)
        time.sleep(self.deadline_s)
        self._force(f"shutdown did not finish within {self.deadline_s:g}s of the stop request")

    def request(self, signum: int = 0) -> None:
        """Ask for a stop from code (what a signal does)."""
        self.received.append(signum)
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._tx.send(b"\0")

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def name(self) -> str:
        """What asked to stop (``SIGTERM``, ``SIGINT`` or ``stop request``)."""
        return _SIGNAMES.get(self.received[0], "stop request") if self.received else ""

    def wait(self, timeout_s: float, *, reloads: bool = False) -> bool:
        """True as soon as a stop was requested, False after ``timeout_s`` without one (or,
        with ``reloads``, as soon as a SIGHUP is waiting for ``take_reloads``)."""
        end = time.monotonic() + timeout_s
        while not self.received:
            if reloads and len(self.reloads) > self._reloads_taken:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self._rx], [], [], left)
            if ready:
                with contextlib.suppress(OSError):
                    self._rx.recv(4096)
                # the byte can come before the Python-level handler ran: it runs at the
                # latest on this loop's next jump back, before the next select
        return True


def watchdog_until_stopped(
    signals: StopSignals, *, healthy: Callable[[], bool],
    on_reload: Callable[[], object] | None = None,
) -> None:  # fmt: skip
    """Ping the systemd watchdog (while ``healthy()``) until a stop is requested; hand each
    SIGHUP to ``on_reload`` (which must not block: the pings go on meanwhile)."""
    ping = min(systemd.watchdog_interval_s() or 10.0, 10.0)
    due = time.monotonic() + ping
    while not signals.wait(max(0.0, due - time.monotonic()), reloads=on_reload is not None):
        if on_reload is not None and signals.take_reloads():
            log.info("received SIGHUP: reloading the policies")
            on_reload()
        if time.monotonic() < due:
            continue
        due = time.monotonic() + ping
        if healthy():
            systemd.notify("WATCHDOG=1")
        else:
            log.error("service loop unhealthy: withholding the systemd watchdog ping")
    log.info("received %s: stopping", signals.name)


def stopping(signals: StopSignals) -> None:
    """The start of a shutdown, however it came: a stop left by an error is bounded too."""
    if not signals.requested:
        signals.request()
    systemd.notify("STOPPING=1")


class CyclesFailed(PermanentError):
    """``run --once``: a cycle failed, or no cycle could run (the leader lock unavailable)."""


def check_lock_ttl(settings: Settings, policies: Sequence[Policy]) -> None:
    """The lock timing check, before anything is built, naming the setting to change."""
    from nomadscale.service.loop import renew_interval
    from nomadscale.service.timing import check_timing

    ttl = settings.lock_ttl_s
    try:
        check_timing(policies, ttl_s=ttl, renew_s=renew_interval(ttl))
    except ConfigError as e:
        errors = [f"NOMADSCALE_LOCK_TTL={ttl:g}s: {x}" for x in e.errors]
        raise ConfigError("; ".join(errors), errors=errors) from None


def lock_key(settings: Settings) -> str:
    return f"{settings.kv_prefix.strip('/')}/leader"


def prometheus_client(settings: Settings) -> Any:
    """The Prometheus client of ``settings``: ``PROMETHEUS_URL``, its CA file
    (``PROMETHEUS_CACERT``) and bearer token (``NOMADSCALE_PROMETHEUS_TOKEN(_FILE)``)."""
    from nomadscale.integrations.prometheus import PrometheusClient

    url = str(settings.prometheus_url)
    cacert = settings.prometheus_cacert
    if cacert and not os.path.isfile(cacert):  # requests would raise a bare OSError per query
        raise ConfigError(f"PROMETHEUS_CACERT: {cacert}: no such file")
    token = settings.prometheus_token.reveal() if settings.prometheus_token else None
    if token and url_password(url):
        raise ConfigError(
            "NOMADSCALE_PROMETHEUS_TOKEN: set while PROMETHEUS_URL carries user:password "
            "(basic auth): give one of them"
        )
    try:
        return PrometheusClient(url=url, bearer_token=token, verify=cacert or True)
    except UsageError as e:
        raise ConfigError(f"PROMETHEUS_URL: {e}") from None


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
        from nomadscale.integrations.prometheus import PrometheusDemandSource

        # errors about the query name the file to fix (`forecast`, `plan`, the cycle record)
        where = f"{policy.source}: demand.query" if policy.source else "demand.query"
        return PrometheusDemandSource(client=prometheus_client(settings), query=d.query,
                                      where=where)  # fmt: skip

    return build


def rollout_prometheus(settings: Settings, policy: Policy, *, gated: bool) -> Any:
    """The Prometheus client a rollout of ``policy`` queries (its SLI gate), None without
    PROMETHEUS_URL. ``gated``: the rollout is driven (start, resume), so a policy with
    ``deploy.sli`` needs it: ConfigError rather than a canary promoted on health alone."""
    if settings.prometheus_url:
        return prometheus_client(settings)
    if gated and policy.deploy is not None and policy.deploy.sli is not None:
        raise ConfigError(
            f"PROMETHEUS_URL: not set (policy {policy.name}: deploy.sli gates the rollout "
            "on Prometheus queries)"
        )
    return None


def pool_for(settings: Settings, *, clock: Clock) -> Any:
    def build(policy: Policy) -> NodePoolPort | None:
        np_ = policy.target.node_pool
        if np_ is None:
            return None
        from nomadscale.integrations.gce import GceMigPool

        return GceMigPool(project=np_.project, base_url=settings.gce_api_url, clock=clock)

    return build


class PolicyAlerts:
    """``AlertPort`` that sends each policy's alerts with that policy's own routing key.

    The policy is ``details["policy"]``, else the ``nomadscale/<policy>/...`` dedup key.
    Alerts of a policy without a routing key are logged and dropped."""

    def __init__(self, routes: Mapping[str, AlertPort]) -> None:
        self.routes = dict(routes)

    def __repr__(self) -> str:
        return f"PolicyAlerts(policies={sorted(self.routes)})"

    def _route(self, dedup_key: str, details: Mapping[str, Any] | None) -> AlertPort | None:
        policy = str((details or {}).get("policy") or "")
        if not policy:
            parts = dedup_key.replace("nomadscale-deploy-", "nomadscale/", 1).split("/")
            policy = parts[1] if len(parts) > 2 and parts[0] == "nomadscale" else ""
        port = self.routes.get(policy)
        if port is None:
            log.warning("alert %s: no PagerDuty routing key for policy %r", dedup_key, policy)
        return port

    def trigger(
        self, *, dedup_key: str, summary: str, severity: str, details: Mapping[str, Any]
    ) -> None:
        port = self._route(dedup_key, details)
        if port is not None:
            port.trigger(dedup_key=dedup_key, summary=summary, severity=severity, details=details)

    def resolve(self, *, dedup_key: str) -> None:
        port = self._route(dedup_key, None)
        if port is not None:
            port.resolve(dedup_key=dedup_key)


def alerts_for(
    policies: Sequence[Policy],
    *,
    env: Mapping[str, str] | None = None,
    base_url: str | None = None,
) -> AlertPort | None:
    """PagerDuty alerts routed per policy (``alerting.pagerduty_routing_key_env``)."""
    env = os.environ if env is None else env
    routes: dict[str, AlertPort] = {}
    by_key: dict[str, AlertPort] = {}
    for p in policies:
        var = p.alerting.pagerduty_routing_key_env
        key = env.get(var) if var else None
        if not key:
            continue
        if key not in by_key:
            from nomadscale.integrations.pagerduty import PagerDutyAlerts

            by_key[key] = PagerDutyAlerts(Secret(key), base_url=base_url)
        routes[p.name] = by_key[key]
    return PolicyAlerts(routes) if routes else None


def build_ports(
    settings: Settings, policies: Sequence[Policy], *, clock: Clock, dry_run: bool = False
) -> Ports:
    from nomadscale.integrations.nomad import NomadClient

    nomad = NomadClient.from_settings(settings, clock=clock)
    if settings.consul_addr:
        from nomadscale.integrations.consul import ConsulKV, ConsulLock
        from nomadscale.service.leaderwatch import ConsulKeyWatch

        token = settings.consul_token.reveal() if settings.consul_token else None
        kv: Any = ConsulKV(addr=settings.consul_addr, token=token, cacert=settings.consul_cacert)
        watch: Any = ConsulKeyWatch(
            addr=settings.consul_addr, key=lock_key(settings), token=token,
            cacert=settings.consul_cacert,
        )  # fmt: skip
        lock: Any = ConsulLock(
            addr=settings.consul_addr,
            key=lock_key(settings),
            token=token,
            cacert=settings.consul_cacert,
            ttl_s=settings.lock_ttl_s,
            # no lock delay: a standby takes over the moment Consul ends the dead leader's
            # session. Writes are fenced without it: the actuator asks Consul (consistent
            # read) whether it still holds the lock right before every write, and a cycle
            # slot is claimed by check-and-set, so a slot is never applied twice.
            lock_delay_s=0,
        )
    elif dry_run:
        from nomadscale.integrations.memkv import MemoryKV, MemoryLock

        kv = MemoryKV(clock=clock)
        lock = MemoryLock(kv=kv, key=lock_key(settings), ttl_s=settings.lock_ttl_s)
        watch = None
    else:
        raise ConfigError("CONSUL_HTTP_ADDR: not set (the service needs Consul for its lock)")
    return Ports(
        nomad=nomad,
        kv=kv,
        lock=lock,
        demand_for=demand_for(settings),
        pool_for=pool_for(settings, clock=clock),
        alerts=alerts_for(policies),
        lock_watch=watch,
    )


def _run_once(svc: Service, signals: StopSignals | None) -> list[CycleResult]:
    """``svc.run_once()`` in a worker thread while this (main) thread waits for SIGTERM/SIGINT:
    a stop request ends the cycle at its next safe point (between two writes), as in the
    running service, and releases the lock, instead of killing it anywhere in between."""
    results: list[CycleResult] = []
    worker = threading.Thread(target=lambda: results.extend(svc.run_once()), name="once",
                              daemon=True)  # fmt: skip
    worker.start()
    while worker.is_alive():
        if signals is not None and signals.wait(0.5):
            log.info("received %s: stopping the cycle at its next safe point", signals.name)
            stopping(signals)
            svc.stop_event.set()  # checked before every write; the caller then releases
            worker.join(timeout=30.0)
            break
        worker.join(0.5)
    return results


def _reloader(
    svc: Service, settings: Settings, *, load: Callable[[], Sequence[Policy]], source: str
) -> Reloader:
    """The SIGHUP reload: the same validation as at start (files, then the lock timing); the
    alert routes rebuilt when a policy names another routing key variable, unless the
    caller gave its own alert port."""
    from nomadscale.service.reload import Reloader

    own = svc.ports.alerts is None or isinstance(svc.ports.alerts, PolicyAlerts)
    return Reloader(svc, load=load, source=source or str(settings.policies),
                    check=lambda ps: check_lock_ttl(settings, ps),
                    rebuild_alerts=alerts_for if own else None)  # fmt: skip


def run_service(
    settings: Settings,
    policies: Sequence[Policy],
    *,
    once: bool = False,
    dry_run: bool = False,
    serve_http: bool = True,
    ports: Ports | None = None,
    clock: Clock | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    on_leader: Sequence[Callable[[], object]] = (),
    after_cycle: Callable[[Policy], object] | None = None,
    on_stop: Sequence[Callable[[], object]] = (),
    signals: StopSignals | None = None,
    reload: Callable[[], Sequence[Policy]] | None = None,
    reload_from: str = "",
) -> Service:
    """Run until SIGTERM/SIGINT (or one cycle of every policy with ``once``).

    ``extra_routes`` are mounted on the HTTP server (the healing webhooks), ``on_leader``
    run in the background whenever this process becomes the leader (resume interrupted
    runbook runs and rollouts), ``after_cycle`` after each cycle the leader ran (the
    warm-up gate), ``on_stop`` at shutdown. The CLI layer builds them: the service must not
    import deploy or healing. ``signals``: the stop request, installed as early as the
    caller could (a stop requested during start-up skips what is not started yet).
    ``reload`` loads the policies again (every error in one ``ConfigError``) from
    ``reload_from``: SIGHUP applies them without a restart (``service.reload``)."""
    clock = clock or SystemClock()
    log.info("effective settings: %s", settings.describe())
    ports = ports or build_ports(settings, policies, clock=clock, dry_run=dry_run)
    svc = Service(
        settings=settings, policies=policies, ports=ports, clock=clock, dry_run=dry_run,
        on_leader=on_leader, after_cycle=after_cycle, lock_watch=ports.lock_watch,
    )  # fmt: skip
    if once:
        results = _run_once(svc, signals)
        for r in results:
            log.info("once: %s", r.record.line())
        if not dry_run:
            svc.stop()
        bad = [r.record for r in results
               if r.record.outcome in ("failed", "aborted")
               or r.record.skipped == "lock-unavailable"]  # fmt: skip
        if bad:  # exit 1: a cron job or a script must see that nothing (or not all) applied
            raise CyclesFailed(
                f"{len(bad)} of {len(results)} cycles did not complete: "
                + "; ".join(f"{r.policy}: {r.reason or ' | '.join(r.errors)}" for r in bad)
            )
        return svc
    if signals is None:
        signals = StopSignals().install()
    http = None
    reloader = None
    try:  # an HTTP server that cannot start ends here too: the on_stop tasks still run
        if serve_http and not signals.requested:
            # rollouts run from `nomadscale deploy` in other processes: /metrics reads their
            # KV state
            svc.metrics.registry.register(DeployCollector(ports.kv, prefix=settings.kv_prefix))
            app = create_app(registry=svc.metrics.registry, status=svc.status,
                             healthy=svc.healthy, extra_routes=extra_routes)  # fmt: skip
            http = HttpServer(app, host=settings.http_host, port=settings.http_port).start()
        if reload is not None:
            reloader = _reloader(svc, settings, load=reload, source=reload_from)
        if not signals.requested:
            svc.start()
            if reloader is not None:
                reloader.start()
            systemd.notify("READY=1")
        # only while the scheduler runs and its lock tick is not stuck: a hung loop stops the
        # pings and systemd restarts the service
        watchdog_until_stopped(signals, healthy=svc.healthy,
                               on_reload=reloader.request if reloader else None)  # fmt: skip
    finally:
        stopping(signals)
        svc.stop()
        if reloader is not None:
            reloader.stop()
        for fn in on_stop:
            try:
                fn()
            except Exception:
                log.exception("shutdown task failed")
        if http is not None:
            http.stop()
    return svc
