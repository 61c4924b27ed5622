"""Reloading the policies without a restart (SIGHUP: ``systemctl reload nomadscale``).

* ``Reloader.reload`` re-reads the policy files (every file validated in one pass, as
  ``policy validate`` does, plus the lock timing check). One invalid file and nothing
  changes: the previous policies keep running, each error is logged on its own line, then one
  summary line, and ``nomadscale_reload_total{result="failed"}`` counts it.
* Otherwise only the difference is applied, one policy at a time and one line each: a new
  policy gets its cron job (its forecaster warms up in the background), a removed one loses
  its job once its running cycle ended, a changed one takes effect from its next cycle (the
  running one finishes with the old policy); its warm forecaster is kept unless the demand
  or forecast settings changed. Unchanged policies are left alone. The leader lock is never
  released: leadership, slots and kicks carry on.
* Reloads run one at a time in one worker thread, never in the signal handler: SIGHUPs that
  come while one runs make one more reload after it (it reads the files as they are then).
* systemd hears ``RELOADING=1`` (with ``MONOTONIC_USEC``, as ``Type=notify-reload`` wants)
  at the start and ``READY=1`` at the end, whatever the outcome.
* The settings file (``/etc/nomadscale/nomadscale.yaml``, the environment) is not reloaded:
  the policies folder it names is re-read; other settings need a restart.

``service_status`` builds ``/status``: the policies running, their files and when they were
loaded, and the last reload (its errors when it failed). The same summary is kept in KV at
``<prefix>/loaded/<host>`` for ``nomadscale status`` on other hosts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from apscheduler.jobstores.base import JobLookupError

from nomadscale.config.policy import Policy
from nomadscale.core.errors import ConfigError, NomadscaleError
from nomadscale.core.ports import AlertPort
from nomadscale.service import systemd
from nomadscale.service.ops_metrics import ReloadMetrics
from nomadscale.service.timing import trigger_for
from nomadscale.stages.decide import forecast_config_from

if TYPE_CHECKING:
    from nomadscale.service.loop import Service

log = logging.getLogger(__name__)

SETTINGS_NOTE = "the settings file and environment are not reloaded: restart for those"


def _fields(p: Policy) -> dict[str, Any]:
    return {k: getattr(p, k) for k in type(p).model_fields}


def same_forecast(a: Policy, b: Policy) -> bool:
    """Whether a forecaster kept for ``a`` forecasts as one built for ``b`` would."""
    return a.demand == b.demand and forecast_config_from(a) == forecast_config_from(b)


@dataclass(frozen=True)
class Change:
    """What a reload does to one policy."""

    name: str
    kind: str  # added | removed | changed | unchanged
    old: Policy | None = None
    new: Policy | None = None
    fields: tuple[str, ...] = ()  # the top-level sections that changed

    @property
    def keep_forecaster(self) -> bool:
        return self.old is not None and self.new is not None and same_forecast(self.old, self.new)

    def line(self) -> str:
        p = self.new or self.old
        where = f" ({p.source})" if p is not None and p.source is not None else ""
        if self.kind == "changed":
            how = "forecaster kept" if self.keep_forecaster else "forecaster rebuilt"
            return (f"policy {self.name}{where}: changed {', '.join(self.fields)}; from its "
                    f"next cycle, {how}")  # fmt: skip
        if self.kind == "added":
            return f"policy {self.name}{where}: added"
        if self.kind == "removed":
            return f"policy {self.name}{where}: removed (no cycle of it running)"
        return f"policy {self.name}{where}: unchanged"


def plan(old: Mapping[str, Policy], new: Sequence[Policy]) -> list[Change]:
    """The changes from the running policies ``old`` to the loaded ``new`` (by name)."""
    out: list[Change] = []
    for p in new:
        was = old.get(p.name)
        if was is None:
            out.append(Change(p.name, "added", new=p))
            continue
        before, after = _fields(was), _fields(p)
        diff = tuple(k for k in after if before.get(k) != after[k])
        if not diff and was.source != p.source:
            diff = ("file",)  # moved: the same policy, named by its new file from now on
        out.append(Change(p.name, "changed" if diff else "unchanged", old=was, new=p,
                          fields=diff))  # fmt: skip
    names = {p.name for p in new}
    out.extend(Change(n, "removed", old=p) for n, p in old.items() if n not in names)
    return out


def _schedule(svc: Service, name: str, *, on: bool = True) -> None:
    """Add (or replace: a new cycle) the cron job of policy ``name``, or remove it. A cycle
    of it that is running goes on. Nothing once stopping (see ``loop.Service._run_soon``)."""
    with svc._sched_mu:
        sched = svc._scheduler
        if sched is None or svc.stop_event.is_set():
            return
        if on:
            svc._cycle_job(sched, name)
        else:
            with contextlib.suppress(JobLookupError):
                sched.remove_job(f"cycle-{name}")


def _forget(svc: Service, name: str) -> None:
    """Drop the demand source and node pool built for ``name`` (``cycle.Ports`` caches them
    by policy name): the next cycle builds them from the policy it runs."""
    svc.ports.forget(name)


def _routes(policies: Sequence[Policy]) -> dict[str, str | None]:
    return {p.name: p.alerting.pagerduty_routing_key_env for p in policies}


class Reloader:
    """Applies policy reloads to a running ``Service``.

    ``load`` reads and validates every policy file (``ConfigError`` with one line per error);
    ``check`` checks the loaded set (the lock timing); ``rebuild_alerts`` builds the alert
    port for the new set (per-policy PagerDuty routing keys), None to keep the one there."""

    def __init__(
        self,
        svc: Service,
        *,
        load: Callable[[], Sequence[Policy]],
        source: str,
        check: Callable[[Sequence[Policy]], None] | None = None,
        metrics: ReloadMetrics | None = None,
        rebuild_alerts: Callable[[Sequence[Policy]], AlertPort | None] | None = None,
        notify: Callable[[str], object] = systemd.notify,
        poll_s: float = 0.25,
    ) -> None:
        self.svc = svc
        self.load = load
        self.source = source
        self.check = check
        self.metrics = metrics or ReloadMetrics(svc.metrics.registry)
        self.rebuild_alerts = rebuild_alerts
        self.notify = notify
        self.poll_s = poll_s
        self.loaded_at: datetime = svc.clock.now()
        self.last: dict[str, Any] | None = None  # the last reload
        self.last_failure: dict[str, Any] | None = None  # the last one that failed
        self._mu = threading.Lock()  # one reload at a time
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.metrics.loaded_now(len(svc.policies), self.loaded_at)
        svc.reload_status = self.status

    # --- requests -----------------------------------------------------------------------

    def start(self) -> Reloader:
        """Start the worker thread that runs requested reloads, one at a time."""
        self._worker = threading.Thread(target=self._work, name="reload", daemon=True)
        self._worker.start()
        self.publish()
        return self

    def request(self) -> None:
        """Ask for a reload (never blocks; several requests before it starts make one)."""
        self._wanted.set()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._wanted.set()
        if self._worker is not None:
            self._worker.join(timeout_s)

    def _work(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping.is_set() or self.svc.stop_event.is_set():
                return
            self._wanted.clear()
            try:
                self.reload()
            except Exception:  # a bug here must not end reloads, nor the service
                log.exception("reload crashed; the policies loaded before keep running")

    # --- the reload ---------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Reload now (blocks until applied); the outcome as ``status()['last_reload']`` shows."""
        with self._mu:
            mono_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={mono_us}")
            status = "READY=1"
            try:
                out = self._reload()
                if out["result"] == "failed":
                    status += f"\nSTATUS=reload failed ({len(out['errors'])} errors): running " \
                              "the previous policies"  # fmt: skip
                return out
            finally:
                self.notify(status)

    def _reload(self) -> dict[str, Any]:
        svc = self.svc
        at = svc.clock.now()
        log.info("reload: reading the policies in %s (%s)", self.source, SETTINGS_NOTE)
        try:
            policies = list(self.load())
            if self.check is not None:
                self.check(policies)
        except ConfigError as e:
            return self._failed(at, list(e.errors) or [str(e)])
        changes = plan(svc.policies, policies)
        routed = _routes(list(svc.policies.values())) != _routes(policies)
        applied = self._apply(changes)
        done = [c for c in changes if c.kind != "unchanged"]
        if applied and routed and self.rebuild_alerts is not None:
            alerts = self.rebuild_alerts(policies)  # a routing key variable changed
            svc.ports.alerts = alerts
            svc.recorder.alerts = alerts
        counts = {k: sum(c.kind == k for c in changes)
                  for k in ("added", "changed", "removed", "unchanged")}  # fmt: skip
        if not applied:  # a shutdown came while waiting for a cycle
            log.warning("reload: stopped by the shutdown before all changes were applied")
            return self._record(at, "stopped", [], [c.line() for c in done])
        self.loaded_at = at
        self.metrics.reloads.labels("ok").inc()
        self.metrics.loaded_now(len(svc.policies), at)
        log.info("reload: %d policies from %s: %s (%s)", len(svc.policies), self.source,
                 ", ".join(f"{n} {k}" for k, n in counts.items()), SETTINGS_NOTE)  # fmt: skip
        return self._record(at, "ok", [], [c.line() for c in done])

    def _failed(self, at: datetime, errors: list[str]) -> dict[str, Any]:
        for line in errors:
            log.error("reload: %s", line)
        n = len(self.svc.policies)
        log.error(
            "reload failed: %d error%s in %s; nothing changed, %d polic%s loaded at %s keep "
            "running (%s)", len(errors), "" if len(errors) == 1 else "s", self.source, n,
            "y" if n == 1 else "ies", self.loaded_at.isoformat(timespec="seconds"), SETTINGS_NOTE,
        )  # fmt: skip
        self.metrics.reloads.labels("failed").inc()
        return self._record(at, "failed", errors, [])

    def _record(self, at: datetime, result: str, errors: list[str],
                changes: list[str]) -> dict[str, Any]:  # fmt: skip
        doc = {"at": at.isoformat(), "result": result, "errors": errors, "changes": changes}
        self.last = doc
        if result == "failed":
            self.last_failure = doc
        self.publish()
        return doc

    def _apply(self, changes: Sequence[Change]) -> bool:
        """Apply ``changes`` (added first); False when a shutdown stopped it midway."""
        warm: list[str] = []
        order = {"added": 0, "changed": 1, "removed": 2}
        for c in sorted((c for c in changes if c.kind in order), key=lambda c: order[c.kind]):
            if c.kind == "added":
                assert c.new is not None
                self._add(c.new)
                warm.append(c.name)
            else:
                busy = self._wait_idle(c.name)
                if busy is None:
                    return False
                try:
                    if c.kind == "changed":
                        assert c.old is not None and c.new is not None
                        if not self._replace(c.old, c.new, keep=c.keep_forecaster):
                            warm.append(c.name)
                    else:
                        assert c.old is not None
                        self._remove(c.old)
                finally:
                    busy.release()
            log.info("reload: %s", c.line())
        if warm:
            threading.Thread(target=self.svc.warm_up, args=(warm,), name="reload-warm-up",
                             daemon=True).start()  # fmt: skip
        return True

    def _wait_idle(self, name: str) -> threading.Lock | None:
        """The policy's lock, once its running cycle (if any) ended; None when stopping."""
        busy = self.svc._busy[name]
        if busy.acquire(blocking=False):
            return busy
        log.info("reload: waiting for the running cycle of policy %s to finish", name)
        while not self.svc.stop_event.is_set():
            if busy.acquire(timeout=self.poll_s):
                return busy
        return None

    def _add(self, p: Policy) -> None:
        svc = self.svc
        try:  # an apply-now made before this policy ran is not replayed (as at start)
            doc = svc.control.kick(p.name)
        except NomadscaleError:
            doc = None
        svc._kicks[p.name] = doc.get("id") if doc else None
        _forget(svc, p.name)
        svc._busy = {**svc._busy, p.name: svc._busy.get(p.name) or threading.Lock()}
        svc._after_busy = {**svc._after_busy,
                           p.name: svc._after_busy.get(p.name) or threading.Lock()}  # fmt: skip
        svc.runners = {**svc.runners, p.name: svc.new_runner(p)}
        svc.policies = {**svc.policies, p.name: p}
        _schedule(svc, p.name)

    def _replace(self, old: Policy, new: Policy, *, keep: bool) -> bool:
        """Swap in ``new`` (the caller holds its lock); True when the forecaster was kept."""
        svc, name = self.svc, new.name
        before = svc.cycle_s(name)
        runner = svc.new_runner(new)
        kept = svc.runners.get(name)
        if keep and kept is not None:
            runner.forecaster = kept.forecaster
            runner.forecaster.policy = new  # same demand and forecast config: names the file
        if old.demand != new.demand or old.target != new.target:
            _forget(svc, name)  # the demand source and node pool are built from them
        svc.runners = {**svc.runners, name: runner}
        svc.policies = {**svc.policies, name: new}
        if svc.cycle_s(name) != before:
            _schedule(svc, name)  # the new cron; a cycle running goes on
        return keep and kept is not None

    def _remove(self, old: Policy) -> None:
        svc, name = self.svc, old.name
        _schedule(svc, name, on=False)
        svc.policies = {n: p for n, p in svc.policies.items() if n != name}
        svc.runners = {n: r for n, r in svc.runners.items() if n != name}
        _forget(svc, name)
        m = svc.metrics  # its gauges would show its last values for good
        for gauge in (m.forecast, m.upper):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        for z in old.zones.items:
            for gauge in (m.desired, m.actual):
                with contextlib.suppress(KeyError):
                    gauge.remove(name, z.name)

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        policies = self.svc.policies.items()
        return {
            "from": self.source,
            "loaded_at": self.loaded_at.isoformat(),
            "policies": {n: str(p.source) if p.source else None for n, p in policies},
            "last_reload": self.last,
            "last_failed_reload": self.last_failure,
            "note": SETTINGS_NOTE,
        }

    def publish(self) -> None:
        """Keep the status in KV for ``nomadscale status`` (best effort)."""
        svc = self.svc
        key = f"{svc.control.prefix}/loaded/{svc.recorder.host}"
        doc = {**self.status(), "host": svc.recorder.host, "pid": os.getpid()}
        try:
            svc.ports.kv.put(key, json.dumps(doc).encode())
        except NomadscaleError as e:
            log.warning("reload: storing the loaded policies in KV failed: %s", e)


def service_status(svc: Service) -> dict[str, Any]:
    """``/status``: leader, policies (with their files and when they were loaded), desired vs
    actual per zone, overrides, last decisions, the last reload."""
    now = svc.clock.now()
    holder = None
    leader_fn = getattr(svc.ports.lock, "leader", None)
    if leader_fn is not None:
        try:
            h = leader_fn()
            holder = h.describe() if h is not None and hasattr(h, "describe") else h
        except NomadscaleError:
            holder = None
    out: dict[str, Any] = {
        "time": now.isoformat(),
        "host": svc.recorder.host,  # this process's host, as its records name it
        "leader": holder,
        "this_process_leads": svc.leader,
        "dry_run": svc.dry_run,
        "policies": {},
        "loaded": svc.reload_status() if svc.reload_status is not None else None,
    }
    for name, p in svc.policies.items():  # one snapshot: a reload replaces it whole
        last = svc.recorder.last.get(name)
        nxt = trigger_for(svc.every_s or p.cycle_s).get_next_fire_time(None, now)
        out["policies"][name] = {
            "cycle": f"{p.cycle_s / 60:g}m",
            "job": f"{p.target.namespace}/{p.target.job}",
            "file": str(p.source) if p.source is not None else None,
            "last": last.to_dict() if last else None,
            "overrides": [o.to_dict() for o in svc.control.overrides(name, now=now)],
            "next_cycle": nxt.isoformat() if nxt is not None else None,
        }
    return out
