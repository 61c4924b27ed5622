"""Response-schema validation against Nomad's OpenAPI spec and our own nomad-api.md schemas.

The OpenAPI file (Nomad 1.1) is converted to JSON Schema 2020-12 once:

* ``nullable: true`` becomes ``type: [X, "null"]``;
* every typed value (and every ``$ref``) also accepts ``null``: Go encodes nil maps, slices
  and pointers (``*string`` EvalID, ``*int`` Count) as ``null``, which the generated spec
  never marks as nullable. Types are still checked whenever a value is present;
* ``$ref: #/components/...`` is resolved inside one root document holding the components.

Newer fields the 1.1 spec lacks (NodePool, /v1/client/metadata, ScalingRequest.Error as a
bool, fields nomadscale relies on) are checked with ``EXTRA`` schemas written from
``nomad-api.md``. Every validation is recorded so the suite can report what it covered.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path("/work/shared/reference/nomad-openapi.yaml")
_HERE_SPEC = Path(__file__).with_name("nomad-openapi.yaml")

_lock = threading.Lock()
VALIDATED_OPENAPI: set[str] = set()  # "GET /job/{jobName}"
VALIDATED_EXTRA: set[str] = set()


def _spec_file() -> Path:
    return _HERE_SPEC if _HERE_SPEC.exists() else SPEC_PATH


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return {"anyOf": [{"$ref": node["$ref"]}, {"type": "null"}]}
    out = {k: _convert(v) for k, v in node.items() if k not in ("nullable", "example")}
    typ = node.get("type")
    if isinstance(typ, str):
        out["type"] = [typ, "null"]
    return out


@functools.cache
def _spec() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with _spec_file().open() as fh:
        raw = yaml.load(fh, Loader=loader)
    raw["components"]["schemas"] = _convert(raw["components"]["schemas"])
    return raw


def openapi_schema(method: str, template: str) -> dict[str, Any] | None:
    """The 200 response schema for ``method template`` (``template`` as in the spec, without
    ``/v1``), or None when the spec has no such operation or no JSON body."""
    spec = _spec()
    op = spec["paths"].get(template, {}).get(method.lower())
    if not op:
        return None
    resp = op.get("responses", {}).get("200")
    if resp is None:
        return None
    if "$ref" in resp:
        resp = spec["components"]["responses"][resp["$ref"].rsplit("/", 1)[-1]]
    schema = resp.get("content", {}).get("application/json", {}).get("schema")
    return _convert(schema) if schema else None


@functools.cache
def _validator(method: str, template: str) -> jsonschema.protocols.Validator | None:
    schema = openapi_schema(method, template)
    if schema is None:
        return None
    root = {**schema, "components": {"schemas": _spec()["components"]["schemas"]}}
    return jsonschema.Draft202012Validator(root)


def _check(validator: jsonschema.protocols.Validator, body: Any, label: str) -> None:
    errors = list(validator.iter_errors(body))
    if errors:
        first = jsonschema.exceptions.best_match(errors)
        while first.context:
            first = jsonschema.exceptions.best_match(first.context)
        where = "/".join(str(p) for p in first.absolute_path) or "<body>"
        raise AssertionError(
            f"{label}: {len(errors)} schema error(s); first at {where}: {first.message[:300]}"
        )


def validate(method: str, template: str, body: Any) -> list[str]:
    """Validate ``body`` with every schema known for the endpoint; returns which sources were
    used ("openapi", "nomad-api.md"). Fails when none is known."""
    key = f"{method.upper()} {template}"
    used: list[str] = []
    v = _validator(method.upper(), template)
    if v is not None:
        _check(v, body, f"{key} (OpenAPI)")
        used.append("openapi")
        with _lock:
            VALIDATED_OPENAPI.add(key)
    extra = EXTRA.get(key)
    if extra is not None:
        _check(jsonschema.Draft202012Validator(extra), body, f"{key} (nomad-api.md)")
        used.append("nomad-api.md")
        with _lock:
            VALIDATED_EXTRA.add(key)
    if not used:
        raise AssertionError(f"{key}: no schema known")
    return used


def summary() -> str:
    total = len(VALIDATED_OPENAPI | VALIDATED_EXTRA)
    return (
        f"contract: {total} endpoints validated ({len(VALIDATED_OPENAPI)} from OpenAPI, "
        f"{len(VALIDATED_EXTRA)} from nomad-api.md)"
    )


# --- our own schemas, from nomad-api.md (Nomad 1.5+ fields and what nomadscale relies on) ---

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR_MAP = {"type": ["object", "null"], "additionalProperties": _STR}


def _obj(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **optional},
    }


_NODE_STUB = _obj(
    {
        "ID": _STR,
        "Name": _STR,
        "Datacenter": _STR,
        "NodePool": _STR,
        "Status": {"enum": ["initializing", "ready", "down", "disconnected"]},
        "SchedulingEligibility": {"enum": ["eligible", "ineligible"]},
        "Drain": _BOOL,
        "CreateIndex": _INT,
        "ModifyIndex": _INT,
    }
)
_NODE = _obj(
    {
        "ID": _STR,
        "Name": _STR,
        "Datacenter": _STR,
        "NodePool": _STR,
        "Status": _STR,
        "SchedulingEligibility": _STR,
        "Meta": _STR_MAP,
        "DrainStrategy": {"type": ["object", "null"]},
    }
)
_ALLOC_STUB = _obj(
    {
        "ID": _STR,
        "JobID": _STR,
        "Namespace": _STR,
        "TaskGroup": _STR,
        "NodeID": _STR,
        "NodeName": _STR,
        "DesiredStatus": {"enum": ["run", "stop", "evict"]},
        "ClientStatus": {"enum": ["pending", "running", "complete", "failed", "lost", "unknown"]},
        "JobVersion": _INT,
        "CreateIndex": _INT,
        "ModifyIndex": _INT,
    },
    JobType=_STR,
    DeploymentStatus={
        "type": ["object", "null"],
        "properties": {"Healthy": {"type": ["boolean", "null"]}, "Canary": _BOOL},
    },
)
_SCALE_EVENT = _obj(
    {
        "Time": _INT,
        "Count": {"type": ["integer", "null"]},
        "Message": _STR,
        "Error": _BOOL,  # a bool in code; the docs say string
        "Meta": {"type": ["object", "null"]},
        "CreateIndex": _INT,
    },
    PreviousCount={"type": ["integer", "null"]},
    EvalID={"type": ["string", "null"]},
)
_DEPLOYMENT = _obj(
    {
        "ID": _STR,
        "JobID": _STR,
        "Namespace": _STR,
        "JobVersion": _INT,
        "Status": {
            "enum": [
                "running",
                "paused",
                "failed",
                "successful",
                "cancelled",
                "pending",
                "blocked",
                "unblocking",
                "initializing",
            ]
        },
        "StatusDescription": _STR,
        "TaskGroups": {
            "type": "object",
            "additionalProperties": _obj(
                {
                    "DesiredTotal": _INT,
                    "PlacedAllocs": _INT,
                    "HealthyAllocs": _INT,
                    "UnhealthyAllocs": _INT,
                    "DesiredCanaries": _INT,
                    "Promoted": _BOOL,
                },
                PlacedCanaries={"type": ["array", "null"], "items": _STR},
            ),
        },
        "CreateIndex": _INT,
        "ModifyIndex": _INT,
    }
)
_CLIENT_META = _obj(
    {
        "Meta": _STR_MAP,
        "Dynamic": {
            "type": ["object", "null"],
            "additionalProperties": {"type": ["string", "null"]},
        },
        "Static": _STR_MAP,
    }
)
_JOB = _obj(
    {
        "ID": _STR,
        "Namespace": _STR,
        "Type": {"enum": ["service", "batch", "system", "sysbatch"]},
        "NodePool": _STR,
        "Status": {"enum": ["pending", "running", "dead"]},
        "Stop": _BOOL,
        "Version": _INT,
        "JobModifyIndex": _INT,
        "TaskGroups": {
            "type": "array",
            "items": _obj({"Name": _STR, "Count": _INT}),
        },
    }
)
_WRITE_EVAL = _obj({"EvalID": _STR, "Index": _INT})

EXTRA: dict[str, dict[str, Any]] = {
    "GET /nodes": {"type": "array", "items": _NODE_STUB},
    "GET /node/{nodeId}": _NODE,
    "GET /node/{nodeId}/allocations": {"type": "array", "items": _ALLOC_STUB},
    "GET /allocations": {"type": "array", "items": _ALLOC_STUB},
    "GET /job/{jobName}/allocations": {"type": "array", "items": _ALLOC_STUB},
    "GET /job/{jobName}": _JOB,
    "GET /jobs": {
        "type": "array",
        "items": _obj({"ID": _STR, "Type": _STR, "NodePool": _STR, "Status": _STR}),
    },
    "GET /job/{jobName}/scale": _obj(
        {
            "JobID": _STR,
            "JobStopped": _BOOL,
            "JobModifyIndex": _INT,
            "TaskGroups": {
                "type": "object",
                "additionalProperties": _obj(
                    {
                        "Desired": _INT,
                        "Placed": _INT,
                        "Running": _INT,
                        "Healthy": _INT,
                        "Unhealthy": _INT,
                        "Events": {"type": ["array", "null"], "items": _SCALE_EVENT},
                    }
                ),
            },
        }
    ),
    "POST /job/{jobName}/scale": _WRITE_EVAL,
    "POST /job/{jobName}": _obj({"EvalID": _STR, "JobModifyIndex": _INT, "Index": _INT}),
    "POST /job/{jobName}/dispatch": _obj({"DispatchedJobID": _STR, "EvalID": _STR, "Index": _INT}),
    "GET /deployment/{deploymentID}": _DEPLOYMENT,
    "GET /job/{jobName}/deployment": {"anyOf": [_DEPLOYMENT, {"type": "null"}]},
    "GET /deployments": {"type": "array", "items": _DEPLOYMENT},
    "POST /deployment/promote/{deploymentID}": _obj(
        {"EvalID": _STR, "DeploymentModifyIndex": _INT, "Index": _INT}
    ),
    "POST /deployment/pause/{deploymentID}": _obj({"DeploymentModifyIndex": _INT, "Index": _INT}),
    "POST /deployment/fail/{deploymentID}": _obj({"DeploymentModifyIndex": _INT, "Index": _INT}),
    "POST /node/{nodeId}/drain": _obj({"NodeModifyIndex": _INT, "Index": _INT}),
    "POST /node/{nodeId}/eligibility": _obj({"NodeModifyIndex": _INT, "Index": _INT}),
    "GET /client/metadata": _CLIENT_META,
    "POST /client/metadata": _CLIENT_META,
    "GET /status/leader": _STR,
}
