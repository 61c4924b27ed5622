"""``run`` as a real process (as systemd starts it): READY=1 over NOTIFY_SOCKET, /metrics
served, the healing webhooks mounted in the same process, the leader lock taken, and on
SIGTERM a clean exit that releases the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from nomadscale.core.clock import SystemClock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent
from tests.harness.twin import TwinFactory
from tests.service.helpers import make_policy

pytestmark = [pytest.mark.consul, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: bytes, *, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_run_notifies_systemd_serves_metrics_and_stops_on_sigterm(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    prefix = consul_prefix.rstrip("/")
    policy = make_policy()
    twin = twin_factory(nodes=4, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    NomadClient(address=twin.address).register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    port = _free_port()
    notify_path = str(tmp_path / "notify.sock")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "NOMAD_ADDR": twin.address,
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "PROMETHEUS_URL": "http://127.0.0.1:9",  # not reached before the first cycle
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMADSCALE_LOCK_TTL": "15s",
        "NOMADSCALE_HTTP_PORT": str(port),
        "NOTIFY_SOCKET": notify_path,
        "NOMADSCALE_RUNBOOKS": str(Path(__file__).resolve().parents[2] / "runbooks"),
        "NOMADSCALE_WEBHOOK_SECRETS": "whsec-test-0001",
        "NOMADSCALE_REPORT_TOKEN": "report-token-0001",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    code = "from nomadscale.cli.cmd_run import run; run.main([])"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        sock.settimeout(20)
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        try:
            try:
                ready = sock.recv(100)
            except TimeoutError:
                proc.kill()
                proc.wait()
                raise AssertionError(proc.stderr.read().decode()[-3000:]) from None  # type: ignore[union-attr]
            assert ready == b"READY=1"
            deadline = time.monotonic() + 10
            metrics = ""
            while time.monotonic() < deadline and "nomadscale_is_leader 1.0" not in metrics:
                time.sleep(0.2)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
            assert "nomadscale_is_leader 1.0" in metrics
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                assert "ekyc" in json.loads(r.read())["policies"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert r.status == 200
            # the healing routes are served by the same process
            base = f"http://127.0.0.1:{port}"
            report = json.dumps({"node": "gpu-1", "event": "NONE"}).encode()
            assert _post(f"{base}/maintenance/report", report, token="wrong") == 401
            assert _post(f"{base}/maintenance/report", report, token="report-token-0001") == 200
            assert _post(f"{base}/webhooks/pagerduty", b"{}", token=None) == 401  # unsigned
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert sock.recv(100) == b"STOPPING=1"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err = ""
            if proc.stderr is not None:
                err = proc.stderr.read().decode()
                proc.stderr.close()
    assert "effective settings" in err and "service stopped" in err, err[-2000:]
    assert "received SIGTERM" in err
    with urllib.request.urlopen(f"{consul_agent.addr}/v1/kv/{prefix}/leader", timeout=2) as r:
        assert "Session" not in json.loads(r.read())[0]  # the lock was released
