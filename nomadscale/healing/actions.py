"""The fixed set of runbook actions. Each is idempotent: it reads what it needs from the run
record (``run``), keeps its progress in ``run["step_state"]`` (saved by the engine after every
call) and returns ``Done(detail)`` or ``Waiting(detail)`` (poll again), or raises a
``core.errors`` error (temporary: retried with backoff; permanent: go to ``on_failure``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nomadscale.core.errors import (
    DeploymentActiveError,
    NomadscaleError,
    PermanentError,
    SafetyError,
    TemporaryError,
)
from nomadscale.core.ports import (
    AllocInfo,
    JobInfo,
    JobStatus,
    KVPort,
    NodeInfo,
    NodeMetadata,
    NomadPort,
    pinned_datacenter,
)
from nomadscale.healing import drains, gpucheck
from nomadscale.healing.outcome import Done, Outcome, Waiting
from nomadscale.healing.resolve import node_zone, resolve_allocation, resolve_node
from nomadscale.healing.runbook import render

log = logging.getLogger(__name__)
__all__ = ["ACTIONS", "Done", "Outcome", "Waiting", "call", "node_zone", "resolve_allocation",
           "resolve_node"]  # fmt: skip
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$")
NOTE_RETRIES = 1  # a note PagerDuty could not take is retried once, then the run goes on


class HealingNomad(NomadPort, Protocol):
    """What healing needs from Nomad beyond ``NomadPort`` (``NomadClient`` provides it)."""

    def node(self, node_id: str) -> NodeInfo: ...

    def get_job(self, job_id: str, *, namespace: str | None = None) -> JobInfo: ...

    def node_allocations(self, node_id: str) -> list[AllocInfo]: ...

    def register_job(self, job: Mapping[str, Any]) -> str: ...

    def node_metadata(self, node_id: str) -> NodeMetadata: ...

    def set_node_metadata(self, node_id: str, meta: Mapping[str, str | None]) -> NodeMetadata: ...

    def allocation(self, alloc_id: str) -> AllocInfo: ...

    def stop_allocation(self, alloc_id: str) -> str: ...

    def job_allocations(self, job_id: str, *, namespace: str | None = None) -> list[AllocInfo]: ...

    def serving_counts(self, job_id: str, *, namespace: str | None = None) -> dict[str, int]: ...


class Notes(Protocol):
    def add_note(self, incident_id: str, text: str) -> str: ...

    def resolve(self, incident_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ZoneTarget:
    """One zone of one policy: the task group serving it and its minimum healthy workers."""

    policy: str
    zone: str
    job: str
    namespace: str
    group: str
    node_pool: str
    min_healthy: int


def zone_targets(policies: Any) -> dict[tuple[str, str], ZoneTarget]:
    """(policy, zone) -> ZoneTarget from ``config.policy.Policy`` objects; the zone's floor is
    its share of ``bounds.min`` (rounded up)."""
    out: dict[tuple[str, str], ZoneTarget] = {}
    for p in policies:
        zones = list(p.zones.items)
        share = math.ceil(p.bounds.min / max(1, len(zones)))
        for z in zones:
            out[(p.name, z.name)] = ZoneTarget(
                p.name, z.name, p.target.job, p.target.namespace, z.group, z.node_pool, share
            )
    return out


@dataclass
class Ctx:
    """Everything an action may touch."""

    nomad: HealingNomad
    kv: KVPort
    prefix: str
    zones: Mapping[tuple[str, str], ZoneTarget]
    notes: Notes | None
    policy: str | None
    dry_run: bool
    now_iso: Callable[[], str]


def _node_id(run: Mapping[str, Any]) -> str:
    nid = run["values"].get("node.id")
    if not nid:
        raise PermanentError("run has no node parameter")
    return str(nid)


def _target(ctx: Ctx, run: Mapping[str, Any]) -> ZoneTarget:
    """The policy zone of the run's node: the zone named like the node's ``zone`` meta or
    datacenter, else the zone whose task group is pinned to the node's datacenter (a zone
    named for the cloud zone, its group in Nomad datacenter ``zone-a``)."""
    zone = run["values"].get("zone")
    t = ctx.zones.get((ctx.policy or "", zone or ""))
    if t is not None:
        return t
    dc = run["values"].get("datacenter")
    for (policy, _), cand in sorted(ctx.zones.items()):
        if policy != (ctx.policy or "") or not dc:
            continue
        job = ctx.nomad.get_job(cand.job, namespace=cand.namespace)
        if pinned_datacenter(job.spec, cand.group) == dc:
            return cand
    raise PermanentError(
        f"policy {ctx.policy!r} has no zone {zone!r} and no zone group pinned to datacenter {dc!r}"
    )


def mark_eligibility(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    nid = _node_id(run)
    eligible = step.action == "mark_eligible"
    word = "eligible" if eligible else "ineligible"
    if ctx.dry_run:
        return Done(f"would mark {nid} {word}")
    ctx.nomad.set_eligibility(nid, eligible)
    return Done(f"node {run['values']['node.name']} marked {word}")


def _group(ctx: Ctx, t: ZoneTarget, status: JobStatus | None = None) -> Any:
    st = status or ctx.nomad.job_status(t.job, namespace=t.namespace)
    g = st.groups.get(t.group)
    if g is None:
        raise PermanentError(f"job {t.job} has no group {t.group}")
    return g


def _serving(ctx: Ctx, job: str, namespace: str, group: str) -> int:
    """Workers of ``group`` serving now. Not the scale status' ``Healthy``: every count change
    (the autoscaler's, a surge's) makes Nomad clear and re-watch the health of the workers it
    updates in place for about min_healthy_time, while they keep serving."""
    return int(ctx.nomad.serving_counts(job, namespace=namespace).get(group, 0))


def _deployment_busy(job: str, deployment: str) -> Waiting:
    """Nomad refuses the Scale API while a deployment of the job is active, and every count
    change starts one (for about min_healthy_time at least): wait for it (the step's timeout
    bounds the wait)."""
    return Waiting(f"deployment {deployment[:8]} of {job} is active: Nomad refuses to scale "
                   "until it ends")  # fmt: skip


def _scale(ctx: Ctx, job: str, group: str, count: int, **kw: Any) -> Waiting | None:
    """Scale, or Waiting when Nomad refused because a deployment just started."""
    try:
        ctx.nomad.scale(job, group, count, **kw)
    except DeploymentActiveError as e:
        return Waiting(f"{job}: {e}; waiting for the deployment to end")
    return None


def drain(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    nid = _node_id(run)
    node = ctx.nomad.node(nid)
    if run["step_state"].get("started"):
        return Done(f"drain of {node.name} in progress")
    if node.draining:  # whose drain is it? (healing.drains)
        outcome = drains.already_draining(ctx, step, run, node)
        if outcome is not None:
            return outcome
    if step.check_capacity and ctx.policy:
        t = _target(ctx, run)
        _group(ctx, t)  # the job has the zone's group
        # the workers the drain takes away: those running there (one still pending there
        # serves nobody yet, so it takes nothing away)
        on_node = sum(
            1
            for a in ctx.nomad.node_allocations(nid)
            if a.job_id == t.job and a.task_group == t.group and not a.terminal
            and a.client_status == "running"
        )  # fmt: skip
        left = max(0, _serving(ctx, t.job, t.namespace, t.group) - on_node)
        s, planned = run.get("surge"), ""
        if ctx.dry_run and s and s.get("target") is None and s.get("group") == t.group:
            # a dry run scaled nothing: count the surge the real run would have waited for
            left += int(s["count"])
            planned = f" (counting the {s['count']} surge worker(s) this run would add)"
        if left < t.min_healthy:
            raise SafetyError(
                f"drain of {node.name} refused: zone {t.zone} would keep {left} healthy "
                f"worker(s){planned}, policy {t.policy} needs at least {t.min_healthy}"
            )
    deadline = drains.deadline_s(step.deadline.total_seconds(), run)
    took = run["step_state"].get("took_over")
    took = f", taking over the drain of run {took}" if took else ""
    if ctx.dry_run:
        return Done(f"would drain {node.name} with deadline {deadline:.0f}s{took}")
    ctx.nomad.drain(nid, deadline_s=deadline, meta=drains.own_meta(run),
                    ignore_system_jobs=step.ignore_system_jobs)  # fmt: skip
    run["step_state"]["started"] = True
    return Done(f"drain of {node.name} started (deadline {deadline:.0f}s){took}")


def surge(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    t = _target(ctx, run)
    s = run.get("surge")
    if s and s.get("target") is not None and not ctx.dry_run:
        st = ctx.nomad.job_status(t.job, namespace=t.namespace)  # absolute count: repeating
        if _group(ctx, t, st).desired < s["target"]:  # after a crash is harmless
            if st.active_deployment:
                return _deployment_busy(t.job, st.active_deployment)
            busy = _scale(ctx, t.job, t.group, s["target"], message=_msg(run, "surge"),
                          namespace=t.namespace)  # fmt: skip
            if busy is not None:
                return busy
        return Done(f"surge of {t.group} to {s['target']} in place")
    st = ctx.nomad.job_status(t.job, namespace=t.namespace)
    g = _group(ctx, t, st)
    target = g.desired + step.count
    if ctx.dry_run:  # what release_surge would release (nothing is scaled)
        run["surge"] = {"job": t.job, "namespace": t.namespace, "group": t.group,
                        "count": step.count, "original": g.desired, "target": None}  # fmt: skip
        return Done(f"would scale {t.job}/{t.group} {g.desired} -> {target}")
    if st.active_deployment:
        return _deployment_busy(t.job, st.active_deployment)
    run["surge"] = {
        "job": t.job,
        "namespace": t.namespace,
        "group": t.group,
        "zone": t.zone,
        "count": step.count,
        "original": g.desired,
        "target": target,
        "released": False,
    }
    busy = _scale(ctx, t.job, t.group, target, message=_msg(run, "surge"),
                  namespace=t.namespace, meta={"nomadscale.run": run["id"]})  # fmt: skip
    if busy is not None:
        return busy  # recorded: the next call scales to the same absolute count
    return Done(f"scaled {t.job}/{t.group} {g.desired} -> {target} in zone {t.zone}")


def release_surge(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    s = run.get("surge")
    if not s or s.get("released"):
        return Done("no surge to release")
    if ctx.dry_run:
        return Done(f"would release the surge of {s['job']}/{s['group']} ({s['count']} worker(s))")
    st = ctx.nomad.job_status(s["job"], namespace=s["namespace"])
    if s.get("release_target") is None:
        g = st.groups[s["group"]]
        # counts are absolute: when someone scaled the group after the surge (the
        # autoscaler's cycle), that count is theirs and the surge is gone; taking the surge
        # off it would leave the zone below their decision (nomad/state/state_store.go
        # UpsertScalingEvent prepends each event: newest first, with the request's Meta)
        last = next((e for e in g.events if not e.error and e.count is not None), None)
        if last is not None and (last.meta or {}).get("nomadscale.run") != run["id"]:
            s["released"] = True
            return Done(f"no surge to release: {s['job']}/{s['group']} was scaled to "
                        f"{last.count} since ({last.message or 'no message'})")  # fmt: skip
        s["release_target"] = max(0, g.desired - int(s["count"]))
    if st.active_deployment:
        return _deployment_busy(s["job"], st.active_deployment)
    busy = _scale(ctx, s["job"], s["group"], s["release_target"], message=_msg(run, "release"),
                  namespace=s["namespace"], meta={"nomadscale.run": run["id"]})  # fmt: skip
    if busy is not None:
        return busy
    s["released"] = True
    return Done(f"released surge: {s['job']}/{s['group']} -> {s['release_target']}")


def wait_node(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    node = ctx.nomad.node(_node_id(run))
    ss = run["step_state"]
    if node.status in ("down", "disconnected"):
        ss["seen_down"] = True
    if ctx.dry_run:
        return Done(f"would wait for {node.name} to be {step.status}")
    if step.status == "down":
        return Done(f"{node.name} is down") if ss.get("seen_down") else Waiting(node.status)
    if node.status == "ready" and (ss.get("seen_down") or not step.after_down):
        return Done(f"{node.name} is ready")
    return Waiting(f"{node.name} is {node.status}")


def wait_condition(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    c = step.condition
    if ctx.dry_run:
        return Done(f"would wait for {c}")
    if c == "node_drained":
        nid = _node_id(run)
        node = ctx.nomad.node(nid)
        return drains.drained(ctx, run, node, drains.left_on(ctx.nomad.node_allocations(nid)))
    if c == "surge_healthy":
        s = run.get("surge")
        if not s:
            return Done("no surge")
        n = _serving(ctx, s["job"], s["namespace"], s["group"])
        if n >= s["target"]:
            return Done(f"{s['group']} has {n} serving of {s['target']}")
        return Waiting(f"{s['group']} {n}/{s['target']} serving")
    if c == "node_ready":
        node = ctx.nomad.node(_node_id(run))
        return Done("ready") if node.status == "ready" else Waiting(node.status)
    if c == "allocation_replaced":
        a = ctx.nomad.allocation(str(run["values"].get("allocation.id")))
        # a replacement is an allocation of the group that did not exist when it was stopped
        # (its siblings, even younger ones, are no replacement)
        before = set((run.get("restart") or {}).get("before") or ())
        allocs = ctx.nomad.job_allocations(a.job_id, namespace=a.namespace)
        new = [
            x
            for x in allocs
            if x.task_group == a.task_group
            and x.id != a.id
            and x.id not in before
            and (before or x.create_index > a.create_index)
            and x.client_status == "running"
        ]
        return Done(f"replaced by {new[0].id[:8]}") if new else Waiting("no replacement yet")
    raise PermanentError(f"unknown condition {c}")


def verify_gpu(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    nid = _node_id(run)
    ss = run["step_state"]
    node = ctx.nomad.node(nid)
    if ctx.dry_run:
        return Done(f"would run the GPU check on {node.name}")
    checker = gpucheck.GpuChecker(ctx.nomad)
    if not ss.get("check_id"):
        again = f"r{run['rewinds']}" if run.get("rewinds") else ""  # escalation: a new check
        ss["check_id"] = f"{run['id'][:8]}{run['step']:02d}{again}"
        checker.start(nid, ss["check_id"])
        return Waiting(f"GPU check {ss['check_id']} requested on {node.name}")
    expected = gpucheck.expected_gpu_count(node.meta, step.expected_gpus)
    verdict = checker.result(nid, ss["check_id"], expected_gpus=expected)
    if verdict is None:
        return Waiting("waiting for the GPU check result")
    run.setdefault("gpu", []).append(verdict.to_dict())
    if not verdict.healthy:
        raise PermanentError(verdict.explain())
    return Done(verdict.explain())


def restart_allocation(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    aid = str(run["values"].get("allocation.id"))
    a = ctx.nomad.allocation(aid)
    if ctx.dry_run:
        return Done(f"would stop allocation {a.id[:8]}")
    if not a.terminal:
        if not run.get("restart"):  # what allocation_replaced must not take for a replacement
            live = ctx.nomad.job_allocations(a.job_id, namespace=a.namespace)
            run["restart"] = {"alloc": a.id, "before": sorted(x.id for x in live)}
        ctx.nomad.stop_allocation(a.id)
    return Done(f"allocation {a.id[:8]} of {a.job_id}/{a.task_group} stopped for rescheduling")


def prune_images(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    nid = _node_id(run)
    key = f"{ctx.prefix}/policies/{ctx.policy}/golden_image"
    entry = ctx.kv.get(key)
    golden = entry.value.decode("utf-8", "replace").strip() if entry else ""
    if not golden or not IMAGE_RE.match(golden):
        raise PermanentError(f"no valid golden image at KV {key}: refusing to prune")
    node = ctx.nomad.node(nid)
    job_id = f"prune-images-{nid[:8]}-{run['id'][:8]}"
    if ctx.dry_run:
        return Done(f"would prune images on {node.name} except {golden}")
    ctx.nomad.register_job(_prune_job(job_id, nid, golden, node.node_pool))
    return Done(f"image prune job {job_id} registered on {node.name}, keeping {golden}")


PRUNE_SCRIPT = r"""set -u
docker images --format '{{.Repository}}:{{.Tag}}' | while read -r img; do
  [ "$img" = "$GOLDEN_IMAGE" ] && continue
  docker rmi "$img" >/dev/null 2>&1 || true
done
docker image prune -f >/dev/null
"""


def _prune_job(job_id: str, node_id: str, golden: str, pool: str) -> dict[str, Any]:
    return {
        "ID": job_id,
        "Name": job_id,
        "Type": "batch",
        "Datacenters": ["*"],
        "NodePool": pool,
        "Constraints": [{"LTarget": "${node.unique.id}", "RTarget": node_id, "Operand": "="}],
        "TaskGroups": [
            {
                "Name": "prune",
                "Count": 1,
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "Tasks": [
                    {
                        "Name": "prune",
                        "Driver": "raw_exec",
                        "Config": {"command": "/bin/sh", "args": ["-c", PRUNE_SCRIPT]},
                        "Env": {"GOLDEN_IMAGE": golden},  # data, never part of the script
                        "Resources": {"CPU": 100, "MemoryMB": 64},
                    }
                ],
            }
        ],
    }


def notify(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    text = render(step.template, run["values"])
    incident = run["values"].get("incident.id")
    if step.channel == "log" or not incident or ctx.notes is None:
        log.info("runbook %s run %s note: %s", run["runbook"], run["id"], text)
        return Done(f"logged: {text}")
    if ctx.dry_run:
        return Done(f"would add note: {text}")
    if not run["step_state"].get("sent"):
        try:
            ctx.notes.add_note(str(incident), text)
        except NomadscaleError as exc:
            # a note is for humans: PagerDuty down (after one retry) or the incident gone
            # must not stop the node from being healed
            if isinstance(exc, TemporaryError) and run["attempts"] < NOTE_RETRIES:
                raise
            log.warning("runbook %s run %s: note not added: %s", run["runbook"], run["id"], exc)
            return Done(f"note not added ({exc}): {text}")
        run["step_state"]["sent"] = True
    return Done(f"note added: {text}")


def _msg(run: Mapping[str, Any], what: str) -> str:
    return f"nomadscale runbook {run['runbook']} run {run['id']}: {what}"


ACTIONS: Mapping[str, Callable[[Ctx, Any, dict[str, Any]], Outcome]] = {
    "mark_ineligible": mark_eligibility,
    "mark_eligible": mark_eligibility,
    "drain": drain,
    "surge": surge,
    "release_surge": release_surge,
    "wait_node": wait_node,
    "wait_condition": wait_condition,
    "verify_gpu": verify_gpu,
    "restart_allocation": restart_allocation,
    "prune_images": prune_images,
    "notify": notify,
}


def call(ctx: Ctx, step: Any, run: dict[str, Any]) -> Outcome:
    """Run ``step``'s action, unless the step is skipped for the run's maintenance event."""
    event = run["values"].get("event")
    if event and event in step.skip_events:
        return Done(f"skipped: not needed for {event}")
    why = drains.skipped(step, run)  # the node is the autoscaler's to remove
    if why is not None:
        return Done(why)
    handed = drains.check(ctx, step, run)
    if handed is not None:
        return handed
    return ACTIONS[step.action](ctx, step, run)
