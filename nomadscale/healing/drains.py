"""Whose drain a node is under, and what a healing run does about a drain it did not start.

Nomad keeps the drainer's ``Meta`` in the node's ``LastDrain`` (nomad/state/state_store.go
updateNodeDrainImpl: set when a drain starts, replaced only by an update with a non-empty
Meta, kept after the drain ends; ``NodeInfo.drain_meta``). nomadscale's drains say whose
they are:

* a healing run's (``actions.drain``): ``nomadscale.run`` and ``nomadscale.runbook``;
* the autoscaler's scale-in (``service/actuator.py``): ``drained_by=nomadscale`` and
  ``decision_id``; once the drain is done the autoscaler deletes the node's instance.

Before a run first touches its node or its capacity (``mark_ineligible``, ``surge``,
``drain``: ``check``), a node the autoscaler is removing (draining it for its scale-in, or
drained by it and still ineligible, its instance about to be deleted) is left to the
autoscaler: healing it for service would fight the scale-in (a surge the autoscaler did not
want, a wait for a node that never comes back, then a page). The run moves that drain's
deadline before the maintenance when it is later (an update without Meta keeps the
autoscaler's), waits for the drain to end (``node_drained``), releases any surge, and skips
the steps that bring the node back (``run["handover"]``); its results and the incident's
summary say so. Should that drain end with work left on the node (cancelled: the node
stays), the run goes back to the step it handed over at and heals the node after all
(``run["taken_over"]``).

When the ``drain`` step finds its node draining otherwise:

* its own drain (the process died between starting it and saving the run): in progress;
* another healing run's (an earlier run that ended): taken over, drained again with this
  run's Meta and deadline;
* anyone else's (an operator's ``nomad node drain``, no Meta): refused with one line, for
  the human who drains it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nomadscale.core.errors import SafetyError
from nomadscale.core.ports import RUN_DRAIN_KEY, AllocInfo, NodeInfo
from nomadscale.healing.outcome import Done, Outcome, Waiting

if TYPE_CHECKING:
    from nomadscale.healing.actions import Ctx

AUTOSCALER = "autoscaler"
# after a handover: the steps that still run (the rest bring the node back: skipped)
KEPT_ACTIONS = frozenset({"release_surge"})
KEPT_CONDITIONS = frozenset({"node_drained", "surge_healthy"})
SYSTEM_TYPES = ("system", "sysbatch")
HANDOVER_AT = frozenset({"mark_ineligible", "surge", "drain"})


def own_meta(run: Mapping[str, Any]) -> dict[str, str]:
    return {RUN_DRAIN_KEY: str(run["id"]), "nomadscale.runbook": str(run["runbook"])}


def owner(node: NodeInfo) -> tuple[str, str]:
    """(``run``, run id) / (``autoscaler``, decision id) / (``other``, what its Meta says)."""
    return node.drain_owner()


def scale_in(node: NodeInfo) -> str | None:
    """The autoscaler's decision id when it is removing ``node``: draining it for its
    scale-in, or done draining it with the node still ineligible (its instance not deleted
    yet: the autoscaler deletes it after its wait)."""
    kind, who = owner(node)
    if kind != AUTOSCALER:
        return None
    if node.draining or (node.drain_status == "complete" and node.eligibility == "ineligible"):
        return who
    return None


def check(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome | None:
    """Before the run first touches its node or its capacity (``HANDOVER_AT``): an outcome
    when the autoscaler is removing the node (the run hands it over), else None."""
    nid = run["values"].get("node.id")
    if (run["phase"] != "main" or step.action not in HANDOVER_AT or not nid
            or run.get("handover") or run.get("taken_over")):  # fmt: skip
        return None
    node = ctx.nomad.node(str(nid))
    decision = scale_in(node)
    return None if decision is None else _hand_over(ctx, step, run, node, decision)


def deadline_s(step_deadline_s: float, run: Mapping[str, Any]) -> float:
    """The step's drain deadline, ending 5 minutes before the maintenance (at least 60 s)."""
    deadline = step_deadline_s
    until = run.get("deadline_epoch")
    if until:
        deadline = max(60.0, min(deadline, float(until) - run["now_epoch"] - 300.0))
    return deadline


def already_draining(ctx: Ctx, step: Any, run: dict[str, Any], node: NodeInfo) -> Outcome | None:
    """What the ``drain`` step does with ``node`` already draining (module docstring): an
    outcome, or None to drain it with this run's Meta (``step_state["took_over"]`` says
    whose drain that replaces)."""
    kind, who = owner(node)
    if kind == "run" and who == run["id"]:
        run["step_state"]["started"] = True
        return Done(f"drain of {node.name} in progress")
    if kind == "run":
        run["step_state"]["took_over"] = who
        return None
    if kind == AUTOSCALER:
        return _hand_over(ctx, step, run, node, who)
    since = f", since {node.drain_started.isoformat()}" if node.drain_started else ""
    raise SafetyError(
        f"drain of {node.name} refused: it is already being drained by someone else ({who}"
        f"{since}); healing does not take over a drain it did not start"
    )


def _hand_over(ctx: Ctx, step: Any, run: dict[str, Any], node: NodeInfo, decision: str) -> Done:
    want = deadline_s(float("inf"), run)  # only the maintenance bounds the autoscaler's
    force_at = node.drain_force_at.timestamp() if node.drain_force_at else None
    late = (
        node.draining
        and bool(run.get("deadline_epoch"))
        and (force_at is None or force_at > run["now_epoch"] + want)
    )
    run["handover"] = {"to": AUTOSCALER, "decision_id": decision, "node": node.name,
                       "at_step": run["step"]}  # fmt: skip
    how = "being drained" if node.draining else "drained"
    what = (f"{node.name} is {how} by the autoscaler for scale-in (decision {decision}), "
            "which then removes it")  # fmt: skip
    moved = ""
    if late:
        moved = f"; its drain deadline moved to {want:.0f}s, before the maintenance"
        if ctx.dry_run:
            moved = f"; would move its drain deadline to {want:.0f}s, before the maintenance"
        else:  # no Meta: Nomad keeps the autoscaler's
            ctx.nomad.drain(node.id, deadline_s=want, meta=None, ignore_system_jobs=True)
    return Done(f"{what}: the node is left to it{moved}; this run waits for the drain to end "
                "and does not bring the node back")  # fmt: skip


def skipped(step: Any, run: Mapping[str, Any]) -> str | None:
    """Why a main-phase step is skipped after a handover (None: it runs)."""
    h = run.get("handover")
    if not h or run["phase"] != "main" or step.action in KEPT_ACTIONS:
        return None
    if step.action == "wait_condition" and step.condition in KEPT_CONDITIONS:
        return None
    return (f"skipped: {h['node']} is being removed by the autoscaler (decision "
            f"{h['decision_id']})")  # fmt: skip


def left_on(allocs: list[AllocInfo]) -> list[AllocInfo]:
    """The allocations a drain must move: running or pending, not of a system job (a drain
    ends without them: nomad/drainer/draining_node.go IsDone; with IgnoreSystemJobs they
    keep running, e.g. the maintenance-watcher job)."""
    return [a for a in allocs if not a.terminal and a.client_status in ("running", "pending")
            and a.job_type not in SYSTEM_TYPES]  # fmt: skip


def drained(ctx: Ctx, run: dict[str, Any], node: NodeInfo, left: list[AllocInfo]) -> Outcome:
    """The ``node_drained`` condition: the drain ended and nothing is left to move. After a
    handover, a drain of the autoscaler's that ended with work left (cancelled: the node
    stays) is taken over: the run goes back to the step it handed the node over at and
    heals the node after all (surge, capacity check, its own drain)."""
    if node.draining:
        return Waiting(f"{len(left)} allocation(s) left on {node.name}")
    h, t = run.get("handover"), run.get("taken_over")
    if not left:
        if h:
            return Done(f"{node.name} drained by the autoscaler (decision {h['decision_id']})")
        if t:
            return Done(f"{node.name} drained by this run (the autoscaler's drain, decision "
                        f"{t['decision_id']}, had ended with work left on it)")  # fmt: skip
        return Done(f"{node.name} drained")
    if h is None:
        return Waiting(f"{len(left)} allocation(s) left on {node.name}")
    back = int(h["at_step"])
    detail = (f"the autoscaler's drain of {node.name} (decision {h['decision_id']}) ended "
              f"{node.drain_status or 'without a status'} with {len(left)} allocation(s) left "
              f"on it: the node stays, so this run heals it after all (back to step {back})")  # fmt: skip
    run["results"].append({"phase": "main", "step": run["step"], "action": "take_over",
                           "status": "ok", "detail": detail, "at": ctx.now_iso()})  # fmt: skip
    del run["handover"]
    run["taken_over"] = {"from": AUTOSCALER, "decision_id": h["decision_id"]}
    run["step"] = back
    run["step_state"], run["step_started"], run["attempts"] = {}, None, 0
    run["rewinds"] = int(run.get("rewinds") or 0) + 1
    return Waiting(detail)
