"""A stronger maintenance notice for a node whose run is under way.

A live-migration notice (``MIGRATE_ON_HOST_MAINTENANCE``: the VM keeps running) can be followed
by a stop (``TERMINATE_ON_HOST_MAINTENANCE``), or the watcher and a PagerDuty incident can name
different events for the same maintenance. A trigger whose event makes the runbook skip fewer
steps than the active run's event is not a mere duplicate: ``request`` records it under
``<prefix>/runbooks/escalations/<run_id>``, and the process driving the run takes it before its
next step (``take``; the run record is written only by that process). The run's ``event``
becomes the new one, so the steps not yet run are no longer skipped for the old one; a step
already skipped for it is gone back to while the node is still out of service (no
``mark_eligible`` done since).

A request the run can no longer honour (the node serves again, or the run is failing) is
never dropped: it stays recorded and the run hands it on when it ends (``claim``: the engine
starts a new run for it). A request that lands while the run ends is claimed by whoever gets
it first: the ending run (``claim``) or the trigger that wrote it and then saw the run had
ended (``withdraw``); both delete it with a CAS on its ModifyIndex, so exactly one of them
starts the new run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from nomadscale.core.ports import KVPort
from nomadscale.healing.runbook import Runbook

log = logging.getLogger(__name__)


def key(prefix: str, run_id: str) -> str:
    return f"{prefix}/runbooks/escalations/{run_id}"


def escalates(rb: Runbook, old: str | None, new: str | None) -> bool:
    """True when a run for ``old`` must do steps it skips for ``new`` (and none the other way):
    e.g. a terminate notice for a live-migration run. A run without an event skips nothing."""
    if not old or not new or old == new:
        return False
    more = any(old in s.skip_events and new not in s.skip_events for s in rb.steps)
    fewer = any(new in s.skip_events and old not in s.skip_events for s in rb.steps)
    return more and not fewer


def watched(rb: Runbook, run: dict[str, Any]) -> bool:
    """Whether the run can be escalated at all (so the others cost no KV read per step)."""
    return bool(run["values"].get("event")) and any(s.skip_events for s in rb.steps)


def request(
    kv: KVPort,
    prefix: str,
    run_id: str,
    *,
    event: str,
    trigger: str,
    at: str,
    params: Mapping[str, str],
) -> int | None:
    """Record a stronger event for ``run_id``; returns the request's ModifyIndex (for
    ``withdraw``). ``params``: the trigger's own parameters, for the run that takes it over
    should this one end first."""
    doc = {"event": event, "trigger": trigger, "at": at, "params": dict(params)}
    kv.put(key(prefix, run_id), json.dumps(doc, sort_keys=True).encode())
    e = kv.get(key(prefix, run_id))
    return e.modify_index if e is not None else None


def withdraw(kv: KVPort, prefix: str, run_id: str, index: int | None) -> bool:
    """Take back one's own request (``index`` from ``request``) from a run that ended
    meanwhile; True when nobody had claimed it (the trigger must then start a run itself)."""
    return index is not None and kv.delete(key(prefix, run_id), cas=index)


def claim(kv: KVPort, prefix: str, run_id: str) -> dict[str, Any] | None:
    """The request left for an ending run, removed; None when there is none (or the trigger
    that wrote it took it back first, or it is unreadable)."""
    k = key(prefix, run_id)
    e = kv.get(k)
    if e is None or not kv.delete(k, cas=e.modify_index):
        return None
    try:
        doc = json.loads(e.value)
        params = doc.get("params") or {}
        out = {
            "event": str(doc["event"]),
            "trigger": str(doc.get("trigger") or "-"),
            "params": {str(k): str(v) for k, v in params.items()},
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("run %s: unreadable escalation request dropped", run_id)
        return None
    return out


def take(
    kv: KVPort,
    prefix: str,
    rb: Runbook,
    run: dict[str, Any],
    *,
    save: Callable[[dict[str, Any]], None],
    now_iso: str,
) -> None:
    """Apply an escalation recorded for ``run`` (then saved), and remove the request; one
    the run can no longer honour stays for ``claim`` when the run ends (noted once)."""
    k = key(prefix, run["id"])
    e = kv.get(k)
    if e is None:
        return
    try:
        doc = json.loads(e.value)
        new, trigger = str(doc["event"]), str(doc.get("trigger") or "-")
    except (ValueError, KeyError, TypeError):
        log.warning("run %s: unreadable escalation request ignored", run["id"])
        new, trigger = "", "-"
    if escalates(rb, run["values"].get("event"), new):
        if run["phase"] == "main" and not _too_late(rb, run, new):
            _apply(rb, run, new, trigger, now_iso)
            save(run)
        else:
            if run.get("escalation_deferred") != e.modify_index:  # noted once
                _defer(rb, run, new, trigger, now_iso)
                run["escalation_deferred"] = e.modify_index
                save(run)
            return  # stays recorded: the run hands it on when it ends
    kv.delete(k, cas=e.modify_index)  # a newer request stays for the next step


def _redo(rb: Runbook, run: Mapping[str, Any], new: str) -> list[int]:
    """Steps already passed that were skipped for the run's event but are needed for ``new``."""
    old = run["values"].get("event")
    return [
        i
        for i in range(min(run["step"], len(rb.steps)))
        if old in rb.steps[i].skip_events and new not in rb.steps[i].skip_events
    ]


def _too_late(rb: Runbook, run: Mapping[str, Any], new: str) -> bool:
    """A step skipped for the old event is needed, but the node serves again since then."""
    redo = _redo(rb, run, new)
    return bool(redo) and any(
        r["phase"] == "main" and r["action"] == "mark_eligible" and r["status"] == "ok"
        and redo[0] < r["step"] < run["step"]
        for r in run["results"]
    )  # fmt: skip


def _defer(rb: Runbook, run: dict[str, Any], new: str, trigger: str, now_iso: str) -> None:
    old = run["values"].get("event")
    why = ("the node serves again" if run["phase"] == "main"
           else "this run is failing")  # fmt: skip
    detail = (f"{old} -> {new} (trigger {trigger}): too late for this run ({why}); a new run "
              f"starts for {new} when this one ends")  # fmt: skip
    run["results"].append(
        {"phase": run["phase"], "step": run["step"], "action": "escalate", "status": "deferred",
         "detail": detail, "at": now_iso}
    )  # fmt: skip
    log.warning("runbook %s run %s: %s", run["runbook"], run["id"], detail)


def _apply(rb: Runbook, run: dict[str, Any], new: str, trigger: str, now_iso: str) -> None:
    """Switch the run to ``new`` (``take`` checked it is not too late for it)."""
    old = str(run["values"]["event"])
    at = run["step"]
    redo = _redo(rb, run, new)
    run["values"]["event"] = new
    detail = f"{old} -> {new} (trigger {trigger}): steps skipped for {old} run from now on"
    if redo:
        back = redo[0]
        run["step"] = back
        run["step_state"], run["step_started"], run["attempts"] = {}, None, 0
        run["rewinds"] = int(run.get("rewinds") or 0) + 1
        detail += f"; back to step {back} {rb.steps[back].action}, already skipped for {old}"
    run["results"].append(
        {"phase": "main", "step": at, "action": "escalate", "status": "ok", "detail": detail,
         "at": now_iso}
    )  # fmt: skip
    log.warning("runbook %s run %s escalated: %s", run["runbook"], run["id"], detail)
