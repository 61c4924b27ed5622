"""HTTP handlers for nodes, drains, allocations, client metadata, evaluations, deployments,
namespaces and status."""

from __future__ import annotations

import re
from typing import Any

from nomadscale.sim import deploy, drain, filters, sched
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.model import ApiError, Deployment, Node, NotFound, RawJSON, dumps
from nomadscale.sim.server import Request, Route, parse_bool, route

_META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


def _paged(req: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    token = req.query.get("next_token")
    if token:
        items = [i for i in items if i["ID"] >= token]
    per_page = int(req.query.get("per_page") or 0)
    if per_page > 0 and len(items) > per_page:
        req.query["_next_token"] = items[per_page]["ID"]
        items = items[:per_page]
    return items


def _raw_list(parts: list[bytes]) -> RawJSON:
    return RawJSON(b"[" + b",".join(parts) + b"]")


def _uuid_prefix(req: Request, lookup: str) -> str:
    """The ``prefix`` query of a list over a table indexed by UUID (nodes, allocs, evals,
    deployments), checked as Nomad's state store does: go-memdb's txn.Get(table,
    "id_prefix", p) reads UUIDFieldIndex.PrefixFromArgs (index.go parseString, length not
    enforced), whose error txn.go getIndexValue wraps as ``index error: ...`` and the
    state store's ...ByIDPrefix as ``<lookup> lookup failed: ...`` (DeploymentsByIDPrefix
    does not wrap): a 500. The Nomad CLI sends an even number of hex digits
    (command/helpers.go sanitizeUUIDPrefix). Jobs use a string index: any prefix."""
    return _uuid_check(req.query.get("prefix", ""), lookup, exact=False)


def _uuid_check(value: str, lookup: str, *, exact: bool) -> str:
    """go-memdb UUIDFieldIndex.parseString: FromArgs (an exact lookup, ``exact``) enforces
    36 characters, PrefixFromArgs only a maximum; the error wrapped as the state store does
    (``<lookup> lookup failed: index error: ...``; no ``lookup``: unwrapped)."""
    why = ""
    plain = value.replace("-", "")
    if exact and len(value) != 36:
        why = "UUID must be 36 characters"
    elif len(value) > 36:
        why = f"Invalid UUID length. UUID have 36 characters; got {len(value)}"
    elif value.count("-") > 4:
        why = f'UUID should have maximum of 4 "-"; got {value.count("-")}'
    elif len(plain) % 2:
        why = "Input (without hyphens) must be even length"
    else:
        bad = next((ch for ch in plain if ch not in "0123456789abcdefABCDEF"), None)
        if bad is not None:  # Go's hex.InvalidByteError: "%#U"
            why = f"Invalid UUID: encoding/hex: invalid byte: U+{ord(bad):04X} {bad!r}"
    if why:
        why = f"index error: {why}"
        raise ApiError(500, f"{lookup} lookup failed: {why}" if lookup else why)
    return value


def _uuid_id(value: str, lookup: str) -> str:
    """An exact lookup by ID in a UUID-indexed table (state store NodeByID, AllocByID,
    EvalByID, DeploymentByID): a malformed ID is the index's 500, a well-formed unknown one
    is not found."""
    return _uuid_check(value, lookup, exact=True)


def list_nodes(c: Cluster, req: Request) -> tuple[Any, int]:
    """Node stubs; ``resources=true`` adds NodeResources and ReservedResources, ``os=true``
    the ``os.name`` attribute (command/agent/node_endpoint.go nodesRequest -> Node.Stub);
    ``filter`` sees the whole node."""
    prefix = _uuid_prefix(req, "node")
    fields = {
        "with_resources": parse_bool(req.query.get("resources")),
        "with_os": parse_bool(req.query.get("os")),
    }
    plain = not any(fields.values())
    if not req.query.get("filter") and not req.query.get("per_page"):
        nodes = sorted(c.nodes.values(), key=lambda n: n.id)
        parts = [
            n.stub_json() if plain else dumps(n.stub(**fields))
            for n in nodes
            if n.id.startswith(prefix)
        ]
        return _raw_list(parts), c.table_index["nodes"]
    pred = filters.compile_filter(req.query["filter"]) if req.query.get("filter") else None
    out = []
    for node in sorted(c.nodes.values(), key=lambda n: n.id):
        if not node.id.startswith(prefix):
            continue
        if pred is not None and not pred(node.full()):
            continue
        out.append(node.stub(**fields))
    return _paged(req, out), c.table_index["nodes"]


def _node(c: Cluster, node_id: str, status: int = 404) -> Node:
    node = c.nodes.get(_uuid_id(node_id, "node"))
    if node is None:
        raise ApiError(status, "node not found")
    return node


def get_node(c: Cluster, req: Request) -> tuple[Any, int]:
    node = c.nodes.get(_uuid_id(req.params[0], "node"))
    if node is None:  # Node.GetNode: a blocking query on the nodes table, then 404
        raise NotFound("node not found", c.table_index["nodes"])
    return node.full(), node.modify_index


def node_allocs(c: Cluster, req: Request) -> tuple[Any, int]:
    """nomad/node_endpoint.go GetAllocs: the allocations by node ID, without looking the node
    up (an unknown node has none); the index is their newest ModifyIndex, or the allocs
    table's when there are none."""
    allocs = c.allocs_by_node.get(req.params[0], ())
    index = max((a.modify_index for a in allocs), default=c.table_index["allocs"])
    return [a.full() for a in allocs], index


def drain_node(c: Cluster, req: Request) -> Any:
    body = req.json()
    node = _node(c, req.params[0], status=500)
    spec = body.get("DrainSpec")
    meta = body.get("Meta")
    evals = drain.start(c, node, spec, meta=meta, mark_eligible=bool(body.get("MarkEligible")))
    return {
        "NodeModifyIndex": node.modify_index,
        "EvalIDs": evals or None,
        "EvalCreateIndex": c.index,
        "Index": c.index,
    }


def eligibility(c: Cluster, req: Request) -> Any:
    body = req.json()
    node = _node(c, req.params[0], status=500)
    value = body.get("Eligibility")
    if value not in ("eligible", "ineligible"):
        raise ApiError(500, f'invalid scheduling eligibility "{value}"')
    if value == "eligible" and node.draining:
        raise ApiError(
            500, "can not set node's scheduling eligibility to eligible while it is draining"
        )
    if node.eligibility != value:
        node.eligibility = value
        node.modify_index = c.bump("nodes")
        c.emit("eligibility", node_id=node.id, eligibility=value)
        if value == "eligible":
            c.capacity_changed()
    return {
        "NodeModifyIndex": node.modify_index,
        "EvalIDs": None,
        "EvalCreateIndex": 0,
        "Index": c.index,
    }


def list_allocs(c: Cluster, req: Request) -> tuple[Any, int]:
    ns = req.namespace
    prefix = _uuid_prefix(req, "alloc")
    task_states = req.query.get("task_states", "true") not in ("false", "False", "0")
    # command/agent/alloc_endpoint.go allocsRequest: AllocStubFields{Resources, TaskStates}
    with_resources = parse_bool(req.query.get("resources"))
    if not req.query.get("filter"):
        parts = [
            a.stub_json(task_states=task_states, with_resources=with_resources)
            for a in c.allocs.values()
            if (ns == "*" or a.namespace == ns) and a.id.startswith(prefix)
        ]
        if req.query.get("reverse") == "true":
            parts.reverse()
        return _raw_list(parts), c.table_index["allocs"]
    pred = filters.compile_filter(req.query["filter"]) if req.query.get("filter") else None
    out = []
    for a in c.allocs.values():
        if (ns != "*" and a.namespace != ns) or not a.id.startswith(prefix):
            continue
        stub = a.stub(task_states=task_states, with_resources=with_resources)
        if pred is None or pred(stub):
            out.append(stub)
    if req.query.get("reverse") == "true":
        out.reverse()
    return out, c.table_index["allocs"]


def get_alloc(c: Cluster, req: Request) -> tuple[Any, int]:
    a = c.allocs.get(_uuid_id(req.params[0], "alloc"))
    if a is None:
        raise NotFound("alloc not found", c.table_index["allocs"])
    return a.full(), a.modify_index


def stop_alloc(c: Cluster, req: Request) -> Any:
    a = c.allocs.get(_uuid_id(req.params[0], "alloc"))
    if a is None:
        raise ApiError(404, "alloc not found")
    job = c.jobs.get((a.namespace, a.job_id))
    if job is not None and job.type in ("service", "batch") and a.live:
        # nomad/alloc_endpoint.go Stop: DesiredTransition.Migrate and an "alloc-stop"
        # evaluation; the reconciler stops it and places its replacement under its name
        # (computeMigrations), whatever the deployment's state
        a.migrating = True
        a.modify_index = c.bump("allocs")
    else:
        sched.stop_alloc(c, a, "alloc was stopped by the user")
    ev = sched.reconcile(c, job, triggered_by="alloc-stop") if job else None
    return {"EvalID": ev["ID"] if ev else "", "Index": c.index}


def client_meta(c: Cluster, req: Request) -> Any:
    if req.method == "GET":
        node_id = req.query.get("node_id", "")
    else:
        body = req.json()
        node_id = body.get("NodeID") or req.query.get("node_id", "")
    if not node_id:
        raise ApiError(400, "No local Node and node_id not provided")
    node = c.nodes.get(node_id)
    if node is None:
        raise ApiError(404, "Unknown node")
    if req.method != "GET":
        changes = body.get("Meta") or {}
        for k, v in changes.items():
            if not _META_KEY.match(str(k)):
                raise ApiError(400, f"invalid node metadata key {k!r}")
            node.dynamic_meta[str(k)] = None if v is None else str(v)
        node.modify_index = c.bump("nodes")
        c.emit("node_meta", node_id=node.id, meta=dict(changes))
    return {
        "Meta": node.merged_meta(),
        "Dynamic": dict(node.dynamic_meta),
        "Static": dict(node.meta),
    }


def list_evals(c: Cluster, req: Request) -> tuple[Any, int]:
    ns, job, status = req.namespace, req.query.get("job"), req.query.get("status")
    prefix = _uuid_prefix(req, "eval")
    out = [
        e
        for e in c.evals.values()
        if (ns == "*" or e["Namespace"] == ns)
        and (not job or e["JobID"] == job)
        and (not status or e["Status"] == status)
        and e["ID"].startswith(prefix)
    ]
    return out, c.table_index["evals"]


def get_eval(c: Cluster, req: Request) -> tuple[Any, int]:
    ev = c.evals.get(_uuid_id(req.params[0], "eval"))
    if ev is None:
        raise NotFound("eval not found", c.table_index["evals"])
    return ev, ev["ModifyIndex"]


def eval_allocs(c: Cluster, req: Request) -> tuple[Any, int]:
    ev = c.evals.get(req.params[0])
    if ev is None:
        raise ApiError(404, "eval not found")
    allocs = c.job_allocs((ev["Namespace"], ev["JobID"]))
    return [a.stub() for a in allocs if a.eval_id == ev["ID"]], c.table_index["allocs"]


def list_deployments(c: Cluster, req: Request) -> tuple[Any, int]:
    ns, prefix = req.namespace, _uuid_prefix(req, "")
    out = [
        d.to_json()
        for d in c.deployments.values()
        if (ns == "*" or d.namespace == ns) and d.id.startswith(prefix)
    ]
    return out, c.table_index["deployments"]


def _dep(c: Cluster, dep_id: str, status: int = 404) -> Deployment:
    dep = c.deployments.get(_uuid_id(dep_id, "deployment"))
    if dep is None:
        raise ApiError(status, "deployment not found")
    return dep


def get_deployment(c: Cluster, req: Request) -> tuple[Any, int]:
    """nomad/deployment_endpoint.go GetDeployment: a missing deployment is a blocking query
    on the deployment table's index like any other; the 404 comes when it returns."""
    dep = c.deployments.get(_uuid_id(req.params[0], "deployment"))
    if dep is None:
        raise NotFound("deployment not found", c.table_index["deployments"])
    return dep.to_json(), dep.modify_index


def deployment_allocs(c: Cluster, req: Request) -> tuple[Any, int]:
    dep = _dep(c, req.params[0])
    out = [a.stub() for a in c.job_allocs((dep.namespace, dep.job_id)) if a.deployment_id == dep.id]
    return out, c.table_index["allocs"]


def _dep_reply(c: Cluster, dep: Deployment, ev: dict[str, Any] | None, **extra: Any) -> Any:
    return {
        "EvalID": ev["ID"] if ev else "",
        "EvalCreateIndex": ev["CreateIndex"] if ev else 0,
        "DeploymentModifyIndex": dep.modify_index,
        "Index": c.index,
        **extra,
    }


def promote(c: Cluster, req: Request) -> Any:
    body = req.json()
    if body.get("DeploymentID") and body["DeploymentID"] != req.params[0]:
        raise ApiError(400, "Deployment ID does not match")
    dep = _dep(c, req.params[0], 500)
    groups = None if body.get("All") else list(body.get("Groups") or []) or None
    ev = deploy.promote(c, dep, groups=groups)
    return _dep_reply(c, dep, ev)


def pause(c: Cluster, req: Request) -> Any:
    body = req.json()
    dep = _dep(c, req.params[0], 500)
    ev = deploy.pause(c, dep, paused=bool(body.get("Pause")))
    return _dep_reply(c, dep, ev)


def fail(c: Cluster, req: Request) -> Any:
    dep = _dep(c, req.params[0], 500)
    version = deploy.fail(c, dep, deploy.DESC_FAILED_BY_USER)
    return _dep_reply(c, dep, None, RevertedJobVersion=version)


def allocation_health(c: Cluster, req: Request) -> Any:
    body = req.json()
    dep = _dep(c, req.params[0], 500)
    if not dep.active:
        raise ApiError(500, "can't set health of allocations for a terminal deployment")
    for key, healthy in (("HealthyAllocationIDs", True), ("UnhealthyAllocationIDs", False)):
        for alloc_id in body.get(key) or []:
            a = c.allocs.get(alloc_id)
            if a is None or a.deployment_id != dep.id:
                raise ApiError(500, f"Deployment {dep.id} has no allocation {alloc_id}")
            if a.healthy is not healthy:
                deploy.on_health(c, a, healthy)
    return _dep_reply(c, dep, None)


def list_namespaces(c: Cluster, req: Request) -> tuple[Any, int]:
    return list(c.namespaces.values()), c.table_index["namespaces"]


def get_namespace(c: Cluster, req: Request) -> tuple[Any, int]:
    ns = c.namespaces.get(req.params[0])
    if ns is None:
        raise ApiError(404, "namespace not found")
    return ns, ns["ModifyIndex"]


def put_namespace(c: Cluster, req: Request) -> Any:
    body = req.json()
    name = body.get("Name") or req.params[0]
    if name != req.params[0]:
        raise ApiError(400, "Namespace name does not match request path")
    c.add_namespace(name, str(body.get("Description") or ""))
    c.namespaces[name]["Meta"] = body.get("Meta")
    return None


def delete_namespace(c: Cluster, req: Request) -> Any:
    name = req.params[0]
    if name == "default":
        raise ApiError(500, "default namespace can not be deleted")
    if any(ns == name for ns, _ in c.jobs):
        raise ApiError(500, f'namespace "{name}" has non-terminal jobs in regions: [global]')
    c.namespaces.pop(name, None)
    c.bump("namespaces")
    return None


def leader(c: Cluster, req: Request) -> tuple[Any, int]:
    return "127.0.0.1:4647", c.index


def peers(c: Cluster, req: Request) -> tuple[Any, int]:
    return ["127.0.0.1:4647"], c.index


def regions(c: Cluster, req: Request) -> tuple[Any, int]:
    return ["global"], c.index


ROUTES: list[Route] = [
    route("GET", "/v1/nodes", list_nodes),
    route("GET", "/v1/node/([^/]+)/allocations", node_allocs),
    route("PUT POST", "/v1/node/([^/]+)/drain", drain_node),
    route("PUT POST", "/v1/node/([^/]+)/eligibility", eligibility),
    route("GET", "/v1/node/([^/]+)", get_node),
    route("GET", "/v1/allocations", list_allocs),
    route("PUT POST", "/v1/allocation/([^/]+)/stop", stop_alloc),
    route("GET", "/v1/allocation/([^/]+)", get_alloc),
    route("GET POST", "/v1/client/metadata", client_meta, read=False, index_header=False),
    route("GET", "/v1/evaluations", list_evals),
    route("GET", "/v1/evaluation/([^/]+)/allocations", eval_allocs),
    route("GET", "/v1/evaluation/([^/]+)", get_eval),
    route("GET", "/v1/deployments", list_deployments),
    route("GET", "/v1/deployment/allocations/([^/]+)", deployment_allocs),
    route("PUT POST", "/v1/deployment/promote/([^/]+)", promote),
    route("PUT POST", "/v1/deployment/pause/([^/]+)", pause),
    route("PUT POST", "/v1/deployment/fail/([^/]+)", fail),
    route("PUT POST", "/v1/deployment/allocation-health/([^/]+)", allocation_health),
    route("GET", "/v1/deployment/([^/]+)", get_deployment),
    route("GET", "/v1/namespaces", list_namespaces),
    route("GET", "/v1/namespace/([^/]+)", get_namespace),
    route("PUT POST", "/v1/namespace/([^/]+)", put_namespace),
    route("DELETE", "/v1/namespace/([^/]+)", delete_namespace),
    route("GET", "/v1/status/leader", leader),
    route("GET", "/v1/status/peers", peers),
    route("GET", "/v1/regions", regions),
]
