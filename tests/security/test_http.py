"""The service's HTTP endpoints: loopback unless configured; /metrics, /status and /healthz
carry no secrets; webhook and maintenance-report endpoints need their signature/token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from nomadscale.config.settings import Settings, load_settings
from nomadscale.core.clock import FakeClock
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.loop import Service
from nomadscale.service.runtime import build_ports
from nomadscale.service.simulate import default_policy, default_trace
from nomadscale.sim import Cluster, TwinServer
from tests.fuzz.webhook_rig import REPORT_TOKEN, WEBHOOK_SECRET, WebhookRig, webhook_rig
from tests.harness.services import free_port

NOMAD_TOKEN = "nomad-HTTP-SECRET-0a1b2c3d-4e5f"
CONSUL_TOKEN = "consul-HTTP-SECRET-9f8e7d6c"
PD_KEY = "pd-HTTP-SECRET-abcdef"


def _listening_on(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets LISTENing on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                out.add(addr)
    return out


def test_http_host_defaults_to_loopback(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("{}\n")
    s = load_settings({"NOMADSCALE_CONFIG": str(tmp_path / "cfg.yaml")})
    assert s.http_host == "127.0.0.1"
    assert Settings().http_host == "127.0.0.1"


@pytest.fixture
def acl_twin() -> Iterator[TwinServer]:
    cluster = Cluster.build(nodes=2, clock=FakeClock(), acl_token=NOMAD_TOKEN)
    server = TwinServer(cluster).start()
    yield server
    server.stop()


@pytest.fixture
def service(acl_twin: TwinServer, tmp_path: Path) -> Iterator[Service]:
    (tmp_path / "cfg.yaml").write_text("{}\n")
    settings = load_settings(
        {
            "NOMADSCALE_CONFIG": str(tmp_path / "cfg.yaml"),
            "NOMAD_ADDR": acl_twin.address,
            "NOMAD_TOKEN": NOMAD_TOKEN,
            "CONSUL_HTTP_TOKEN": CONSUL_TOKEN,
            "NOMADSCALE_PD_API_KEY": PD_KEY,
            "NOMADSCALE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "NOMADSCALE_REPORT_TOKEN": REPORT_TOKEN,
            "NOMADSCALE_HTTP_PORT": str(free_port()),
        }
    )
    clock = FakeClock()
    policies = [default_policy(default_trace())]
    ports = build_ports(settings, policies, clock=clock, dry_run=True)
    svc = Service(settings=settings, policies=policies, ports=ports, clock=clock, dry_run=True)
    svc.run_once()
    yield svc
    svc.stop()


def test_metrics_status_healthz_carry_no_secrets_and_bind_loopback(service: Service) -> None:
    s = service.settings
    app = create_app(registry=service.metrics.registry, status=service.status)
    http = HttpServer(app, host=s.http_host, port=s.http_port).start()
    try:
        assert _listening_on(s.http_port) == {"0100007F"}  # 127.0.0.1 only
        base = f"http://127.0.0.1:{s.http_port}"
        bodies = []
        answers = {}
        for path in ("/metrics", "/status", "/healthz"):
            r = httpx.get(base + path, timeout=5)
            assert r.status_code in (200, 503), (path, r.status_code)
            answers[path] = r.text
            bodies.append(r.text + json.dumps(dict(r.headers)))
        assert "nomadscale_cycles_total" in answers["/metrics"]
        names = {p.name for p in service.policies.values()}
        assert names <= set(json.loads(answers["/status"])["policies"])
    finally:
        http.stop()
    blob = "\n".join(bodies)
    for token in (NOMAD_TOKEN, CONSUL_TOKEN, PD_KEY, WEBHOOK_SECRET, REPORT_TOKEN):
        assert token not in blob


@pytest.fixture(scope="module")
def rig() -> Iterator[WebhookRig]:
    yield from webhook_rig()


def test_webhook_and_report_endpoints_need_credentials(rig: WebhookRig) -> None:
    body = json.dumps(
        {"event": {"id": "E1", "event_type": "incident.triggered", "data": {"title": "x"}}}
    ).encode()
    with TestClient(rig.app) as client:
        assert client.post("/webhooks/pagerduty", content=body).status_code == 401
        r = client.post(
            "/webhooks/pagerduty", content=body, headers={"x-pagerduty-signature": "v1=00"}
        )
        assert r.status_code == 401
        report = {"node": "gpu-0001", "event": "TERMINATE_ON_HOST_MAINTENANCE"}
        assert client.post("/maintenance/report", json=report).status_code == 401
        r = client.post("/maintenance/report", json=report, headers={"authorization": "Bearer "})
        assert r.status_code == 401
        r = client.post(
            "/maintenance/report",
            json=report,
            headers={"authorization": f"Bearer {REPORT_TOKEN}"},
        )
        assert r.status_code == 202
        assert client.get("/webhooks/pagerduty").status_code == 405
