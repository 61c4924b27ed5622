"""The Nomad adapter: ``NomadClient`` implements ``core.ports.NomadPort`` and the rest of what
nomadscale needs from Nomad, on top of python-nomad 2.1.

python-nomad gaps are filled with raw calls through its own ``Requester`` (scale, drain with
Meta, dynamic node metadata, blocking queries with ``X-Nomad-Index``, dispatch with the
idempotency token in the query string). Errors, retries and TLS live in ``nomad_http``;
JSON -> value parsing lives in ``nomad_parse``; the node methods in ``nomad_nodes``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ConfigError, ExternalPermanentError
from nomadscale.core.ports import (
    AllocInfo,
    DeploymentInfo,
    EvalInfo,
    JobInfo,
    JobStatus,
    ScaleEvent,
)
from nomadscale.integrations import nomad_parse as parse
from nomadscale.integrations.nomad_http import SYSTEM, NomadTransport, index_of, json_body, seg
from nomadscale.integrations.nomad_nodes import NomadNodes
from nomadscale.integrations.nomad_serving import serving_counts

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0  # Nomad caps a blocking query's wait at 5 minutes


class _Revealable(Protocol):
    def reveal(self) -> str: ...


class NomadClient(NomadNodes):
    """Typed Nomad API client. Every method raises only ``nomadscale.core.errors`` types.
    Node methods (list_nodes, node, node_allocations, drain, ...) live in ``NomadNodes``."""

    def __init__(
        self,
        *,
        address: str = "http://127.0.0.1:4646",
        token: str | _Revealable | None = None,
        namespace: str | None = None,
        region: str | None = None,
        cacert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        skip_verify: bool = False,
        timeout: float = 10.0,
        clock: Clock | None = None,
        max_retries: int = 3,
    ) -> None:
        if bool(client_cert) != bool(client_key):
            raise ConfigError("nomad: client_cert and client_key must be given together")
        secret = token.reveal() if token is not None and not isinstance(token, str) else token
        verify: bool | str = False if skip_verify else (str(cacert) if cacert else True)
        cert: tuple[str, str] | tuple[()] = (
            (str(client_cert), str(client_key)) if client_cert and client_key else ()
        )
        self.address = address.rstrip("/")
        self.namespace = namespace or "default"
        self.timeout = timeout
        self._http = NomadTransport(
            address=self.address,
            token=secret or None,
            namespace=namespace,
            region=region,
            verify=verify,
            cert=cert,
            timeout=timeout,
            clock=clock or SystemClock(),
            max_retries=max_retries,
        )
        self._api = self._http.api

    @classmethod
    def from_settings(cls, settings: Any, *, clock: Clock | None = None) -> NomadClient:
        """Build from ``config.settings.Settings`` (nomad_addr, nomad_token, nomad_* TLS)."""

        def opt(name: str) -> str | None:
            value = getattr(settings, name, None)
            return None if value in (None, "") else str(value)

        return cls(
            address=str(settings.nomad_addr),
            token=getattr(settings, "nomad_token", None),
            namespace=opt("nomad_namespace"),
            region=opt("nomad_region"),
            cacert=opt("nomad_cacert"),
            client_cert=opt("nomad_client_cert"),
            client_key=opt("nomad_client_key"),
            skip_verify=bool(getattr(settings, "nomad_skip_verify", False)),
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"NomadClient(address={self.address!r}, namespace={self.namespace!r}, token=***)"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NomadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _ns(namespace: str | None) -> dict[str, str]:
        return {"namespace": namespace} if namespace else {}

    # --- status --------------------------------------------------------------------------

    def leader(self) -> str:
        """Address of the Raft leader; ``ExternalTemporaryError`` when there is none."""
        resp = self._http.get(self._api.status.leader, what="GET leader")
        return str(json_body(resp) or "")

    # --- jobs ----------------------------------------------------------------------------

    def get_job(self, job_id: str, *, namespace: str | None = None) -> JobInfo:
        resp = self._http.get(
            self._api.job, seg(job_id), what=f"GET job {job_id}", params=self._ns(namespace)
        )
        return parse.job_info(json_body(resp))

    def job_versions(self, job_id: str, *, namespace: str | None = None) -> list[JobInfo]:
        """Every stored version of a job, newest first."""
        resp = self._http.get(
            self._api.job,
            seg(job_id),
            "versions",
            what=f"GET job {job_id} versions",
            params=self._ns(namespace),
        )
        versions = parse.job_versions(json_body(resp))
        return sorted(versions, key=lambda j: j.version, reverse=True)

    def job_status(self, job_id: str, *, namespace: str | None = None) -> JobStatus:
        """Scale status of every group plus the id of the active deployment, if any."""
        resp = self._http.get(
            self._api.job,
            seg(job_id),
            "scale",
            what=f"GET job {job_id} scale",
            params=self._ns(namespace),
        )
        latest = self.latest_deployment(job_id, namespace=namespace)
        active = latest.id if latest is not None and latest.active else None
        return parse.job_status(
            json_body(resp), active_deployment=active, namespace=namespace or self.namespace
        )

    def serving_counts(self, job_id: str, *, namespace: str | None = None) -> dict[str, int]:
        """Allocations serving now per task group (unpromoted canaries left out). Not the
        scale endpoint's ``Healthy``: a worker whose health Nomad clears and watches again
        after an in-place update (every new job version, a count change too) keeps serving;
        a fresh placement serves once healthy (see ``nomad_serving``)."""
        params = self._ns(namespace)
        job = json_body(self._http.get(self._api.job, seg(job_id), what=f"GET job {job_id}",
                                       params=params))  # fmt: skip
        dep = json_body(self._http.get(self._api.job, seg(job_id), "deployment",
                                       what=f"GET job {job_id} deployment", params=params))  # fmt: skip
        allocs = json_body(self._http.get(self._api.job, seg(job_id), "allocations",
                                          what=f"GET job {job_id} allocations", params=params))  # fmt: skip
        return serving_counts(
            job if isinstance(job, Mapping) else {},
            [a for a in parse.items(allocs, "allocations") if isinstance(a, Mapping)],
            deployment=dep if isinstance(dep, Mapping) else None,
            now=self._http.clock.now(),
        )

    def last_scale_events(
        self, job_id: str, *, namespace: str | None = None
    ) -> dict[str, ScaleEvent | None]:
        """The newest scaling event of each group (None when a group has none)."""
        status = self.job_status(job_id, namespace=namespace)
        return {name: (g.events[0] if g.events else None) for name, g in status.groups.items()}

    def scale(
        self,
        job_id: str,
        group: str,
        count: int,
        *,
        message: str,
        meta: Mapping[str, Any] | None = None,
        namespace: str | None = None,
    ) -> str:
        """Set one group's count (Scale API). Returns the evaluation id. Never retried:
        ``DeploymentActiveError`` while a deployment is active, ``ExternalTemporaryError`` on 5xx."""
        target: dict[str, str] = {"Job": job_id, "Group": group}
        if namespace:
            target["Namespace"] = namespace
        body = {"Count": count, "Target": target, "Message": message, "Meta": dict(meta or {})}
        resp = self._http.write(
            self._api.job,
            seg(job_id),
            "scale",
            what=f"scale {job_id}/{group} to {count}",
            body=body,
            params=self._ns(namespace),
        )
        eval_id = parse.str_field(json_body(resp), "EvalID")
        log.info("nomad scaled %s/%s to %s (eval %s): %s", job_id, group, count, eval_id, message)
        return eval_id

    def register_job(
        self,
        job: Mapping[str, Any],
        *,
        enforce_index: int | None = None,
        namespace: str | None = None,
    ) -> str:
        """Register a job version (``job`` is the Job JSON, bare or as ``{"Job": ...}``).
        With ``enforce_index`` the write only happens if JobModifyIndex still matches
        (``ConflictError`` otherwise; 0 = only if the job does not exist). Returns the eval id."""
        spec = dict(job.get("Job", job)) if set(job) == {"Job"} else dict(job)
        job_id = str(spec.get("ID") or spec.get("Name") or "")
        if not job_id:
            raise ExternalPermanentError("nomad: register job: job has no ID", system=SYSTEM)
        body: dict[str, Any] = {"Job": spec}
        if enforce_index is not None:
            body["EnforceIndex"] = True
            body["JobModifyIndex"] = enforce_index
        ns = namespace or spec.get("Namespace") or None
        resp = self._http.write(
            self._api.job,
            seg(job_id),
            what=f"register job {job_id}",
            body=body,
            params=self._ns(ns),
        )
        return parse.str_field(json_body(resp), "EvalID")

    def parse_hcl(self, text: str, *, canonicalize: bool = True) -> dict[str, Any]:
        """HCL job file -> Job JSON, parsed by the Nomad server."""
        resp = self._http.call(
            "parse job HCL",
            lambda: self._api.jobs.request(
                "parse", method="post", json={"JobHCL": text, "Canonicalize": canonicalize}
            ),
            idempotent=True,  # parsing has no side effects
        )
        return dict(json_body(resp) or {})

    def dispatch(
        self,
        job_id: str,
        *,
        meta: Mapping[str, str],
        payload: bytes | None = None,
        idempotency_token: str | None = None,
        namespace: str | None = None,
    ) -> str:
        """Dispatch a parameterized job; returns the child job id. The idempotency token goes
        in the query string (python-nomad puts it in the body, where Nomad ignores it)."""
        body: dict[str, Any] = {"Meta": {str(k): str(v) for k, v in meta.items()}}
        if payload is not None:
            body["Payload"] = base64.b64encode(payload).decode("ascii")
        params = self._ns(namespace)
        if idempotency_token:
            params["idempotency_token"] = idempotency_token
        resp = self._http.write(
            self._api.job,
            seg(job_id),
            "dispatch",
            what=f"dispatch {job_id}",
            body=body,
            params=params,
        )
        return parse.str_field(json_body(resp), "DispatchedJobID")

    def job_allocations(
        self, job_id: str, *, namespace: str | None = None, all_versions: bool = False
    ) -> list[AllocInfo]:
        params = self._ns(namespace)
        if all_versions:
            params["all"] = "true"
        resp = self._http.get(
            self._api.job,
            seg(job_id),
            "allocations",
            what=f"GET job {job_id} allocations",
            params=params,
        )
        return [parse.alloc_info(a) for a in parse.items(json_body(resp), "allocations")]

    def job_evaluations(self, job_id: str, *, namespace: str | None = None) -> list[EvalInfo]:
        """The job's evaluations, oldest first: a placement the scheduler could not make
        shows as ``failed`` plus a ``blocked`` evaluation."""
        resp = self._http.get(self._api.job, seg(job_id), "evaluations",
                              what=f"GET job {job_id} evaluations", params=self._ns(namespace))  # fmt: skip
        evals = [parse.eval_info(e) for e in parse.items(json_body(resp), "evaluations")]
        return sorted(evals, key=lambda e: e.create_index)

    # --- deployments -----------------------------------------------------------------------

    def latest_deployment(
        self, job_id: str, *, namespace: str | None = None
    ) -> DeploymentInfo | None:
        resp = self._http.get(
            self._api.job,
            seg(job_id),
            "deployment",
            what=f"GET job {job_id} deployment",
            params=self._ns(namespace),
        )
        data = json_body(resp)
        return parse.deployment_info(data) if data else None

    def deployment(self, deployment_id: str) -> DeploymentInfo:
        resp = self._http.get(
            self._api.deployment, seg(deployment_id), what=f"GET deployment {deployment_id}"
        )
        return parse.deployment_info(json_body(resp))

    def watch_deployment(
        self, deployment_id: str, *, index: int, wait_s: float
    ) -> tuple[DeploymentInfo, int]:
        """Blocking query: returns when the deployment's index passes ``index`` or after about
        ``wait_s`` (capped at 300 s). Returns the deployment and the new X-Nomad-Index."""
        wait_s = max(0.0, min(wait_s, MAX_WAIT_S))
        resp = self._http.get(
            self._api.deployment,
            seg(deployment_id),
            what=f"watch deployment {deployment_id}",
            params={"index": max(0, int(index)), "wait": f"{int(wait_s * 1000)}ms"},
            timeout=wait_s + wait_s / 16 + self.timeout,
        )
        return parse.deployment_info(json_body(resp)), index_of(resp)

    def promote(self, deployment_id: str, *, groups: list[str] | None = None) -> str:
        body: dict[str, Any] = {"DeploymentID": deployment_id}
        if groups:
            body["Groups"] = list(groups)
        else:
            body["All"] = True
        resp = self._http.write(
            self._api.deployment,
            "promote",
            seg(deployment_id),
            what=f"promote deployment {deployment_id}",
            body=body,
        )
        return parse.str_field(json_body(resp), "EvalID")

    def fail_deployment(self, deployment_id: str) -> str:
        resp = self._http.write(
            self._api.deployment,
            "fail",
            seg(deployment_id),
            what=f"fail deployment {deployment_id}",
            body={"DeploymentID": deployment_id},
        )
        return parse.str_field(json_body(resp), "EvalID")

    def pause_deployment(self, deployment_id: str, *, pause: bool = True) -> None:
        self._http.write(
            self._api.deployment,
            "pause",
            seg(deployment_id),
            what=f"{'pause' if pause else 'resume'} deployment {deployment_id}",
            body={"DeploymentID": deployment_id, "Pause": pause},
        )

    # --- allocations -----------------------------------------------------------------------

    def allocation(self, alloc_id: str) -> AllocInfo:
        resp = self._http.get(self._api.allocation, seg(alloc_id), what=f"GET alloc {alloc_id}")
        return parse.alloc_info(json_body(resp))

    def allocations_by_prefix(self, prefix: str) -> list[AllocInfo]:
        """Allocation stubs whose id starts with ``prefix``, in every namespace: one
        ``GET /v1/allocations?prefix=P&namespace=*`` (nomad/alloc_endpoint.go ``Alloc.List``:
        a prefix in every namespace reads ``state.AllocsByIDPrefixAllNSs``; the stubs omit
        task states and resources here). Through the transport like the other list calls
        (retries, error translation, ``X-Nomad-NextToken`` paging)."""
        allocs = self._http.get_all(
            self._api.allocations,
            what=f"GET allocations with prefix {prefix}",
            params={"prefix": prefix, "namespace": "*", "task_states": "false",
                    "resources": "false"},
        )  # fmt: skip
        return [parse.alloc_info(a) for a in allocs]

    def stop_allocation(self, alloc_id: str) -> str:
        resp = self._http.write(
            self._api.allocation, seg(alloc_id), "stop", what=f"stop alloc {alloc_id}", body={}
        )
        return parse.str_field(json_body(resp), "EvalID")
