"""Runbook files (``runbooks/*.yaml``): the model, validation with ``file:line: field: message``
errors, and the restricted template formatter.

A runbook is a list of steps from a FIXED set of actions with typed arguments. Nothing in a
runbook runs a shell command or builds a path; templates may use only validated parameters
(``{node.id}``, ``{node.name}``, ``{zone}``, ``{incident.id}``, ``{runbook}``, ``{run.id}``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from nomadscale.config.yamlpos import YamlSyntaxError, load_yaml
from nomadscale.core.durations import parse_duration
from nomadscale.core.errors import ConfigError
from nomadscale.core.files import read_small_text

#: Largest runbook file read.
MAX_RUNBOOK_BYTES = 256 * 1024

NODE_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
ZONE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
INCIDENT_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
ALLOC_RE = re.compile(r"^[a-f0-9]{8}(-[a-f0-9]{4}){3}-[a-f0-9]{12}$|^[a-f0-9]{8}$")
MAINTENANCE_EVENTS = ("TERMINATE_ON_HOST_MAINTENANCE", "MIGRATE_ON_HOST_MAINTENANCE")
PARAM_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "node": NODE_RE,
    "zone": ZONE_RE,
    "incident_id": INCIDENT_RE,
    "allocation": ALLOC_RE,
    "event": re.compile("^(" + "|".join(MAINTENANCE_EVENTS) + ")$"),
}
PARAM_HINTS: Mapping[str, str] = {  # what a parameter's value must look like, for its error
    "node": "a Nomad node id, id prefix or name (letters, digits, '.', '_', '-'; up to 64)",
    "zone": "a zone name (lowercase letters, digits, '-')",
    "incident_id": "a PagerDuty incident id (letters and digits)",
    "allocation": "a full allocation id or its first 8 characters (lowercase hex)",
    "event": " or ".join(MAINTENANCE_EVENTS),
}
TEMPLATE_FIELDS: Mapping[str, str] = {  # template field -> parameter it needs ("" = always)
    "node.id": "node",
    "node.name": "node",
    "zone": "zone",
    "incident.id": "incident_id",
    "event": "event",
    "allocation.id": "allocation",
    "runbook": "",
    "run.id": "",
}
CONDITIONS = ("node_drained", "surge_healthy", "node_ready", "allocation_replaced")


def _duration(value: Any) -> timedelta:
    try:
        td = parse_duration(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if td.total_seconds() <= 0:
        raise ValueError("must be longer than 0s")
    return td


Duration = Annotated[timedelta, PlainValidator(_duration)]


def template_fields(template: str) -> list[str]:
    """Field names used by ``template``; ValueError for anything but plain ``{field}``."""
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template: {exc}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise ValueError(f"unknown template field {{{name}}} (allowed: {allowed})")
        if spec or conv:
            raise ValueError(f"template field {{{name}}}: no format spec or conversion allowed")
        out.append(name)
    return out


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a validated template from validated values only (missing -> ``-``)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"unknown template field {{{name}}}")
            parts.append(str(values.get(name) or "-"))
    return "".join(parts)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- triggers ---------------------------------------------------------------------------------


class PagerDutyRule(_Model):
    event_types: tuple[str, ...] = ("incident.triggered",)
    title: str | None = None  # regex; named groups (node, zone, event) fill parameters
    service_id: str | None = None
    service_name: str | None = None
    urgency: Literal["high", "low"] | None = None
    custom_fields: dict[str, str] = Field(default_factory=dict)

    @field_validator("title")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        bad = set(rx.groupindex) - {"node", "zone", "event"}
        if bad:
            raise ValueError(f"named groups may only be node, zone, event (got {sorted(bad)})")
        return v


class MaintenanceTrigger(_Model):
    events: tuple[Literal["TERMINATE_ON_HOST_MAINTENANCE", "MIGRATE_ON_HOST_MAINTENANCE"], ...]


class Triggers(_Model):
    pagerduty: tuple[PagerDutyRule, ...] = ()
    maintenance: MaintenanceTrigger | None = None
    manual: bool = True


class Parameter(_Model):
    required: bool = True
    description: str = ""


# --- steps ------------------------------------------------------------------------------------


class _Step(_Model):
    name: str | None = None
    timeout: Duration | None = None  # default per action (see DEFAULT_TIMEOUTS)
    # skipped when the run's ``event`` parameter is one of these (runs without one: never)
    skip_events: tuple[
        Literal["TERMINATE_ON_HOST_MAINTENANCE", "MIGRATE_ON_HOST_MAINTENANCE"], ...
    ] = ()


class MarkIneligible(_Step):
    action: Literal["mark_ineligible"]


class MarkEligible(_Step):
    action: Literal["mark_eligible"]


class Drain(_Step):
    action: Literal["drain"]
    deadline: Duration = timedelta(minutes=15)
    ignore_system_jobs: bool = True
    check_capacity: bool = True


class Surge(_Step):
    action: Literal["surge"]
    count: int = Field(default=1, ge=1, le=8)


class ReleaseSurge(_Step):
    action: Literal["release_surge"]


class WaitNode(_Step):
    action: Literal["wait_node"]
    status: Literal["ready", "down"]
    after_down: bool = False  # with status=ready: wait until seen down first (VM restarted)


class WaitCondition(_Step):
    action: Literal["wait_condition"]
    condition: Literal["node_drained", "surge_healthy", "node_ready", "allocation_replaced"]


class VerifyGpu(_Step):
    action: Literal["verify_gpu"]
    expected_gpus: int | None = Field(default=None, ge=0, le=16)


class RestartAllocation(_Step):
    action: Literal["restart_allocation"]


class PruneImages(_Step):
    action: Literal["prune_images"]


class Notify(_Step):
    action: Literal["notify"]
    channel: Literal["pagerduty_note", "log"] = "pagerduty_note"
    template: str

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v


Step = Annotated[
    MarkIneligible
    | MarkEligible
    | Drain
    | Surge
    | ReleaseSurge
    | WaitNode
    | WaitCondition
    | VerifyGpu
    | RestartAllocation
    | PruneImages
    | Notify,
    Field(discriminator="action"),
]
NEEDS_NODE = {
    "mark_ineligible",
    "mark_eligible",
    "drain",
    "wait_node",
    "verify_gpu",
    "prune_images",
}
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    "wait_node": 3600.0,
    "wait_condition": 900.0,
    "verify_gpu": 600.0,
    "drain": 120.0,
}
DEFAULT_TIMEOUT_S = 120.0


class Runbook(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    description: str = ""
    policy: str | None = None  # the policy whose zones/groups/bounds surge and drain use
    triggers: Triggers = Triggers()
    parameters: dict[Literal["node", "zone", "incident_id", "allocation", "event"], Parameter] = (
        Field(default_factory=dict)
    )
    steps: tuple[Step, ...] = Field(min_length=1)
    on_failure: tuple[Step, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Runbook:
        params = set(self.parameters)
        have = params | ({"zone"} if "node" in params else set())
        for where, steps in (("steps", self.steps), ("on_failure", self.on_failure)):
            for i, st in enumerate(steps):
                if st.skip_events and "event" not in params:
                    raise ValueError(f"{where}[{i}]: skip_events needs an 'event' parameter")
                if st.action in NEEDS_NODE and "node" not in params:
                    raise ValueError(f"{where}[{i}]: {st.action} needs a 'node' parameter")
                if st.action == "restart_allocation" and "allocation" not in params:
                    raise ValueError(f"{where}[{i}]: restart_allocation needs 'allocation'")
                if st.action in ("surge", "prune_images") and not self.policy:
                    raise ValueError(f"{where}[{i}]: {st.action} needs 'policy' set")
                if st.action == "surge" and "zone" not in have:
                    raise ValueError(f"{where}[{i}]: surge needs a 'node' or 'zone' parameter")
                if isinstance(st, Notify):
                    for f in template_fields(st.template):
                        need = TEMPLATE_FIELDS[f]
                        if need and need not in have:
                            raise ValueError(
                                f"{where}[{i}].template: {{{f}}} needs a '{need}' parameter"
                            )
        for i, rule in enumerate(self.triggers.pagerduty):
            if rule.title:
                groups = set(re.compile(rule.title).groupindex)
                missing = groups - params
                if missing:
                    raise ValueError(
                        f"triggers.pagerduty[{i}].title: group(s) {sorted(missing)} "
                        "are not parameters"
                    )
        if self.triggers.maintenance and "node" not in params:
            raise ValueError("triggers.maintenance: needs a 'node' parameter")
        return self

    def step_list(self, phase: str) -> tuple[Any, ...]:
        return self.steps if phase == "main" else self.on_failure


def step_timeout(step: Any) -> float:
    if step.timeout is not None:
        return float(step.timeout.total_seconds())
    return DEFAULT_TIMEOUTS.get(step.action, DEFAULT_TIMEOUT_S)


# --- loading ------------------------------------------------------------------------------------


def _strip_tags(loc: tuple[Any, ...], data: Any) -> tuple[str | int, ...]:
    """Drop pydantic's union tags (e.g. the action name) that are not keys in the data."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and out[-1:] != [part]:
            if any(isinstance(v, str) and v == part for v in node.values()):
                continue  # discriminator tag
            out.append(part)
            node = None
        else:
            out.append(part)
            node = None
    return tuple(out)


def _field(path: Iterable[str | int]) -> str:
    s = ""
    for p in path:
        if isinstance(p, int):
            s += f"[{p}]"
            continue
        name = str(p)
        if not name.isprintable() or not name or name != name.strip() or " " in name:
            name = repr(name)  # odd keys stay on one line and visibly quoted
        s += f".{name}" if s else name
    return s


def check_runbook(path: str | Path) -> tuple[Runbook | None, list[str]]:
    """``(runbook, [])`` or ``(None, ["file:line: field: message", ...])``."""
    file = str(path)
    try:
        text = read_small_text(path, limit=MAX_RUNBOOK_BYTES)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, [f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}"]
    try:
        doc = load_yaml(text)
    except YamlSyntaxError as exc:
        return None, [f"{file}:{exc.line}: yaml: {exc.message}"]
    if not isinstance(doc.data, dict):
        return None, [f"{file}:1: runbook: top level must be a mapping (name, steps, ...)"]
    errors = [
        f"{file}:{line}: {_field(p)}: duplicate key (first at line {first})"
        for p, line, first in doc.duplicates
    ]
    try:
        rb = Runbook.model_validate(doc.data)
    except ValidationError as exc:
        raw = exc.errors()
        for err in raw:
            if err["type"] == "too_short" and any(
                len(o["loc"]) > len(err["loc"]) and o["loc"][: len(err["loc"])] == err["loc"]
                for o in raw
            ):
                continue  # items failed validation: their own errors say why
            loc = _strip_tags(tuple(err["loc"]), doc.data)
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            if not loc and msg[:6] in ("steps[", "on_fai", "trigge"):
                # model-level errors name their own path: "steps[2]: ..."
                head, _, rest = msg.partition(": ")
                m = re.match(r"^(steps|on_failure)\[(\d+)\]", head)
                sub: tuple[str | int, ...] = (m.group(1), int(m.group(2))) if m else ("triggers",)
                errors.append(f"{file}:{doc.line_of(sub)}: {head}: {rest}")
                continue
            errors.append(f"{file}:{doc.line_of(loc)}: {_field(loc) or 'runbook'}: {msg}")
        return None, errors
    if errors:
        return None, errors
    return rb, []


def load_runbooks(paths: Iterable[str | Path]) -> dict[str, Runbook]:
    """Runbooks from files or folders (``*.yaml``/``*.yml``); ConfigError with every error."""
    files: list[Path] = []
    errors: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml")))
        elif p.exists():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    out: dict[str, Runbook] = {}
    where: dict[str, str] = {}
    for f in files:
        rb, errs = check_runbook(f)
        errors.extend(errs)
        if rb is None:
            continue
        if rb.name in out:
            errors.append(f"{f}:1: name: {rb.name!r} already defined in {where[rb.name]}")
            continue
        out[rb.name] = rb
        where[rb.name] = str(f)
    if errors:
        raise ConfigError(f"{len(errors)} runbook error(s); first: {errors[0]}", errors=errors)
    return out
