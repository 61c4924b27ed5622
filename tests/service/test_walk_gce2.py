"""The running service against a rollout and a cloud that cannot fill a zone: an apply-now that
meets a golden-image rollout lands when the rollout ends, not at the first scheduled cycle
after it (``service.kicks``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.harness.twin import TwinFactory
from tests.service.helpers import constant, make_policy


def _wait(what: str, ok: Callable[[], Any], within: float) -> None:
    deadline = time.monotonic() + within
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_an_apply_now_that_met_a_rollout_applies_once_the_rollout_ended(
    twin_factory: TwinFactory,
) -> None:
    """``nomadscale scale ekyc --count 6 --now`` while ``deploy start`` rolls an image: the
    kicked cycle skips (``deploy-rollout``); the leader tries the kick again, so the count
    lands seconds after the rollout ends instead of at the next cycle (up to 20 min later:
    here the schedule is an hour away)."""
    clock = SystemClock()
    twin = twin_factory(nodes=8, clock=clock, node_pool="default", images=("i",))
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address)
    nomad.register_job(worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i",
                                  update={"MaxParallel": 0}))  # fmt: skip
    kv = MemoryKV(clock=clock)
    lock = MemoryLock(kv=kv, key="ns/leader", ttl_s=10, lock_delay_s=0)
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: constant(120.0))
    svc = Service(settings=Settings(kv_prefix="ns", lock_ttl_s=10), policies=[policy],
                  ports=ports, clock=clock, renew_s=0.3, every_s=3600, poll_s=0.2,
                  check=False)  # fmt: skip
    svc.kick_retries.every_s = 0.5
    svc.kick_retries.rollout_every_s = 0.5
    rollout_key = svc.control.deploy_key("ekyc")

    def desired() -> dict[str, int]:
        st = nomad.job_status("ml-worker", namespace="ekyc")
        return {g: s.desired for g, s in st.groups.items()}

    svc.start()
    try:
        _wait("leadership", lambda: svc.leader, 5)
        kv.put(rollout_key, json.dumps({"status": "rolling", "image": "img:2"}).encode())
        now = clock.now()
        svc.control.set_override("ekyc", kind="fixed", value=6, reason="t", who="t", now=now,
                                 duration=timedelta(hours=1))  # fmt: skip
        svc.control.request_kick("ekyc", reason="scale to 6", now=now, who="t")
        _wait("the kicked cycle", lambda: any(
            r.skipped == "deploy-rollout" for r in svc.recorder.recent), 10)  # fmt: skip
        assert desired() == {"ml-worker-a": 1, "ml-worker-b": 1}  # nothing during the rollout
        time.sleep(1.0)  # a retry or two, still inside the rollout
        assert desired() == {"ml-worker-a": 1, "ml-worker-b": 1}
        kv.put(rollout_key, json.dumps({"status": "completed", "image": "img:2"}).encode())
        _wait("the kick after the rollout", lambda: desired() == {"ml-worker-a": 3,
                                                                 "ml-worker-b": 3}, 10)  # fmt: skip
        # Nomad has the counts a moment before the cycle stores its record
        _wait("the applied record", lambda: any(
            r.outcome == "applied" for r in svc.recorder.recent), 10)  # fmt: skip
        applied = [r for r in svc.recorder.recent if r.outcome == "applied"]
        assert applied and applied[-1].trigger == "apply-now", applied
        _wait("the kick to be done", lambda: svc.kick_retries.waiting("ekyc") is None, 5)
        # the retries are logged, but only the first skip is stored: a rollout's hour of
        # retries (one a minute) would push the useful history (100 records) out of KV
        # (the takeover cycle at start may meet the rollout too: count the kick's only)
        tries = [r for r in svc.recorder.recent
                 if r.skipped == "deploy-rollout" and r.trigger == "apply-now"]  # fmt: skip
        stored = [d for d in svc.recorder.history("ekyc", limit=100)
                  if d.get("skipped") == "deploy-rollout" and d.get("trigger") == "apply-now"]  # fmt: skip
        assert len(tries) >= 2 and len(stored) == 1, (len(tries), len(stored))
    finally:
        svc.stop(timeout_s=5)
