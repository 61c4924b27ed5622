"""Rollouts against the Nomad twin over HTTP (virtual time), KV in memory or real Consul."""

from __future__ import annotations

from typing import Any

import pytest

from nomadscale.core.errors import ConflictError, SafetyError, UsageError
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.memkv import MemoryKV
from tests.deploy.helpers import NEW, OLD, images_running, policy, setup_job


def make(twin: Any, nomad: Any, kv: Any = None, **kw: Any) -> Rollout:
    kw.setdefault("policy", policy())
    return Rollout(nomad=nomad, kv=kv or MemoryKV(clock=twin.clock), clock=twin.clock,
                   watch_wait_s=0, poll_s=5.0, **kw)  # fmt: skip


def test_rollout_completes_with_prefetch(twin: Any) -> None:
    nomad = setup_job(twin)
    r = make(twin, nomad)
    st = r.start(NEW)
    assert st.status == "completed", st.reason
    assert images_running(twin) == {NEW: 4}
    assert st.zones_done == ["ml-worker-a", "ml-worker-b"]
    assert sorted(st.prefetch["ok"]) == sorted(twin.cluster.nodes)
    assert r.store.golden_image("ekyc-ml") == NEW
    assert r.status() is not None and not r.status().active  # type: ignore[union-attr]


def test_bad_image_reference_is_refused(twin: Any) -> None:
    nomad = setup_job(twin)
    with pytest.raises(UsageError, match="--image"):
        make(twin, nomad).start("not an image")


def test_second_rollout_refused_while_one_runs(twin: Any) -> None:
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if st.status == "rolling" and info.get("healthy", 0) >= 1:
            raise Crash

    with pytest.raises(Crash):
        make(twin, nomad, kv, reporter=crash).start(NEW)
    with pytest.raises(ConflictError, match="resume"):
        make(twin, nomad, kv).start(NEW)
    st = make(twin, nomad, kv).resume()
    assert st is not None and st.status == "completed", st and st.reason
    assert images_running(twin) == {NEW: 4}


def test_prefetch_failure_blocks(twin: Any) -> None:
    nomad = setup_job(twin)
    bad = next(iter(twin.cluster.nodes))
    twin.cluster.faults.pull_fails(bad, NEW)
    st = make(twin, nomad).start(NEW)
    assert st.status == "aborted"
    assert bad in st.prefetch["failed"]
    assert images_running(twin) == {OLD: 4}


def test_prefetch_failure_makes_node_ineligible(twin: Any) -> None:
    nomad = setup_job(twin)
    bad = next(iter(twin.cluster.nodes))
    twin.cluster.faults.pull_fails(bad, NEW)
    st = make(twin, nomad, policy=policy(on_fail="ineligible")).start(NEW)
    assert st.status == "completed", st.reason
    assert st.prefetch["ineligible"] == [bad]
    assert twin.cluster.nodes[bad].eligibility == "ineligible"
    assert images_running(twin) == {NEW: 4}


def test_unhealthy_canary_rolls_back(twin: Any) -> None:
    nomad = setup_job(twin)
    twin.cluster.faults.unhealthy_image(NEW)
    st = make(twin, nomad).start(NEW, prefetch=False)
    assert st.status == "rolled_back"
    assert "unhealthy" in st.reason
    assert images_running(twin) == {OLD: 4}


def test_refused_when_no_surge_room(twin: Any) -> None:
    nomad = setup_job(twin, count=3)  # 6 nodes, 6 workers: no free node for the canary
    with pytest.raises(SafetyError, match="free"):
        make(twin, nomad).start(NEW)
    assert StateStore(MemoryKV()).load("ekyc-ml")[0] is None
