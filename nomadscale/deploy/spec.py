"""Job spec edits for a rollout: new image in zone groups, the rollout's update block."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from nomadscale.config.policy_sections import Deploy

NS = 1_000_000_000


def update_block(d: Deploy, *, canary: int, auto_revert: bool = True) -> dict[str, Any]:
    return {
        "MaxParallel": 1,
        "Canary": canary,
        "AutoRevert": auto_revert,
        "AutoPromote": False,
        "HealthCheck": "checks",
        "MinHealthyTime": int(d.min_healthy_time.total_seconds() * NS),
        "HealthyDeadline": int(d.healthy_deadline.total_seconds() * NS),
        "ProgressDeadline": int(d.progress_deadline.total_seconds() * NS),
        "Stagger": 30 * NS,
    }


def with_image(
    spec: dict[str, Any],
    *,
    image: str,
    groups: Iterable[str],
    update: dict[str, Any] | None,
    update_group: str | None,
) -> dict[str, Any]:
    """A copy of ``spec`` whose ``groups`` run ``image``; ``update_group`` gets ``update``."""
    out = copy.deepcopy(dict(spec))
    wanted = set(groups)
    for tg in out.get("TaskGroups") or []:
        if tg.get("Name") in wanted:
            for task in tg.get("Tasks") or []:
                cfg = task.setdefault("Config", {}) or {}
                cfg["image"] = image
                task["Config"] = cfg
        if update is not None and tg.get("Name") == update_group:
            tg["Update"] = dict(update)
        elif tg.get("Update"):
            # other groups have nothing to replace: no canaries waiting for promotion there
            tg["Update"] = {**tg["Update"], "Canary": 0}
    return out


def with_count(
    spec: dict[str, Any], *, group: str, count: int, update: dict[str, Any] | None
) -> dict[str, Any]:
    """A copy of ``spec`` whose ``group`` runs ``count`` allocations (and gets ``update``, when
    given): a new job version that changes nothing an allocation runs."""
    out = copy.deepcopy(dict(spec))
    for tg in out.get("TaskGroups") or []:
        if tg.get("Name") == group:
            tg["Count"] = count
            if update is not None:
                tg["Update"] = dict(update)
    return out


def canaries(spec: dict[str, Any], group: str) -> int:
    """The canaries ``group``'s update block asks for (0 without one)."""
    for tg in spec.get("TaskGroups") or []:
        if tg.get("Name") == group:
            return int((tg.get("Update") or {}).get("Canary") or 0)
    return 0


def update_blocks(spec: dict[str, Any]) -> dict[str, Any]:
    """Each task group's update block (None for none), by group name."""
    return {
        str(tg.get("Name")): copy.deepcopy(tg.get("Update")) for tg in spec.get("TaskGroups") or []
    }


def with_update_blocks(spec: dict[str, Any], blocks: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` whose groups named in ``blocks`` get those update blocks back: a
    new job version that changes nothing an allocation runs (Nomad updates them in place)."""
    out = copy.deepcopy(dict(spec))
    for tg in out.get("TaskGroups") or []:
        if tg.get("Name") in blocks:
            tg["Update"] = copy.deepcopy(blocks[tg["Name"]])
    return out
