"""Holds for a worker Nomad can't place (twin over HTTP, virtual time).

The canary zone's canary (with no surge) whose node another job took is a blocked evaluation
in Nomad, like a surge worker's: the rollout sees it within one poll and holds (deployment
paused, every old worker serving) until a node is free or the canary is placed, and pauses for
the operator past the hold limit; it never waits for the progress deadline. The hold limit
counts every hold of the same step: a step whose holds keep ending (a node came free) and
starting again (it was taken again) still alerts within the hold limit. A node counts as free
for a GPU worker when its GPU is free, whatever non-GPU or system allocations run there.
"""

from __future__ import annotations

from typing import Any

from nomadscale.deploy.replan import surge_blocker
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import RolloutState
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from tests.deploy.helpers import (
    CALM,
    JOB,
    NEW,
    OLD,
    ROOT,
    TRACE,
    RecordingAlerts,
    images_running,
    other_team_job,
    policy,
    sampling_twin,
    setup_job,
    surge_rpm,
)

POLL_S = 5.0


def _run(twin: Any, nomad: Any, hcl: str, *, settle_s: float = 60.0) -> list[Any]:
    """Register a job (Nomad places it at once); its live allocations ``settle_s`` later."""
    spec = nomad.parse_hcl(hcl)
    nomad.register_job(spec)
    if settle_s:
        twin.advance(settle_s)
    return [a for a in twin.cluster.job_allocs(("default", spec["ID"])) if a.live]


def _stop(twin: Any, job: str) -> None:
    twin.nomad().job.deregister_job(job)


def _free_nodes(twin: Any, dc: str) -> list[str]:
    """Nodes of ``dc`` whose GPU no allocation holds."""
    c = twin.cluster
    return sorted(n.name for n in c.nodes.values() if n.datacenter == dc and n.gpu_used == 0)


def _failed_deployments(twin: Any) -> list[str]:
    return [e["deployment_id"] for e in twin.cluster.events
            if e["type"] == "deployment" and e["status"] == "failed"]  # fmt: skip


def _rollout(twin: Any, nomad: Any, rpm: float, **kw: Any) -> Rollout:
    kw.setdefault("demand", TraceDemandSource(TRACE))
    kw.setdefault("kv", MemoryKV(clock=twin.clock))
    return Rollout(policy=policy(rpm=rpm, bmax=80), nomad=nomad, clock=twin.clock,
                   watch_wait_s=0, poll_s=POLL_S, **kw)  # fmt: skip


# --- gap 1: the canary zone's canary (no surge) can't be placed ---------------------------


def _canary_blocked(twin_factory: Any) -> tuple[Any, Any, Any]:
    """8 nodes, 3 workers per zone: after the preflight found zone a's one free node, another
    team's GPU job takes it just before the canary's job version is registered, so the
    canary has no node."""
    twin, clock = sampling_twin(twin_factory, nodes=8, start=CALM)
    nomad = setup_job(twin, count=3)
    assert len(_free_nodes(twin, "zone-a")) == 1
    proxy = TakesOnRegister(nomad, twin, dc="zone-a")
    proxy.armed = True
    return twin, clock, proxy


def _marker(twin: Any, marks: dict[str, Any], *, release_after_s: float | None) -> Any:
    """Records when the rollout holds; ``release_after_s`` after that the trainer leaves."""

    def report(st: RolloutState, info: dict[str, Any]) -> None:
        now = twin.clock.now()
        if st.status == "held" and "held" not in marks:
            marks["held"] = now
        if str(info.get("note", "")).startswith("zone ml-worker-a: deployment"):
            marks.setdefault("zone", now)
        if (
            release_after_s is not None
            and "held" in marks
            and "released" not in marks
            and (now - marks["held"]).total_seconds() >= release_after_s
        ):
            marks["released"] = now
            _stop(twin, "trainer")

    return report


def test_a_blocked_canary_holds_at_once_and_goes_on_when_a_node_is_free(
    twin_factory: Any,
) -> None:
    twin, clock, nomad = _canary_blocked(twin_factory)
    marks: dict[str, Any] = {}
    r = _rollout(twin, nomad, 1e5, reporter=_marker(twin, marks, release_after_s=180))
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "completed", st.reason
    assert (marks["held"] - marks["zone"]).total_seconds() <= 2 * POLL_S, marks
    held = next(line for line in st.log if "held" in line and "canary" in line)
    assert "the canary of ml-worker-a can't be placed" in held, held
    assert "nvidia/gpu" in held, held  # Nomad's reason: the GPU dimension is exhausted
    assert any("hold ended" in line for line in st.log), st.log
    assert _failed_deployments(twin) == []
    t_held, t_released = marks["held"].timestamp(), marks["released"].timestamp()
    during = [n for t, n in clock.samples if t_held <= t <= t_released]
    assert during and min(during) == 6  # every old worker served while held
    assert images_running(twin) == {NEW: 6}


def test_a_blocked_canary_held_past_the_limit_pauses_then_resumes(twin_factory: Any) -> None:
    twin, clock, nomad = _canary_blocked(twin_factory)
    marks: dict[str, Any] = {}
    sink = RecordingAlerts()
    kv = MemoryKV(clock=twin.clock)
    r = _rollout(twin, nomad, 1e5, kv=kv, alerts=sink, hold_limit_s=120,
                 reporter=_marker(twin, marks, release_after_s=None))  # fmt: skip

    st = r.start(NEW)

    assert st.status == "paused" and st.current_zone == "ml-worker-a", st.reason
    assert st.reason.startswith("held for 2 min and the canary of ml-worker-a still can't be "
                                "placed"), st.reason  # fmt: skip
    assert (clock.now() - marks["held"]).total_seconds() < 120 + 3 * POLL_S
    assert [a["severity"] for a in sink.sent] == ["warning", "warning"]
    assert st.deployment_id and nomad.deployment(st.deployment_id).status == "paused"
    assert _failed_deployments(twin) == []
    assert images_running(twin) == {OLD: 6}  # nothing taken out

    _stop(twin, "trainer")  # the trainer is done; an operator resumes
    again = _rollout(twin, nomad, 1e5, kv=kv).resume()
    assert again is not None and again.status == "completed", again and again.reason
    assert images_running(twin) == {NEW: 6}


# --- gap 2: the hold limit counts every hold of the same step -----------------------------


class TakesOnRegister:
    """A NomadClient whose next registration of the ml-worker job (once ``armed``) is preceded
    by another team's job taking the free node of datacenter ``dc``: the node was free, and is
    taken before Nomad places the surge worker or canary."""

    def __init__(self, nomad: Any, twin: Any, *, dc: str = "zone-b") -> None:
        self._nomad, self._twin, self._dc = nomad, twin, dc
        self.armed = False

    def register_job(self, spec: Any, **kw: Any) -> Any:
        if self.armed and spec.get("ID") == "ml-worker":
            self.armed = False
            taken = _run(
                self._twin, self._nomad, other_team_job("trainer", dc=self._dc), settle_s=0
            )
            assert len(taken) == 1, taken
        return self._nomad.register_job(spec, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nomad, name)


def test_the_hold_limit_counts_every_hold_of_the_same_step(twin_factory: Any) -> None:
    """Zone b's start holds (its free node is ineligible: no node for the surge it needs);
    100 s later the node is back, the hold ends, and the trainer takes it before the surge
    worker is placed: the rollout holds again. Each hold is shorter than the 150 s limit, but
    together they pass it: the rollout pauses and alerts within the limit of the first hold."""
    twin, clock = sampling_twin(twin_factory, nodes=9, start=CALM)
    nomad = setup_job(twin, count=3)  # zone b: 4 nodes, 1 free
    rpm, _upper = surge_rpm(twin, 5.5, fleet=6)  # 6 of 6 needed: a surge per zone
    proxy = TakesOnRegister(nomad, twin)
    [free] = _free_nodes(twin, "zone-b")
    node_id = twin.cluster.find_node(free).id
    holds: list[Any] = []
    back: list[Any] = []
    sink = RecordingAlerts()

    def report(st: RolloutState, info: dict[str, Any]) -> None:
        note = str(info.get("note", ""))
        if note == "zone ml-worker-a done":
            nomad.set_eligibility(node_id, False)  # zone b's free node goes away ...
        if note.startswith("held") and "ml-worker-b" in note:
            holds.append(twin.clock.now())

    sample = clock.sample

    def every_second() -> None:  # a held rollout reports nothing: time drives the test
        sample()
        now = twin.clock.now()
        if len(holds) == 1 and not back and (now - holds[0]).total_seconds() >= 100:
            back.append(now)
            proxy.armed = True  # ... comes back, and is taken again
            nomad.set_eligibility(node_id, True)
        if len(holds) == 2 and len(back) == 1 and (now - holds[1]).total_seconds() >= 100:
            back.append(now)
            _stop(twin, "trainer")  # the old rule's second hold ends here

    clock.sample = every_second  # type: ignore[method-assign]
    r = _rollout(twin, proxy, rpm, alerts=sink, hold_limit_s=150, reporter=report)

    st = r.start(NEW)

    assert len(holds) >= 2, st.log
    assert any("no free node in zone zone-b" in line for line in st.log), st.log
    assert st.status == "paused" and st.current_zone == "ml-worker-b", st.reason
    assert st.reason.startswith("held for"), st.reason
    paused_at = clock.now()
    assert (paused_at - holds[1]).total_seconds() < 100  # within the second hold
    assert (paused_at - holds[0]).total_seconds() <= 150 + 6 * POLL_S
    assert [a["severity"] for a in sink.sent] == ["warning", "warning", "warning"]
    assert "paused" in sink.sent[-1]["summary"]
    assert _failed_deployments(twin) == []


# --- gap 3: a node's GPU, not its allocation count, makes it free -------------------------


def test_a_node_with_its_gpu_free_counts_as_free_whatever_else_runs_there(
    twin_factory: Any,
) -> None:
    """Zone b's spare node runs the maintenance watcher (a system job) and a non-GPU service
    job: Nomad would place a GPU worker there, so the rollout counts it free. A system job
    that holds the GPU makes it taken."""
    twin, _clock = sampling_twin(twin_factory, nodes=6, start=CALM)
    nomad = setup_job(twin, count=2)  # zone b: 3 nodes, 1 free
    [spare] = _free_nodes(twin, "zone-b")
    r = _rollout(twin, nomad, 1e5)
    job = nomad.get_job("ml-worker")
    pol = policy(rpm=1e5, bmax=80)
    desired = {"ml-worker-a": 2, "ml-worker-b": 2}

    def blocker() -> str | None:
        return surge_blocker(pol, nomad, spec=job.spec, group="ml-worker-b", desired=desired,
                             surge=None)  # fmt: skip

    assert r._free_node("ml-worker-b") and blocker() is None

    watcher = nomad.parse_hcl((ROOT / "jobs" / "maintenance-watcher.nomad.hcl").read_text())
    watcher["NodePool"] = "gpu"  # the twin's GPU nodes are in pool "gpu"
    nomad.register_job(watcher)
    shipper = _run(twin, nomad, other_team_job("shipper", dc="zone-b", gpu=False, node=spare))
    twin.advance(60)
    on_spare = {a.job_id for a in twin.cluster.allocs.values()
                if a.live and a.node_name == spare}  # fmt: skip
    assert on_spare == {"maintenance-watcher", "shipper"}, on_spare
    assert [a.node_name for a in shipper] == [spare]
    assert r._free_node("ml-worker-b"), "a node with its GPU free is free for a worker"
    assert blocker() is None

    _stop(twin, "shipper")
    agent = _run(twin, nomad, other_team_job("gpu-agent", dc="zone-b", job_type="system"))
    assert [a.node_name for a in agent] == [spare]  # the only GPU left in zone b
    assert not r._free_node("ml-worker-b"), "a system job holds the spare node's GPU"
    why = blocker()
    assert why == "no free node in zone zone-b (3 usable, none with 1 nvidia/gpu free)", why
    assert [a for a in twin.cluster.job_allocs(JOB) if a.node_name == spare] == []


def test_room_reads_nomads_device_bookkeeping_conservatively() -> None:
    from nomadscale.deploy.room import has_room
    from nomadscale.integrations.nomad_parse import alloc_info, node_info

    def node(*healthy: bool) -> Any:
        insts = [{"ID": f"GPU-{i}", "Healthy": h} for i, h in enumerate(healthy)]
        return node_info({"ID": "n1", "Name": "n1", "NodeResources": {"Devices": [
            {"Vendor": "nvidia", "Type": "gpu", "Name": "l4", "Instances": insts}]}})  # fmt: skip

    def alloc(job: str, *gpus: str, kind: str = "service", reported: bool = True) -> Any:
        devs = [{"Vendor": "nvidia", "Type": "gpu", "Name": "l4", "DeviceIDs": list(gpus)}]
        data: dict[str, Any] = {"ID": job, "JobID": job, "Job": {"Type": kind},
                                "DesiredStatus": "run", "ClientStatus": "running"}  # fmt: skip
        if reported:
            data["AllocatedResources"] = {"Tasks": {"t": {"Devices": devs if gpus else None}}}
        return alloc_info(data)

    gpu = {"nvidia/gpu": 1}
    two = node(True, True)
    assert two.devices is not None and two.devices[0].ids == ("GPU-0", "GPU-1")
    assert alloc("w", "GPU-0").job_type == "service"
    watcher = alloc("maintenance-watcher", kind="system")
    # one of two GPUs held: room for one more (another job's or our own worker's)
    assert has_room(two, [watcher, alloc("w", "GPU-0")], wants=gpu, job_id="ml-worker")
    assert not has_room(two, [alloc("w", "GPU-0"), alloc("x", "GPU-1")], wants=gpu,
                        job_id="ml-worker")  # fmt: skip
    # an unhealthy instance is no room; a request by vendor/type/name or type matches too
    assert not has_room(node(True, False), [alloc("w", "GPU-0")], wants=gpu, job_id="ml-worker")
    assert has_room(two, [alloc("w", "GPU-0")], wants={"nvidia/gpu/l4": 1}, job_id="ml-worker")
    assert not has_room(two, [alloc("w", "GPU-0")], wants={"gpu": 2}, job_id="ml-worker")
    # distinct_hosts: none next to an allocation of the same job
    assert not has_room(two, [alloc("ml-worker", "GPU-0")], wants=gpu, job_id="ml-worker",
                        distinct=True)  # fmt: skip
    # not reported: an allocation may hold any device; a node without devices listed (or a
    # group asking for none) is free only without service or batch allocations
    assert not has_room(two, [alloc("x", reported=False)], wants=gpu, job_id="ml-worker")
    stub = node_info({"ID": "n1", "Name": "n1"})
    assert stub.devices is None
    assert has_room(stub, [watcher], wants=gpu, job_id="ml-worker")
    assert not has_room(stub, [alloc("x", "GPU-0")], wants=gpu, job_id="ml-worker")
