"""Job specifications: HCL2 to Nomad's JSON job shape, canonical defaults, validation, and
Go-style case-insensitive decoding of request bodies."""

from __future__ import annotations

import copy
from typing import Any

import hcl2
from hcl2 import SerializationOptions

from nomadscale.core.durations import parse_duration
from nomadscale.sim.fieldnames import BY_LOWER
from nomadscale.sim.model import NS, ApiError

# values of these keys are user maps: their keys are kept as written
OPAQUE = frozenset(
    {
        "Meta",
        "Env",
        "Config",
        "Options",
        "Payload",
        "Variables",
        "Attributes",
        "Labels",
        "Headers",
        "Args",
        "DynamicMeta",
        "Dynamic",
        "Static",
        "Spec",
    }
)

DURATIONS = frozenset(
    {
        "MinHealthyTime",
        "HealthyDeadline",
        "ProgressDeadline",
        "Stagger",
        "Interval",
        "Timeout",
        "Delay",
        "MaxDelay",
        "KillTimeout",
        "ShutdownDelay",
        "Deadline",
        "InitialStatusDelay",
        "SuccessBeforePassing",
        "StopAfterClientDisconnect",
        "MaxClientDisconnect",
        "Wait",
    }
)

DEFAULT_KILL_TIMEOUT_NS = 5 * NS  # structs.DefaultKillTimeout

_RENAMES = {
    "datacenters": "Datacenters",
    "node_pool": "NodePool",
    "attribute": "LTarget",
    "value": "RTarget",
    "operator": "Operand",
    "cpu": "CPU",
    "memory": "MemoryMB",
    "memory_max": "MemoryMaxMB",
    "disk": "DiskMB",
    "id": "ID",
    "meta_required": "MetaRequired",
    "meta_optional": "MetaOptional",
    "port": "PortLabel",
    "image_pull_timeout": "image_pull_timeout",
    "min": "Min",
    "max": "Max",
    "mbits": "MBits",
    "size": "SizeMB",
}
_LISTS = {  # block name -> (JSON key, labelled?)
    "group": ("TaskGroups", True),
    "task": ("Tasks", True),
    "constraint": ("Constraints", False),
    "affinity": ("Affinities", False),
    "spread": ("Spreads", False),
    "service": ("Services", False),
    "check": ("Checks", False),
    "device": ("Devices", True),
    "network": ("Networks", False),
    "template": ("Templates", False),
    "artifact": ("Artifacts", False),
    "volume_mount": ("VolumeMounts", False),
}
_SINGLE = {
    "update": "Update",
    "scaling": "Scaling",
    "resources": "Resources",
    "parameterized": "ParameterizedJob",
    "periodic": "Periodic",
    "migrate": "Migrate",
    "reschedule": "ReschedulePolicy",
    "restart": "RestartPolicy",
    "ephemeral_disk": "EphemeralDisk",
    "logs": "LogConfig",
    "lifecycle": "Lifecycle",
}
_MAPS = {"meta": "Meta", "env": "Env", "config": "Config"}
# keys whose API name depends on the block (jobspec2 -> api.Template, api.TaskArtifact,
# api.Port: hashicorp/nomad api/tasks.go, api/resources.go)
_BLOCK_RENAMES = {
    "template": {
        "source": "SourcePath", "destination": "DestPath", "data": "EmbeddedTmpl",
        "env": "Envvars", "left_delimiter": "LeftDelim", "right_delimiter": "RightDelim",
        "error_on_missing_key": "ErrMissingKey",
    },
    "artifact": {
        "source": "GetterSource", "destination": "RelativeDest", "options": "GetterOptions",
        "headers": "GetterHeaders", "mode": "GetterMode",
    },
    "port": {"static": "Value", "to": "To", "host_network": "HostNetwork"},
}  # fmt: skip


def _camel(key: str) -> str:
    if key in _RENAMES:
        return _RENAMES[key]
    return "".join(w[:1].upper() + w[1:] for w in key.split("_"))


def _ns(v: Any) -> Any:
    if isinstance(v, str):
        return int(parse_duration(v).total_seconds() * NS)
    return v


def _first(v: Any) -> dict[str, Any]:
    if isinstance(v, list):
        out: dict[str, Any] = {}
        for item in v:
            if isinstance(item, dict):
                out.update(item)
        return out
    return dict(v) if isinstance(v, dict) else {}


def _block(body: dict[str, Any], kind: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    renames = _BLOCK_RENAMES.get(kind, {})
    for k, v in body.items():
        if k in renames:
            key = renames[k]
            out[key] = (
                _ns(v) if key in DURATIONS else (_first(v) if k in ("options", "headers") else v)
            )
        elif k in _LISTS:
            key, labelled = _LISTS[k]
            items = v if isinstance(v, list) else [v]
            conv = []
            for item in items:
                if labelled:
                    for label, inner in item.items():
                        b = _block(_first(inner))
                        b["Name"] = label
                        conv.append(b)
                else:
                    conv.append(_block(_first(item), k))
            out.setdefault(key, []).extend(conv)
        elif k in _SINGLE:
            out[_SINGLE[k]] = _block(_first(v))
        elif k == "port" and isinstance(v, list | dict):
            for item in v if isinstance(v, list) else [v]:
                for label, inner in item.items():
                    b = _block(_first(inner), "port")
                    b["Label"] = label
                    key = "ReservedPorts" if "Value" in b else "DynamicPorts"
                    out.setdefault(key, []).append(b)
        elif k in _MAPS:
            out[_MAPS[k]] = _first(v)
        else:
            key = _camel(k)
            out[key] = _ns(v) if key in DURATIONS else v
    if "Operand" not in out and out.get("DistinctHosts"):
        out.pop("DistinctHosts")
        out["Operand"] = "distinct_hosts"
    return out


def parse_hcl(text: str) -> dict[str, Any]:
    """HCL2 job file -> Nomad JSON job (not yet canonicalized)."""
    if not text or not text.strip():
        raise ApiError(400, "Job spec is empty")
    try:
        raw = hcl2.loads(
            text,
            serialization_options=SerializationOptions(
                strip_string_quotes=True, explicit_blocks=False, with_comments=False
            ),
        )
        jobs = raw.get("job") or []
        if len(jobs) != 1 or len(jobs[0]) != 1:
            raise ValueError("expected exactly one job block")
        ((name, body),) = jobs[0].items()
        job = _block(_first(body))
    except ApiError:
        raise
    except Exception as exc:  # the parser raises many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ApiError(400, f"Failed to parse job: {msg}") from None
    job["ID"] = job.get("ID") or name
    job.setdefault("Name", name)
    return job


def decode(obj: Any) -> Any:
    """Rewrite keys to their canonical Nomad case (Go decodes JSON keys case-insensitively)."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = BY_LOWER.get(str(k).lower(), str(k))
        out[key] = v if key in OPAQUE else decode(v)
    return out


def get_ci(body: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    if not body:
        return default
    if key in body:
        return body[key]
    low = key.lower()
    for k, v in body.items():
        if str(k).lower() == low:
            return v
    return default


_UPDATE_DEFAULTS = {
    "Stagger": 30 * NS,
    "MaxParallel": 1,
    "HealthCheck": "checks",
    "MinHealthyTime": 10 * NS,
    "HealthyDeadline": 300 * NS,
    "ProgressDeadline": 600 * NS,
    "AutoRevert": False,
    "AutoPromote": False,
    "Canary": 0,
}
_MIGRATE_DEFAULTS = {
    "MaxParallel": 1,
    "HealthCheck": "checks",
    "MinHealthyTime": 10 * NS,
    "HealthyDeadline": 300 * NS,
}


# structs.DefaultServiceJobReschedulePolicy / DefaultBatchJobReschedulePolicy, as
# api/tasks.go NewDefaultReschedulePolicy fills them in
RESCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "service": {
        "Attempts": 0,
        "Interval": 0,
        "Delay": 30 * NS,
        "DelayFunction": "exponential",
        "MaxDelay": 3600 * NS,
        "Unlimited": True,
    },
    "batch": {
        "Attempts": 1,
        "Interval": 24 * 3600 * NS,
        "Delay": 5 * NS,
        "DelayFunction": "constant",
        "MaxDelay": 0,
        "Unlimited": False,
    },
}


def _reschedule_policy(job: dict[str, Any], tg: dict[str, Any]) -> dict[str, Any] | None:
    """api/tasks.go TaskGroup.Canonicalize: the job's ``Reschedule`` merged with the
    group's, then ReschedulePolicy.Canonicalize fills the job type's defaults (service and
    batch; system and sysbatch jobs get none unless set)."""
    merged: dict[str, Any] | None = None
    for src in (job.get("Reschedule"), tg.get("ReschedulePolicy")):
        if src is not None:
            merged = {**(merged or {}), **{k: v for k, v in src.items() if v is not None}}
    default = RESCHEDULE_DEFAULTS.get(job["Type"])
    if default is None:
        return merged
    return {**default, **(merged or {})}


def _count(v: Any) -> int:
    """A group's Count as Go decodes it into ``*int``: a whole number (HCL has already
    turned a quoted number into one), anything else is the decoder's 400."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):  # Go's decoder: 2.0 is not an int
        kind = {str: "string", bool: "bool", float: "number"}.get(type(v), "object")
        raise ApiError(
            400,
            f"json: cannot unmarshal {kind} into Go struct field TaskGroup.Job.TaskGroups.Count "
            "of type int",
        )
    return int(v)


def canonicalize(job: dict[str, Any]) -> dict[str, Any]:
    """Fill Nomad's defaults (like api.Job.Canonicalize plus server-side defaults)."""
    job = copy.deepcopy(job)
    job.setdefault("Name", job.get("ID"))
    for k, v in (
        ("Namespace", "default"),
        ("Region", "global"),
        ("Type", "service"),
        ("Priority", 50),
        ("NodePool", "default"),
    ):
        if not job.get(k):
            job[k] = v
    if not job.get("Datacenters"):
        job["Datacenters"] = ["*"]
    for k in (
        "Constraints",
        "Affinities",
        "Spreads",
        "Meta",
        "Periodic",
        "ParameterizedJob",
        "Payload",
        "Update",
    ):
        job.setdefault(k, None)
    job.setdefault("ParentID", "")
    job.setdefault("Stop", False)
    job.setdefault("Dispatched", False)
    job.setdefault("AllAtOnce", False)
    pj = job.get("ParameterizedJob")
    if pj is not None:
        pj.setdefault("Payload", "optional")
        pj.setdefault("MetaRequired", None)
        pj.setdefault("MetaOptional", None)
    if job["Type"] == "service" and job.get("Update") is None:
        job["Update"] = dict(_UPDATE_DEFAULTS)  # like api.Job.Canonicalize for services
    job_update = job.get("Update")
    for tg in job.get("TaskGroups") or []:
        if tg.get("Count") is None:
            sc = tg.get("Scaling") or {}
            low = sc.get("Min")
            tg["Count"] = int(low) if low is not None else 1
        tg["Count"] = _count(tg["Count"])
        if job["Type"] == "service" and (job_update or tg.get("Update")):
            merged = dict(_UPDATE_DEFAULTS)
            merged.update({k: v for k, v in (job_update or {}).items() if v is not None})
            merged.update({k: v for k, v in (tg.get("Update") or {}).items() if v is not None})
            tg["Update"] = merged
        else:
            tg["Update"] = None
        tg["ReschedulePolicy"] = _reschedule_policy(job, tg)
        if job["Type"] == "service":
            mig = dict(_MIGRATE_DEFAULTS)
            mig.update(tg.get("Migrate") or {})
            tg["Migrate"] = mig
        sc = tg.get("Scaling")
        if sc is not None:
            sc.setdefault("Min", tg["Count"])
            sc.setdefault("Enabled", True)
            sc.setdefault("Type", "horizontal")
            sc.setdefault("Policy", None)
            sc["Target"] = {"Namespace": job["Namespace"], "Job": job["ID"], "Group": tg["Name"]}
        for k in ("Constraints", "Affinities", "Spreads", "Meta", "Networks", "Services"):
            tg.setdefault(k, None)
        for con in (job.get("Constraints") or []) + (tg.get("Constraints") or []):
            con.setdefault("Operand", "=")
            con.setdefault("RTarget", "")
        for task in tg.get("Tasks") or []:
            task.setdefault("Driver", "docker")
            # api/tasks.go Task.Canonicalize; structs.Task.Canonicalize: DefaultKillTimeout
            if not task.get("KillTimeout"):
                task["KillTimeout"] = DEFAULT_KILL_TIMEOUT_NS
            task.setdefault("ShutdownDelay", 0)
            task.setdefault("KillSignal", "")
            task.setdefault("Leader", False)
            task.setdefault("Config", {})
            res = task.setdefault("Resources", {})
            res.setdefault("CPU", 100)
            res.setdefault("MemoryMB", 300)
            res.setdefault("Devices", None)
            for k in ("Constraints", "Meta", "Env", "Services", "Templates", "Artifacts"):
                task.setdefault(k, None)
    return job


def validate(job: dict[str, Any]) -> None:
    errors = []
    if job["Type"] not in ("service", "batch", "system", "sysbatch"):
        errors.append(f'Invalid job type: "{job["Type"]}"')
    groups = job.get("TaskGroups") or []
    if not groups:
        errors.append("Missing job task groups")
    seen = set()
    for i, tg in enumerate(groups):
        name = tg.get("Name")
        if not name:
            errors.append(f"Job task group {i + 1} missing name")
        elif name in seen:
            errors.append(f"Job task group {i + 1} redefines '{name}' from group {i}")
        seen.add(name)
        if tg["Count"] < 0:
            errors.append(f"Task group {name} should have a non-negative count")
        if not tg.get("Tasks"):
            errors.append(f"Task group {name} validation failed: Missing tasks for task group")
        u = tg.get("Update")
        if u:
            mh, hd, pd = u["MinHealthyTime"], u["HealthyDeadline"], u["ProgressDeadline"]
            if mh >= hd:
                errors.append("Minimum healthy time must be less than healthy deadline")
            if pd != 0 and hd >= pd:
                errors.append("Healthy deadline must be less than progress deadline")
        sc = tg.get("Scaling")
        if sc is not None:
            if sc.get("Max") is None:
                errors.append(f"Task group {name} scaling policy missing max value")
            elif sc["Min"] > sc["Max"]:
                errors.append(
                    "Scaling policy invalid: maximum count must not be less than minimum count"
                )
            elif not sc["Min"] <= tg["Count"] <= sc["Max"]:
                errors.append(
                    f"Task group {name} has count {tg['Count']} outside the scaling range "
                    f"[{sc['Min']}, {sc['Max']}]"
                )
    if errors:
        n = len(errors)
        lines = "\n".join(f"\t* {e}" for e in errors)
        raise ApiError(500, f"{n} error{'s' if n > 1 else ''} occurred:\n{lines}\n\n")
