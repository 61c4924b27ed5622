"""Scripted healing, fourth walk-through: a node the autoscaler is draining for scale-in when
its maintenance notice comes, an operator's drain, the maintenance-watcher's system job on a
drained node, a maintenance report's deadline without a timezone, and id prefixes as a real
Nomad takes them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from nomadscale.core.errors import PermanentError
from nomadscale.healing.resolve import resolve_allocation, resolve_node
from tests.healing.conftest import REPORT_TOKEN, ZONES, Rig

TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
RUNBOOK = "gpu-host-maintenance"
# what the autoscaler's actuator sends with its scale-in drains (service/actuator.py)
AUTOSCALER_META = {"drained_by": "nomadscale", "decision_id": "d-0042"}


def _worker_node(rig: Rig, group: str = "ml-worker-a") -> str:
    allocs = rig.nomad.job_allocations("ml-worker", namespace="ekyc")
    live = sorted((a for a in allocs if not a.terminal and a.task_group == group),
                  key=lambda a: a.create_index)  # fmt: skip
    return live[0].node_id


def _drive(
    rig: Rig, run_id: str, calls: int = 80, until: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """Drive the run one step call at a time until it ends or ``until`` holds (bounded: a
    run stuck waiting for something that never comes fails here, not hours later)."""
    run = rig.engine.get_run(run_id)
    assert run is not None
    for _ in range(calls):
        if run["status"] not in ("pending", "running") or (until is not None and until(run)):
            return run
        run = rig.engine.run(run_id, max_calls=1)
    raise AssertionError(f"run still {run['status']} at step {run['phase']} {run['step']}: "
                         f"{run['results'][-3:]}")  # fmt: skip


def _result(run: dict[str, Any], action: str) -> dict[str, Any]:
    return next(r for r in run["results"] if r["action"] == action and r["phase"] == "main")


# --- 1. the node the autoscaler is draining for scale-in -----------------------------------


def test_scale_in_drain_is_left_to_the_autoscaler_and_the_node_not_brought_back(
    rig_factory: Any,
) -> None:
    # the autoscaler decided to remove this node and drains it (2 h deadline in its policy);
    # then the host gets a terminate notice (1 h). The run must not take the drain for its
    # own and wait for the node to come back (the autoscaler deletes it once drained: a
    # 2 h wait, then a FAILED page and a node "left for a human"), nor make the node eligible
    # again; it must make the work leave before the maintenance, and say what happened.
    rig = rig_factory()
    nid = _worker_node(rig)
    rig.nomad.drain(nid, deadline_s=7200, meta=AUTOSCALER_META)
    rig.pd.open_incident("Q7SCALEIN1")
    deadline = rig.twin.clock.now() + timedelta(hours=1)
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": TERMINATE,
                                      "incident_id": "Q7SCALEIN1"},
                            trigger=f"maintenance:{TERMINATE}", deadline=deadline)  # fmt: skip
    done = _drive(rig, run["id"])
    assert done["status"] == "succeeded", done
    name = rig.twin.cluster.nodes[nid].name
    # told before the run touches the node or its capacity (no surge for a node going away)
    first = _result(done, "mark_ineligible")["detail"]
    assert first.startswith(f"{name} is being drained by the autoscaler for scale-in "
                            "(decision d-0042), which then removes it"), first  # fmt: skip
    assert first.endswith(
        "; its drain deadline moved to 3300s, before the maintenance; this "
        "run waits for the drain to end and does not bring the node back"
    )
    for action in ("surge", "drain", "wait_node", "verify_gpu", "mark_eligible", "notify"):
        detail = [r["detail"] for r in done["results"] if r["action"] == action][-1]
        assert detail == f"skipped: {name} is being removed by the autoscaler (decision d-0042)"
    node = rig.nomad.node(nid)
    assert node.drain_meta == AUTOSCALER_META  # still the autoscaler's drain
    assert node.eligibility == "ineligible" and not node.draining
    assert node.drain_status == "complete"
    drained = [r["detail"] for r in done["results"] if r["action"] == "wait_condition"]
    assert drained == ["no surge", f"{name} drained by the autoscaler (decision d-0042)"]
    assert _result(done, "release_surge")["detail"] == "no surge to release", done
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2
    assert not rig.gpu.answered  # no GPU check on a node on its way out
    # the incident is told, and resolved: nothing is left for a human
    assert rig.pd.wait_for(lambda s: s.incidents["Q7SCALEIN1"]["status"] == "resolved")
    notes = [n["content"] for n in rig.pd.state.notes["Q7SCALEIN1"]]
    assert any("removed by the autoscaler" in n and "SUCCEEDED" in n for n in notes), notes
    assert not any("is back, GPUs healthy" in n for n in notes), notes


def test_scale_in_drain_within_the_notice_keeps_its_deadline(rig_factory: Any) -> None:
    # the autoscaler's 15 min drain ends long before the maintenance: nothing to change
    rig = rig_factory()
    nid = _worker_node(rig)
    rig.nomad.drain(nid, deadline_s=900, meta=AUTOSCALER_META)
    deadline = rig.twin.clock.now() + timedelta(hours=1)
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": TERMINATE},
                            trigger=f"maintenance:{TERMINATE}", deadline=deadline)  # fmt: skip
    done = _drive(rig, run["id"])
    assert done["status"] == "succeeded", done
    first = _result(done, "mark_ineligible")["detail"]
    assert "by the autoscaler" in first and "deadline" not in first, first
    drains = [e for e in rig.twin.cluster.events if e.get("type") == "drain"
              and e.get("phase") == "start" and e.get("node_id") == nid]  # fmt: skip
    assert len(drains) == 1, drains  # the autoscaler's only


def test_a_cancelled_scale_in_drain_is_taken_over_and_the_node_healed(rig_factory: Any) -> None:
    # the run left the node to the autoscaler; then the scale-in drain is cancelled (someone
    # ran `nomad node drain -disable`) with work still on the node: the node stays, so the
    # run must heal it after all (surge, capacity check, its own drain, GPU check), not wait
    # for a drain that is gone
    rig = rig_factory()
    nid = _worker_node(rig)
    rig.twin.cluster.batch_run_s = 10**6  # a batch allocation the drain leaves running
    rig.nomad.register_job({
        "ID": "batch-work", "Name": "batch-work", "Type": "batch", "Datacenters": list(ZONES),
        "NodePool": "gpu-l4",
        "Constraints": [{"LTarget": "${node.unique.id}", "RTarget": nid, "Operand": "="}],
        "TaskGroups": [{"Name": "work", "Count": 1, "Tasks": [{
            "Name": "work", "Driver": "raw_exec", "Config": {"command": "true"},
            "Resources": {"CPU": 50, "MemoryMB": 64}}]}],
    })  # fmt: skip
    rig.twin.advance(30)
    rig.nomad.drain(nid, deadline_s=7200, meta=AUTOSCALER_META)
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": MIGRATE})
    _drive(rig, run["id"], until=lambda r: bool(r.get("handover")))
    rig.twin.advance(60)
    rig.nomad.cancel_drain(nid)
    done = _drive(rig, run["id"], calls=400)
    assert done["status"] == "succeeded", done["results"]
    name = rig.twin.cluster.nodes[nid].name
    (took,) = [r for r in done["results"] if r["action"] == "take_over"]
    assert took["detail"] == (
        f"the autoscaler's drain of {name} (decision d-0042) ended canceled with 1 "
        "allocation(s) left on it: the node stays, so this run heals it after all (back to "
        "step 1)"
    )
    main = [(r["action"], r["detail"].split(":")[0]) for r in done["results"]]
    after = main[main.index(("take_over", took["detail"].split(":")[0])) + 1 :]
    assert [a for a, _ in after] == [
        "mark_ineligible",
        "surge",
        "wait_condition",
        "drain",
        "wait_condition",
        "wait_node",
        "verify_gpu",
        "mark_eligible",
        "release_surge",
        "notify",
    ], after
    last_drain = [r["detail"] for r in done["results"] if r["action"] == "drain"][-1]
    assert last_drain.startswith(f"drain of {name} started"), last_drain
    drained = [r["detail"] for r in done["results"] if r["action"] == "wait_condition"]
    assert drained[-1] == (f"{name} drained by this run (the autoscaler's drain, decision "
                           "d-0042, had ended with work left on it)")  # fmt: skip
    node = rig.nomad.node(nid)
    assert node.drain_meta == {"nomadscale.run": run["id"], "nomadscale.runbook": RUNBOOK}
    assert node.eligibility == "eligible"


def test_an_operators_drain_is_refused_in_one_line(rig_factory: Any) -> None:
    # someone drains the node by hand (`nomad node drain -enable`, no meta): healing must not
    # take it over (and later make the node eligible behind their back)
    rig = rig_factory()
    nid = _worker_node(rig, "ml-worker-b")
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": MIGRATE})
    steps = [s.action for s in rig.engine.runbooks[RUNBOOK].steps]
    _drive(rig, run["id"], until=lambda r: r["step"] == steps.index("drain"))
    rig.nomad.drain(nid, deadline_s=3600, meta=None)  # while the run waited for its surge
    done = _drive(rig, run["id"])
    name = rig.twin.cluster.nodes[nid].name
    assert done["status"] == "failed", done
    refused = [r for r in done["results"] if r["status"] == "refused"]
    assert len(refused) == 1 and refused[0]["action"] == "drain", done["results"]
    assert refused[0]["detail"].startswith(
        f"drain of {name} refused: it is already being drained by someone else (no drain "
        "meta, since 2026-"
    ), refused
    assert refused[0]["detail"].endswith("healing does not take over a drain it did not start")
    assert "\n" not in refused[0]["detail"]
    assert rig.nomad.node(nid).eligibility == "ineligible"


def test_an_ended_runs_drain_is_taken_over_with_this_runs_meta(rig_factory: Any) -> None:
    # a run that failed earlier left its drain running: the new run for the node makes the
    # drain its own (its deadline, its Meta), so that the next look at the node tells whose
    rig = rig_factory()
    nid = _worker_node(rig, "ml-worker-b")
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": MIGRATE})
    steps = [s.action for s in rig.engine.runbooks[RUNBOOK].steps]
    _drive(rig, run["id"], until=lambda r: r["step"] == steps.index("drain"))
    old = {"nomadscale.run": "0123456789ab", "nomadscale.runbook": "gpu-xid-error"}
    rig.nomad.drain(nid, deadline_s=7200, meta=old)
    done = _drive(rig, run["id"])
    assert done["status"] == "succeeded", done
    name = rig.twin.cluster.nodes[nid].name
    assert _result(done, "drain")["detail"] == (
        f"drain of {name} started (deadline 900s), taking over the drain of run 0123456789ab"
    )
    assert rig.nomad.node(nid).drain_meta == {"nomadscale.run": run["id"],
                                              "nomadscale.runbook": RUNBOOK}  # fmt: skip


def test_a_drained_node_with_the_watchers_system_job_counts_as_drained(rig_factory: Any) -> None:
    # every GPU node runs the maintenance-watcher system job (jobs/maintenance-watcher), and
    # drains leave system jobs running (IgnoreSystemJobs): the node is drained all the same
    rig = rig_factory()
    rig.nomad.register_job({
        "ID": "maintenance-watcher", "Name": "maintenance-watcher", "Type": "system",
        "Datacenters": list(ZONES), "NodePool": "gpu-l4",
        "TaskGroups": [{"Name": "watch", "Count": 1, "Tasks": [{
            "Name": "watch", "Driver": "raw_exec", "Config": {"command": "nomadscale"},
            "Resources": {"CPU": 50, "MemoryMB": 64}}]}],
    })  # fmt: skip
    rig.twin.advance(60)
    nid = _worker_node(rig)
    run = rig.engine.submit(RUNBOOK, {"node": nid, "event": MIGRATE})
    done = _drive(rig, run["id"])
    assert done["status"] == "succeeded", done
    left = [a for a in rig.nomad.node_allocations(nid) if not a.terminal]
    assert [a.job_id for a in left] == ["maintenance-watcher"]  # still watching


# --- 2. a maintenance report's deadline ---------------------------------------------------------


def _report(rig: Rig, deadline: Any) -> httpx.Response:
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    return httpx.post(f"{rig.url}/maintenance/report",
                      json={"node": node.id, "event": TERMINATE, "deadline": deadline},
                      headers={"Authorization": f"Bearer {REPORT_TOKEN}"})  # fmt: skip


def test_report_deadline_without_timezone_is_refused_naming_the_field(rig_factory: Any) -> None:
    # the watcher sends RFC 3339 with an offset; a time without one would be read as the
    # host's local time: hours off on a host that is not on UTC, and the drain too late
    rig = rig_factory()
    r = _report(rig, "2026-01-05T01:00:00")
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "deadline: '2026-01-05T01:00:00' has no timezone offset "
        "(expected RFC 3339, e.g. 2026-01-05T01:00:00+00:00)"
    }
    r = _report(rig, "soon")
    assert (r.status_code, r.json()) == (400, {"error": "deadline: 'soon' is not an RFC 3339 "
                                                        "time"})  # fmt: skip
    assert rig.engine.list_runs() == []
    r = _report(rig, "2026-01-05T08:00:00+07:00")  # the zone's local time, with its offset
    assert r.status_code == 202, r.text
    run = rig.wait_run(lambda x: x["runbook"] == RUNBOOK)
    assert run["deadline_epoch"] == datetime(2026, 1, 5, 1, 0, tzinfo=UTC).timestamp()


# --- 3. id prefixes as a real Nomad takes them --------------------------------------------------


def test_odd_length_allocation_prefix_is_trimmed_like_the_cli(rig_factory: Any) -> None:
    # Nomad's state store answers an odd number of hex digits with a 500 ("Input (without
    # hyphens) must be even length"): ask for one character less, then match exactly
    rig = rig_factory()
    allocs = rig.nomad.job_allocations("ml-worker", namespace="ekyc")
    one = allocs[0]
    assert resolve_allocation(rig.nomad, one.id[:7]).id == one.id
    assert resolve_allocation(rig.nomad, one.id[:10]).id == one.id  # 9 digits and a "-"
    others = {a.id[:6] for a in allocs if a.id[:7] != one.id[:7]}
    miss = next(one.id[:6] + c for c in "0123456789abcdef" if one.id[:6] + c != one.id[:7])
    if one.id[:6] not in others:
        with pytest.raises(PermanentError, match=f"allocation '{miss}' not found in Nomad"):
            resolve_allocation(rig.nomad, miss)


def test_node_by_name_does_not_ask_nomad_for_it_as_an_id(rig_factory: Any) -> None:
    # GET /v1/node/<name> is no lookup by name in Nomad: its state store reads the id through
    # the UUID index, which answers 500 "UUID must be 36 characters" (nomad/node_endpoint.go
    # GetNode -> state.NodeByID) - a server error, retried, then the PagerDuty-triggered run
    # for "... on gpu-asia-southeast2-a-0000" never starts
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    rig.twin.cluster.faults.fail(r"^GET /v1/node/gpu-", 500,
                                 message="node lookup failed: index error: UUID must be 36 "
                                 "characters")  # fmt: skip
    assert resolve_node(rig.nomad, node.name).id == node.id
    assert resolve_node(rig.nomad, node.id[:8]).id == node.id
    assert resolve_node(rig.nomad, node.id).name == node.name
    with pytest.raises(PermanentError, match="node 'gpu-nope' not found in Nomad"):
        resolve_node(rig.nomad, "gpu-nope")
