"""The node side of ``NomadClient`` (``nomad.py``): listing nodes (with the service/batch
allocations running on each), one node with its devices and its allocations, drain,
eligibility and dynamic node metadata. ``NomadNodes`` is a mixin: ``NomadClient`` sets up
the transport it uses (``_http``, ``_api``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from nomadscale.core.ports import AllocInfo, NodeInfo, NodeMetadata
from nomadscale.integrations import nomad_parse as parse
from nomadscale.integrations.nomad_http import NomadTransport, json_body, seg

log = logging.getLogger("nomadscale.integrations.nomad")  # the adapter's one logger

_NON_TERMINAL = (
    'DesiredStatus == "run" and (ClientStatus == "pending" or ClientStatus == "running")'
)
_COUNTED_JOB_TYPES = frozenset({"service", "batch", ""})


def _quote(value: str) -> str:
    """A bexpr string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NomadNodes:
    """Node methods of ``NomadClient``. Every method raises only ``nomadscale.core.errors``
    types."""

    _http: NomadTransport
    _api: Any  # python-nomad's ``Nomad`` (``_http.api``)

    def list_nodes(
        self,
        *,
        node_pool: str | None = None,
        datacenter: str | None = None,
        filter_expr: str | None = None,
        with_allocs: bool = False,
    ) -> list[NodeInfo]:
        """Nodes of a pool and/or datacenter (zone). ``with_allocs`` fills ``allocs_running``
        from ONE /v1/allocations call. Stubs carry no Meta: use ``node()`` for it."""
        terms = []
        if node_pool:
            terms.append(f"NodePool == {_quote(node_pool)}")
        if datacenter:
            terms.append(f"Datacenter == {_quote(datacenter)}")
        if filter_expr:
            terms.append(f"({filter_expr})")
        params = {"filter": " and ".join(terms)} if terms else {}
        stubs = self._http.get_all(self._api.nodes, what="GET nodes", params=params)
        counts: Counter[str] = Counter()
        if with_allocs and stubs:
            counts = self._running_allocs_per_node()
        return [parse.node_info(n, allocs_running=counts.get(str(n.get("ID")), 0)) for n in stubs]

    def _running_allocs_per_node(self) -> Counter[str]:
        allocs = self._http.get_all(
            self._api.allocations,
            what="GET allocations",
            params={
                "filter": _NON_TERMINAL,
                "namespace": "*",
                "task_states": "false",
                "resources": "false",
            },
        )
        return Counter(
            str(a.get("NodeID"))
            for a in allocs
            if str(a.get("JobType") or "") in _COUNTED_JOB_TYPES
        )

    def node(self, node_id: str) -> NodeInfo:
        """Full node (with Meta and drain state)."""
        resp = self._http.get(self._api.node, seg(node_id), what=f"GET node {node_id}")
        return parse.node_info(json_body(resp))

    def node_allocations(self, node_id: str) -> list[AllocInfo]:
        resp = self._http.get(
            self._api.node, seg(node_id), "allocations", what=f"GET node {node_id} allocations"
        )
        return [parse.alloc_info(a) for a in parse.items(json_body(resp), "allocations")]

    def drain(
        self,
        node_id: str,
        *,
        deadline_s: float,
        meta: Mapping[str, str] | None = None,
        ignore_system_jobs: bool = True,
    ) -> None:
        """Start draining: allocations migrate; forced after ``deadline_s`` (0 = never,
        negative = now). ``meta`` is recorded in the node's LastDrain."""
        body = {
            "NodeID": node_id,
            "DrainSpec": {
                "Deadline": int(deadline_s * 1_000_000_000),
                "IgnoreSystemJobs": ignore_system_jobs,
            },
            "Meta": {str(k): str(v) for k, v in (meta or {}).items()},
        }
        self._http.write(
            self._api.node, seg(node_id), "drain", what=f"drain node {node_id}", body=body
        )
        log.info("nomad drain started on node %s (deadline %ss)", node_id, deadline_s)

    def cancel_drain(self, node_id: str, *, mark_eligible: bool = False) -> None:
        body = {"NodeID": node_id, "DrainSpec": None, "MarkEligible": mark_eligible}
        self._http.write(
            self._api.node, seg(node_id), "drain", what=f"cancel drain of node {node_id}", body=body
        )

    def set_eligibility(self, node_id: str, eligible: bool) -> None:
        # python-nomad's eligible_node(ineligible=False) sends "ineligible": use eligible=.
        self._http.call(
            f"set node {node_id} {'eligible' if eligible else 'ineligible'}",
            lambda: self._api.node.eligible_node(seg(node_id), eligible=bool(eligible)),
            idempotent=False,
        )

    def node_metadata(self, node_id: str) -> NodeMetadata:
        resp = self._http.get(
            self._http.metadata, what=f"GET node {node_id} metadata", params={"node_id": node_id}
        )
        return parse.node_metadata(node_id, json_body(resp) or {})

    def set_node_metadata(self, node_id: str, meta: Mapping[str, str | None]) -> NodeMetadata:
        """Set (or, with None, unset) dynamic metadata keys; returns the merged result."""
        body = {
            "NodeID": node_id,
            "Meta": {str(k): (None if v is None else str(v)) for k, v in meta.items()},
        }
        resp = self._http.write(
            self._http.metadata,
            what=f"set node {node_id} metadata",
            body=body,
            params={"node_id": node_id},
        )
        return parse.node_metadata(node_id, json_body(resp) or {})
