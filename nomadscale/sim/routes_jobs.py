"""HTTP handlers for jobs, scaling, dispatch, parse and plan."""

from __future__ import annotations

import uuid
from typing import Any

from nomadscale.sim import filters, jobs, jobspec, sched
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.model import ApiError, JobRecord, NotFound
from nomadscale.sim.server import Request, Route, route

# One escaped segment, or an unescaped dispatched/periodic child ("parent/dispatch-...").
_ID = r"([^/]+(?:/(?:dispatch|periodic)-[^/]+)?)"


def _job(c: Cluster, req: Request) -> JobRecord:
    """The job of the path; a read of a missing one blocks on the jobs table (Job.GetJob:
    ``state.Index("jobs")``) before its 404."""
    job = c.jobs.get((req.namespace, req.params[0]))
    if job is None:
        raise NotFound("job not found", c.table_index["jobs"])
    return job


def _maybe_job(c: Cluster, req: Request) -> JobRecord | None:
    """The job's lists (allocations, evaluations, deployments) of a missing job are empty:
    Job.Allocations, Job.Evaluations, Job.Deployments and Job.LatestDeployment query by job
    ID without looking the job up (nomad/job_endpoint.go)."""
    return c.jobs.get((req.namespace, req.params[0]))


def _job_summary(c: Cluster, job: JobRecord) -> dict[str, Any]:
    children = None
    if job.parameterized or job.periodic:
        kids = [j for j in c.jobs.values() if j.spec.get("ParentID") == job.id]
        st = [_status(c, k) for k in kids]
        children = {
            "Pending": st.count("pending"),
            "Running": st.count("running"),
            "Dead": st.count("dead"),
        }
    return {
        "JobID": job.id,
        "Namespace": job.namespace,
        "Summary": sched.summary(c, job),
        "Children": children,
        "CreateIndex": job.create_index,
        "ModifyIndex": job.modify_index,
    }


def _stub(c: Cluster, job: JobRecord, *, meta: bool) -> dict[str, Any]:
    s = job.spec
    out = {
        "ID": job.id,
        "ParentID": s.get("ParentID", ""),
        "Name": s.get("Name", job.id),
        "Namespace": job.namespace,
        "Datacenters": s.get("Datacenters"),
        "NodePool": s.get("NodePool"),
        "Multiregion": None,
        "Type": job.type,
        "Priority": s.get("Priority", 50),
        "Periodic": job.periodic,
        "ParameterizedJob": job.parameterized,
        "Stop": job.stopped,
        "Status": _status(c, job),
        "StatusDescription": "",
        "JobSummary": _job_summary(c, job),
        "CreateIndex": job.create_index,
        "ModifyIndex": job.modify_index,
        "JobModifyIndex": s.get("JobModifyIndex", 0),
        "SubmitTime": s.get("SubmitTime", 0),
    }
    if meta:
        out["Meta"] = s.get("Meta")
    return out


def _status(c: Cluster, job: JobRecord) -> str:
    """The stored status (set with the job's ModifyIndex, ``sched.sync_status``)."""
    return str(job.spec.get("Status") or sched.job_status(c, job))


def _full(c: Cluster, job: JobRecord) -> dict[str, Any]:
    out = dict(job.spec)
    out["Status"] = _status(c, job)
    out["ModifyIndex"] = job.modify_index
    return out


def list_jobs(c: Cluster, req: Request) -> tuple[Any, int]:
    ns = req.namespace
    prefix = req.query.get("prefix", "")
    pred = filters.compile_filter(req.query["filter"]) if req.query.get("filter") else None
    meta = req.query.get("meta", "") in ("true", "True", "1")
    out = []
    for (jns, jid), job in sorted(c.jobs.items()):
        if (ns != "*" and jns != ns) or not jid.startswith(prefix):
            continue
        stub = _stub(c, job, meta=meta)
        if pred is None or pred(stub):
            out.append(stub)
    return out, max(c.table_index["jobs"], c.table_index["allocs"])


def get_job(c: Cluster, req: Request) -> tuple[Any, int]:
    """Blocks on the job's ModifyIndex (nomad/job_endpoint.go GetJob), which a new version
    and a status change move (state_store.go setJobStatus; ``sched.sync_status``)."""
    job = _job(c, req)
    return _full(c, job), job.modify_index


def versions(c: Cluster, req: Request) -> tuple[Any, int]:
    job = _job(c, req)
    vs = [job.versions[v] for v in sorted(job.versions, reverse=True)]
    return {"Versions": vs, "Diffs": None}, c.table_index["jobs"]


def job_allocs(c: Cluster, req: Request) -> tuple[Any, int]:
    job = _maybe_job(c, req)
    if job is None:
        return [], c.table_index["allocs"]
    all_ = req.query.get("all", "") in ("true", "True", "1")
    out = [
        a.stub()
        for a in c.job_allocs((job.namespace, job.id))
        if all_ or a.job.get("CreateIndex") == job.create_index
    ]
    return out, c.table_index["allocs"]


def job_deployments(c: Cluster, req: Request) -> tuple[Any, int]:
    deps = c.deployments_by_job.get((req.namespace, req.params[0]), [])
    return [d.to_json() for d in deps], c.table_index["deployments"]


def job_deployment(c: Cluster, req: Request) -> tuple[Any, int]:
    deps = c.deployments_by_job.get((req.namespace, req.params[0]), [])
    return (deps[-1].to_json() if deps else None), c.table_index["deployments"]


def job_evals(c: Cluster, req: Request) -> tuple[Any, int]:
    return list(c.evals_by_job.get((req.namespace, req.params[0]), [])), c.table_index["evals"]


def job_summary(c: Cluster, req: Request) -> tuple[Any, int]:
    return _job_summary(c, _job(c, req)), max(c.table_index["jobs"], c.table_index["allocs"])


def scale_status(c: Cluster, req: Request) -> tuple[Any, int]:
    job = _job(c, req)
    groups = {}
    allocs = c.job_allocs((job.namespace, job.id))
    for tg in job.spec.get("TaskGroups") or []:
        mine = [a for a in allocs if a.task_group == tg["Name"] and a.live and not a.canary]
        groups[tg["Name"]] = {
            "Desired": tg["Count"],
            "Placed": len(mine),
            "Running": sum(1 for a in mine if a.client_status == "running"),
            "Healthy": sum(1 for a in mine if a.healthy is True),
            "Unhealthy": sum(1 for a in mine if a.healthy is False),
            "Events": list(job.scaling_events.get(tg["Name"], [])) or None,
        }
    # nomad/job_endpoint.go ScaleStatus: JobModifyIndex is the job's ModifyIndex; the index
    # is the newest of the job, its scaling events and its live non-canary allocations
    body = {
        "JobID": job.id,
        "Namespace": job.namespace,
        "JobCreateIndex": job.create_index,
        "JobModifyIndex": job.modify_index,
        "JobStopped": job.stopped,
        "TaskGroups": groups,
    }
    events = (e["CreateIndex"] for evs in job.scaling_events.values() for e in evs)
    live = (a.modify_index for a in allocs if a.live and not a.canary)
    return body, max([job.modify_index, *events, *live])


def _register_body(req: Request, path_id: str | None) -> dict[str, Any]:
    body = req.json()
    spec = body.get("Job")
    if not spec:
        raise ApiError(400, "Job must be specified")
    if not spec.get("ID"):
        raise ApiError(400, "Job ID hasn't been provided")
    if path_id is not None and spec["ID"] != path_id:
        raise ApiError(400, "Job ID does not match name")
    ns = req.query.get("namespace") or body.get("Namespace") or spec.get("Namespace") or "default"
    spec["Namespace"] = ns
    return body  # type: ignore[no-any-return]


def register(c: Cluster, req: Request) -> Any:
    body = _register_body(req, req.params[0] if req.params else None)
    return jobs.register(
        c,
        body["Job"],
        enforce_index=bool(body.get("EnforceIndex")),
        job_modify_index=int(body.get("JobModifyIndex") or 0),
        preserve_counts=bool(body.get("PreserveCounts")),
    )


def deregister(c: Cluster, req: Request) -> Any:
    job = _job(c, req)
    return jobs.stop(c, job, purge=req.query.get("purge", "") in ("true", "True", "1"))


def scale(c: Cluster, req: Request) -> Any:
    return jobs.scale(c, req.params[0], req.namespace, req.json())


def dispatch(c: Cluster, req: Request) -> Any:
    job = _job(c, req)
    return jobs.dispatch(
        c, job, req.json(required=False), idempotency_token=req.query.get("idempotency_token", "")
    )


def plan(c: Cluster, req: Request) -> Any:
    body = _register_body(req, req.params[0])
    return jobs.plan(c, body["Job"])


def revert(c: Cluster, req: Request) -> Any:
    job = _job(c, req)
    body = req.json()
    return jobs.revert(c, job, int(body.get("JobVersion") or 0), triggered_by="job-register")


def stable(c: Cluster, req: Request) -> Any:
    job = _job(c, req)
    body = req.json()
    version = int(body.get("JobVersion") or 0)
    if version not in job.versions:
        raise ApiError(500, f"job {job.id!r} at version {version} not found")
    job.versions[version]["Stable"] = bool(body.get("Stable"))
    job.modify_index = c.bump("jobs")
    return {"JobModifyIndex": job.spec["JobModifyIndex"], "Index": c.index}


def evaluate(c: Cluster, req: Request) -> Any:
    job = _job(c, req)
    ev = sched.reconcile(c, job, triggered_by="job-eval")
    return {
        "EvalID": ev["ID"] if ev else "",
        "EvalCreateIndex": ev["CreateIndex"] if ev else 0,
        "JobModifyIndex": job.spec["JobModifyIndex"],
        "Index": c.index,
    }


def _policies(c: Cluster) -> list[dict[str, Any]]:
    out = []
    for job in c.jobs.values():
        for tg in job.spec.get("TaskGroups") or []:
            sc = tg.get("Scaling")
            if sc is None:
                continue
            pid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{job.namespace}/{job.id}/{tg['Name']}"))
            out.append(
                {
                    "ID": pid,
                    "Type": sc.get("Type", "horizontal"),
                    "Enabled": sc.get("Enabled"),
                    "Min": sc.get("Min"),
                    "Max": sc.get("Max"),
                    "Policy": sc.get("Policy"),
                    "Target": {"Namespace": job.namespace, "Job": job.id, "Group": tg["Name"]},
                    "CreateIndex": job.create_index,
                    "ModifyIndex": job.modify_index,
                }
            )
    return out


def scaling_policies(c: Cluster, req: Request) -> tuple[Any, int]:
    job = req.query.get("job")
    stubs = [
        {k: p[k] for k in ("ID", "Type", "Enabled", "Target", "CreateIndex", "ModifyIndex")}
        for p in _policies(c)
        if (not job or p["Target"]["Job"] == job)
        and (req.namespace == "*" or p["Target"]["Namespace"] == req.namespace)
    ]
    return stubs, c.table_index["jobs"]


def scaling_policy(c: Cluster, req: Request) -> tuple[Any, int]:
    for p in _policies(c):
        if p["ID"] == req.params[0]:
            return p, c.table_index["jobs"]
    raise ApiError(404, "policy not found")


def parse(c: Cluster, req: Request) -> Any:
    body = req.json()
    text = body.get("JobHCL") or ""
    job = jobspec.parse_hcl(text)
    if body.get("Canonicalize"):
        job = jobspec.canonicalize(job)
    return job


ROUTES: list[Route] = [
    route("GET", "/v1/jobs", list_jobs),
    route("GET", "/v1/scaling/policies", scaling_policies),
    route("GET", "/v1/scaling/policy/([^/]+)", scaling_policy),
    route("PUT POST", "/v1/jobs", register),
    route("PUT POST", "/v1/jobs/parse", parse),
    route("GET", f"/v1/job/{_ID}/versions", versions),
    route("GET", f"/v1/job/{_ID}/allocations", job_allocs),
    route("GET", f"/v1/job/{_ID}/deployments", job_deployments),
    route("GET", f"/v1/job/{_ID}/deployment", job_deployment),
    route("GET", f"/v1/job/{_ID}/evaluations", job_evals),
    route("GET", f"/v1/job/{_ID}/summary", job_summary),
    route("GET", f"/v1/job/{_ID}/scale", scale_status),
    route("PUT POST", f"/v1/job/{_ID}/scale", scale),
    route("PUT POST", f"/v1/job/{_ID}/dispatch", dispatch),
    route("PUT POST", f"/v1/job/{_ID}/plan", plan),
    route("PUT POST", f"/v1/job/{_ID}/revert", revert),
    route("PUT POST", f"/v1/job/{_ID}/evaluate", evaluate),
    route("PUT POST", f"/v1/job/{_ID}/stable", stable),
    route("GET", f"/v1/job/{_ID}", get_job),
    route("PUT POST", f"/v1/job/{_ID}", register),
    route("DELETE", f"/v1/job/{_ID}", deregister),
]
