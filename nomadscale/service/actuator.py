"""Turning a decision into writes: a pure plan, then a fenced, stoppable apply.

``plan_actions`` compares the decision with the ACTUAL state (group counts, nodes, instance
group sizes, removals left pending by an earlier cycle) and returns frozen ``Action``s in a
safe order:

1. ``resize`` up: a zone's instance group grows BEFORE its task group does;
2. ``scale``: each zone's Nomad task group through the Scale API (message + meta);
3. ``drain``: surplus nodes (empty first, then the oldest: first started, first stopped),
   deadline from the policy, ``drained_by=nomadscale`` + decision id in the drain meta; a
   node held by someone else (ineligible or draining, not being removed by this autoscaler:
   a healing run's maintenance, an operator) is neither capacity nor a victim, and its
   instance stays in the group;
4. ``wait_drain``: until the drains finish, bounded by the deadline (on the injected clock);
5. ``delete``: exactly the drained instances (never one still draining past its deadline:
   that is recorded and alerted instead; never one whose drain ended with workers still
   running on it, i.e. a drain cancelled meanwhile);
6. ``resize`` down: only instances that never joined as nodes, and only when every planned
   delete of that instance group went through and its size is still the planned one: a
   resize down lets the cloud pick which instances go, so after a failed or partial delete
   it could take a node that runs workers (skipped, left to the next cycle). Instances the
   cloud failed to create (stockout, quota: ``ZoneView.not_created``) are kept while the
   zone needs every instance it has: the MIG retries their creation, and the cycle has
   moved the workers they would host to the other zones (``zone_capacity``).

Because the plan is derived from actual state, a zone half-applied by a crashed leader is
fixed by the next cycle. ``Actuator.apply`` calls ``lock.held()`` right before every write
and checks the stop flag between actions: a lost lock or a shutdown abandons the rest.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nomadscale.core.clock import Clock
from nomadscale.core.errors import ConflictError, LockLostError, NomadscaleError, PermanentError
from nomadscale.core.ports import (
    AlertPort,
    JobStatus,
    LockPort,
    NodeInfo,
    NodePoolPort,
    NomadPort,
    autoscaler_drain_meta,
)
from nomadscale.core.values import Decision

log = logging.getLogger(__name__)

PHASES = {"resize_up": 0, "scale": 1, "drain": 2, "wait_drain": 3, "delete": 4, "resize_down": 5}


class Abandoned(PermanentError):
    """The service is shutting down: the remaining actions were not started."""


@dataclass(frozen=True, slots=True)
class NodeRef:
    id: str
    name: str
    allocs: int = 0
    create_index: int = 0


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # resize_up | scale | drain | wait_drain | delete | resize_down
    zone: str
    target: str  # task group (scale) or instance group (resize/delete)
    count: int = 0  # new group count / instance group size
    previous: int | None = None
    nodes: tuple[NodeRef, ...] = ()
    deadline_s: float = 0.0

    def describe(self) -> str:
        names = ",".join(n.name for n in self.nodes)
        if self.kind == "scale":
            return f"scale {self.zone}/{self.target} {self.previous} -> {self.count}"
        if self.kind in ("resize_up", "resize_down"):
            return f"resize {self.zone}/{self.target} {self.previous} -> {self.count}"
        if self.kind == "drain":
            return f"drain {self.zone} {names} (deadline {self.deadline_s:.0f}s)"
        if self.kind == "wait_drain":
            return f"wait for drain of {self.zone} {names}"
        return f"delete {self.zone}/{self.target} {names}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "zone": self.zone,
            "target": self.target,
            "count": self.count,
            "previous": self.previous,
            "nodes": [n.name for n in self.nodes],
            "describe": self.describe(),
        }


@dataclass(frozen=True, slots=True)
class ZoneView:
    """What a zone looks like right now (inputs to planning)."""

    zone: str
    group: str
    instance_group: str | None
    nodes: tuple[NodeInfo, ...] = ()
    mig_size: int | None = None
    pending: tuple[str, ...] = ()  # node ids an earlier cycle started removing
    not_created: int = 0  # instances of mig_size the cloud failed to create (still retried)


def short_zones(pool: Any, zones: Sequence[Any], *, policy: str) -> tuple[dict[str, Any], bool]:
    """Zones whose instance group the cloud only partly created (a pool with
    ``fulfilment``, e.g. ``GceMigPool``: stockout, quota), and whether the pool was read."""
    reader = getattr(pool, "fulfilment", None)
    if reader is None:
        return {}, False
    short: dict[str, Any] = {}
    for z in zones:
        if not z.instance_group:
            continue
        try:
            f = reader(z.instance_group, zone=z.name)
        except NomadscaleError as e:  # the cycle's own reads of the pool say it again
            log.warning("%s: reading %s/%s fulfilment failed: %s", policy, z.name,
                        z.instance_group, e)  # fmt: skip
            return {}, False
        if f.short:
            short[z.name] = f
    return short, True


def zone_capacity(
    short: Mapping[str, tuple[int, int]], *, workers_per_node: int = 1
) -> dict[str, int | None]:
    """Workers each zone whose instance group the cloud only partly fills can host: its
    created instances; ``short`` maps zone -> (target size, instances not created)."""
    wpn = max(1, workers_per_node)
    return {z: max(0, target - missing) * wpn for z, (target, missing) in short.items()}


def drain_owner(n: NodeInfo) -> str | None:
    """Who drains (or last drained) ``n`` when it is not this autoscaler: the drain's Meta
    (Nomad's LastDrain) names a healing run or someone else; None for our own drain
    (``drained_by=nomadscale``) or a drain with no Meta (older Nomad: taken as ours)."""
    meta = n.drain_meta or {}
    if not meta or meta.get("drained_by") == "nomadscale":
        return None
    kind, who = n.drain_owner()
    if kind == "run":
        return f"healing run {who}"
    return "another drain (meta " + ", ".join(sorted(meta))[:60] + ")"


def choose_victims(nodes: Sequence[NodeInfo], n: int, *, order: str) -> list[NodeInfo]:
    """``n`` nodes to remove: empty ones first (``empty-then-oldest``), then the oldest."""
    if n <= 0:
        return []
    if order == "oldest":
        ranked = sorted(nodes, key=lambda x: (x.create_index, x.name))
    else:
        ranked = sorted(nodes, key=lambda x: (x.allocs_running > 0, x.create_index, x.name))
    return ranked[:n]


def _ref(n: NodeInfo) -> NodeRef:
    return NodeRef(id=n.id, name=n.name, allocs=n.allocs_running, create_index=n.create_index)


def plan_actions(
    decision: Decision,
    status: JobStatus,
    zones: Sequence[ZoneView],
    *,
    workers_per_node: int = 1,
    drain_deadline_s: float = 900.0,
    scale_in_order: str = "empty-then-oldest",
    manage_nodes: bool = True,
) -> tuple[Action, ...]:
    """The actions that bring ``zones`` to ``decision`` (pure; see the module docstring)."""
    wanted = {z.zone: z.count for z in decision.zones}
    out: list[Action] = []
    for zv in zones:
        if zv.zone not in wanted:
            continue
        target = wanted[zv.zone]
        grp = status.groups.get(zv.group)
        current = grp.desired if grp is not None else None
        if manage_nodes and zv.instance_group and zv.mig_size is not None:
            need = math.ceil(target / max(1, workers_per_node))
            live = [n for n in zv.nodes if n.status != "down"]
            # an earlier cycle's removal, unless someone took its drain over meanwhile
            ours = {n.id for n in live if n.id in set(zv.pending) and not drain_owner(n)}
            pending = [n for n in live if n.id in ours]
            # held by someone else: a node ineligible or draining that this autoscaler is not
            # removing (a healing run's maintenance, an operator's drain). It hosts no new
            # workers, so it is not capacity, and it is never ours to drain or delete: the
            # run waits for it to come back. Its instance stays in the MIG next to the need.
            held = [n for n in live if n.id not in ours
                    and (n.draining or n.eligibility == "ineligible")]  # fmt: skip
            active = [n for n in live if n.id not in ours and n not in held]
            size = need + len(pending) + len(held)
            if size > zv.mig_size:
                out.append(Action("resize_up", zv.zone, zv.instance_group,
                                  count=size, previous=zv.mig_size))  # fmt: skip
            victims = choose_victims(active, len(active) - need, order=scale_in_order)
            if current is not None and current != target:
                out.append(Action("scale", zv.zone, zv.group, count=target, previous=current))
            to_drain = [n for n in pending if not n.draining] + victims
            if to_drain:
                out.append(Action("drain", zv.zone, zv.instance_group,
                                  nodes=tuple(_ref(n) for n in to_drain),
                                  deadline_s=drain_deadline_s))  # fmt: skip
            removing = tuple(_ref(n) for n in pending + victims)
            if removing:
                out.append(Action("wait_drain", zv.zone, zv.instance_group, nodes=removing,
                                  deadline_s=drain_deadline_s))  # fmt: skip
                out.append(Action("delete", zv.zone, zv.instance_group, nodes=removing))
            after = max(zv.mig_size, size) - len(removing)
            joined = len(active) - len(victims)
            keep = need + len(held)
            # failed creations the zone still needs: the MIG keeps retrying them
            wanted_stuck = zv.not_created > 0 and keep >= after - zv.not_created
            if after > keep and joined <= need and not wanted_stuck:
                out.append(Action("resize_down", zv.zone, zv.instance_group,
                                  count=keep, previous=after))  # fmt: skip
        elif current is not None and current != target:
            out.append(Action("scale", zv.zone, zv.group, count=target, previous=current))
    return tuple(sorted(out, key=lambda a: PHASES[a.kind]))


@dataclass
class ApplyResult:
    applied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # nodes not deleted (still draining)
    aborted: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.aborted is None


class Actuator:
    """Applies planned actions through the ports, fenced by the leader lock."""

    def __init__(
        self,
        *,
        nomad: NomadPort,
        pool: NodePoolPort | None,
        lock: LockPort,
        clock: Clock,
        stop: threading.Event | None = None,
        alerts: AlertPort | None = None,
        poll_s: float = 5.0,
        drain_grace_s: float = 60.0,
        deployment_wait_s: float = 900.0,
        on_removing: Callable[[str, Sequence[NodeRef], bool], None] | None = None,
        on_applied: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.nomad = nomad
        self.pool = pool
        self.lock = lock
        self.clock = clock
        self.stop = stop or threading.Event()
        self.alerts = alerts
        self.poll_s = poll_s
        self.drain_grace_s = drain_grace_s
        self.deployment_wait_s = deployment_wait_s
        self.on_removing = on_removing  # (zone, nodes, started) -> persist pending removals
        self.on_applied = on_applied  # (applied so far) after every write: the cycle journal
        self._short: set[tuple[str, str]] = set()  # instance groups with a delete not done

    def guard(self) -> None:
        """Right before every write: stop when shutting down or when the lock is lost."""
        if self.stop.is_set():
            raise Abandoned("shutting down: remaining actions not started")
        if not self.lock.held():
            raise LockLostError("leader lock lost: remaining actions not started")

    def _still_leading(self, doing: str) -> None:
        """Between two polls of a long wait: a lost lock ends the cycle now, not after the
        wait (the rest would be refused anyway, and the next leader may already act)."""
        if not self.lock.held():
            raise LockLostError(f"leader lock lost while {doing}: remaining actions not started")

    def apply(
        self,
        actions: Sequence[Action],
        *,
        decision: Decision,
        job: str,
        namespace: str | None,
        meta: Mapping[str, Any] | None = None,
    ) -> ApplyResult:
        res = ApplyResult()
        drained_ok: dict[tuple[str, str], set[str]] = {}
        self._short = set()
        scaled = False
        for act in actions:
            try:
                if act.kind == "scale" and scaled:
                    # Nomad refuses to scale while the deployment of the previous scale runs
                    self._wait_deployment(job, namespace)
                scaled = scaled or act.kind == "scale"
                self._one(act, res, drained_ok, decision=decision, job=job,
                          namespace=namespace, meta=meta or {})  # fmt: skip
            except (Abandoned, LockLostError) as e:
                res.aborted = str(e)
                log.warning("%s: %s", decision.policy, e)
                break
            except NomadscaleError as e:
                res.errors.append(f"{act.describe()}: {e}")
                log.error("%s: %s failed: %s", decision.policy, act.describe(), e)
                if act.kind == "delete":
                    self._short.add((act.zone, act.target))
                if act.kind != "delete":
                    break  # later actions depend on this one; the next cycle reconciles
        return res

    def _one(
        self,
        act: Action,
        res: ApplyResult,
        drained_ok: dict[tuple[str, str], set[str]],
        *,
        decision: Decision,
        job: str,
        namespace: str | None,
        meta: Mapping[str, Any],
    ) -> None:
        if act.kind in ("resize_up", "resize_down"):
            assert self.pool is not None
            if act.kind == "resize_down":
                self._check_resize_down(act)
            self.guard()
            self.pool.resize(act.target, act.count, zone=act.zone)
        elif act.kind == "scale":
            self.guard()
            f = decision.forecast
            scale_meta = {
                "nomadscale.decision_id": decision.id,
                "nomadscale.forecast": round(f.peak, 2) if f else None,
                "nomadscale.upper": round(f.upper, 2) if f else None,
                "nomadscale.headroom": round(f.headroom, 4) if f else None,
                "nomadscale.previous": act.previous,
                **meta,
            }
            msg = f"nomadscale {decision.id}: {act.previous} -> {act.count}; {decision.reason}"
            self.nomad.scale(job, act.target, act.count, message=msg[:400],
                             meta=scale_meta, namespace=namespace)  # fmt: skip
        elif act.kind == "drain":
            if self.on_removing is not None:
                self.guard()
                self.on_removing(act.zone, act.nodes, True)
            for n in act.nodes:
                self.guard()
                self.nomad.drain(
                    n.id,
                    deadline_s=act.deadline_s,
                    meta=autoscaler_drain_meta(decision.id),
                )
        elif act.kind == "wait_drain":
            drained_ok[(act.zone, act.target)] = self._wait(act, res, decision)
        elif act.kind == "delete":
            assert self.pool is not None
            done = drained_ok.get((act.zone, act.target), set())
            names = [n.name for n in act.nodes if n.id in done]
            if len(names) < len(act.nodes):
                self._short.add((act.zone, act.target))
            if not names:
                return
            self.guard()
            self.pool.delete_instances(act.target, names, zone=act.zone)
            if self.on_removing is not None:
                self.on_removing(act.zone, [n for n in act.nodes if n.id in done], False)
        res.applied.append(act.describe())
        log.info("%s: %s (decision %s)", decision.policy, act.describe(), decision.id)
        if self.on_applied is not None and act.kind != "wait_drain":
            self.on_applied(tuple(res.applied))

    def _check_resize_down(self, act: Action) -> None:
        """Refuse a resize down that could take a node with workers (module docstring 6)."""
        assert self.pool is not None
        why = ""
        if (act.zone, act.target) in self._short:
            why = "not every planned instance was deleted"
        else:
            size = self.pool.size(act.target, zone=act.zone)
            if size != act.previous:
                why = f"its size is {size}, not the {act.previous} planned"
        if why:
            raise PermanentError(
                f"skipped: {why}, and a resize down lets the cloud choose which instances "
                "go; left to the next cycle"
            )

    def _wait_deployment(self, job: str, namespace: str | None) -> None:
        started = self.clock.monotonic()
        while True:
            active = self.nomad.job_status(job, namespace=namespace).active_deployment
            if active is None:
                return
            if self.clock.monotonic() - started >= self.deployment_wait_s:
                raise ConflictError(
                    f"deployment {active} of {job} still active after "
                    f"{self.deployment_wait_s:.0f}s: remaining actions left to the next cycle",
                    system="nomad",
                )
            if self.stop.is_set():
                raise Abandoned("shutting down while waiting for a deployment")
            self._still_leading("waiting for a deployment")
            self.clock.sleep(self.poll_s)

    def _drained(self, node_id: str) -> bool:
        getter = getattr(self.nomad, "node", None)
        if getter is not None:
            info: NodeInfo = getter(node_id)
            return not info.draining or info.status == "down"
        nodes = {n.id: n for n in self.nomad.list_nodes()}
        n = nodes.get(node_id)
        return n is None or not n.draining or n.status == "down"

    def _keep(self, ids: set[str]) -> dict[str, str]:
        """Nodes of ``ids`` (not down) that must not be deleted after their drain, and why:
        running service/batch allocations (a drain that ended is not an empty node: Nomad
        ends a drain when it is cancelled too, ``nomad node drain -disable``), or a drain
        someone else took over meanwhile (a healing run's maintenance)."""
        if not ids:
            return {}
        try:
            nodes = self.nomad.list_nodes(with_allocs=True)  # type: ignore[call-arg]
        except TypeError:  # a port without allocation counts
            return {}
        out: dict[str, str] = {}
        for n in nodes:
            if n.id not in ids or n.status == "down":
                continue
            owner = drain_owner(n)
            if owner:
                out[n.id] = f"its drain was taken over by {owner}: not deleted"
            elif n.allocs_running > 0:
                out[n.id] = (
                    f"its drain ended (cancelled?) with {n.allocs_running} allocation(s) "
                    "still running: not deleted"
                )
        return out

    def _wait(self, act: Action, res: ApplyResult, decision: Decision) -> set[str]:
        """Wait (bounded by deadline + grace) until the nodes finished draining."""
        limit = act.deadline_s + self.drain_grace_s
        started = self.clock.monotonic()
        waiting = {n.id: n for n in act.nodes}
        done: set[str] = set()
        while waiting:
            for nid in list(waiting):
                if self._drained(nid):
                    done.add(nid)
                    waiting.pop(nid)
            if not waiting:
                break
            if self.clock.monotonic() - started >= limit:
                break
            if self.stop.is_set():
                raise Abandoned("shutting down while waiting for drains")
            self._still_leading("waiting for drains")
            self.clock.sleep(self.poll_s)
        busy = self._keep(done)
        for nid, why in busy.items():  # workers run (drain cancelled) or not our drain now
            done.discard(nid)
            n = next(x for x in act.nodes if x.id == nid)
            msg = f"node {n.name} in {act.zone}: {why}"
            res.kept.append(n.name)
            res.errors.append(msg)
            log.error("%s: %s", decision.policy, msg)
        if busy and self.on_removing is not None:  # re-planned from scratch next cycle
            self.on_removing(act.zone, [n for n in act.nodes if n.id in busy], False)
        for n in waiting.values():
            msg = (
                f"node {n.name} in {act.zone} still draining {limit:.0f}s after the drain "
                "started: not deleted"
            )
            res.kept.append(n.name)
            res.errors.append(msg)
            log.error("%s: %s", decision.policy, msg)
            if self.alerts is not None:
                try:
                    self.alerts.trigger(
                        dedup_key=f"nomadscale/{decision.policy}/drain/{n.name}",
                        summary=f"nomadscale {decision.policy}: {msg}",
                        severity="warning",
                        details={
                            "policy": decision.policy,
                            "decision_id": decision.id,
                            "node": n.name,
                            "zone": act.zone,
                        },
                    )
                except NomadscaleError as e:
                    log.error("%s: alert failed: %s", decision.policy, e)
        return done
