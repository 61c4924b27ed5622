"""Scripted healing as an operator and an on-call engineer meet it: a live-migration notice,
PagerDuty being unreachable while a node is healed, webhook retries after a failed hand-off,
incidents nomadscale cannot act on, and the node-side watcher's own logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nomadscale.config.settings import Secret
from nomadscale.healing.webhooks import make_app, sign
from nomadscale.integrations.consul import ConsulKV
from tests.harness.gce_metadata_server import MetadataServer
from tests.harness.services import free_port
from tests.healing.conftest import REPORT_TOKEN, WEBHOOK_SECRET, ZONES, Rig, serve
from tests.healing.test_e2e import incident_body, play_host_maintenance, post

ROOT = Path(__file__).resolve().parents[2]


def _report(rig: Rig, node: str, event: str) -> int:
    r = httpx.post(
        f"{rig.url}/maintenance/report",
        json={"node": node, "event": event, "deadline": None},
        headers={"Authorization": f"Bearer {REPORT_TOKEN}"},
    )
    return r.status_code


def test_live_migration_notice_does_not_wait_for_a_stop_that_never_comes(
    rig_factory: Any,
) -> None:
    # MIGRATE_ON_HOST_MAINTENANCE: the VM keeps running through a live migration, so the node
    # is never seen down; the run must not sit in wait_node(after_down) for 2 h and then fail
    # leaving the node ineligible.
    rig = rig_factory()
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    assert _report(rig, node.id, "MIGRATE_ON_HOST_MAINTENANCE") == 202
    run = rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance")
    run = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"], timeout=30)
    assert run["status"] == "succeeded", run
    waits = [r for r in run["results"] if r["action"] == "wait_node"]
    assert waits and waits[0]["detail"].startswith("skipped"), waits
    n = rig.nomad.node(node.id)
    assert n.eligibility == "eligible" and not n.draining
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2


def test_terminate_notice_still_waits_for_the_restart(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    assert _report(rig, node.id, "TERMINATE_ON_HOST_MAINTENANCE") == 202
    run = rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance")
    play_host_maintenance(rig, node.id, run["id"])
    run = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"], timeout=30)
    assert run["status"] == "succeeded", run
    wait = next(r for r in run["results"] if r["action"] == "wait_node")
    assert wait["detail"].endswith("is ready"), wait


def test_pagerduty_outage_does_not_abort_the_healing(rig_factory: Any) -> None:
    # the first step of gpu-host-maintenance is a note; PagerDuty being down (or the incident
    # gone) must not stop the node from being moved off before the maintenance
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    rig.pd.stop()
    run = rig.engine.submit(
        "gpu-host-maintenance",
        {"node": node.name, "incident_id": "Q3PDDOWN1", "event": "MIGRATE_ON_HOST_MAINTENANCE"},
    )
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done
    first = done["results"][0]
    assert first["action"] == "notify" and first["status"] == "ok"
    assert first["detail"].startswith("note not added"), first
    assert [r["action"] for r in done["results"]].count("drain") == 1


def test_note_to_an_unknown_incident_does_not_abort_the_healing(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    rig.pd.fail_next(404)
    run = rig.engine.submit(
        "gpu-host-maintenance",
        {"node": node.id, "incident_id": "Q3GONE01", "event": "MIGRATE_ON_HOST_MAINTENANCE"},
    )
    done = rig.engine.run(run["id"])
    assert done["status"] == "succeeded", done
    assert "not found" in done["results"][0]["detail"]
    # the other notes and the resolution still reach the incident
    notes = [x["content"] for x in rig.pd.state.notes["Q3GONE01"]]
    assert "eligible again" in notes[0] and "SUCCEEDED" in notes[-1]


def test_webhook_not_recorded_is_not_a_duplicate_on_retry(rig_factory: Any) -> None:
    # the de-duplication store (Consul) is unreachable: PagerDuty must get a retryable answer
    # (503, not a 500 with a traceback), and its retry must not be dropped as a duplicate
    rig = rig_factory()
    dead = ConsulKV(addr=f"http://127.0.0.1:{free_port()}")
    app = make_app(engine=rig.engine, secrets=[Secret(WEBHOOK_SECRET)], report_token=None, kv=dead)
    url, server, thread = serve(app)
    try:
        body = incident_body("Something unrelated happened")
        headers = {
            "Content-Type": "application/json",
            "X-Webhook-Id": "wh-consul-down",
            "X-PagerDuty-Signature": sign(WEBHOOK_SECRET, body),
        }
        first = httpx.post(f"{url}/webhooks/pagerduty", content=body, headers=headers)
        retry = httpx.post(f"{url}/webhooks/pagerduty", content=body, headers=headers)
    finally:
        server.should_exit = True
        thread.join(5)
    assert first.status_code == 503, first.text
    assert retry.status_code == 503, retry.text
    assert "duplicate" not in retry.text


def test_matched_incident_that_cannot_run_gets_a_note(rig_factory: Any) -> None:
    # a title naming a node Nomad does not know: the on-call must see why nothing happened
    rig = rig_factory()
    rig.engine.start()
    rig.pd.open_incident("Q3NONODE1")
    body = incident_body("Nomad node down: gpu-zone-z-0099", "Q3NONODE1")
    assert post(rig, body, sign(WEBHOOK_SECRET, body)) == 202
    assert rig.pd.wait_for(lambda s: bool(s.notes.get("Q3NONODE1")), timeout=10)
    (note,) = rig.pd.state.notes["Q3NONODE1"]
    assert "node-down" in note["content"] and "not found in Nomad" in note["content"]
    assert rig.engine.list_runs() == []


def test_incident_for_a_node_already_being_healed_gets_a_note(rig_factory: Any) -> None:
    # the watcher's report and the PagerDuty incident for the same maintenance: one run, and
    # the incident is told which run handles it
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    first = rig.engine.submit("gpu-host-maintenance", {"node": node.id}, trigger="maintenance:x")
    rig.engine.start()
    rig.pd.open_incident("Q3DUP0001")
    body = incident_body(
        f"GPU host maintenance: TERMINATE_ON_HOST_MAINTENANCE on {node.name}", "Q3DUP0001"
    )
    assert post(rig, body, sign(WEBHOOK_SECRET, body)) == 202
    assert rig.pd.wait_for(lambda s: bool(s.notes.get("Q3DUP0001")), timeout=10)
    (note,) = rig.pd.state.notes["Q3DUP0001"]
    assert first["id"] in note["content"] and "already" in note["content"]
    assert [r["id"] for r in rig.engine.list_runs()] == [first["id"]]


@pytest.fixture()
def md() -> Any:
    s = MetadataServer(hang_s=2.0).start()
    yield s
    s.stop()


def test_watch_maintenance_logs_as_configured_and_never_the_token(
    rig_factory: Any, md: MetadataServer
) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMADSCALE_", "NOMAD_"))} | {
        "NOMADSCALE_REPORT_TOKEN": REPORT_TOKEN,
        "NOMADSCALE_LOG_JSON": "true",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomadscale", "watch-maintenance",
         "--report-url", f"{rig.url}/maintenance/report",
         "--metadata-url", md.url, "--node-id", node.id],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(
            r["query"].get("last_etag") not in (None, "0") for r in md.requests
        ):
            time.sleep(0.05)
        md.set_event("TERMINATE_ON_HOST_MAINTENANCE")
        rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance", timeout=20)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    lines = [json.loads(x) for x in (out + err).splitlines() if x.startswith("{")]
    msgs = [x.get("message", x.get("msg", "")) for x in lines]
    assert any("maintenance reported: TERMINATE_ON_HOST_MAINTENANCE" in m for m in msgs), out + err
    assert REPORT_TOKEN not in out + err


@pytest.mark.parametrize("url", ["nomadscale:9464/maintenance/report", "ftp://x/report", ""])
def test_watch_maintenance_rejects_a_report_url_that_is_not_http(url: str) -> None:
    env = dict(os.environ, NOMADSCALE_REPORT_TOKEN="tok", NOMAD_NODE_ID="n1")
    r = subprocess.run(
        [sys.executable, "-m", "nomadscale", "watch-maintenance", "--report-url", url,
         "--metadata-url", "http://127.0.0.1:9/computeMetadata/v1"],
        env=env, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: --report-url") and "Traceback" not in r.stderr


@pytest.mark.parametrize("short", [True, False], ids=["8-char-prefix", "full-id"])
def test_stuck_allocation_by_prefix_or_full_id_is_replaced(rig_factory: Any, short: bool) -> None:
    # the runbook's parameter: "allocation id (full UUID or 8-char prefix)", as `nomad alloc
    # status` shows it
    rig = rig_factory()
    before = rig.nomad.job_allocations("ml-worker", namespace="ekyc")
    alloc = min(  # the oldest: its group has younger workers that are no replacement
        (a for a in before if a.client_status == "running" and not a.terminal),
        key=lambda a: a.create_index,
    )
    ref = alloc.id[:8] if short else alloc.id
    run = rig.engine.submit("stuck-allocation", {"allocation": ref})
    assert run["values"]["allocation.id"] == alloc.id
    rig.engine.start()
    rig.engine.enqueue(run["id"])
    done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"], timeout=30)
    assert done["status"] == "succeeded", done
    assert rig.nomad.allocation(alloc.id).terminal
    detail = done["results"][1]["detail"]
    assert detail.startswith("replaced by"), detail
    (new,) = [
        a
        for a in rig.nomad.job_allocations("ml-worker", namespace="ekyc")
        if a.id.startswith(detail.split()[-1])
    ]
    assert new.id not in {a.id for a in before} and new.task_group == alloc.task_group
    assert new.client_status == "running"


def test_unknown_allocation_is_a_one_line_refusal(rig_factory: Any) -> None:
    from nomadscale.core.errors import PermanentError

    rig = rig_factory()
    with pytest.raises(PermanentError, match=r"^allocation 'deadbeef' not found in Nomad$"):
        rig.engine.submit("stuck-allocation", {"allocation": "deadbeef"})
    assert rig.engine.list_runs() == []
