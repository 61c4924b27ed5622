"""Parameters naming Nomad objects, resolved to them: a node by id, name or id prefix, an
allocation by id or 8-char prefix (as the Nomad CLI shows them)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nomadscale.core.errors import NotFoundError, PermanentError
from nomadscale.core.ports import AllocInfo, NodeInfo

if TYPE_CHECKING:
    from nomadscale.healing.actions import HealingNomad


def resolve_node(nomad: HealingNomad, ref: str) -> NodeInfo:
    """A node by exact id, exact name or unique id prefix (>= 8 chars)."""
    with contextlib.suppress(PermanentError):  # not a full node id: try names and prefixes
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
    ``GET /v1/allocation/:id`` takes only a full id, so a prefix is looked up on the nodes'
    allocations."""
    if len(ref) == 36:
        try:
            return nomad.allocation(ref)
        except NotFoundError:
            raise PermanentError(f"allocation {ref!r} not found in Nomad") from None
    found = {
        a.id: a
        for n in nomad.list_nodes()
        for a in nomad.node_allocations(n.id)
        if a.id.startswith(ref)
    }
    if len(found) > 1:
        raise PermanentError(f"allocation {ref!r} is ambiguous: give the full id")
    if not found:
        raise PermanentError(f"allocation {ref!r} not found in Nomad")
    return nomad.allocation(next(iter(found)))
