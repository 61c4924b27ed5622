"""The second walk-through of rollouts: the job's own update blocks after a rollout, node
pools per zone in the prefetch, a zone Nomad auto-reverted while no nomadscale followed it,
a rollout of the image the job already runs, and what the commands print and answer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from nomadscale.config.policy import Policy
from nomadscale.core.errors import ConflictError
from nomadscale.deploy.progress import LiveProgress
from nomadscale.deploy.rollout import NothingToDo, Rollout
from nomadscale.deploy.state import RolloutState, StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.sim.speed import ScaledClock
from tests.deploy.helpers import NEW, OLD, ROOT, TRACE, images_running, policy, setup_job
from tests.deploy.test_walk_deploy import OutageAfterZoneRegister, cli, one_line, policy_file

JOB_ID = ("default", "ml-worker")


def make(twin: Any, nomad: Any, kv: Any = None, **kw: Any) -> Rollout:
    kw.setdefault("policy", policy())
    return Rollout(nomad=nomad, kv=kv or MemoryKV(clock=twin.clock), clock=twin.clock,
                   watch_wait_s=0, **kw)  # fmt: skip


def live_allocs(twin: Any) -> set[str]:
    return {a.id for a in twin.cluster.job_allocs(JOB_ID) if a.live}


class RecordingClient(NomadClient):
    """The real client; keeps the job's live allocations right before each registration of
    ml-worker (``before``, the last one at the end) and the specs registered."""

    def __init__(self, twin: Any) -> None:
        super().__init__(address=twin.address, clock=twin.clock)
        self.twin = twin
        self.before: list[set[str]] = []
        self.specs: list[dict[str, Any]] = []

    def register_job(self, job: Any, **kw: Any) -> Any:
        if job.get("ID") == "ml-worker":
            self.before.append(live_allocs(self.twin))
            self.specs.append(dict(job))
        return super().register_job(job, **kw)


def updates(nomad: NomadClient) -> dict[str, Any]:
    spec = nomad.get_job("ml-worker").spec
    return {tg["Name"]: tg["Update"] for tg in spec["TaskGroups"]}


# --- 1. the job's own update blocks after a rollout -----------------------------------------


def test_a_completed_rollout_gives_the_job_its_update_blocks_back(twin: Any) -> None:
    setup_job(twin)
    nomad = RecordingClient(twin)
    before = updates(nomad)
    assert {u["Canary"] for u in before.values()} == {1}  # jobs/ml-worker.nomad.hcl
    st = make(twin, nomad).start(NEW)
    assert st.status == "completed", st.reason
    assert updates(nomad) == before
    # that last registration changed update blocks only: Nomad replaced no allocation
    twin.advance(600)
    assert live_allocs(twin) == nomad.before[-1]
    assert images_running(twin) == {NEW: 4}
    # the next change made through Nomad directly canaries, as the job file says
    spec = dict(nomad.get_job("ml-worker").spec)
    for tg in spec["TaskGroups"]:
        tg["Tasks"][0]["Config"]["image"] = OLD
    nomad.register_job(spec)
    twin.advance(60)
    dep = nomad.latest_deployment("ml-worker")
    assert dep is not None and {g.desired_canaries for g in dep.groups.values()} == {1}


def test_a_rolled_back_rollout_gives_the_job_its_update_blocks_back(twin: Any) -> None:
    setup_job(twin)
    nomad = RecordingClient(twin)
    before = updates(nomad)

    def zone_b_fails(st: Any, info: dict[str, Any]) -> None:
        # zone A done: Nomad's auto-revert of zone B goes back to zone A's version (the
        # rollout's update blocks), and the rollback registers the previous image itself
        if "ml-worker-a" in st.zones_done and not twin.cluster.faults.image_is_bad(NEW):
            twin.cluster.faults.unhealthy_image(NEW)

    st = make(twin, nomad, reporter=zone_b_fails).start(NEW, prefetch=False)
    assert st.status == "rolled_back", st.reason
    assert updates(nomad) == before
    twin.advance(600)
    assert live_allocs(twin) == nomad.before[-1]
    assert images_running(twin) == {OLD: 4}


# --- 4. zones in different node pools ---------------------------------------------------------


def two_pools(twin: Any) -> None:
    """zone-b's nodes in pool gpu-b (zone-a's stay in gpu); the job in the ``all`` pool."""
    with twin.cluster.lock:
        for node in twin.cluster.nodes.values():
            if node.datacenter == "zone-b":
                node.node_pool = "gpu-b"


def pools_policy() -> Policy:
    return Policy.model_validate(
        {
            "name": "ekyc-ml",
            "demand": {"source": "trace", "trace": TRACE, "step": "10m"},
            "capacity": {"rpm_per_worker": 240.0},
            "bounds": {"min": 1, "max": 40},
            "zones": {"list": [
                {"name": "zone-a", "group": "ml-worker-a", "node_pool": "gpu"},
                {"name": "zone-b", "group": "ml-worker-b", "node_pool": "gpu-b"},
            ]},
            "target": {"job": "ml-worker", "namespace": "default"},
            "deploy": {"image": NEW, "image_size": "7GB", "prefetch_job": "image-prefetch",
                       "prefetch_retries": 0, "on_prefetch_failure": "block", "canary": 1,
                       "min_healthy_time": "30s", "healthy_deadline": "5m",
                       "progress_deadline": "10m"},
        }
    )  # fmt: skip


def setup_pools_job(twin: Any) -> NomadClient:
    """jobs/ml-worker.nomad.hcl, 2 per zone, in the ``all`` pool (a job has one node pool;
    its groups reach their zone's pool through their datacenter constraint)."""
    two_pools(twin)
    nomad = NomadClient(address=twin.address, clock=twin.clock)
    spec = nomad.parse_hcl((ROOT / "jobs" / "ml-worker.nomad.hcl").read_text())
    spec["Namespace"], spec["NodePool"] = "default", "all"
    for tg in spec["TaskGroups"]:
        tg["Count"] = 2
    nomad.register_job(spec)
    twin.advance(300)
    assert images_running(twin) == {OLD: 4}
    return nomad


def test_the_prefetch_covers_every_zone_node_pool(twin: Any) -> None:
    nomad = setup_pools_job(twin)
    st = make(twin, nomad, policy=pools_policy()).start(NEW)
    assert st.status == "completed", st.reason
    assert sorted(st.prefetch["ok"]) == sorted(twin.cluster.nodes)
    assert images_running(twin) == {NEW: 4}


def test_the_prefetch_job_of_one_pool_is_registered_again_for_every_pool(twin: Any) -> None:
    """A prefetch job registered for the first zone's pool only (an earlier nomadscale)."""
    nomad = setup_pools_job(twin)
    from nomadscale.deploy.prefetch import ensure_prefetch_job

    ensure_prefetch_job(nomad, job_id="image-prefetch", namespace="default", node_pool="gpu")
    assert nomad.get_job("image-prefetch").spec["NodePool"] == "gpu"
    st = make(twin, nomad, policy=pools_policy()).start(NEW)
    assert st.status == "completed", st.reason
    assert sorted(st.prefetch["ok"]) == sorted(twin.cluster.nodes)


@pytest.mark.consul
def test_the_prefetch_command_pulls_on_every_zone_node_pool(
    twin_factory: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    twin = twin_factory(clock=ScaledClock(300))
    two_pools(twin)
    f = policy_file(tmp_path)
    f.write_text(f.read_text().replace("group: ml-worker-b, node_pool: gpu",
                                       "group: ml-worker-b, node_pool: gpu-b"))  # fmt: skip
    res = cli(twin, consul_agent, consul_prefix, tmp_path, "prefetch", str(f), "--image", NEW)
    assert res.exit_code == 0, res.output
    assert f"prefetched {NEW} on 6/6 nodes" in res.output


# --- 5. a zone Nomad auto-reverted while no nomadscale followed it ---------------------------


def test_resume_after_nomad_auto_reverted_the_zone_rolls_back(twin: Any) -> None:
    """The rollout registered zone A's version and stopped (Nomad unreachable) before it
    recorded the deployment; the canary turned unhealthy and Nomad failed the deployment
    and auto-reverted the job meanwhile. ``resume`` rolls back: it does not register the
    image again (which would canary it once more)."""
    setup_job(twin)
    kv = MemoryKV(clock=twin.clock)
    twin.cluster.faults.unhealthy_image(NEW)
    outage = OutageAfterZoneRegister(twin)
    st = make(twin, outage, kv, outage_limit_s=60).start(NEW, prefetch=False)
    assert st.status == "paused" and st.deployment_id is None, st.log
    twin.advance(1800)  # the progress deadline passes: failed, auto-reverted
    twin.cluster.faults.clear()  # Nomad reachable again (and the image would be healthy now)
    nomad = RecordingClient(twin)
    spec = nomad.get_job("ml-worker").spec
    assert {t["Config"]["image"] for tg in spec["TaskGroups"] for t in tg["Tasks"]} == {OLD}
    assert nomad.latest_deployment("ml-worker") is not None
    st2 = make(twin, nomad, kv).resume()
    assert st2 is not None and st2.status == "rolled_back", st2 and st2.log
    assert "reverted" in st2.reason
    assert all(
        t["Config"]["image"] != NEW for s in nomad.specs for tg in s["TaskGroups"]
        for t in tg["Tasks"]
    )  # fmt: skip
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}


def test_resume_of_a_recorded_deployment_nomad_failed_rolls_back(twin: Any) -> None:
    setup_job(twin)
    kv = MemoryKV(clock=twin.clock)
    twin.cluster.faults.unhealthy_image(NEW)

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if st.deployment_id:
            raise Crash

    with pytest.raises(Crash):
        make(twin, NomadClient(address=twin.address, clock=twin.clock), kv,
             reporter=crash).start(NEW, prefetch=False)  # fmt: skip
    twin.advance(1800)
    twin.cluster.faults.clear()
    st = make(twin, NomadClient(address=twin.address, clock=twin.clock), kv).resume()
    assert st is not None and st.status == "rolled_back", st and st.log
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}


def test_a_rollback_stopped_midway_is_finished_by_resume(twin: Any) -> None:
    """A record left in rolling-back (the process died during the rollback) is rolled back
    by ``resume``, never rolled forward."""
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)
    twin.cluster.faults.unhealthy_image(NEW)

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if st.status == "rolling-back":
            raise Crash

    with pytest.raises(Crash):
        make(twin, nomad, kv, reporter=crash).start(NEW, prefetch=False)
    twin.cluster.faults.clear()
    st = make(twin, nomad, kv).resume()
    assert st is not None and st.status == "rolled_back", st and st.log
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}


# --- 6. messages and answers ------------------------------------------------------------------


def test_the_conflict_message_names_the_phase(twin: Any) -> None:
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)
    store = StateStore(kv)
    store.create(RolloutState(policy="ekyc-ml", image=NEW, job_id="ml-worker",
                              namespace="default", status="prefetch"))  # fmt: skip
    with pytest.raises(ConflictError, match="is in its prefetch phase;"):
        make(twin, nomad, kv).start(NEW)


def test_a_rollout_of_the_image_the_job_runs_has_nothing_to_do(twin: Any) -> None:
    setup_job(twin)
    nomad = RecordingClient(twin)
    kv = MemoryKV(clock=twin.clock)
    version = nomad.get_job("ml-worker").version
    with pytest.raises(NothingToDo, match="nothing to do"):
        make(twin, nomad, kv).start(OLD)
    assert nomad.specs == [] and nomad.get_job("ml-worker").version == version
    assert StateStore(kv).load("ekyc-ml")[0] is None


@pytest.mark.consul
def test_the_commands_answer_nothing_to_do_and_unknown_policies(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    setup_job(twin)
    f = policy_file(tmp_path)
    same = cli(twin, consul_agent, consul_prefix, tmp_path,
               "deploy", "start", str(f), "--image", OLD, "--yes")  # fmt: skip
    assert same.exit_code == 0, same.output
    assert "nothing to do" in one_line(same)
    assert (
        StateStore(ConsulKV(addr=consul_agent.addr), prefix=consul_prefix).load("ekyc-ml")[0]
        is None
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    policy_file(policies)
    unknown = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "status", "NOSUCH",
                  NOMADSCALE_POLICIES=str(policies))  # fmt: skip
    assert unknown.exit_code == 2, unknown.output
    assert "NOSUCH" in one_line(unknown)


def test_a_dry_run_plans_without_consul(twin: Any, tmp_path: Path) -> None:
    setup_job(twin)
    f = policy_file(tmp_path)

    class NoConsul:
        addr, token = "", ""

    res = cli(twin, NoConsul(), "nomadscale", tmp_path,
              "deploy", "start", str(f), "--image", NEW, "--dry-run")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "no surge" in out and "not checked" in out


# --- 2. the final table, once ------------------------------------------------------------------


def test_the_live_table_is_not_left_on_screen() -> None:
    """In a terminal the live table goes when the rollout ends: the command prints the final
    record itself (once, on stdout)."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    st = RolloutState(policy="ekyc-ml", image=NEW, job_id="ml-worker", namespace="default",
                      status="completed")  # fmt: skip
    with LiveProgress(console) as live:
        live(st, {})
    out = buf.getvalue()
    last_erase = out.rfind("\x1b[2K")
    assert last_erase >= 0 and "completed" not in out[last_erase:], repr(out[-300:])
