"""Scripted healing, second walk-through: a terminate notice for a node whose live-migration
run is under way, the watcher while nomadscale is unreachable, the final incident update, and
dry runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from nomadscale.config.settings import Secret
from nomadscale.core.clock import FakeClock
from nomadscale.healing.watcher import MaintenanceWatcher
from nomadscale.integrations.gce_metadata import MetadataClient
from tests.harness.gce_metadata_server import MetadataServer
from tests.healing.conftest import ZONES, Rig
from tests.healing.sinks import ReportSink
from tests.healing.test_e2e import play_host_maintenance

MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"


def _drive_until(rig: Rig, run_id: str, pred: Callable[[dict[str, Any]], bool]) -> dict:
    run = rig.engine.get_run(run_id)
    assert run is not None
    for _ in range(200):
        if pred(run):
            return run
        run = rig.engine.run(run_id, max_calls=1)
        assert run["status"] in ("pending", "running"), run
    raise AssertionError(f"run never got there: {run}")


# --- 1. a terminate notice reaches the live-migration run of the same node ----------------------


@pytest.mark.parametrize("at_step", [2, 7], ids=["before-the-wait", "wait-already-skipped"])
def test_terminate_notice_during_a_live_migration_run_waits_for_the_restart(
    rig_factory: Any, at_step: int
) -> None:
    # the watcher reported a live migration; then the VM's notice turns into a stop (GPU VMs
    # are stopped, not migrated). The run under way must now wait for the node to go down and
    # come back (and check its GPUs after that), not skip the wait as for a live migration.
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    run = rig.engine.submit(
        "gpu-host-maintenance",
        {"node": node.id, "event": MIGRATE},
        trigger=f"maintenance:{MIGRATE}",
    )
    # at 7 (verify_gpu) the wait for the restart was already skipped; the node is still out
    # of service, so the run goes back to it
    _drive_until(rig, run["id"], lambda r: r["step"] == at_step)
    again = rig.engine.submit(
        "gpu-host-maintenance",
        {"node": node.id, "event": TERMINATE},
        trigger=f"maintenance:{TERMINATE}",
    )
    assert again.get("duplicate") and again["id"] == run["id"]
    # a smaller event for a run already handling a stop changes nothing
    lesser = rig.engine.submit(
        "gpu-host-maintenance", {"node": node.id, "event": MIGRATE}, trigger="pagerduty:x"
    )
    assert lesser.get("duplicate") and lesser["id"] == run["id"]
    rig.engine.start()
    rig.engine.enqueue(run["id"])
    play_host_maintenance(rig, node.id, run["id"])
    done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"], timeout=30)
    assert done["status"] == "succeeded", done
    assert done["values"]["event"] == TERMINATE
    notes = [r for r in done["results"] if r["action"] == "escalate"]
    assert len(notes) == 1 and TERMINATE in notes[0]["detail"], done["results"]
    assert ("back to step 6 wait_node" in notes[0]["detail"]) == (at_step == 7), notes
    waits = [r for r in done["results"] if r["action"] == "wait_node"]
    assert waits[-1]["detail"].endswith("is ready"), waits
    # the GPUs are checked after the restart, by a check of its own
    gpu = [r for r in done["results"] if r["action"] == "verify_gpu"]
    assert gpu[-1]["at"] > waits[-1]["at"] and gpu[-1]["status"] == "ok"
    assert len(done["gpu"]) == 1, done["gpu"]
    n = rig.nomad.node(node.id)
    assert n.eligibility == "eligible" and not n.draining


# --- 2. the watcher keeps following the metadata server while it cannot report ------------------


@pytest.fixture()
def md() -> Iterator[MetadataServer]:
    s = MetadataServer(hang_s=2.0).start()
    yield s
    s.stop()


def _watcher_while_nomadscale_is_down(
    md: MetadataServer,
) -> tuple[ReportSink, FakeClock, MaintenanceWatcher]:
    sink = ReportSink("tok")
    sink.down.set()
    clock = FakeClock()
    w = MaintenanceWatcher(
        metadata=MetadataClient(base_url=md.url, hang_timeout_s=5),
        report_url=sink.url,
        token=Secret("tok"),
        node="gpu-zone-a-0000",
        clock=clock,
        backoff_max_s=8,
    )
    return sink, clock, w


def test_watcher_reports_the_latest_state_after_nomadscale_was_unreachable(
    md: MetadataServer,
) -> None:
    sink, clock, w = _watcher_while_nomadscale_is_down(md)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        with md.cond:
            assert md.cond.wait_for(
                lambda: any(r["query"].get("last_etag") not in (None, "0") for r in md.requests),
                timeout=5,
            )
        md.set_event(TERMINATE)
        assert sink.wait(lambda: any(a["event"] == TERMINATE for a in sink.attempts))
        # the notice ends while nomadscale is still unreachable: the watcher must notice
        md.set_event("NONE")
        assert sink.wait(lambda: any(a["event"] == "NONE" for a in sink.attempts)), [
            a["event"] for a in sink.attempts
        ]
        sink.down.clear()
        assert sink.wait(lambda: bool(sink.reports))
    finally:
        w.stop()
        md.set_event("NONE")  # wake a hanging GET so the thread ends
        t.join(10)
        w.close()
        sink.stop()
    assert not t.is_alive()
    # the stale notice is never reported once it is over; the end of it is
    assert [r["event"] for r in sink.reports] == ["NONE"], sink.reports
    assert w.reports == sink.reports
    assert clock.sleeps and max(clock.sleeps) <= 8.0


def test_watcher_reports_the_notice_with_its_deadline_from_when_it_was_seen(
    md: MetadataServer,
) -> None:
    sink, clock, w = _watcher_while_nomadscale_is_down(md)
    md.set_event(TERMINATE)
    seen = clock.now()
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        assert sink.wait(lambda: len(sink.attempts) >= 5)
        sink.down.clear()
        assert sink.wait(lambda: bool(sink.reports))
    finally:
        w.stop()
        md.set_event("NONE")
        t.join(10)
        w.close()
        sink.stop()
    report = sink.reports[0]  # (the end of the notice may follow while the watcher stops)
    assert report["event"] == TERMINATE
    assert all(r["event"] in (TERMINATE, "NONE") for r in sink.reports[1:]), sink.reports
    assert (clock.now() - seen).total_seconds() >= 1 + 2 + 4 + 8  # retried a while meanwhile
    assert (datetime.fromisoformat(report["deadline"]) - seen).total_seconds() == 3600


# --- 3. the incident is resolved even when the final note cannot be added ----------------------


def test_incident_resolved_when_the_final_note_fails(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    rig.pd.open_incident("Q4FINAL01")
    run = rig.engine.submit(
        "gpu-host-maintenance", {"node": node.id, "event": MIGRATE, "incident_id": "Q4FINAL01"}
    )
    steps = len(rig.engine.runbooks["gpu-host-maintenance"].steps)
    _drive_until(rig, run["id"], lambda r: r["step"] == steps)
    rig.pd.fail_next(500)  # the final note: PagerDuty has a hiccup
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded" and done["finalized"], done
    assert rig.pd.state.incidents["Q4FINAL01"]["status"] == "resolved"


# --- 4. dry runs ---------------------------------------------------------------------------------


def test_dry_run_for_a_node_being_healed_runs_as_a_dry_run(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    real = rig.engine.submit("gpu-host-maintenance", {"node": node.id, "event": TERMINATE})
    dry = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, dry_run=True)
    assert not dry.get("duplicate") and dry["id"] != real["id"], dry
    assert dry["status"] == "pending" and dry["dry_run"]
    assert dry["active_run"]["id"] == real["id"]
    done = rig.engine.run(dry["id"])
    assert done["status"] == "succeeded", done
    assert done["results"][0]["action"] == "dry_run"
    assert real["id"] in done["results"][0]["detail"]
    # and a real trigger meanwhile is still the real run's duplicate, never the dry run's
    dup = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, trigger="pagerduty:y")
    assert dup.get("duplicate") and dup["id"] == real["id"]
    assert rig.nomad.node(node.id).eligibility == "eligible"


def test_real_trigger_while_a_dry_run_is_active_is_not_a_duplicate(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    dry = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, dry_run=True)
    real = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, trigger="pagerduty:z")
    assert not real.get("duplicate") and real["id"] != dry["id"]
    assert real["status"] == "pending"


def test_dry_run_release_surge_says_what_it_would_release(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    run = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, dry_run=True)
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done
    (rel,) = [r for r in done["results"] if r["action"] == "release_surge"]
    assert rel["detail"].startswith("would release"), rel
    assert "ml-worker-a" in rel["detail"]
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2
