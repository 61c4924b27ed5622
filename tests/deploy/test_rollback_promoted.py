"""A rollback after the first zone's canary was promoted: Nomad's auto-revert goes back to the
job version the rollout started from, whose update block (the job file's) asks for a canary,
so its deployment would wait for a promotion while the promoted canary keeps the new image
beside the old workers (hashicorp/nomad#10882). The rollback registers the previous image
without canaries instead: every worker back on it, no extra allocation, no deployment left
waiting, and the job's own update blocks back at the end. In one process (the SLI gate fails
with the zone's deployment paused between node steps or running) and when a rollback stopped
midway is finished by ``resume``."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from nomadscale.deploy.rollout import Rollout
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.prometheus import PrometheusClient
from tests.deploy.helpers import NEW, OLD, images_running, policy, setup_job
from tests.harness.promdata import Series

pytestmark = pytest.mark.prometheus

JOB_ID = ("default", "ml-worker")
SLI = {"error_rate_query": 'max(ekyc_error_ratio{image="{image}"})', "max_error_rate": 0.01}
# virtual seconds after the start (its prefetch takes 80 s): the canary of zone a is promoted at
# 115 s, the zone's deployment waits paused for the re-plan until 125 s, then runs its last
# replacement until the zone is done at 160 s. The errors start after the canary's gate; the
# gate after the promotion (120 s) or the next one (30 s later) sees them.
ERRORS_FROM = {"paused": 117.0, "running": 130.0}
# a rollback replaces one worker (min_healthy_time 30 s): never as long as a progress deadline
ROLLBACK_LIMIT_S = 180.0


class Killed(BaseException):
    """The process died here."""


def updates(nomad: NomadClient) -> dict[str, Any]:
    spec = nomad.get_job("ml-worker").spec
    return {tg["Name"]: tg["Update"] for tg in spec["TaskGroups"]}


def live_per_group(twin: Any) -> dict[str, int]:
    return dict(Counter(a.task_group for a in twin.cluster.job_allocs(JOB_ID) if a.live))


def rollback_s(st: Any) -> float:
    """Virtual seconds from the rollback's start (its first note) to the rollout's end."""
    started = next(n for n in st.log if " rolling back: " in n).split(" ", 1)[0]
    return (
        datetime.fromisoformat(st.finished_at) - datetime.fromisoformat(started)
    ).total_seconds()


def assert_rolled_back_cleanly(twin: Any, nomad: NomadClient, before: dict[str, Any]) -> None:
    """Every worker on the previous image, one per slot, the job's update blocks back, and no
    deployment waiting for a canary (nor, once the update blocks' in-place one passed its
    min_healthy_time, any active deployment)."""
    assert images_running(twin) == {OLD: 4}, images_running(twin)
    assert live_per_group(twin) == {"ml-worker-a": 2, "ml-worker-b": 2}, live_per_group(twin)
    assert updates(nomad) == before  # the job file's canary = 1 again
    dep = nomad.latest_deployment("ml-worker")
    assert dep is not None and not dep.needs_promotion, dep
    twin.advance(60)
    status = nomad.job_status("ml-worker")
    assert status.active_deployment is None, status.active_deployment
    assert images_running(twin) == {OLD: 4}, images_running(twin)
    assert live_per_group(twin) == {"ml-worker-a": 2, "ml-worker-b": 2}, live_per_group(twin)


@pytest.mark.parametrize("deployment", ["paused", "running"])
def test_an_sli_breach_after_the_canary_promotion_rolls_every_worker_back(
    twin: Any, prometheus_factory: Any, deployment: str
) -> None:
    nomad = setup_job(twin)
    before = updates(nomad)
    assert {u["Canary"] for u in before.values()} == {1}  # jobs/ml-worker.nomad.hcl
    twin.advance(600)
    t0 = twin.clock.now().timestamp()
    ts = np.arange(t0 - 600, t0 + 7200, 15.0)
    errors = np.where(ts < t0 + ERRORS_FROM[deployment], 0.0, 0.2)
    prom = prometheus_factory([Series("ekyc_error_ratio", {"image": NEW}, ts, errors)])
    seen: list[str] = []

    def watch(st: Any, info: dict[str, Any]) -> None:
        if st.status != "rolling-back" and "deployment" in info:
            seen.append(str(info["deployment"]))

    st = Rollout(policy=policy(sli=SLI), nomad=nomad, kv=MemoryKV(clock=twin.clock),
                 clock=twin.clock, prometheus=PrometheusClient(url=prom.url), reporter=watch,
                 watch_wait_s=0).start(NEW)  # fmt: skip
    assert st.status == "rolled_back" and "SLI gate" in st.reason, (st.status, st.reason)
    # really after the promotion, in the first zone, with the zone's deployment as asked
    assert any("promoted" in n for n in st.log) and st.zones_done == [], st.log
    assert seen and seen[-1] == deployment, seen
    assert rollback_s(st) < ROLLBACK_LIMIT_S, st.log  # no wait for a canary
    assert_rolled_back_cleanly(twin, nomad, before)


def test_a_rollback_after_the_promotion_stopped_midway_is_finished_by_resume(
    twin: Any, prometheus_factory: Any
) -> None:
    """The process died right after failing the zone's deployment (Nomad's auto-revert left a
    deployment waiting for a canary): ``resume`` finishes the rollback without it."""
    nomad = setup_job(twin)
    before = updates(nomad)
    twin.advance(600)
    t0 = twin.clock.now().timestamp()
    ts = np.arange(t0 - 600, t0 + 7200, 15.0)
    errors = np.where(ts < t0 + ERRORS_FROM["paused"], 0.0, 0.2)
    prom = prometheus_factory([Series("ekyc_error_ratio", {"image": NEW}, ts, errors)])
    kv = MemoryKV(clock=twin.clock)

    class Dying(NomadClient):
        def fail_deployment(self, deployment_id: str) -> str:
            super().fail_deployment(deployment_id)
            raise Killed

    def make(client: NomadClient) -> Rollout:
        return Rollout(policy=policy(sli=SLI), nomad=client, kv=kv, clock=twin.clock,
                       prometheus=PrometheusClient(url=prom.url), watch_wait_s=0)  # fmt: skip

    with pytest.raises(Killed):
        make(Dying(address=twin.address, clock=twin.clock)).start(NEW)
    twin.advance(120)
    dep = nomad.latest_deployment("ml-worker")
    assert dep is not None and dep.needs_promotion, dep  # Nomad's revert waits for a canary
    resumed = twin.clock.now()
    st = make(nomad).resume()
    assert st is not None and st.status == "rolled_back" and "SLI gate" in st.reason, st
    took = (datetime.fromisoformat(st.finished_at) - resumed).total_seconds()
    assert took < ROLLBACK_LIMIT_S, st.log  # no wait for a canary, nor its progress deadline
    assert_rolled_back_cleanly(twin, nomad, before)
