"""Contract suite fixtures: a target Nomad (the twin, or a real one via env) with throwaway
jobs registered, plus a raw HTTP helper. Prints the validated-endpoint count at the end."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.contract import spec
from tests.contract.env import (
    REAL_POOL_ENV,
    Target,
    prefetch_job,
    real_nomad,
    service_job,
    twin_target,
    unique,
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if spec.VALIDATED_OPENAPI or spec.VALIDATED_EXTRA:
        terminalreporter.write_sep("-", "nomad contract")
        terminalreporter.write_line(spec.summary())


class Api:
    """Raw JSON calls to the target (the contract is about the HTTP API, not the adapter)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.session = requests.Session()
        if target.token:
            self.session.headers["X-Nomad-Token"] = target.token

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        ok: bool = True,
    ) -> requests.Response:
        resp = self.session.request(
            method,
            self.target.address + "/v1" + path,
            params=params,
            json=body,
            timeout=30,
        )
        if ok and not resp.ok:
            raise AssertionError(f"{method} {path}: {resp.status_code} {resp.text[:200]}")
        return resp

    def check(
        self,
        method: str,
        template: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """Call and validate the JSON reply against every schema known for ``template``."""
        data = self.call(method, path, params=params, body=body).json()
        spec.validate(method, template, data)
        return data


def seg(value: str) -> str:
    return quote(value, safe="")


@dataclass
class World:
    api: Api
    target: Target
    job_id: str
    parent_id: str
    child_id: str
    node_id: str
    alloc_id: str
    eval_id: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def wait_for(self, what: str, fn: Callable[[], bool], timeout_s: float = 60) -> None:
        """Twin: advance simulated time; real Nomad: poll."""
        deadline = time.monotonic() + timeout_s
        simulated = 0.0
        while not fn():
            if self.target.is_twin:
                if simulated > 3600:
                    raise AssertionError(f"twin: {what} not reached after {simulated:.0f}s")
                self.target.advance(10)
                simulated += 10
            elif time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            else:
                time.sleep(1)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if not spec._spec_file().exists():
        pytest.skip(f"{spec.SPEC_PATH} not found")
    real = real_nomad()
    if real is not None:
        yield Target(
            address=real[0].rstrip("/"),
            token=real[1],
            cluster=None,
            # the Vagrant cluster's clients are in node pool gpu-l4, like the shipped jobs
            node_pool=os.environ.get(REAL_POOL_ENV, "gpu-l4") or None,
            datacenters=("*",),
        )
        return
    with twin_target(nodes=4) as t:
        yield t


def _running_allocs(api: Api, job_id: str) -> list[dict[str, Any]]:
    allocs = api.call("GET", f"/job/{seg(job_id)}/allocations").json() or []
    return [a for a in allocs if a["ClientStatus"] == "running"]


@pytest.fixture(scope="module")
def world(target: Target) -> Iterator[World]:
    api = Api(target)
    job_id = unique("contract-svc")
    parent_id = unique("contract-prefetch")
    kwargs: dict[str, Any] = {"datacenters": target.datacenters, "node_pool": target.node_pool}
    reg = api.call("POST", "/jobs", body={"Job": service_job(job_id, count=1, **kwargs)}).json()
    api.call("POST", "/jobs", body={"Job": prefetch_job(parent_id, **kwargs)})
    child = api.call(
        "POST", f"/job/{seg(parent_id)}/dispatch", body={"Meta": {"image": "busybox:1.36"}}
    ).json()["DispatchedJobID"]
    w = World(
        api=api,
        target=target,
        job_id=job_id,
        parent_id=parent_id,
        child_id=child,
        node_id="",
        alloc_id="",
        eval_id=reg["EvalID"],
    )
    w.wait_for("the probe job to run", lambda: len(_running_allocs(api, job_id)) >= 2)

    def settled() -> bool:
        dep = api.call("GET", f"/job/{seg(job_id)}/deployment").json()
        return not dep or dep["Status"] in ("successful", "failed", "cancelled")

    w.wait_for("the first deployment to finish", settled)
    alloc = _running_allocs(api, job_id)[0]
    w.alloc_id = alloc["ID"]
    w.node_id = alloc["NodeID"]
    try:
        yield w
    finally:
        for fn in w.cleanup:
            fn()
        for jid in (child, parent_id, job_id):
            api.call("DELETE", f"/job/{seg(jid)}", params={"purge": "true"}, ok=False)


@pytest.fixture
def twin_only(target: Target) -> None:
    if not target.is_twin:
        pytest.skip("needs the twin (fault injection / writes to nodes), not a real Nomad")
