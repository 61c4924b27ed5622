"""nomadscale killed mid-deployment and mid-runbook: a fresh object on the same (real Consul)
KV resumes to a known end state, without repeating what was already done."""

from __future__ import annotations

from typing import Any

import pytest

from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.service.control import Control
from tests.chaos.conftest import Record
from tests.deploy.helpers import NEW, images_running, policy, setup_job
from tests.harness.services import ConsulAgent
from tests.healing.conftest import ZONES, rig_factory  # noqa: F401  (fixture)
from tests.healing.test_e2e import play_host_maintenance

pytestmark = [pytest.mark.consul]


class Killed(BaseException):
    """The process died here (nothing after this point runs in the dying object)."""


@pytest.mark.parametrize("at", ["zone 1 rolling", "zone 2 rolling"])
def test_deploy_killed_mid_rollout_resumes(
    at: str, twin: Any, consul_agent: ConsulAgent, consul_prefix: str, fault_table: Record
) -> None:
    nomad = setup_job(twin)
    kv = ConsulKV(addr=consul_agent.addr)
    prefix = consul_prefix + "nomadscale"
    zone = 0 if at.startswith("zone 1") else 1

    def die(st: Any, info: dict[str, Any]) -> None:
        if st.status == "rolling" and len(st.zones_done) == zone and info.get("healthy", 0) >= 1:
            raise Killed

    with pytest.raises(Killed):
        Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                reporter=die, watch_wait_s=0).start(NEW)  # fmt: skip
    mid = images_running(twin)
    stored = StateStore(kv, prefix=prefix).load("ekyc-ml")[0]
    assert stored is not None and stored.status == "rolling"  # really half-way
    assert len(stored.zones_done) == zone and mid.get(NEW, 0) >= 1, mid
    assert Control(kv, prefix=prefix).deploy_active("ekyc-ml") is not None  # autoscaler holds
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                 watch_wait_s=0).resume()  # fmt: skip
    assert st is not None and st.status == "completed", st and st.reason
    assert images_running(twin) == {NEW: 4}
    assert st.zones_done == ["ml-worker-a", "ml-worker-b"]
    assert StateStore(kv, prefix=prefix).golden_image("ekyc-ml") == NEW
    assert Control(kv, prefix=prefix).deploy_active("ekyc-ml") is None
    fault_table(
        f"killed mid-deployment ({at})",
        "fresh Rollout on the same KV resumes to completed",
        f"images { {k.rsplit(':', 1)[1]: v for k, v in mid.items()} } at the kill -> "
        f"completed, {NEW.rsplit(':', 1)[1]} x4, autoscaler hold released",
    )


def test_runbook_killed_mid_run_resumes(
    rig_factory: Any,  # noqa: F811
    consul_agent: ConsulAgent,
    consul_prefix: str,
    fault_table: Record,
) -> None:
    kv = ConsulKV(addr=consul_agent.addr)
    prefix = consul_prefix.rstrip("/")
    rig = rig_factory(kv=kv, prefix=prefix)
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    first = rig.engine
    run = first.submit("gpu-host-maintenance", {"node": node.id})
    first.run(run["id"], max_calls=4)  # notify, ineligible, surge, ... then the process dies
    saved = first.get_run(run["id"])
    assert saved is not None and saved["status"] == "running"
    done_before = [r["action"] for r in saved["results"]]
    second = rig.make_engine()  # a fresh process on the same Consul KV
    rig.engine = second
    assert second.resume_all() == [run["id"]]
    second.start(workers=1)
    try:
        play_host_maintenance(rig, node.id, run["id"])
        done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    finally:
        second.stop()
    assert done["status"] == "succeeded", done.get("error")
    actions = [r["action"] for r in done["results"]]
    assert all(actions.count(a) == 1 for a in ("surge", "mark_ineligible")), actions
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2
    assert kv.get(f"{prefix}/runbooks/locks/zone/{ZONES[0]}") is None
    fault_table(
        "killed mid-runbook (after 4 steps)",
        "fresh engine on the same KV resumes; no step repeated",
        f"resumed after {', '.join(done_before)}; succeeded; surge undone; zone lock released",
    )
