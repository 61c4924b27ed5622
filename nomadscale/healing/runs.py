"""Run records of the runbook engine: a new record, which runs are the same target, what a
zone lock's holder is doing, the parameters that gave a run's values, and the audit summary
for the incident."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from nomadscale.core.values import new_id
from nomadscale.healing.runbook import Runbook

ACTIVE = ("pending", "running")


def new_run(
    rb: Runbook,
    values: dict[str, str],
    *,
    trigger: str,
    dry_run: bool,
    now: datetime,
    deadline: datetime | None,
) -> dict[str, Any]:
    """A ``pending`` run record of ``rb`` for validated ``values``."""
    run: dict[str, Any] = {
        "id": new_id(),
        "runbook": rb.name,
        "values": values,
        "trigger": trigger,
        "dry_run": dry_run,
        "status": "pending",
        "phase": "main",
        "step": 0,
        "step_state": {},
        "step_started": None,
        "attempts": 0,
        "results": [],
        "surge": None,
        "zone_lock": None,
        "error": None,
        "finalized": False,
        "created_at": now.isoformat(),
        "deadline_epoch": deadline.timestamp() if deadline else None,
    }
    run["values"]["run.id"] = run["id"]
    return run


def target(values: Mapping[str, str]) -> str | None:
    return values.get("node.id") or values.get("allocation.id") or values.get("zone")


def same_target(runbook: str, values: Mapping[str, str], other: Mapping[str, Any]) -> bool:
    return (other["runbook"] == runbook and not other.get("dry_run")
            and target(other["values"]) == target(values))  # fmt: skip


def zone_busy(zone: str, holder: Mapping[str, Any] | None) -> str:
    if holder is None:
        return f"another node in zone {zone} is being healed"
    node = holder["values"].get("node.name", "-")
    return (f"zone {zone} is being healed by run {holder['id']} ({holder['runbook']} on "
            f"{node}): one node per zone at a time")  # fmt: skip


def params_of(rb: Runbook, values: Mapping[str, str]) -> dict[str, str]:
    """The runbook parameters that gave ``values`` (for submitting them again)."""
    names = {"node": "node.id", "incident_id": "incident.id", "allocation": "allocation.id"}
    out: dict[str, str] = {
        p: values[names.get(p, p)] for p in rb.parameters if values.get(names.get(p, p))
    }
    if "node" in out:
        out.pop("zone", None)  # derived from the node
    return out


def summary(run: Mapping[str, Any]) -> str:
    """A multi-line audit summary for the incident."""
    head = f"nomadscale runbook {run['runbook']} run {run['id']}: {run['status'].upper()}"
    if run["status"] != "succeeded":
        head += " - escalated, left for a human" if run["status"] != "refused" else ""
    lines = [head]
    if run.get("error"):
        lines.append(f"reason: {run['error']}")
    if run.get("followup"):
        lines.append(f"a stronger event came too late for this run: run {run['followup']} "
                     "handles it")  # fmt: skip
    for r in run.get("results", []):
        lines.append(f"- [{r['phase']} {r['step']}] {r['action']}: {r['status']}: {r['detail']}")
    return "\n".join(lines)
