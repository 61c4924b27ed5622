"""The third walk-through of rollouts, as on-call meets them next to the rest of the product:
the deployment that giving the job its update blocks back starts (the rollout ends after it),
the autoscaler's cycles during and after a rollout, ``deploy status`` through a rollout's
life (also after a crash and a resume), two operators starting one at once, and the
arguments an operator gets wrong. The twin over HTTP, real Consul where state is shared."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from nomadscale.config.policy import load_policy
from nomadscale.config.settings import Settings
from nomadscale.core.errors import ConflictError, DeploymentActiveError
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV, LockHolder
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from tests.deploy.helpers import (
    CALM,
    NEW,
    OLD,
    TRACE,
    RecordingAlerts,
    images_running,
    policy,
    sampling_twin,
    setup_job,
    surge_rpm,
)
from tests.deploy.test_walk_deploy import cli, one_line, policy_file

JOB_ID = ("default", "ml-worker")


def make(twin: Any, nomad: Any, kv: Any = None, **kw: Any) -> Rollout:
    kw.setdefault("policy", policy())
    return Rollout(nomad=nomad, kv=kv or MemoryKV(clock=twin.clock), clock=twin.clock,
                   watch_wait_s=0, **kw)  # fmt: skip


def update_blocks(nomad: Any) -> dict[str, Any]:
    spec = nomad.get_job("ml-worker").spec
    return {tg["Name"]: tg["Update"] for tg in spec["TaskGroups"]}


# --- 1. the deployment that giving the update blocks back starts ---------------------------


def test_a_completed_rollout_leaves_the_job_without_a_running_deployment(twin: Any) -> None:
    """Giving the update blocks back starts a short deployment (in place, min_healthy_time):
    the rollout used to say "completed" while it ran, so the autoscaler's next cycle skipped
    and an operator's ``scale --now`` right after met it (the Scale API refuses meanwhile)."""
    nomad = setup_job(twin)
    before = update_blocks(nomad)
    st = make(twin, nomad).start(NEW)
    assert st.status == "completed", st.reason
    assert update_blocks(nomad) == before
    assert nomad.job_status("ml-worker").active_deployment is None
    dep = nomad.latest_deployment("ml-worker")
    assert dep is not None and dep.status == "successful"
    assert dep.job_version == nomad.get_job("ml-worker").version  # the blocks' own one
    assert any("of the job's own update blocks successful" in line for line in st.log)
    # what `scale --now` (and the autoscaler's next cycle) does at once: accepted
    nomad.scale("ml-worker", "ml-worker-a", 3, message="operator")
    assert nomad.job_status("ml-worker").groups["ml-worker-a"].desired == 3


def test_an_aborted_rollout_leaves_the_job_without_a_running_deployment(twin: Any) -> None:
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)

    def abort_in_zone_b(st: Any, info: dict[str, Any]) -> None:
        if st.zones_done == ["ml-worker-a"] and info.get("healthy", 0) >= 1:
            raise KeyboardInterrupt  # the operator's Ctrl-C; `deploy abort` follows

    with pytest.raises(KeyboardInterrupt):
        make(twin, nomad, kv, reporter=abort_in_zone_b).start(NEW, prefetch=False)
    st = make(twin, nomad, kv).abort()
    assert st is not None and st.status == "aborted", st and st.reason
    twin.advance(0)
    assert images_running(twin) == {OLD: 4}
    assert nomad.job_status("ml-worker").active_deployment is None
    nomad.scale("ml-worker", "ml-worker-b", 3, message="operator")


def test_a_failed_update_block_deployment_pauses_the_rollout_and_resume_finishes(
    twin: Any,
) -> None:
    """A worker that turns unhealthy while Nomad watches it again fails that deployment: the
    rollout does not report completed over it, it pauses, alerts, says why; resume finishes
    once the workers are healthy again."""
    nomad = setup_job(twin)
    kv = MemoryKV(clock=twin.clock)
    alerts = RecordingAlerts()

    def sick_after_the_last_zone(st: Any, info: dict[str, Any]) -> None:
        if len(st.zones_done) == 2 and not twin.cluster.faults.image_is_bad(NEW):
            twin.cluster.faults.unhealthy_image(NEW)

    st = make(twin, nomad, kv, alerts=alerts, reporter=sick_after_the_last_zone).start(NEW)
    assert st.status == "paused", st.reason
    assert "of the job's own update blocks failed" in st.reason
    assert "'deploy resume'" in st.reason
    assert alerts.sent and alerts.sent[-1]["severity"] == "warning"
    assert st.reason in alerts.sent[-1]["summary"]
    twin.cluster.faults.clear()
    twin.advance(600)  # the workers recover; Nomad's auto-revert deployment ends
    again = make(twin, nomad, kv).resume()
    assert again is not None and again.status == "completed", again and again.reason
    assert nomad.job_status("ml-worker").active_deployment is None
    assert {u["Canary"] for u in update_blocks(nomad).values()} == {1}  # the job file's


def test_an_update_block_deployment_that_never_ends_pauses_the_rollout(twin: Any) -> None:
    """Bounded by the blocks' progress deadline, on the rollout's clock: an operator who
    paused that deployment in Nomad gets a paused rollout that says so, not a hang."""
    nomad = setup_job(twin)

    def pause_it(st: Any, info: dict[str, Any]) -> None:
        note = str(info.get("note") or "")
        if note.startswith("waiting for deployment") and "update blocks" in note:
            dep = nomad.latest_deployment("ml-worker")
            if dep is not None and dep.status == "running":
                nomad.pause_deployment(dep.id, pause=True)

    t0 = twin.clock.now()
    st = make(twin, nomad, reporter=pause_it).start(NEW)
    assert st.status == "paused", st.reason
    assert "of the job's own update blocks still paused after" in st.reason
    waited = (twin.clock.now() - t0).total_seconds()
    assert waited < 20 * 60 + 600  # the job file's progress deadline, plus the rollout


def test_the_scale_api_refusal_is_what_the_wait_avoids(twin: Any) -> None:
    """The twin refuses a scale while a deployment runs, as Nomad does: the symptom above."""
    nomad = setup_job(twin)
    spec = dict(nomad.get_job("ml-worker").spec)
    for tg in spec["TaskGroups"]:
        tg["Update"] = {**tg["Update"], "Canary": 0}
    nomad.register_job(spec)  # update blocks only: in place, and a deployment
    assert nomad.job_status("ml-worker").active_deployment is not None
    with pytest.raises(DeploymentActiveError):
        nomad.scale("ml-worker", "ml-worker-a", 3, message="operator")


# --- 2. the autoscaler's counts across a rollout -------------------------------------------


def _surge_rollout(twin_factory: Any, **kw: Any) -> tuple[Any, Any, Rollout]:
    """10 nodes in virtual time at a calm hour of the trace, 3 workers per zone, demand that
    needs all 6: a surge worker in each zone while it rolls."""
    twin, _clock = sampling_twin(twin_factory, nodes=10, start=CALM)
    nomad = setup_job(twin, count=3)
    rpm, _upper = surge_rpm(twin, 5.5, fleet=6)
    r = Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, kv=kw.pop("kv", None)
                or MemoryKV(clock=twin.clock), clock=twin.clock, demand=TraceDemandSource(TRACE),
                watch_wait_s=0, poll_s=5.0, **kw)  # fmt: skip
    return twin, nomad, r


def _zone_b_fails(twin: Any) -> Any:
    def report(st: Any, info: dict[str, Any]) -> None:
        if "ml-worker-a" in st.zones_done and not twin.cluster.faults.image_is_bad(NEW):
            twin.cluster.faults.unhealthy_image(NEW)

    return report


def desired(nomad: Any) -> dict[str, int]:
    return {g: s.desired for g, s in nomad.job_status("ml-worker").groups.items()}


def test_a_rollback_in_the_second_zone_leaves_no_surge_worker_in_the_first(
    twin_factory: Any,
) -> None:
    """Zone a's surge worker was released by the Scale API, and zone b's version registered
    at once, cancelling that count change's deployment: the release version never became
    stable, so Nomad's auto-revert of zone b went back to zone a's version, surge included,
    and the rolled-back fleet kept an extra GPU worker nobody released."""
    twin, nomad, r = _surge_rollout(twin_factory)
    r.reporter = _zone_b_fails(twin)
    st = r.start(NEW)
    assert st.status == "rolled_back", st.reason
    twin.cluster.faults.clear()
    twin.advance(600)
    assert desired(nomad) == {"ml-worker-a": 3, "ml-worker-b": 3}
    assert images_running(twin) == {OLD: 6}


def test_a_rollout_started_during_a_scale_change_keeps_that_count_through_a_rollback(
    twin_factory: Any,
) -> None:
    """The autoscaler (or ``scale --now``) scaled zone a up a moment before the operator's
    ``deploy start``: the rollout waits for that count change's deployment instead of
    cancelling it, so its version is stable, and a rollback returns to it, not below it."""
    twin, nomad, r = _surge_rollout(twin_factory, kv=None)
    nomad.scale("ml-worker", "ml-worker-a", 4, message="autoscaler")
    scale_dep = nomad.job_status("ml-worker").active_deployment
    assert scale_dep is not None
    r.reporter = _zone_b_fails(twin)
    st = r.start(NEW, prefetch=False)  # no prefetch: the zone is registered at once
    assert st.status == "rolled_back", st.reason
    assert nomad.deployment(scale_dep).status == "successful"  # not cancelled by the rollout
    twin.cluster.faults.clear()
    twin.advance(600)
    assert desired(nomad) == {"ml-worker-a": 4, "ml-worker-b": 3}
    assert images_running(twin) == {OLD: 7}


def _service(twin: Any, nomad: Any, kv: MemoryKV, pol: Any, prefix: str) -> Service:
    """The autoscaling service of this policy on the rollout's KV, one cycle slot every 10 s
    of virtual time (so each phase of the rollout gets a cycle of its own)."""
    lock = MemoryLock(kv=kv, key=f"{prefix}/leader", ttl_s=3600, lock_delay_s=0,
                      holder=LockHolder(host="ops-1", pid=0, started_at=""))  # fmt: skip
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: TraceDemandSource(TRACE))
    return Service(settings=Settings(kv_prefix=prefix), policies=[pol], ports=ports,
                   clock=twin.clock, poll_s=5, check=False, every_s=10)  # fmt: skip


def test_the_autoscaler_holds_through_every_phase_and_acts_right_after_the_rollout(
    twin_factory: Any,
) -> None:
    kv = MemoryKV()
    twin, nomad, r = _surge_rollout(twin_factory, kv=kv, prefix="ns")
    kv.clock = twin.clock
    svc = _service(twin, nomad, kv, r.policy, "ns")
    cycles: dict[str, Any] = {}

    def cycle_per_phase(st: Any, info: dict[str, Any]) -> None:
        phase = "blocks" if "update blocks" in str(info.get("note") or "") else st.status
        if phase not in cycles and st.active:
            twin.clock.sleep(10)  # the next cycle slot
            [res] = svc.run_once()
            cycles[phase] = res.record

    r.reporter = cycle_per_phase
    st = r.start(NEW)
    assert st.status == "completed", st.reason
    twin.clock.sleep(10)
    [res] = svc.run_once()  # the first cycle after the rollout runs (no deployment to skip)
    rec = res.record
    assert rec.outcome in ("applied", "unchanged"), rec.line()
    # it sizes from the fleet as the rollout left it: the surge workers released
    assert rec.decision is not None and rec.decision["current"] == 6
    assert {z: c["actual"] for z, c in rec.zones.items()} == {"zone-a": 3, "zone-b": 3}
    # every cycle during the rollout held, the wait for the blocks' deployment included
    assert set(cycles) >= {"prefetch", "canary", "rolling", "blocks"}, sorted(cycles)
    for phase, held in cycles.items():
        assert (held.outcome, held.skipped) == ("skipped", "deploy-rollout"), (phase, held.line())
        assert NEW in held.reason


# --- 3. `deploy status` through a rollout's life --------------------------------------------


class Killed(BaseException):
    """The process died here (nothing after this point runs in the dying object)."""


@pytest.mark.consul
def test_deploy_status_through_every_phase_a_crash_and_the_resume(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    nomad = setup_job(twin)
    f = policy_file(tmp_path)
    kv = ConsulKV(addr=consul_agent.addr)
    shown: dict[str, tuple[str, dict[str, Any]]] = {}
    killed: list[str] = []

    def status(*extra: str) -> Any:
        res = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "status", str(f), *extra)
        assert res.exit_code == 0, res.output
        return json.loads(res.output) if extra else " ".join(res.output.replace("│", " ").split())

    def watch(st: Any, info: dict[str, Any]) -> None:
        phase = "blocks" if "update blocks" in str(info.get("note") or "") else st.status
        if phase not in shown:
            shown[phase] = (status(), status("--json"))
        if not killed and st.status == "rolling" and st.zones_done and info.get("healthy", 0):
            killed.append(st.id)
            raise Killed  # mid-step in the second zone

    with pytest.raises(Killed):
        Rollout(policy=load_policy(f), nomad=nomad, kv=kv, clock=twin.clock,
                prefix=consul_prefix, reporter=watch, watch_wait_s=0).start(NEW)  # fmt: skip
    for phase in ("prefetch", "canary", "rolling"):
        text, doc = shown[phase]
        assert doc["status"] == phase and doc["active"] is True
        assert f"{killed[0]} {phase}" in text and "last event" in text
    # nobody drives it any more: the table says when it last moved and which process drove it
    text, doc = status(), status("--json")
    assert doc["status"] == "rolling" and doc["zones_done"] == ["ml-worker-a"]
    assert f"driven by {doc['owner']}" in text and doc["owner"].endswith(f"pid {os.getpid()}")
    assert f"last progress {doc['updated_at']} (" in text and "ago)" in text

    shown.clear()
    st = Rollout(policy=load_policy(f), nomad=nomad, kv=kv, clock=twin.clock,
                 prefix=consul_prefix, reporter=watch, watch_wait_s=0).resume()  # fmt: skip
    assert st is not None and st.status == "completed", st and st.reason
    text, doc = shown["blocks"]  # the wait for the update blocks' deployment, as it shows
    assert doc["status"] == "rolling" and doc["zones_done"] == ["ml-worker-a", "ml-worker-b"]
    assert "waiting for deployment" in text and "update blocks" in text
    assert "re-plan" not in text  # the last zone's re-plan is history by then
    text, doc = status(), status("--json")
    assert doc["status"] == "completed" and doc["active"] is False
    assert "completed" in text and "finished" in text
    assert "driven by" not in text and "last progress" not in text


# --- 4. two operators at once, and the arguments they get wrong -------------------------------


class AtOnceKV(ConsulKV):
    """Real Consul; the first write of the rollout record waits until the other operator's
    process is there too, so both write the record they read at the same index."""

    def __init__(self, barrier: threading.Barrier, **kw: Any) -> None:
        super().__init__(**kw)
        self.barrier, self.first = barrier, True

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        if key.endswith("/deploy/ekyc-ml/state") and self.first:
            self.first = False
            self.barrier.wait()
        return super().put(key, value, cas=cas)


@pytest.mark.consul
def test_two_operators_starting_at_once_exactly_one_wins(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    nomad = setup_job(twin)
    barrier = threading.Barrier(2, timeout=30)
    out: dict[str, Any] = {}

    def operator(name: str) -> None:
        kv = AtOnceKV(barrier, addr=consul_agent.addr)
        r = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                    watch_wait_s=0)  # fmt: skip
        try:
            out[name] = r.start(NEW)
        except ConflictError as e:
            out[name] = e

    threads = [threading.Thread(target=operator, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    won = [v for v in out.values() if not isinstance(v, ConflictError)]
    lost = [v for v in out.values() if isinstance(v, ConflictError)]
    assert len(won) == 1 and len(lost) == 1, out
    assert won[0].status == "completed", won[0].reason
    msg = str(lost[0])
    assert "\n" not in msg
    assert f"rollout {won[0].id} of {NEW}" in msg and "by another nomadscale" in msg, msg
    assert "deploy status" in msg
    stored = StateStore(ConsulKV(addr=consul_agent.addr), prefix=consul_prefix).load("ekyc-ml")[0]
    assert stored is not None and stored.id == won[0].id
    assert images_running(twin) == {NEW: 4}


@pytest.mark.consul
def test_the_arguments_an_operator_gets_wrong(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    setup_job(twin)
    policies = tmp_path / "policies"
    policies.mkdir()
    policy_file(policies)

    def run(*args: str) -> Any:
        return cli(twin, consul_agent, consul_prefix, tmp_path, *args,
                   NOMADSCALE_POLICIES=str(policies))  # fmt: skip

    unknown = run("deploy", "start", "NOSUCH", "--image", NEW, "--yes")
    assert unknown.exit_code == 2 and "POLICY 'NOSUCH': no such policy" in one_line(unknown)
    for bad in ("registry.example.com/ekyc/ml-worker", "Registry/ML::1", "a b:1", ""):
        res = run("deploy", "start", "ekyc-ml", "--image", bad, "--yes")
        assert res.exit_code == 2, (bad, res.output)
        assert one_line(res).startswith(f"error: --image: {bad!r} is not an image reference")
    same = run("deploy", "start", "ekyc-ml", "--image", OLD, "--yes")
    assert same.exit_code == 0 and "nothing to do" in one_line(same)
    missing = run("deploy", "start", "ekyc-ml", "--yes")
    assert missing.exit_code == 2 and "Missing option '--image'" in missing.output
    kv = ConsulKV(addr=consul_agent.addr)
    assert StateStore(kv, prefix=consul_prefix).load("ekyc-ml")[0] is None  # nothing started
