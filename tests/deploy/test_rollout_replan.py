"""The re-plan before every node step (twin over HTTP, virtual time): demand that rises after
the rollout planned (a forecast miss) makes it surge one worker in the zone rolling and at the
next zone's start, or hold (status ``held`` in ``nomadscale deploy status``) when no surge
fits; a process that dies while held resumes the hold from the record in real Consul."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nomadscale.deploy.rollout import Rollout
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.control import Control
from tests.deploy.helpers import (
    NEW,
    RecordingAlerts,
    SamplingClock,
    cli_status,
    images_running,
    policy,
    sampling_twin,
    setup_job,
)

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # the rollout starts at 00:05 (after setup_job)
RISE = T0 + timedelta(minutes=7)  # zone a is rolling: canary promoted at 00:06:55
BASE, HIGH = 1000.0, 1600.0  # rpm
RPM = HIGH / 5.5  # planned for 1000 rpm: 4 of 6 needed; at 1600 rpm: 6 of 6
NODE_STEP_S = 40.0  # one replacement: start, min_healthy_time 30s, a poll


def write_trace(path: Path, *, fall: datetime | None = None) -> TraceDemandSource:
    """A week of 1-minute steps at BASE rpm, HIGH from RISE until ``fall``."""
    t, rows = T0 - timedelta(days=7), ["timestamp,requests"]
    while t < T0 + timedelta(hours=2):
        high = t >= RISE and (fall is None or t < fall)
        rows.append(f"{t:%Y-%m-%dT%H:%M:%SZ},{HIGH if high else BASE:.0f}")
        t += timedelta(minutes=1)
    path.write_text("\n".join(rows) + "\n")
    return TraceDemandSource(path)


def short_of_demand(clock: SamplingClock, demand: TraceDemandSource) -> list[float]:
    """Sample times when healthy workers x RPM were below the trace's demand."""
    return [t for t, h in clock.samples
            if h * RPM < demand.rpm_at(datetime.fromtimestamp(t, tz=UTC))]  # fmt: skip


def scale_counts(nomad: Any, group: str) -> list[int]:
    events = nomad.job_status("ml-worker").groups[group].events
    return [e.count for e in sorted(events, key=lambda e: e.time) if e.count is not None]


def test_demand_rise_mid_rollout_surges_in_the_zone_and_the_next(
    twin_factory: Any, tmp_path: Path
) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=10, start=T0)
    nomad = setup_job(twin, count=3)  # 6 workers, 2 free nodes per zone
    demand = write_trace(tmp_path / "rise.csv")
    r = Rollout(policy=policy(rpm=RPM), nomad=nomad, kv=MemoryKV(clock=twin.clock),
                clock=twin.clock, demand=demand, watch_wait_s=0, poll_s=5.0)  # fmt: skip
    plan = r.plan(NEW)
    assert not plan.surge and plan.required_workers == 4  # the forecast knows nothing of it
    clock.samples.clear()

    st = r.start(NEW)

    assert st.status == "completed", st.reason
    assert images_running(twin) == {NEW: 6}
    replans = [line.split("re-plan: ")[1] for line in st.log if "re-plan: " in line]
    assert [line.split(":")[0] for line in replans] == ["ml-worker-a", "ml-worker-b"]
    assert all("demand 1600 rpm" in line and line.endswith("-> surge") for line in replans)
    # zone a surged in the middle of its deployment (a new job version), zone b at its start
    # (the zone's own new job version: the surge worker runs the new image); both released
    # (the Scale API) when their zone was done
    assert "new job version" in next(line for line in st.log if "surge: ml-worker-a" in line)
    assert "surge released: ml-worker-a -> 3" in " ".join(st.log)
    assert "surge: ml-worker-b 3 -> 4 in the zone's new job version" in " ".join(st.log)
    assert scale_counts(nomad, "ml-worker-b") == [3]
    status = nomad.job_status("ml-worker")
    assert {g: status.groups[g].desired for g in ("ml-worker-a", "ml-worker-b")} == {
        "ml-worker-a": 3, "ml-worker-b": 3,
    }  # fmt: skip
    # short of demand only while the replacement that went out before the rise (00:06:55,
    # at 1000 rpm) was in flight; every later step kept 6 workers serving
    short = short_of_demand(clock, demand)
    assert short and min(short) >= RISE.timestamp()
    back = next(t for t, h in clock.samples if t > min(short) and h >= 6)
    assert max(short) < back <= RISE.timestamp() + NODE_STEP_S


@pytest.mark.consul
def test_hold_when_no_surge_fits_shows_in_status_and_resumes_after_a_crash(
    twin_factory: Any, tmp_path: Path, consul_agent: Any, consul_prefix: str
) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=10, start=T0)
    nomad = setup_job(twin, count=3)
    fall = T0 + timedelta(minutes=10)
    demand = write_trace(tmp_path / "rise-and-fall.csv", fall=fall)
    kv = ConsulKV(addr=consul_agent.addr, token=consul_agent.token)
    pol = policy(rpm=RPM, bmax=6)  # no room for a surge worker

    class Crash(Exception):
        pass

    shown: list[dict[str, Any]] = []

    def die_when_held(st: Any, info: dict[str, Any]) -> None:
        if st.status == "held" and not shown:
            shown.append(cli_status(twin, consul_agent, consul_prefix, tmp_path))
            raise Crash

    def rollout(**kw: Any) -> Rollout:
        return Rollout(policy=pol, nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                       demand=demand, watch_wait_s=0, poll_s=5.0, **kw)  # fmt: skip

    clock.samples.clear()
    with pytest.raises(Crash):
        rollout(reporter=die_when_held).start(NEW)

    held = shown[0]
    assert held["status"] == "held" and held["active"]
    assert "held before the next node step: ml-worker-a: demand 1600 rpm" in held["reason"]
    assert "bounds.max 6" in held["reason"]
    assert held["replan"]["last"]["action"] == "hold" and held["replan"]["held_since"]
    # held between two node steps: nomadscale paused the zone's deployment, every worker serves
    assert held["replan"]["paused"] == held["deployment_id"]
    assert nomad.deployment(held["deployment_id"]).status == "paused"
    assert Control(kv, prefix=consul_prefix).deploy_active("ekyc-ml") == (
        f"deploy rollout held of {NEW}"
    )
    held_at = clock.now().timestamp()
    assert clock.samples[-1][1] == 6

    st = rollout().resume()  # a new process: holds on until demand falls, then goes on

    assert st is not None and st.status == "completed", st and st.reason
    assert images_running(twin) == {NEW: 6}
    ended = next(line for line in st.log if "hold ended" in line)
    assert ended.startswith(f"{fall + timedelta(seconds=15):%Y-%m-%dT%H:%M}")  # next 15 s step
    assert "demand 1000 rpm" in ended and ended.endswith("-> go")
    assert all(h == 6 for t, h in clock.samples if held_at <= t <= fall.timestamp())
    # short of demand only while the replacement already out at the rise was in flight
    short = short_of_demand(clock, demand)
    assert short and max(short) < RISE.timestamp() + NODE_STEP_S
    assert all(not g.events for g in nomad.job_status("ml-worker").groups.values())  # no surge
    final = cli_status(twin, consul_agent, consul_prefix, tmp_path)
    assert final["status"] == "completed" and not final["active"] and final["id"] == held["id"]


def test_hold_past_its_limit_pauses_the_rollout_and_alerts(
    twin_factory: Any, tmp_path: Path
) -> None:
    twin, clock = sampling_twin(twin_factory, nodes=10, start=T0)
    nomad = setup_job(twin, count=3)
    demand = write_trace(tmp_path / "rise.csv")  # demand stays high
    sink = RecordingAlerts()
    alerts = sink.sent

    kv = MemoryKV(clock=twin.clock)
    r = Rollout(policy=policy(rpm=RPM, bmax=6), nomad=nomad, kv=kv, clock=twin.clock,
                demand=demand, alerts=sink, watch_wait_s=0, poll_s=5.0,
                hold_limit_s=120)  # fmt: skip

    st = r.start(NEW)

    assert st.status == "paused" and st.active
    assert st.reason.startswith("held for 2 min and capacity is still short: ml-worker-a:")
    assert st.reason.endswith("(a surge worker would pass bounds.max 6); resume or abort")
    summaries = [a["summary"] for a in alerts]
    assert len(summaries) == 2 and all(a["severity"] == "warning" for a in alerts)
    assert summaries[0].startswith(f"nomadscale deploy ekyc-ml: rollout of {NEW} held before")
    assert summaries[1].startswith(f"nomadscale deploy ekyc-ml: rollout of {NEW} paused: held")
    assert st.deployment_id and st.replan["paused"] == st.deployment_id
    assert nomad.deployment(st.deployment_id).status == "paused"  # no worker taken out
    assert clock.samples[-1][1] == 6
    # demand fell meanwhile: an operator resumes, the re-plan lets the next step go
    fell = write_trace(tmp_path / "fell.csv", fall=clock.now() - timedelta(minutes=1))
    again = Rollout(policy=policy(rpm=RPM, bmax=6), nomad=nomad, kv=kv, clock=twin.clock,
                    demand=fell, watch_wait_s=0, poll_s=5.0).resume()  # fmt: skip
    assert again is not None and again.status == "completed", again and again.reason
    assert images_running(twin) == {NEW: 6}
