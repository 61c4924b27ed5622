"""Re-planning before every node step of a rollout.

The preflight plans the rollout once, against the forecast's upper bound at its start. Demand
can outrun that bound while the rollout runs (a forecast miss at peak), so before each next
worker is taken out (a zone's first replacement, the canary's promotion, every later node) the
rollout re-reads current demand from its ``DemandSource`` and checks that the workers serving
now, minus the one about to be replaced, still cover ``max(current demand, planned upper)``.
When they do not it surges one worker in the zone first or, when no surge is possible (or one
already runs there), holds until they do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nomadscale.config.policy import Policy
from nomadscale.core.errors import NomadscaleError
from nomadscale.core.ports import DemandSource, GroupStatus, NodeInfo, pinned_datacenter
from nomadscale.deploy import room
from nomadscale.integrations.tracefile import read_time

log = logging.getLogger(__name__)

# The newest demand sample: Prometheus' default scrape interval; a finer step adds nothing.
CURRENT_STEP_S = 15.0
CURRENT_LOOKBACK_S = 60.0  # tolerate a missing sample or two

GO, SURGE, HOLD = "go", "surge", "hold"


def current_demand(
    demand: DemandSource | None,
    *,
    now: datetime,
    step_s: float = CURRENT_STEP_S,
    lookback_s: float = CURRENT_LOOKBACK_S,
) -> float | None:
    """Demand (rpm) of the newest finished step of ``step_s`` seconds; None when unknown (no
    source, no data, or the source failed: the caller then relies on the planned bound)."""
    if demand is None:
        return None
    try:
        series = demand.history(
            end=read_time(demand, now), lookback_s=max(lookback_s, step_s), step_s=step_s
        )
    except NomadscaleError as e:
        log.warning("deploy re-plan: current demand unavailable: %s", e)
        return None
    for v in reversed([float(x) for x in series.values]):
        if math.isfinite(v):
            return v
    return None


def serving_workers(groups: Mapping[str, GroupStatus], serving: Mapping[str, int]) -> int:
    """Workers serving now in ``groups``: each group's serving allocations (``serving``, from
    ``NomadClient.serving_counts``; unpromoted canaries are not counted), at most its desired
    count. Not the scale status' ``Healthy``: Nomad clears and re-watches the health of every
    allocation a new job version updates in place (a surge or zone version, a count change),
    though those workers keep serving; a fresh replacement serves once it is healthy."""
    return sum(min(serving.get(name, 0), g.desired) for name, g in groups.items())


@dataclass(frozen=True, slots=True)
class StepCheck:
    """One re-plan before a node step: what demand needs and whether the step may go."""

    group: str
    at: datetime
    action: str  # go / surge / hold
    serving: int  # workers serving now
    out: int  # workers the next step takes out
    rpm_per_worker: float
    demand_rpm: float | None  # current demand, newest sample
    planned_upper: float | None  # the forecast upper bound the rollout planned for
    need_workers: int | None  # None: no demand figure at all (the step goes)
    why_not_surge: str = ""

    @property
    def after(self) -> int:
        return self.serving - self.out

    def explain(self) -> str:
        cur = "unknown" if self.demand_rpm is None else f"{self.demand_rpm:.0f} rpm"
        up = "none" if self.planned_upper is None else f"{self.planned_upper:.0f} rpm"
        need = "no demand figure" if self.need_workers is None else f"need {self.need_workers}"
        text = (
            f"{self.group}: demand {cur}, planned upper {up} -> {need}; "
            f"{self.serving} serving - {self.out} = {self.after} -> {self.action}"
        )
        if self.action == HOLD and self.why_not_surge:
            text += f" ({self.why_not_surge})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "at": self.at.isoformat(),
            "action": self.action,
            "serving": self.serving,
            "out": self.out,
            "demand_rpm": self.demand_rpm,
            "planned_upper": self.planned_upper,
            "need_workers": self.need_workers,
            "explain": self.explain(),
        }


def check_step(
    *,
    group: str,
    at: datetime,
    serving: int,
    rpm_per_worker: float,
    demand_rpm: float | None,
    planned_upper: float | None,
    surge_blocked: Callable[[], str | None],
    out: int = 1,
    surge_must_cover: bool = False,
) -> StepCheck:
    """Decide the next node step. ``surge_blocked`` (asked only when the step would leave too
    little capacity) says why no surge worker can be added in ``group``, or None. With
    ``surge_must_cover`` (a zone's start: the surge worker comes with the zone's new job
    version, whose deployment then runs) a surge that would still leave the step short is a
    hold instead: it waits before any deployment, every worker serving."""
    known = [x for x in (demand_rpm, planned_upper) if x is not None and math.isfinite(x)]
    need = math.ceil(max(known) / rpm_per_worker - 1e-9) if known else None
    action, why = GO, ""
    if need is not None and serving - out < need:
        short = surge_must_cover and serving + 1 - out < need
        blocked = (
            f"one surge worker would still leave {serving + 1 - out} < {need}"
            if short
            else surge_blocked()
        )
        action, why = (SURGE, "") if blocked is None else (HOLD, blocked)
    return StepCheck(group=group, at=at, action=action, serving=serving, out=out,
                     rpm_per_worker=rpm_per_worker, demand_rpm=demand_rpm,
                     planned_upper=planned_upper, need_workers=need, why_not_surge=why)  # fmt: skip


def surge_blocker(
    policy: Policy,
    nomad: Any,
    *,
    spec: Mapping[str, Any],
    group: str,
    desired: Mapping[str, int],
    surge: Mapping[str, Any] | None,
) -> str | None:
    """Why one more worker cannot be added in ``group`` now (None when it can): one surge per
    zone, ``bounds.max``, the group's scaling max, more usable nodes in the zone than workers
    and one of them with room for a worker (its GPU free: ``room``)."""
    count = desired.get(group, 0)
    if (
        surge
        and surge.get("group") == group
        and not surge.get("released")
        and count >= int(surge.get("to") or 0)
    ):
        return f"a surge worker already runs in {group}"
    total = sum(desired.values())
    if total + 1 > policy.bounds.max:
        return f"a surge worker would pass bounds.max {policy.bounds.max}"
    for tg in spec.get("TaskGroups") or []:
        if tg.get("Name") == group:
            mx = (tg.get("Scaling") or {}).get("Max")
            if mx is not None and count + 1 > int(mx):
                return f"a surge worker would pass {group}'s scaling max {mx}"
    zone = next((z for z in policy.zones.items if z.group == group), None)
    if zone is None:
        return f"{group} is not a zone of the policy"
    usable = zone_nodes(policy, nomad, spec=spec, group=group)
    dc = pinned_datacenter(spec, group) or zone.name
    if len(usable) <= count:
        return f"no free node in zone {dc} ({len(usable)} usable for {count} workers)"
    if room.free_node(nomad, usable, spec=spec, group=group) is None:
        return (f"no free node in zone {dc} ({len(usable)} usable, none with "
                f"{room.wants_text(spec, group)} free)")  # fmt: skip
    return None


def zone_nodes(
    policy: Policy, nomad: Any, *, spec: Mapping[str, Any], group: str, with_allocs: bool = False
) -> list[NodeInfo]:
    """The nodes a worker of ``group`` can be placed on now: its zone's pool and datacenter,
    ready, eligible and not draining (none when ``group`` is not a zone of the policy).
    ``with_allocs`` fills each node's ``allocs_running`` (one more call)."""
    zone = next((z for z in policy.zones.items if z.group == group), None)
    if zone is None:
        return []
    dc = pinned_datacenter(spec, group) or zone.name
    listed = (nomad.list_nodes(node_pool=zone.node_pool, with_allocs=True) if with_allocs
              else nomad.list_nodes(node_pool=zone.node_pool))  # fmt: skip
    return [
        n for n in listed
        if n.datacenter == dc and n.status == "ready" and n.eligibility == "eligible"
        and not n.draining
    ]  # fmt: skip
