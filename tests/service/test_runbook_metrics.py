"""Runbook metrics on the service's /metrics over real HTTP: the healing webhooks mounted on the
service app (as `nomadscale run`/`serve` do), a signed PagerDuty webhook runs a runbook on the
Nomad twin (the healing rig), and the run, its duration, its triggers by source and the runs in
progress show on the scrape. The engine's metrics are process-wide, so the checks are deltas."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import httpx
import pytest

from nomadscale.config.settings import Secret
from nomadscale.healing.webhooks import routes, sign
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.records import Metrics
from tests.harness.services import free_port
from tests.healing.conftest import REPORT_TOKEN, WEBHOOK_SECRET, ZONES, Rig
from tests.healing.conftest import rig_factory as rig_factory  # the healing rig, as a fixture
from tests.healing.test_e2e import incident_body, play_host_maintenance
from tests.service.test_deploy_metrics import Samples, scrape, value

RB = "gpu-host-maintenance"
RUNS = "nomadscale_runbook_runs_total"
TRIGGERS = "nomadscale_runbook_triggers_total"
IN_PROGRESS = "nomadscale_runbook_runs_in_progress"
DURATION = "nomadscale_runbook_run_duration_seconds"


@contextmanager
def service(rig: Rig) -> Iterator[str]:
    """The service's app with the healing routes of the rig's engine, on loopback."""
    metrics = Metrics()
    hooks = routes(
        engine=rig.engine, secrets=[Secret(WEBHOOK_SECRET)], report_token=Secret(REPORT_TOKEN)
    )
    app = create_app(registry=metrics.registry, status=lambda: {}, extra_routes=hooks)
    server = HttpServer(app, host="127.0.0.1", port=free_port()).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def v(samples: Samples, name: str, **labels: str) -> float:
    return value(samples, name, **labels) or 0.0


def wait_scrape(url: str, pred: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    end = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if pred(m):
            return m
        assert time.monotonic() < end, "the scrape never showed the expected values"
        time.sleep(0.05)


def post_incident(url: str, title: str, incident: str) -> int:
    body = incident_body(title, incident)
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Id": uuid.uuid4().hex,
        "X-PagerDuty-Signature": sign(WEBHOOK_SECRET, body),
    }
    return httpx.post(f"{url}/webhooks/pagerduty", content=body, headers=headers).status_code


def test_webhook_run_shows_runs_duration_triggers_and_in_progress(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    node = rig.twin.cluster.nodes[rig.node_id(ZONES[0])]
    title = f"GPU host maintenance: TERMINATE_ON_HOST_MAINTENANCE on {node.name}"
    rig.pd.open_incident("Q2HMETR01")
    with service(rig) as url:
        before = scrape(url)
        assert value(before, IN_PROGRESS, runbook=RB) == 0.0  # a series per loaded runbook
        rig.engine.start()
        assert post_incident(url, title, "Q2HMETR01") == 202
        run = rig.wait_run(lambda r: r["runbook"] == RB)
        wait_scrape(url, lambda m: v(m, IN_PROGRESS, runbook=RB) == 1.0)
        # PagerDuty sends the incident again while the run is active: one run, a duplicate
        assert post_incident(url, title, "Q2HMETR01") == 202
        wait_scrape(
            url,
            lambda m: (
                v(m, TRIGGERS, runbook=RB, source="pagerduty", result="duplicate")
                == v(before, TRIGGERS, runbook=RB, source="pagerduty", result="duplicate") + 1
            ),
        )
        play_host_maintenance(rig, node.id, run["id"])
        done = rig.wait_run(lambda r: r["id"] == run["id"] and r["finalized"])
        assert done["status"] == "succeeded", done
        ok = {"runbook": RB, "outcome": "succeeded", "dry_run": "false"}
        after = wait_scrape(url, lambda m: v(m, RUNS, **ok) == v(before, RUNS, **ok) + 1)
    took = (
        datetime.fromisoformat(done["updated_at"]) - datetime.fromisoformat(done["created_at"])
    ).total_seconds()
    assert took > 0
    assert (
        v(after, f"{DURATION}_count", runbook=RB) == v(before, f"{DURATION}_count", runbook=RB) + 1
    )
    assert v(after, f"{DURATION}_sum", runbook=RB) - v(
        before, f"{DURATION}_sum", runbook=RB
    ) == pytest.approx(took, abs=1.0)
    accepted = {"runbook": RB, "source": "pagerduty", "result": "accepted"}
    assert v(after, TRIGGERS, **accepted) == v(before, TRIGGERS, **accepted) + 1
    assert v(after, IN_PROGRESS, runbook=RB) == 0.0
    failed = {"runbook": RB, "outcome": "failed", "dry_run": "false"}
    assert v(after, RUNS, **failed) == v(before, RUNS, **failed)


def test_refused_watcher_report_and_cli_trigger_are_counted_by_source(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()  # engine not started: the first run stays pending, holding the zone
    a0, a1 = rig.node_id(ZONES[0], 0), rig.node_id(ZONES[0], 1)
    with service(rig) as url:
        before = scrape(url)
        first = rig.engine.submit(RB, {"node": a0}, trigger="manual")  # `nomadscale runbook run`
        assert first["status"] == "pending"
        report = {"node": a1, "event": "TERMINATE_ON_HOST_MAINTENANCE", "deadline": None}
        r = httpx.post(
            f"{url}/maintenance/report", json=report,
            headers={"Authorization": f"Bearer {REPORT_TOKEN}"},
        )  # fmt: skip
        assert r.status_code == 202
        refused = {"runbook": RB, "outcome": "refused", "dry_run": "false"}
        after = wait_scrape(url, lambda m: v(m, RUNS, **refused) == v(before, RUNS, **refused) + 1)
    manual = {"runbook": RB, "source": "manual", "result": "accepted"}
    watcher = {"runbook": RB, "source": "maintenance", "result": "refused"}
    assert v(after, TRIGGERS, **manual) == v(before, TRIGGERS, **manual) + 1
    assert v(after, TRIGGERS, **watcher) == v(before, TRIGGERS, **watcher) + 1
    # a refused run never ran: no duration observed
    assert v(after, f"{DURATION}_count", runbook=RB) == v(before, f"{DURATION}_count", runbook=RB)
