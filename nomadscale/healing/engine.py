"""The runbook engine: resumable runs with their whole state in KV.

A run record (``<prefix>/runbooks/runs/<run_id>``, JSON) holds the runbook, the validated
parameters, the current phase/step, each step's progress and result, the surge done, and the
status. It is saved after every step call, so ``resume_all()`` in a new process continues any
run that was interrupted. Safety limits: one healing run per zone at a time (a KV lock per
zone, value = run id), a global rate limit (runs started in the last hour), and the drain
action refuses to go below the policy's per-zone share of ``bounds.min``.

A trigger for the parameters of an active run is its duplicate, but a stronger maintenance
event is passed on to it (``healing.escalation``); when that run can no longer honour it (the
node serves again, or the run ended while the event was being passed on), a new run starts
for it: the event is never lost. A dry run is never a duplicate (it changes nothing) and never
makes one. ``RunbookMetrics`` (``healing.metrics``) counts triggers and
finished runs, times them and gauges the runs this process drives.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import (
    NomadscaleError,
    PermanentError,
    SafetyError,
    TemporaryError,
    UsageError,
)
from nomadscale.core.ports import KVPort
from nomadscale.healing import actions, escalation, runs
from nomadscale.healing.metrics import DEFAULT_METRICS, TRIGGER_SOURCES, RunbookMetrics
from nomadscale.healing.resolve import parameter_values
from nomadscale.healing.runbook import Runbook, step_timeout
from nomadscale.healing.runs import ACTIVE, summary

__all__ = ["DEFAULT_METRICS", "TRIGGER_SOURCES", "EngineLimits", "RunbookEngine", "RunbookMetrics"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_runs_per_hour: int = 12
    poll_s: float = 5.0
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0


class RunbookEngine:
    def __init__(
        self,
        *,
        runbooks: Mapping[str, Runbook],
        nomad: actions.HealingNomad,
        kv: KVPort,
        zones: Mapping[tuple[str, str], actions.ZoneTarget] | None = None,
        notes: actions.Notes | None = None,
        clock: Clock | None = None,
        prefix: str = "nomadscale",
        limits: EngineLimits | None = None,
        metrics: RunbookMetrics | None = None,
    ) -> None:
        self.runbooks = dict(runbooks)
        self.nomad = nomad
        self.kv = kv
        self.zones = dict(zones or {})
        self.notes = notes
        self.clock: Clock = clock or SystemClock()
        self.prefix = prefix.rstrip("/")
        self.limits = limits or EngineLimits()
        self.metrics = metrics or DEFAULT_METRICS
        for name in self.runbooks:  # a 0 series per runbook, not "no data"
            self.metrics.in_progress.labels(name)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._submit_lock = threading.Lock()
        self._stoppers: list[Callable[[float], object]] = []

    # --- keys and records -----------------------------------------------------------------

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}/runbooks/runs/{run_id}"

    def _lock_key(self, zone: str) -> str:
        return f"{self.prefix}/runbooks/locks/zone/{zone}"

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        e = self.kv.get(self._run_key(run_id))
        return json.loads(e.value) if e else None

    def list_runs(self) -> list[dict[str, Any]]:
        out = []
        for e in self.kv.list(f"{self.prefix}/runbooks/runs/"):
            try:
                out.append(json.loads(e.value))
            except ValueError:
                log.warning("unreadable run record %s", e.key)
        return sorted(out, key=lambda r: r.get("created_at", ""))

    def _save(self, run: dict[str, Any]) -> None:
        run["updated_at"] = self.clock.now().isoformat()
        self.kv.put(self._run_key(run["id"]), json.dumps(run, sort_keys=True).encode())

    # --- submitting ---------------------------------------------------------------------------

    def submit(
        self,
        runbook: str,
        params: Mapping[str, str],
        *,
        trigger: str = "manual",
        dry_run: bool = False,
        deadline: datetime | None = None,
    ) -> dict[str, Any]:
        """Validate parameters, resolve the node through Nomad, apply the safety limits and
        store a new run (status ``pending``; ``refused`` when a limit says no). Returns the run,
        or the active one for the same parameters marked ``duplicate``. ``UsageError`` for an
        unknown runbook or a bad parameter."""
        rb = self.runbooks.get(runbook)
        if rb is None:
            raise UsageError(f"runbook {runbook!r} not found (have: {', '.join(self.runbooks)})")
        values = parameter_values(self.nomad, rb, params)
        now = self.clock.now()
        run = runs.new_run(rb, values, trigger=trigger, dry_run=dry_run, now=now,
                           deadline=deadline)  # fmt: skip
        with self._submit_lock:
            active = self._active_duplicate(rb.name, values)
            if active is not None and not dry_run:
                dup = self._duplicate(rb, active, values, trigger, now)
                if dup is not None:
                    return dup
                active = None  # it ended while its event was passed on: this run takes it
            if active is not None:  # a dry run changes nothing: it runs, and says so
                self._note_active(run, active)
            refusal = self._refusal(run, now)
            if refusal is None and not dry_run and values.get("zone") and rb.policy:
                if self._lock_zone(values["zone"], run["id"]):
                    run["zone_lock"] = values["zone"]
                else:
                    holder = self._zone_holder(values["zone"])
                    if holder is not None and runs.same_target(rb.name, values, holder):
                        # a run for the same node started meanwhile in another process
                        # (e.g. two replicas took one incident's webhooks at once)
                        dup = self._duplicate(rb, holder["id"], values, trigger, now)
                        if dup is not None:
                            return dup
                    if self._lock_zone(values["zone"], run["id"]):  # its holder just ended
                        run["zone_lock"] = values["zone"]
                    else:
                        refusal = runs.zone_busy(values["zone"], holder)
            if refusal:
                run["status"] = "refused"
                run["error"] = refusal
            self._save(run)
        self.metrics.triggered(rb.name, trigger, "refused" if refusal else "accepted")
        log.info(
            "runbook %s run %s %s (trigger %s, node %s)",
            rb.name,
            run["id"],
            "refused: " + refusal if refusal else "accepted",
            trigger,
            values.get("node.name", "-"),
        )
        if refusal:
            self._finalize(run)
        return run

    def _duplicate(
        self, rb: Runbook, active: str, values: Mapping[str, str], trigger: str, now: datetime
    ) -> dict[str, Any] | None:
        """The active run for a trigger with the same parameters; a stronger maintenance
        event (a stop after a live-migration notice) is passed on to it. None when that run
        ended while the event was being passed on and nobody claimed it: the trigger must
        start a run of its own (the ending run claims a request it sees: ``_finalize``)."""
        other = self.get_run(active) or {"id": active, "values": {}}
        event = values.get("event")
        result = "duplicate"
        if event and escalation.escalates(rb, other["values"].get("event"), event):
            index = escalation.request(self.kv, self.prefix, active, event=event,
                                       trigger=trigger, at=now.isoformat(),
                                       params=runs.params_of(rb, values))  # fmt: skip
            after = self.get_run(active)  # read after the write: see escalation's docstring
            ended = after is None or after["status"] not in ACTIVE
            if ended and escalation.withdraw(self.kv, self.prefix, active, index):
                log.info("runbook %s run %s ended as %s came: a new run takes it", rb.name,
                         active, event)  # fmt: skip
                return None
            result = "escalated"
        log.info("runbook %s already running for these parameters as %s (%s)", rb.name,
                 active, result)  # fmt: skip
        self.metrics.triggered(rb.name, trigger, result)
        return {**other, "duplicate": True, "escalated": result == "escalated"}

    def _note_active(self, run: dict[str, Any], active: str) -> None:
        other = self.get_run(active) or {}
        trig = other.get("trigger", "-")
        run["active_run"] = {"id": active, "trigger": trig, "status": other.get("status")}
        detail = f"run {active} (trigger {trig}) is active for these parameters; this dry run "
        detail += "changes nothing"
        at = run["created_at"]
        run["results"].append(
            {"phase": "main", "step": 0, "action": "dry_run", "status": "note", "detail": detail,
             "at": at}
        )  # fmt: skip
        log.info("dry run %s of %s while run %s is active", run["id"], run["runbook"], active)

    def _active_duplicate(self, runbook: str, values: Mapping[str, str]) -> str | None:
        """The active (not dry) run of ``runbook`` for the same node/allocation/zone."""
        for r in self.list_runs():
            if r["status"] in ACTIVE and runs.same_target(runbook, values, r):
                return str(r["id"])
        return None

    def _refusal(self, run: Mapping[str, Any], now: datetime) -> str | None:
        if run["dry_run"]:
            return None
        since = (now - timedelta(hours=1)).isoformat()
        recent = [
            r
            for r in self.list_runs()
            if r.get("created_at", "") >= since and r["status"] != "refused" and not r["dry_run"]
        ]
        if len(recent) >= self.limits.max_runs_per_hour:
            return f"rate limit: {len(recent)} runs in the last hour (max {self.limits.max_runs_per_hour})"
        return None

    def _lock_zone(self, zone: str, run_id: str) -> bool:
        key = self._lock_key(zone)
        e = self.kv.get(key)
        if e is None:
            return self.kv.put(key, run_id.encode(), cas=0)
        holder = e.value.decode()
        if holder == run_id:
            return True
        other = self.get_run(holder)
        if other is not None and other["status"] in ACTIVE:
            return False
        return self.kv.put(key, run_id.encode(), cas=e.modify_index)  # stale lock

    def _zone_holder(self, zone: str) -> dict[str, Any] | None:
        """The active run holding ``zone``'s lock (None when it is free or stale)."""
        e = self.kv.get(self._lock_key(zone))
        other = self.get_run(e.value.decode()) if e is not None else None
        return other if other is not None and other["status"] in ACTIVE else None

    def _unlock_zone(self, run: Mapping[str, Any]) -> None:
        zone = run.get("zone_lock")
        if not zone:
            return
        e = self.kv.get(self._lock_key(zone))
        if e is not None and e.value.decode() == run["id"]:
            self.kv.delete(self._lock_key(zone), cas=e.modify_index)

    # --- running ------------------------------------------------------------------------------

    def run(self, run_id: str, *, max_calls: int | None = None) -> dict[str, Any]:
        """Drive a run until it ends (or ``max_calls`` step calls, to simulate a crash)."""
        run = self.get_run(run_id)
        if run is None:
            raise UsageError(f"run {run_id} not found")
        rb = self.runbooks.get(run["runbook"])
        if rb is None:
            run["status"], run["error"] = "failed", f"runbook {run['runbook']} no longer loaded"
            self._save(run)
            return run
        if run["status"] == "pending":
            run["status"] = "running"
            self._save(run)
        ctx = actions.Ctx(
            nomad=self.nomad,
            kv=self.kv,
            prefix=self.prefix,
            zones=self.zones,
            notes=self.notes,
            policy=rb.policy,
            dry_run=bool(run["dry_run"]),
            now_iso=lambda: self.clock.now().isoformat(),
        )
        calls = 0
        with self.metrics.in_progress.labels(rb.name).track_inprogress():
            while run["status"] == "running" and not self._stop.is_set():
                if max_calls is not None and calls >= max_calls:
                    return run
                calls += 1
                if escalation.watched(rb, run):
                    escalation.take(self.kv, self.prefix, rb, run, save=self._save,
                                    now_iso=self.clock.now().isoformat())  # fmt: skip
                self._step_once(rb, ctx, run)
        if run["status"] not in ACTIVE:
            self._finalize(run)
            if run.get("followup") and self._workers and not self._stop.is_set():
                self._queue.put(run["followup"])
        return run

    def _step_once(self, rb: Runbook, ctx: actions.Ctx, run: dict[str, Any]) -> None:
        steps = rb.step_list(run["phase"])
        if run["step"] >= len(steps):
            run["status"] = "succeeded" if run["phase"] == "main" else "failed"
            self._save(run)
            return
        step = steps[run["step"]]
        now = self.clock.now()
        if not run["step_started"]:
            run["step_started"] = now.isoformat()
        started = datetime.fromisoformat(run["step_started"])
        timed_out = (now - started).total_seconds() >= step_timeout(step)
        run["now_epoch"] = now.timestamp()
        try:
            outcome = actions.call(ctx, step, run)
        except TemporaryError as exc:
            run["attempts"] += 1
            if timed_out:
                self._fail_step(run, step, f"timed out after retries: {exc}")
                return
            delay = min(
                self.limits.backoff_max_s,
                max(exc.retry_after, self.limits.backoff_initial_s * 2 ** (run["attempts"] - 1)),
            )
            log.warning(
                "runbook %s run %s step %s %s: temporary error (retry in %.0fs): %s",
                run["runbook"],
                run["id"],
                run["step"],
                step.action,
                delay,
                exc,
            )
            self._save(run)
            self.clock.sleep(delay)
            return
        except (PermanentError, NomadscaleError) as exc:
            self._fail_step(run, step, str(exc), safety=isinstance(exc, SafetyError))
            return
        if isinstance(outcome, actions.Waiting):
            if timed_out:
                self._fail_step(run, step, f"timed out: {outcome.detail}")
                return
            self._save(run)
            self.clock.sleep(self.limits.poll_s)
            return
        self._record(run, step, "ok", outcome.detail)
        run["step"] += 1
        self._reset_step(run)
        self._save(run)

    def _reset_step(self, run: dict[str, Any]) -> None:
        run["step_state"] = {}
        run["step_started"] = None
        run["attempts"] = 0

    def _record(self, run: dict[str, Any], step: Any, status: str, detail: str) -> None:
        run["results"].append(
            {
                "phase": run["phase"],
                "step": run["step"],
                "action": step.action,
                "status": status,
                "detail": detail,
                "at": self.clock.now().isoformat(),
            }
        )
        log.info(
            "runbook %s run %s %s step %s %s: %s: %s",
            run["runbook"],
            run["id"],
            run["phase"],
            run["step"],
            step.action,
            status,
            detail,
        )

    def _fail_step(self, run: dict[str, Any], step: Any, why: str, *, safety: bool = False) -> None:
        self._record(run, step, "refused" if safety else "failed", why)
        if run["phase"] == "main":
            run["error"] = f"step {run['step']} {step.action}: {why}"
            run["phase"] = "on_failure"
            run["step"] = 0
        else:
            run["step"] += 1  # on_failure steps are best effort
        self._reset_step(run)
        self._save(run)

    def _finalize(self, run: dict[str, Any]) -> None:
        """Release the zone lock, tell the incident (note; resolve on success), and start a
        new run for a stronger event this run could not honour (``run["followup"]``)."""
        if run.get("finalized"):
            return
        self._unlock_zone(run)
        passed = None
        if run["values"].get("event"):  # a stronger event this run did not take
            passed = escalation.claim(self.kv, self.prefix, run["id"])
        if passed is not None and not run["dry_run"]:
            run["followup"] = self._follow_up(run, passed)
        incident = run["values"].get("incident.id")
        if incident and self.notes is not None and not run["dry_run"]:
            self._tell(run, "add the final note to", self.notes.add_note, incident, summary(run))
            if run["status"] == "succeeded":  # even when the note could not be added
                self._tell(run, "resolve", self.notes.resolve, incident)
        run["finalized"] = True
        self._save(run)
        self.metrics.finished(run, self.clock.now())  # after the save: counted once
        log.info("runbook %s run %s finished: %s", run["runbook"], run["id"], run["status"])

    def _follow_up(self, run: Mapping[str, Any], passed: Mapping[str, Any]) -> str | None:
        """Submit the run for an event ``run`` ended without honouring; its id when it is
        pending (the caller drives or queues it)."""
        params = dict(passed["params"]) or {"node": run["values"].get("node.id", ""),
                                            "event": passed["event"]}  # fmt: skip
        try:
            new = self.submit(run["runbook"], params, trigger=passed["trigger"])
        except NomadscaleError as exc:
            log.error("runbook %s run %s: %s (trigger %s) came too late for it and no new run "
                      "could start: %s", run["runbook"], run["id"], passed["event"],
                      passed["trigger"], exc)  # fmt: skip
            return None
        log.warning("runbook %s run %s: %s came too late for it: run %s %s", run["runbook"],
                    run["id"], passed["event"], new["id"],
                    "is active for it" if new.get("duplicate") else f"started ({new['status']})")  # fmt: skip
        return str(new["id"]) if new["status"] == "pending" and not new.get("duplicate") else None

    def _tell(self, run: Mapping[str, Any], what: str, fn: Any, incident: str, *a: str) -> None:
        try:
            fn(incident, *a)
        except NomadscaleError as exc:
            log.warning("run %s: could not %s incident %s: %s", run["id"], what, incident, exc)

    # --- workers and resume ------------------------------------------------------------------

    def resume_all(self) -> list[str]:
        """Queue every run left pending/running (e.g. by a process that died)."""
        ids = [r["id"] for r in self.list_runs() if r["status"] in ACTIVE]
        for rid in ids:
            log.info("resuming run %s", rid)
            self._queue.put(rid)
        return ids

    def enqueue(self, run_id: str) -> None:
        self._queue.put(run_id)

    def start(self, workers: int = 2) -> RunbookEngine:
        for i in range(workers):
            t = threading.Thread(target=self._work, name=f"runbook-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def on_stop(self, fn: Callable[[float], object]) -> None:
        """Call ``fn(timeout)`` first when the engine stops (the webhook dispatcher: what it
        still submits stays pending in KV for the next process)."""
        self._stoppers.append(fn)

    def stop(self, timeout: float = 5.0) -> None:
        for fn in self._stoppers:
            try:
                fn(timeout)
            except Exception:  # the workers must stop whatever happened there
                log.exception("stopping %s failed", fn)
        self._stop.set()
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until the queue is empty and every worker is idle (tests, CLI)."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def _work(self) -> None:
        while True:
            rid = self._queue.get()
            try:
                if rid is None:
                    return
                self.run(rid)
            except Exception:  # the worker must survive any single run
                log.exception("run %s crashed", rid)
            finally:
                self._queue.task_done()
