"""A stronger maintenance notice for a node whose run is under way.

A live-migration notice (``MIGRATE_ON_HOST_MAINTENANCE``: the VM keeps running) can be followed
by a stop (``TERMINATE_ON_HOST_MAINTENANCE``), or the watcher and a PagerDuty incident can name
different events for the same maintenance. A trigger whose event makes the runbook skip fewer
steps than the active run's event is not a mere duplicate: ``request`` records it under
``<prefix>/runbooks/escalations/<run_id>``, and the process driving the run takes it before its
next step (``take``; the run record is written only by that process). The run's ``event``
becomes the new one, so the steps not yet run are no longer skipped for the old one; a step
already skipped for it is gone back to while the node is still out of service (no
``mark_eligible`` done since), else the result says it was too late for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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


def request(kv: KVPort, prefix: str, run_id: str, event: str, trigger: str, at: str) -> None:
    doc = {"event": event, "trigger": trigger, "at": at}
    kv.put(key(prefix, run_id), json.dumps(doc, sort_keys=True).encode())


def take(
    kv: KVPort,
    prefix: str,
    rb: Runbook,
    run: dict[str, Any],
    *,
    save: Callable[[dict[str, Any]], None],
    now_iso: str,
) -> None:
    """Apply an escalation recorded for ``run`` (then saved), and remove the request."""
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
    if run["phase"] == "main" and escalates(rb, run["values"].get("event"), new):
        _apply(rb, run, new, trigger, now_iso)
        save(run)
    kv.delete(k, cas=e.modify_index)  # a newer request stays for the next step


def _apply(rb: Runbook, run: dict[str, Any], new: str, trigger: str, now_iso: str) -> None:
    old = str(run["values"]["event"])
    at = run["step"]
    run["values"]["event"] = new
    detail = f"{old} -> {new} (trigger {trigger}): steps skipped for {old} run from now on"
    redo = [
        i
        for i in range(at)
        if old in rb.steps[i].skip_events and new not in rb.steps[i].skip_events
    ]
    if redo:
        back = redo[0]
        in_service = any(
            r["phase"] == "main" and r["action"] == "mark_eligible" and r["status"] == "ok"
            and back < r["step"] < at
            for r in run["results"]
        )  # fmt: skip
        what = f"step {back} {rb.steps[back].action}"
        if in_service:
            detail += f"; {what} was already skipped and the node serves again: too late for it"
        else:
            run["step"] = back
            run["step_state"], run["step_started"], run["attempts"] = {}, None, 0
            run["rewinds"] = int(run.get("rewinds") or 0) + 1
            detail += f"; back to {what}, already skipped for {old}"
    run["results"].append(
        {"phase": "main", "step": at, "action": "escalate", "status": "ok", "detail": detail,
         "at": now_iso}
    )  # fmt: skip
    log.warning("runbook %s run %s escalated: %s", run["runbook"], run["id"], detail)
