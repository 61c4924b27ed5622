"""The surge release when another count change just started a deployment (twin over HTTP,
virtual time): Nomad refuses the Scale API while any deployment of the job is active, and
every count change starts one (a runbook's surge in the other zone, here, right after zone a's
deployment succeeded). The rollout waits for it, then releases its surge worker."""

from __future__ import annotations

from typing import Any

from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import RolloutState
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from tests.deploy.helpers import (
    CALM,
    NEW,
    TRACE,
    images_running,
    policy,
    sampling_twin,
    setup_job,
    surge_rpm,
)


def test_surge_release_waits_for_a_deployment_started_meanwhile(twin_factory: Any) -> None:
    twin, _clock = sampling_twin(twin_factory, nodes=10, start=CALM)
    nomad = setup_job(twin, count=3)
    rpm, _upper = surge_rpm(twin, 5.5, fleet=6)  # 6 of 6 needed: a surge worker per zone
    other: dict[str, Any] = {}

    def runbook_surge(st: RolloutState, info: dict[str, Any]) -> None:
        """A runbook surges zone b the moment zone a's deployment is successful."""
        if info.get("deployment") == "successful" and not other:
            other["at"] = twin.clock.now()
            nomad.scale("ml-worker", "ml-worker-b", 4, message="runbook surge")
            other["deployment"] = nomad.job_status("ml-worker").active_deployment

    r = Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=MemoryKV(clock=twin.clock),
                clock=twin.clock, demand=TraceDemandSource(TRACE), watch_wait_s=0, poll_s=5.0,
                reporter=runbook_surge)  # fmt: skip
    st = r.start(NEW)

    assert st.status == "completed", st.reason
    assert other["deployment"] is not None
    assert "surge released: ml-worker-a -> 3" in " ".join(st.log)
    release = next(e for e in twin.cluster.events
                   if e["type"] == "scale" and e["group"] == "ml-worker-a")  # fmt: skip
    done = next(e for e in twin.cluster.events if e["type"] == "deployment"
                and e["deployment_id"] == other["deployment"] and e["status"] == "successful")  # fmt: skip
    assert other["at"] < done["time"] <= release["time"]  # waited for it, did not cut it short
    status = nomad.job_status("ml-worker")
    assert {g: s.desired for g, s in status.groups.items()} == {
        "ml-worker-a": 3, "ml-worker-b": 4,
    }  # fmt: skip
    assert images_running(twin) == {NEW: 7}
