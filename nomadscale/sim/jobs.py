"""Job writes: register (with versions and EnforceIndex), scale, dispatch, revert, stop,
and a dry-run plan."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nomadscale.sim import jobspec, sched
from nomadscale.sim.model import ApiError, JobRecord, unix_ns

if TYPE_CHECKING:
    from nomadscale.sim.cluster import Cluster

TRACKED_VERSIONS = 6
MAX_SCALE_EVENTS = 20
MAX_PAYLOAD = 16 * 1024
_SERVER_FIELDS = (
    "Version",
    "Stable",
    "SubmitTime",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "Status",
    "StatusDescription",
)


def _same_spec(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(d: dict[str, Any]) -> str:
        return json.dumps(
            {k: v for k, v in d.items() if k not in _SERVER_FIELDS}, sort_keys=True, default=str
        )

    return strip(a) == strip(b)


def register(
    c: Cluster,
    spec: dict[str, Any],
    *,
    enforce_index: bool = False,
    job_modify_index: int = 0,
    preserve_counts: bool = False,
    triggered_by: str = "job-register",
    eval_: bool = True,
    new_version: bool = False,
) -> dict[str, Any]:
    """Register ``spec``. An unchanged spec keeps its version (like Job.Register) unless
    ``new_version`` (the Scale API always writes a new version)."""
    spec = jobspec.canonicalize(spec)
    jobspec.validate(spec)
    key = (spec["Namespace"], spec["ID"])
    if spec["Namespace"] not in c.namespaces:
        raise ApiError(500, f'job "{spec["ID"]}" is in nonexistent namespace "{spec["Namespace"]}"')
    existing = c.jobs.get(key)
    if enforce_index:
        if job_modify_index == 0 and existing is not None:
            raise ApiError(500, "Enforcing job modify index 0: job already exists")
        if job_modify_index != 0:
            if existing is None:
                raise ApiError(
                    500, f"Enforcing job modify index {job_modify_index}: job does not exist"
                )
            cur = int(existing.spec["JobModifyIndex"])
            if cur != job_modify_index:
                raise ApiError(
                    500,
                    f"Enforcing job modify index {job_modify_index}: job exists with "
                    f"conflicting job modify index: {cur}",
                )
    if existing is not None and preserve_counts:
        for tg in spec.get("TaskGroups") or []:
            old = existing.group(tg["Name"])
            if old is not None:
                tg["Count"] = old["Count"]
    idx = c.bump("jobs")
    now = c.now_s()
    if existing is not None and not new_version and _same_spec(existing.spec, spec):
        job = existing  # no change: no new version
    else:
        version = existing.version + 1 if existing is not None else 0
        spec.update(
            Version=version,
            Stable=False,
            SubmitTime=unix_ns(now),
            Status="pending",
            StatusDescription="",
            JobModifyIndex=idx,
            ModifyIndex=idx,
            CreateIndex=existing.create_index if existing is not None else idx,
        )
        spec.setdefault("Stop", False)
        if existing is None:
            job = JobRecord(id=spec["ID"], namespace=spec["Namespace"], spec=spec, create_index=idx)
            c.jobs[key] = job
        else:
            job = existing
            job.spec = spec
        job.versions[version] = spec
        for v in sorted(job.versions)[:-TRACKED_VERSIONS]:
            del job.versions[v]
        job.modify_index = idx
        # state_store.go upsertJobImpl -> setJobStatus in the same write (same index)
        spec["Status"] = sched.job_status(c, job)
        c.emit(
            "register",
            job_id=job.id,
            namespace=job.namespace,
            version=version,
            triggered_by=triggered_by,
        )
    ev = sched.reconcile(c, job, triggered_by=triggered_by) if eval_ else None
    return {
        "EvalID": ev["ID"] if ev else "",
        "EvalCreateIndex": ev["CreateIndex"] if ev else 0,
        "JobModifyIndex": job.spec["JobModifyIndex"],
        "Warnings": "",
        "Index": c.index,
        "LastContact": 0,
        "KnownLeader": False,
    }


def revert(c: Cluster, job: JobRecord, version: int, *, triggered_by: str) -> dict[str, Any]:
    if version not in job.versions:
        raise ApiError(
            500, f"job {job.id!r} in namespace {job.namespace!r} at version {version} not found"
        )
    spec = copy.deepcopy(job.versions[version])
    for k in _SERVER_FIELDS:
        spec.pop(k, None)
    spec["Stop"] = False
    return register(c, spec, triggered_by=triggered_by)


def stop(c: Cluster, job: JobRecord, *, purge: bool) -> dict[str, Any]:
    spec = copy.deepcopy(job.spec)
    spec["Stop"] = True
    for k in _SERVER_FIELDS:
        spec.pop(k, None)
    reply = register(c, spec, triggered_by="job-deregister")
    c.emit("deregister", job_id=job.id, namespace=job.namespace, purge=purge)
    if purge:
        key = (job.namespace, job.id)
        c.jobs.pop(key, None)
        c.blocked.pop(key, None)
        c.bump("jobs")
    return {
        "EvalID": reply["EvalID"],
        "EvalCreateIndex": reply["EvalCreateIndex"],
        "JobModifyIndex": reply["JobModifyIndex"],
        "Index": c.index,
    }


def scale(c: Cluster, job_id: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    target = body.get("Target") or {}
    target = {str(k).lower(): v for k, v in target.items()}
    group = target.get("group") or ""
    # command/agent/job_endpoint.go jobScaleAction checks the job ID, then
    # structs.JobScaleRequest.Validate the namespace, the group and the count
    if target.get("job") and target["job"] != job_id:
        raise ApiError(400, "job ID in payload did not match URL")
    if target.get("namespace") and target["namespace"] != namespace:
        raise ApiError(400, "namespace in payload did not match header")
    if not group:
        raise ApiError(400, "missing task group name for scaling action")
    count = body.get("Count")
    error = bool(body.get("Error"))
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int):
            raise ApiError(400, "Count must be an integer")
        if count < 0:
            raise ApiError(400, "scaling action count can't be negative")
        if error:
            raise ApiError(400, "scaling action should not contain count if error is true")
    job = c.jobs.get((namespace, job_id))
    if job is None:
        raise ApiError(404, f'job "{job_id}" not found')
    # nomad/job_endpoint.go Job.Scale, right after the job lookup (before the group, the
    # scaling policy and the deployment checks); sysbatch jobs have no such limit
    if job.type == "system" and count is not None and count > 1:
        raise ApiError(400, 'jobs of type "system" can only be scaled to 1 or 0')
    tg = job.group(group)
    if tg is None:
        raise ApiError(400, f'task group "{group}" specified for scaling does not exist in job')
    prev = int(tg["Count"])
    reply: dict[str, Any] = {
        "EvalID": "",
        "EvalCreateIndex": 0,
        "JobModifyIndex": job.modify_index,  # Job.Scale without a count: job.ModifyIndex
        "Warnings": "",
        "Index": c.index,
    }
    if count is not None:
        sc = tg.get("Scaling")
        if sc is not None and sc.get("Min") is not None and count < sc["Min"]:
            raise ApiError(
                400, f"group count was less than scaling policy minimum: {count} < {sc['Min']}"
            )
        if sc is not None and sc.get("Max") is not None and count > sc["Max"]:
            raise ApiError(
                400, f"group count was greater than scaling policy maximum: {count} > {sc['Max']}"
            )
        dep = c.active_deployment((namespace, job_id))
        if dep is not None and dep.job_create_index == job.create_index:
            raise ApiError(400, "job scaling blocked due to active deployment")
        jmi = int(body.get("JobModifyIndex") or 0)  # checked after the deployment (Job.Scale)
        if jmi and jmi != int(job.spec["JobModifyIndex"]):
            raise ApiError(
                500,
                f"Enforcing job modify index {jmi}: job exists with conflicting "
                f"job modify index: {job.spec['JobModifyIndex']}",
            )
        spec = copy.deepcopy(job.spec)
        for k in _SERVER_FIELDS:
            spec.pop(k, None)
        for g in spec["TaskGroups"]:
            if g["Name"] == group:
                g["Count"] = count
        eval_wanted = not (job.parameterized or job.periodic)
        reply = register(c, spec, triggered_by="job-scaling", eval_=eval_wanted, new_version=True)
    idx = c.bump("jobs")
    event = {
        "Time": unix_ns(c.now_s()),
        "Count": count,
        "PreviousCount": prev,
        "Message": str(body.get("Message") or ""),
        "Error": error,
        "Meta": body.get("Meta"),
        "EvalID": reply["EvalID"] or None,
        "CreateIndex": idx,
    }
    events = job.scaling_events.setdefault(group, [])
    events.insert(0, event)
    del events[MAX_SCALE_EVENTS:]
    c.emit(
        "scale",
        job_id=job_id,
        group=group,
        count=count,
        previous=prev,
        message=event["Message"],
        error=error,
        meta=event["Meta"],
    )
    reply["Index"] = c.index
    return reply


def dispatch(
    c: Cluster, parent: JobRecord, body: Mapping[str, Any], *, idempotency_token: str = ""
) -> dict[str, Any]:
    import base64

    if not parent.parameterized:
        raise ApiError(500, f'Specified job "{parent.id}" is not a parameterized job')
    if parent.stopped:
        raise ApiError(500, f'Job "{parent.id}" has been stopped; cannot dispatch')
    pj = parent.spec["ParameterizedJob"]
    payload = body.get("Payload") or ""
    raw = base64.b64decode(payload) if payload else b""
    if pj.get("Payload") == "forbidden" and raw:
        raise ApiError(500, "Payload is not allowed")
    if pj.get("Payload") == "required" and not raw:
        raise ApiError(500, "Payload must be provided")
    if len(raw) > MAX_PAYLOAD:
        raise ApiError(500, f"Payload exceeds maximum size; {len(raw)} > {MAX_PAYLOAD}")
    meta = {str(k): str(v) for k, v in (body.get("Meta") or {}).items()}
    required = list(pj.get("MetaRequired") or [])
    allowed = set(required) | set(pj.get("MetaOptional") or [])
    bad = sorted(k for k in meta if k not in allowed)
    if bad:
        raise ApiError(500, f"Dispatch includes invalid meta keys: {bad}".replace("'", ""))
    missing = [k for k in required if k not in meta]
    if missing:
        raise ApiError(
            500, f"Dispatch did not provide required meta keys: {missing}".replace("'", "")
        )
    if idempotency_token and idempotency_token in parent.dispatch_tokens:
        child_id = parent.dispatch_tokens[idempotency_token]
        child = c.jobs.get((parent.namespace, child_id))
        if child is not None and not child.stopped:
            return {
                "DispatchedJobID": child_id,
                "EvalID": "",
                "EvalCreateIndex": 0,
                "JobCreateIndex": child.create_index,
                "Index": c.index,
            }
    prefix = str(body.get("IdPrefixTemplate") or "")
    unix = int(c.now_s())
    child_id = f"{parent.id}/dispatch-{prefix + '-' if prefix else ''}{unix}-{secrets.token_hex(4)}"
    spec = copy.deepcopy(parent.spec)
    for k in _SERVER_FIELDS:
        spec.pop(k, None)
    spec.update(
        ID=child_id,
        Name=child_id,
        ParentID=parent.id,
        ParameterizedJob=None,
        Dispatched=True,
        Payload=payload or None,
    )
    spec["Meta"] = {**(spec.get("Meta") or {}), **meta}
    reply = register(c, spec, triggered_by="job-register")
    if idempotency_token:
        parent.dispatch_tokens[idempotency_token] = child_id
    child = c.jobs[(parent.namespace, child_id)]
    c.emit("dispatch", job_id=parent.id, child_id=child_id, meta=meta)
    return {
        "DispatchedJobID": child_id,
        "EvalID": reply["EvalID"],
        "EvalCreateIndex": reply["EvalCreateIndex"],
        "JobCreateIndex": child.create_index,
        "Index": c.index,
    }


def plan(c: Cluster, spec: dict[str, Any]) -> dict[str, Any]:
    spec = jobspec.canonicalize(spec)
    jobspec.validate(spec)
    existing = c.jobs.get((spec["Namespace"], spec["ID"]))
    updates: dict[str, Any] = {}
    for tg in spec.get("TaskGroups") or []:
        h = sched.spec_hash(spec, tg)
        live = [
            a
            for a in (c.job_allocs((spec["Namespace"], spec["ID"])) if existing else [])
            if a.task_group == tg["Name"] and a.live
        ]
        same = [a for a in live if a.spec_hash == h]
        other = [a for a in live if a.spec_hash != h]
        count = int(tg["Count"])
        canary = int((tg.get("Update") or {}).get("Canary") or 0) if other else 0
        updates[tg["Name"]] = {
            "Place": max(0, count - len(live)),
            "Stop": max(0, len(live) - count),
            "Migrate": 0,
            "InPlaceUpdate": len(same) if existing and not _same_spec(existing.spec, spec) else 0,
            "DestructiveUpdate": 0 if canary else min(len(other), count),
            "Canary": canary,
            "Ignore": len(same) if existing and _same_spec(existing.spec, spec) else 0,
            "Preemptions": 0,
        }
    return {
        "Annotations": {"DesiredTGUpdates": updates, "PreemptedAllocs": None},
        "FailedTGAllocs": None,
        "JobModifyIndex": existing.spec["JobModifyIndex"] if existing else 0,
        "CreatedEvals": None,
        "Diff": {
            "Type": "Edited" if existing else "Added",
            "ID": spec["ID"],
            "Fields": None,
            "Objects": None,
            "TaskGroups": None,
        },
        "NextPeriodicLaunch": None,
        "Warnings": "",
        "Index": c.index,
    }
