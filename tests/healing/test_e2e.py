"""End to end over real HTTP: signed PagerDuty webhook -> runbook on the Nomad twin -> notes
and resolution on a loopback PagerDuty; forged webhooks change nothing; a killed engine
resumes its run from KV."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from nomadscale.healing.runbook import check_runbook
from nomadscale.healing.webhooks import sign
from tests.healing.conftest import REPORT_TOKEN, WEBHOOK_SECRET, XID_79, ZONES, Rig


def incident_body(title: str, incident: str = "Q2HMAINT01") -> bytes:
    event = {
        "event": {
            "id": "01" + uuid.uuid4().hex[:12].upper(),
            "event_type": "incident.triggered",
            "resource_type": "incident",
            "occurred_at": "2026-01-05T00:00:00.000Z",
            "agent": None,
            "client": None,
            "data": {
                "id": incident,
                "type": "incident",
                "self": f"https://api.pagerduty.com/incidents/{incident}",
                "html_url": f"https://acme.pagerduty.com/incidents/{incident}",
                "number": 42,
                "status": "triggered",
                "incident_key": "gce-maint-1",
                "created_at": "2026-01-05T00:00:00Z",
                "title": title,
                "service": {"id": "PSVC001", "type": "service_reference", "summary": "ekyc-gpu"},
                "assignees": [],
                "escalation_policy": {"id": "PEP1", "type": "escalation_policy_reference"},
                "teams": [],
                "priority": None,
                "urgency": "high",
                "conference_bridge": None,
                "resolve_reason": None,
            },
        }
    }
    return json.dumps(event).encode()


def post(rig: Rig, body: bytes, signature: str | None, webhook_id: str | None = None) -> int:
    headers = {"Content-Type": "application/json", "X-Webhook-Id": webhook_id or uuid.uuid4().hex}
    if signature is not None:
        headers["X-PagerDuty-Signature"] = signature
    return httpx.post(f"{rig.url}/webhooks/pagerduty", content=body, headers=headers).status_code


def play_host_maintenance(rig: Rig, node_id: str, run_id: str) -> None:
    """The VM is stopped once drained, and boots again on a new host."""
    rig.wait_run(
        lambda r: (
            r["id"] == run_id
            and r["step_state"].get("seen_down") is None
            and any(
                x["action"] == "wait_condition" and x["detail"].endswith("drained")
                for x in r["results"]
            )
        )
    )
    rig.twin.cluster.set_node_status(node_id, "down")
    rig.wait_run(lambda r: r["id"] == run_id and r["step_state"].get("seen_down") is True)
    rig.twin.cluster.set_node_status(node_id, "ready")


def running_in_zone(rig: Rig, zone: str, exclude: str) -> list[Any]:
    return [
        a
        for a in rig.nomad.job_allocations("ml-worker", namespace="ekyc")
        if a.client_status == "running"
        and not a.terminal
        and a.node_id != exclude
        and rig.twin.cluster.nodes[a.node_id].datacenter == zone
    ]


def test_host_maintenance_incident_heals_and_resolves(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    rig.pd.open_incident("Q2HMAINT01")
    body = incident_body(f"GPU host maintenance: TERMINATE_ON_HOST_MAINTENANCE on {node.name}")
    assert post(rig, body, sign(WEBHOOK_SECRET, body)) == 202
    run = rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance")
    assert run["values"]["node.id"] == node.id and run["values"]["zone"] == ZONES[0]
    play_host_maintenance(rig, node.id, run["id"])
    run = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    assert run["status"] == "succeeded", run
    # drained, replaced in the same zone, back and eligible, surge released
    assert any(
        e.get("type") == "node_status" and e.get("status") == "down"
        for e in rig.twin.cluster.events
    )
    n = rig.nomad.node(node.id)
    assert n.status == "ready" and n.eligibility == "eligible" and not n.draining
    assert len(running_in_zone(rig, ZONES[0], exclude=node.id)) >= 2
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2
    notes = [x["content"] for x in rig.pd.state.notes["Q2HMAINT01"]]
    assert notes[0].startswith("nomadscale gpu-host-maintenance run")
    assert "SUCCEEDED" in notes[-1] and "verify_gpu: ok: GPU check healthy" in notes[-1]
    assert rig.pd.state.incidents["Q2HMAINT01"]["status"] == "resolved"


def test_policy_zone_found_through_the_group_pinned_to_the_node_datacenter(
    rig_factory: Any,
) -> None:
    # the shipped job files and the Vagrant cluster: Nomad datacenters zone-a/zone-b, while the
    # policy's zones are named for the GCE zones and reach them through their groups
    rig = rig_factory(datacenters=("zone-a", "zone-b"))
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id("zone-b")]
    run = rig.engine.submit("gpu-host-maintenance", {"node": node.name}, trigger="manual")
    rig.engine.enqueue(run["id"])
    assert run["values"]["datacenter"] == "zone-b"
    play_host_maintenance(rig, node.id, run["id"])
    run = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    assert run["status"] == "succeeded", run
    surge = next(x for x in run["results"] if x["action"] == "surge")
    assert "ml-worker-b" in surge["detail"], surge
    assert len(running_in_zone(rig, "zone-b", exclude=node.id)) >= 2
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-b"].desired == 2


def test_unhealthy_gpu_leaves_node_ineligible_and_incident_open(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.gpu.outputs["xid"] = XID_79
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    rig.pd.open_incident("Q2HMAINT02")
    body = incident_body(
        f"GPU host maintenance: TERMINATE_ON_HOST_MAINTENANCE on {node.name}", "Q2HMAINT02"
    )
    assert post(rig, body, sign(WEBHOOK_SECRET, body)) == 202
    run = rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance")
    play_host_maintenance(rig, node.id, run["id"])
    run = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    assert run["status"] == "failed" and "Xid 79" in run["error"]
    assert rig.nomad.node(node.id).eligibility == "ineligible"
    assert rig.pd.state.incidents["Q2HMAINT02"]["status"] == "triggered"
    last = rig.pd.state.notes["Q2HMAINT02"][-1]["content"]
    assert "FAILED - escalated" in last and "GPU has fallen off the bus" in last
    # the surge was given back by on_failure
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-b"].desired == 2


@pytest.mark.parametrize(
    "signature",
    [None, "v1=" + "0" * 64, sign("wrong-secret", b"x"), "v0=abc", ""],
    ids=["missing", "zeros", "other-secret", "other-version", "empty"],
)
def test_forged_webhooks_change_nothing(rig_factory: Any, signature: str | None) -> None:
    rig = rig_factory()
    rig.engine.start()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    before = list(rig.twin.cluster.events)
    body = incident_body(f"GPU host maintenance: TERMINATE_ON_HOST_MAINTENANCE on {node.name}")
    assert post(rig, body, signature) == 401
    time.sleep(0.2)
    assert rig.twin.cluster.events == before
    assert rig.engine.list_runs() == []


def test_signature_rotation_duplicates_and_limits(rig_factory: Any) -> None:
    rig = rig_factory()
    body = incident_body("Something unrelated happened")
    rotated = f"v1={'a' * 64}, {sign(WEBHOOK_SECRET, body)}"
    assert post(rig, body, rotated, webhook_id="wh-1") == 202
    assert post(rig, body, rotated, webhook_id="wh-1") == 200  # PagerDuty retry: ignored
    bad = b'{"event": "nope"}'
    assert post(rig, bad, sign(WEBHOOK_SECRET, bad)) == 400
    big = b"{" + b" " * (600 * 1024) + b"}"
    assert post(rig, big, sign(WEBHOOK_SECRET, big)) == 413
    assert rig.engine.list_runs() == []


def test_maintenance_report_needs_the_token(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    report = {"node": node.id, "event": "TERMINATE_ON_HOST_MAINTENANCE", "deadline": None}
    r = httpx.post(
        f"{rig.url}/maintenance/report", json=report, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401
    r = httpx.post(
        f"{rig.url}/maintenance/report",
        json={"node": "../../etc"},
        headers={"Authorization": f"Bearer {REPORT_TOKEN}"},
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{rig.url}/maintenance/report",
        json=report,
        headers={"Authorization": f"Bearer {REPORT_TOKEN}"},
    )
    assert r.status_code == 202
    run = rig.wait_run(lambda r: r["runbook"] == "gpu-host-maintenance")
    assert run["trigger"] == "maintenance:TERMINATE_ON_HOST_MAINTENANCE"


def test_killed_engine_resumes_from_kv(rig_factory: Any) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    first = rig.engine
    run = first.submit("gpu-host-maintenance", {"node": node.name})
    first.run(run["id"], max_calls=4)  # notify, ineligible, surge, ... then the process dies
    saved = first.get_run(run["id"])
    assert saved is not None and saved["status"] == "running" and saved["surge"]["target"] == 3
    del first
    second = rig.make_engine()
    rig.engine = second
    assert second.resume_all() == [run["id"]]
    second.start(workers=1)
    play_host_maintenance(rig, node.id, run["id"])
    done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    assert done["status"] == "succeeded"
    actions = [r["action"] for r in done["results"]]
    assert actions.count("surge") == 1 and actions.count("mark_ineligible") == 1
    assert rig.nomad.job_status("ml-worker", namespace="ekyc").groups["ml-worker-a"].desired == 2
    second.stop()


def test_second_node_in_zone_refused_and_capacity_floor(rig_factory: Any, tmp_path: Any) -> None:
    rig = rig_factory()
    a0, a1 = rig.node_id(ZONES[0], 0), rig.node_id(ZONES[0], 1)
    first = rig.engine.submit("gpu-host-maintenance", {"node": a0})
    assert first["status"] == "pending"
    second = rig.engine.submit("gpu-xid-error", {"node": a1})
    assert second["status"] == "refused" and "zone asia-southeast2-a" in second["error"]
    # a drain that would leave zone b below its floor (bounds.min 2 -> 1 per zone) is refused
    rig.nomad.scale("ml-worker", "ml-worker-b", 1, message="test", namespace="ekyc")
    rig.twin.advance(120)
    (b_node,) = {a.node_id for a in running_in_zone(rig, ZONES[1], exclude="")}
    rb = check_runbook_text(
        tmp_path,
        "name: drain-only\npolicy: ekyc-ml\nparameters: {node: {}}\n"
        "steps:\n  - action: mark_ineligible\n  - action: drain\n",
    )
    rig.engine.runbooks[rb.name] = rb
    run = rig.engine.submit("drain-only", {"node": b_node})
    done = rig.engine.run(run["id"])
    assert done["status"] == "failed"
    assert done["results"][-1]["status"] == "refused"
    assert "would keep 0 healthy worker(s), policy ekyc-ml needs at least 1" in done["error"]
    assert not rig.nomad.node(b_node).draining


def check_runbook_text(tmp_path: Any, text: str) -> Any:
    p = tmp_path / "rb.yaml"
    p.write_text(text)
    rb, errors = check_runbook(p)
    assert rb is not None, errors
    return rb


@pytest.mark.consul
def test_resume_with_state_in_real_consul(
    rig_factory: Any, consul_agent: Any, consul_prefix: str
) -> None:
    from nomadscale.integrations.consul import ConsulKV

    kv = ConsulKV(addr=consul_agent.addr, token=consul_agent.token)
    rig = rig_factory(kv=kv, prefix=consul_prefix.rstrip("/"))
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[1])]
    run = rig.engine.submit("gpu-host-maintenance", {"node": node.id})
    rig.engine.run(run["id"], max_calls=3)
    second = rig.make_engine()
    rig.engine = second
    assert second.resume_all() == [run["id"]]
    second.start(workers=1)
    play_host_maintenance(rig, node.id, run["id"])
    done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
    assert done["status"] == "succeeded"
    assert kv.get(f"{consul_prefix.rstrip('/')}/runbooks/locks/zone/{ZONES[1]}") is None
    second.stop()
