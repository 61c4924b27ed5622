"""The service loop: leader election, one APScheduler job per policy, kicks, shutdown.

* One job per policy on a ``CronTrigger`` aligned to the wall clock (``cycle: 20m`` ->
  ``minute="*/20"``), ``coalesce=True``, ``max_instances=1``, ``misfire_grace_time``.
* A short ``lock`` job renews the leader lock well within its TTL and picks up "apply now"
  kicks from KV. Each cycle renews the lock too; only the leader writes, and the actuator
  re-checks ``lock.held()`` before every write.
* A cycle slot (policy + scheduled time) is claimed in KV before acting, so a failover never
  applies the same slot twice; the claim stays ``open`` until the cycle's record is final, so
  a leader that died (or lost the lock) mid-apply leaves its slot to the next leader, whose
  takeover cycle finishes the interrupted decision at once instead of a cycle later.
* Every cycle's record names this host and its trigger: the cron tick (``scheduled``), a kick
  (``apply-now``), the first cycle after taking the lock (``takeover``) or ``run --once``.
* A reload (``service.reload``) replaces ``policies``, ``runners`` and the policy locks
  whole, never in place; a cycle looks its policy up under the policy's lock (gone: no run).
* ``stop()`` (SIGTERM) sets a flag checked before a cycle and between actions, waits for the
  running cycle, then releases the lock: never half-applied by choice. No job is added once
  it began: APScheduler's ``shutdown(wait=True)`` holds its job store lock while it waits for
  the running jobs, so a job adding a job then hangs the process for good (``_run_soon``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import Clock
from nomadscale.core.errors import ConfigError, NomadscaleError
from nomadscale.integrations.consul import update_json
from nomadscale.service.control import Control
from nomadscale.service.cycle import CycleResult, CycleRunner, Ports
from nomadscale.service.kicks import KickRetries
from nomadscale.service.leaderwatch import LockWatch
from nomadscale.service.lockalarm import LockAlarm
from nomadscale.service.records import APPLY_NOW, ONCE, SCHEDULED, TAKEOVER, Metrics, Recorder
from nomadscale.service.timing import check_timing, trigger_for

log = logging.getLogger(__name__)


def renew_interval(ttl_s: float) -> float:
    """How often the lock tick renews a lock of ``ttl_s``."""
    return max(1.0, min(ttl_s / 3, ttl_s - 10.0))


class Service:
    """The autoscaler for a set of policies. ``run_policy`` is what every trigger calls."""

    def __init__(
        self,
        *,
        settings: Settings,
        policies: Sequence[Policy],
        ports: Ports,
        clock: Clock,
        dry_run: bool = False,
        renew_s: float | None = None,
        keep: int = 100,
        metrics: Metrics | None = None,
        poll_s: float = 5.0,
        misfire_grace_s: float = 120.0,
        check: bool = True,
        every_s: float | None = None,
        on_leader: Sequence[Callable[[], object]] = (),
        after_cycle: Callable[[Policy], object] | None = None,
        lock_watch: LockWatch | None = None,
        incremental_forecasts: bool = True,
        host: str | None = None,  # named in every record; default socket.gethostname()
    ) -> None:
        if not policies:
            raise ConfigError("no policies to run")
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise ConfigError(f"policy names must be unique, got {names}")
        self.settings = settings
        self.policies = {p.name: p for p in policies}
        self.ports = ports
        self.clock = clock
        self.dry_run = dry_run
        self.renew_s = renew_s if renew_s is not None else renew_interval(settings.lock_ttl_s)
        if check:
            check_timing(policies, ttl_s=settings.lock_ttl_s, renew_s=self.renew_s)
        self.misfire_grace_s = misfire_grace_s
        self.every_s = every_s  # replaces every policy's cycle (tests, demos)
        self.stop_event = threading.Event()
        self.lock_error: str | None = None  # why the last election failed, None when it ran
        self.control = Control(ports.kv, prefix=settings.kv_prefix)
        self.metrics = metrics or Metrics()
        self.recorder = Recorder(
            kv=ports.kv,
            prefix=settings.kv_prefix,
            metrics=self.metrics,
            alerts=ports.alerts,
            keep=keep,
            log_json=settings.log_json,
            host=host,
        )
        self.lock_alarm = LockAlarm(recorder=self.recorder, clock=clock, ttl_s=settings.lock_ttl_s)
        self.poll_s = poll_s
        self.incremental_forecasts = incremental_forecasts
        self.runners = {p.name: self.new_runner(p) for p in policies}
        self.leader = False
        self._busy = {name: threading.Lock() for name in self.policies}
        self._kicks: dict[str, str | None] = {}
        self.kick_retries = KickRetries(clock=self.clock)
        self._scheduler: BackgroundScheduler | None = None
        self._sched_mu = threading.Lock()  # adding a job vs. stop() taking the scheduler
        self._elect_mu = threading.Lock()
        # run in the background when this process becomes the leader (resume interrupted
        # runbook runs and rollouts); wired by the CLI layer
        self.on_leader = tuple(on_leader)
        # run in the background after each cycle the leader ran (the warm-up gate for new
        # nodes); never two at once for one policy
        self.after_cycle = after_cycle
        self._after_busy = {name: threading.Lock() for name in self.policies}
        self.lock_watch = lock_watch  # a standby waits on the lock key with it
        self._watcher: threading.Thread | None = None
        self._alive_at = time.monotonic()
        # the reload state for /status (service.reload.Reloader sets it), None without one
        self.reload_status: Callable[[], dict[str, Any]] | None = None

    def new_runner(self, policy: Policy) -> CycleRunner:
        return CycleRunner(
            policy=policy, ports=self.ports, control=self.control, recorder=self.recorder,
            clock=self.clock, stop=self.stop_event, poll_s=self.poll_s,
            incremental=self.incremental_forecasts,
        )  # fmt: skip

    # --- leadership ---------------------------------------------------------------------

    def elect(self) -> bool:
        """Take or renew the leader lock; False on any error (never act when unsure)."""
        with self._elect_mu:
            if self.stop_event.is_set():  # stopping: never take the lock again after stop()
                return self.leader
            try:
                now_leader = bool(self.ports.lock.acquire())
                self.lock_error = None
                self.lock_alarm.reachable()
            except NomadscaleError as e:
                log.warning("leader lock: %s", e)
                now_leader = False
                self.lock_error = str(e)
                self.lock_alarm.unreachable(e)
            if now_leader != self.leader:
                # forecasters stay: standbys keep theirs up to date (see run_policy)
                log.info("leadership %s", "acquired" if now_leader else "lost")
                if now_leader:
                    self._background("on-leader", self._run_on_leader)
                    for name in self.policies:  # run the current slot if nobody did
                        self._run_soon(self._scheduled, [name, TAKEOVER], f"takeover-{name}")
            self.leader = now_leader
            self.metrics.is_leader.set(1 if now_leader else 0)
            return now_leader

    def _claim_slot(self, name: str, slot: datetime) -> bool:
        """Record that ``slot`` of ``name`` is being acted on; False if it already was (a
        slot left ``open`` by a leader that died mid-apply can be claimed again)."""
        key = f"{self.control.prefix}/slots/{name}"
        claimed: list[bool] = []

        def fn(old: Any) -> Any:
            done, mine = (old or {}).get("slot"), slot.isoformat()
            if done is not None and (done > mine or (done == mine and not old.get("open"))):
                claimed[:] = [False]
                return old
            claimed[:] = [True]
            return {"slot": slot.isoformat(), "by": str(getattr(self.ports.lock, "holder", "")),
                    "open": True}  # fmt: skip

        if not self.ports.lock.held():
            return False
        update_json(self.ports.kv, key, fn, default={})
        return bool(claimed and claimed[0])

    def _close_slot(self, name: str, slot: datetime, result: CycleResult) -> None:
        """The slot's cycle ended with its record stored: the slot is done."""
        key = f"{self.control.prefix}/slots/{name}"

        def fn(old: Any) -> Any:
            doc = dict(old or {})
            if doc.get("slot") == slot.isoformat():
                doc.pop("open", None)
            return doc

        try:
            if result.record.outcome != "aborted" and self.ports.lock.held():
                update_json(self.ports.kv, key, fn, default={})
            # else interrupted (lock lost, shutting down): the next leader may finish it
        except NomadscaleError as e:
            log.warning("%s: closing the cycle slot failed: %s", name, e)

    def cycle_s(self, name: str) -> float:
        return self.every_s or self.policies[name].cycle_s

    def slot_of(self, name: str, when: datetime) -> datetime:
        cycle = self.cycle_s(name)
        ts = when.timestamp()
        return datetime.fromtimestamp(math.floor(ts / cycle) * cycle, tz=when.tzinfo)

    # --- cycles -------------------------------------------------------------------------

    def run_policy(
        self, name: str, *, now: datetime | None = None, kick: str | None = None,
        trigger: str | None = None, retry: bool = False,
    ) -> CycleResult | None:  # fmt: skip
        """One cycle of ``name`` (what the scheduler, kicks, ``--once`` and simulate call);
        ``trigger`` defaults to ``apply-now`` with a ``kick``, else ``scheduled``. A kick's
        ``retry`` that skips again is not stored (one record says it waits, not one a try)."""
        if self.stop_event.is_set():
            return None
        trigger = trigger or (APPLY_NOW if kick is not None else SCHEDULED)
        busy = self._busy.get(name)
        if busy is None:  # removed by a reload (a kick or takeover job queued before)
            return None
        with busy:
            runner = self.runners.get(name)
            if runner is None or name not in self.policies:  # removed while waiting
                return None
            now = now or self.clock.now()
            if self.dry_run:
                return runner.run(leader=False, dry_run=True, now=now, trigger=trigger)
            if not self.elect():
                kind, why = "not-leader", "not the leader"
                if self.lock_error is not None:  # nobody may lead: say why, not "not leader"
                    kind, why = "lock-unavailable", f"leader lock unavailable: {self.lock_error}"
                rec = self.recorder.skipped(name, started_at=now, trigger=trigger, kind=kind,
                                            reason=why)  # fmt: skip
                runner.warm(slot=self.slot_of(name, now))  # a takeover then starts warm
                return CycleResult(record=rec)
            try:
                fresh = kick is not None or self._claim_slot(name, self.slot_of(name, now))
            except NomadscaleError as e:
                log.error("%s: cannot claim the cycle slot: %s", name, e)
                fresh = False
            if not fresh:
                rec = self.recorder.skipped(name, started_at=now, trigger=trigger,
                                            kind="slot-done",
                                            reason="this cycle slot was already run")  # fmt: skip
                return CycleResult(record=rec)
            slot = self.slot_of(name, now)
            result = runner.run(leader=self.ports.lock.held(), now=now, trigger=trigger,
                                meta={"nomadscale.slot": slot.isoformat()},
                                store_skip=not retry)  # fmt: skip
            if kick is None:
                self._close_slot(name, slot, result)
        if self.after_cycle is not None and self.leader and not self.stop_event.is_set():
            self._background(f"after-cycle-{name}", lambda: self._run_after_cycle(name))
        return result

    # --- hooks --------------------------------------------------------------------------

    def _background(self, what: str, fn: Callable[[], object]) -> None:
        threading.Thread(target=fn, name=what, daemon=True).start()

    def _run_on_leader(self) -> None:
        """Each on-leader task in its own thread (a resumed rollout runs for a long time)."""
        for fn in self.on_leader:
            name = getattr(fn, "__name__", "task")

            def run(fn: Callable[[], object] = fn, name: str = name) -> None:
                if self.stop_event.is_set() or not self.leader:
                    return
                try:
                    fn()
                except Exception:  # one failing task must not stop the others or the loop
                    log.exception("on-leader task %s failed", name)

            self._background(f"on-leader-{name}", run)

    def _run_after_cycle(self, name: str) -> None:
        busy, policy = self._after_busy.get(name), self.policies.get(name)
        if self.after_cycle is None or busy is None or policy is None:
            return  # removed by a reload meanwhile
        if not busy.acquire(blocking=False):
            return  # the previous one is still running
        try:
            self.after_cycle(policy)
        except Exception:
            log.exception("%s: after-cycle task failed", name)
        finally:
            busy.release()

    def warm_up(self, names: Sequence[str] | None = None) -> None:
        """Warm the forecasters of ``names`` (default: every policy) to the current slot (at
        start-up and after a reload, in the background: the next cycle then reads only new
        steps)."""
        for name in list(self.policies) if names is None else names:
            if self.stop_event.is_set():
                return
            busy = self._busy.get(name)
            if busy is None:
                continue
            with busy:
                runner = self.runners.get(name)
                if runner is not None and name in self.policies:
                    runner.warm(slot=self.slot_of(name, self.clock.now()))

    def run_once(self) -> list[CycleResult]:
        """One cycle of every policy (``run --once``). The lock is renewed meanwhile, as the
        lock tick does in the running service: a cycle can wait many minutes for a Nomad
        deployment or for drains, and a lock left to expire meanwhile would abandon the rest
        of the cycle and leave its decision unrecorded."""
        done = threading.Event()
        renewer = None
        if not self.dry_run:
            renewer = threading.Thread(target=self._renew_until, args=(done,),
                                       name="lock-renew", daemon=True)  # fmt: skip
            renewer.start()
        out = []
        try:
            for name in self.policies:
                r = self.run_policy(name, trigger=ONCE)
                if r is not None:
                    out.append(r)
        finally:
            done.set()
            if renewer is not None:
                renewer.join(timeout=30.0)
        return out

    def _renew_until(self, done: threading.Event) -> None:
        while not done.wait(self.renew_s):
            if self.leader:
                self.elect()

    def _scheduled(self, name: str, trigger: str = SCHEDULED) -> None:
        try:
            self.run_policy(name, trigger=trigger)
        except Exception:  # the cycle boundary: a bug in one cycle must not stop the loop
            log.exception("%s: cycle crashed", name)
            self.metrics.errors.labels(name, "crash").inc()

    def healthy(self) -> bool:
        """The scheduler runs and its lock tick ran lately (the systemd watchdog and
        ``/healthz`` ask this)."""
        sched = self._scheduler
        if sched is None or not sched.running or self.stop_event.is_set():
            return False
        return time.monotonic() - self._alive_at < 3 * self.renew_s + 15.0

    def _tick(self) -> None:
        """Renew the lock; as leader, run cycles for new kicks."""
        self._alive_at = time.monotonic()
        if self.stop_event.is_set() or self.dry_run:
            return
        if not self.elect():
            return
        for name in self.policies:
            try:
                doc = self.control.kick(name)
            except NomadscaleError as e:
                log.warning("%s: reading kicks failed: %s", name, e)
                continue
            if not doc:
                continue
            kid = doc.get("id")
            if kid and kid != self._kicks.get(name):
                self._kicks[name] = kid
                log.info(
                    "%s: apply-now requested by %s: %s", name, doc.get("who"), doc.get("reason")
                )
                self._run_soon(self._kicked, [name, kid], f"kick-{name}")
        for name, kid in self.kick_retries.due(self._kicks):
            self._run_soon(self._kicked, [name, kid], f"kick-{name}")

    def _run_soon(self, fn: Callable[..., object], args: list[Any], job_id: str) -> None:
        """Run ``fn(*args)`` in the scheduler now, unless stopping (see the module doc)."""
        with self._sched_mu:
            sched = self._scheduler
            if sched is None or self.stop_event.is_set():
                return
            sched.add_job(fn, args=args, id=job_id, replace_existing=True)

    def _watch_lock(self) -> None:
        """Standby: block on the lock key and try to take the lock the moment it frees
        (instead of waiting for the next renewal tick)."""
        assert self.lock_watch is not None
        index = 0
        while not self.stop_event.is_set():
            if self.leader or self.dry_run:
                self.stop_event.wait(self.renew_s)
                continue
            try:
                index, free = self.lock_watch.wait(index, timeout_s=max(1.0, 4 * self.renew_s))
            except NomadscaleError as e:
                log.debug("lock watch: %s", e)
                index = 0
                self.stop_event.wait(min(1.0, self.renew_s))
                continue
            if free and not self.stop_event.is_set():
                self._tick()

    def _kicked(self, name: str, kid: str) -> None:
        result = None
        try:
            retry = self.kick_retries.waiting(name) == kid
            result = self.run_policy(name, kick=kid, trigger=APPLY_NOW, retry=retry)
        except Exception:
            log.exception("%s: kicked cycle crashed", name)
        self.kick_retries.outcome(name, kid, result)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> BackgroundScheduler:
        """Start the scheduler (returns at once). Call ``stop()`` to end."""
        for name in self.policies:  # kicks made before start are not replayed
            try:
                doc = self.control.kick(name)
            except NomadscaleError:
                doc = None
            self._kicks[name] = doc.get("id") if doc else None
        sched = BackgroundScheduler(timezone="UTC")
        for name in self.policies:
            self._cycle_job(sched, name)
        sched.add_job(
            self._tick,
            IntervalTrigger(seconds=self.renew_s, timezone="UTC"),
            id="lock",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=int(max(1, self.renew_s)),
            next_run_time=datetime.now().astimezone(),
        )
        with self._sched_mu:  # before its first lock tick can take over and add a job
            self._scheduler = sched
        sched.start()
        self._background("warm-up", self.warm_up)
        if self.lock_watch is not None and not self.dry_run:
            self._watcher = threading.Thread(target=self._watch_lock, name="lock-watch",
                                             daemon=True)  # fmt: skip
            self._watcher.start()
        log.info(
            "scheduler started: %s",
            ", ".join(f"{n} every {self.cycle_s(n):g}s" for n in self.policies),
        )
        return sched

    def _cycle_job(self, sched: BackgroundScheduler, name: str) -> None:
        sched.add_job(self._scheduled, trigger_for(self.cycle_s(name)), args=[name],
                      id=f"cycle-{name}", coalesce=True, max_instances=1,
                      misfire_grace_time=int(self.misfire_grace_s),
                      replace_existing=True)  # fmt: skip

    def next_fire(self, name: str, after: datetime) -> datetime:
        nxt = trigger_for(self.cycle_s(name)).get_next_fire_time(None, after)
        assert nxt is not None
        return nxt

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop scheduling, let the running cycle end at its next safe point, release."""
        with self._sched_mu:  # from here on no job adds a job (see _run_soon)
            self.stop_event.set()
            sched, self._scheduler = self._scheduler, None
        if sched is not None:

            def _shutdown() -> None:
                if sched.running:
                    # emptied first: shutdown() marks it stopped before taking the job
                    # store lock, and a run-once job removed then raises JobLookupError
                    sched.pause()
                    sched.remove_all_jobs()
                    sched.shutdown(wait=True)

            waiter = threading.Thread(target=_shutdown, name="scheduler-stop", daemon=True)
            waiter.start()
            waiter.join(timeout_s)
            if waiter.is_alive():
                log.warning("a cycle did not finish within %.0fs of shutdown", timeout_s)
        if not self.dry_run:
            # after an election in flight (none starts once stopping): a few Consul calls
            got = self._elect_mu.acquire(timeout=min(timeout_s, 15.0))
            try:
                self.ports.lock.release()
            except NomadscaleError as e:
                log.warning("releasing the leader lock failed: %s", e)
            finally:
                if got:
                    self._elect_mu.release()
        self.leader = False
        self.metrics.is_leader.set(0)
        log.info("service stopped")

    def status(self) -> dict[str, Any]:
        """Leader, policies (and when they were loaded), overrides, last decisions."""
        from nomadscale.service.reload import service_status

        return service_status(self)
