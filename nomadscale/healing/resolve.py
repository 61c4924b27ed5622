"""Runbook parameters, validated and resolved: a node by id, name or id prefix, an
allocation by id or 8-char prefix (as the Nomad CLI shows them)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from nomadscale.core.errors import NotFoundError, PermanentError, UsageError
from nomadscale.core.ports import AllocInfo, NodeInfo
from nomadscale.healing.runbook import PARAM_HINTS, PARAM_PATTERNS, Runbook

if TYPE_CHECKING:
    from nomadscale.healing.actions import HealingNomad


UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def uuid_prefix(prefix: str) -> str:
    """The id prefix Nomad can look up: its state store reads prefixes through go-memdb's
    UUID index, which refuses an odd number of hex digits with a 500 ("Input (without
    hyphens) must be even length"); the Nomad CLI drops the last character then
    (command/helpers.go sanitizeUUIDPrefix) and so does this. Filter the answer by the
    whole prefix."""
    return prefix[: len(prefix) - (len(prefix) - prefix.count("-")) % 2]


def resolve_node(nomad: HealingNomad, ref: str) -> NodeInfo:
    """A node by exact id, exact name or unique id prefix (>= 8 chars). Only a full id is
    asked for as one: ``GET /v1/node/<name or prefix>`` is a 500 in Nomad, not a 404 (the
    state store reads the id through the UUID index: "UUID must be 36 characters";
    nomad/node_endpoint.go GetNode -> state.NodeByID)."""
    if UUID_RE.fullmatch(ref):
        with contextlib.suppress(NotFoundError):  # a name that looks like an id: try names
            return nomad.node(ref)
    nodes = nomad.list_nodes()
    named = [n for n in nodes if n.name == ref]
    if len(named) == 1:
        return nomad.node(named[0].id)
    pref = [n for n in nodes if len(ref) >= 8 and n.id.startswith(ref)]
    if len(pref) == 1:
        return nomad.node(pref[0].id)
    if len(named) + len(pref) > 1:
        raise PermanentError(f"node {ref!r} is ambiguous")
    raise PermanentError(f"node {ref!r} not found in Nomad")


def resolve_allocation(nomad: HealingNomad, ref: str) -> AllocInfo:
    """An allocation by full id or unique 8-char prefix (as ``nomad alloc status`` shows it).
    ``GET /v1/allocation/:id`` takes only a full id; a prefix is one ``GET /v1/allocations
    ?prefix=`` over every namespace (``allocations_by_prefix``), as the Nomad CLI does, with
    an even number of hex digits (``uuid_prefix``)."""
    if len(ref) == 36:
        try:
            return nomad.allocation(ref)
        except NotFoundError:
            raise PermanentError(f"allocation {ref!r} not found in Nomad") from None
    query = uuid_prefix(ref)
    if not query:
        raise PermanentError(f"allocation {ref!r}: give at least its first 8 characters")
    found = {a.id: a for a in nomad.allocations_by_prefix(query) if a.id.startswith(ref)}
    if len(found) > 1:
        some = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
        raise PermanentError(
            f"allocation {ref!r} is ambiguous: {len(found)} allocations start with it "
            f"({some}); give the full id"
        )
    if not found:
        raise PermanentError(f"allocation {ref!r} not found in Nomad")
    return next(iter(found.values()))


def node_zone(node: NodeInfo) -> str:
    return str(node.meta.get("zone") or node.datacenter)


def parameter_values(nomad: HealingNomad, rb: Runbook, params: Mapping[str, str]) -> dict[str, str]:
    """The run's values from trigger/CLI parameters: validated (``UsageError`` naming the
    parameter and what it must look like), the node and allocation resolved through Nomad
    (``PermanentError`` when not found or ambiguous)."""
    values: dict[str, str] = {"runbook": rb.name}
    unknown = set(params) - set(rb.parameters)
    if unknown:
        raise UsageError(f"runbook {rb.name}: unknown parameter(s) {sorted(unknown)}")
    for name, spec in rb.parameters.items():
        raw = params.get(name)
        if raw is None or raw == "":
            if spec.required:
                raise UsageError(f"runbook {rb.name}: parameter {name} is required")
            continue
        if not PARAM_PATTERNS[name].fullmatch(str(raw)):  # (``$`` alone allows a newline)
            shown = repr(str(raw)[:64]) + ("..." if len(str(raw)) > 64 else "")
            raise UsageError(f"runbook {rb.name}: parameter {name}: invalid value {shown} "
                             f"(expected {PARAM_HINTS[name]})")  # fmt: skip
        key = {"incident_id": "incident.id", "allocation": "allocation.id"}.get(name, name)
        values[key] = str(raw)
    if "allocation.id" in values:  # a prefix becomes the full id
        values["allocation.id"] = resolve_allocation(nomad, values["allocation.id"]).id
    if "node" in values:
        node = resolve_node(nomad, values.pop("node"))
        values["node.id"] = node.id
        values["node.name"] = node.name
        values["zone"] = node_zone(node)
        values["datacenter"] = node.datacenter
    return values
