"""``run`` as a real process (as systemd starts it): READY=1 over NOTIFY_SOCKET, /metrics
served, the healing webhooks mounted in the same process, the leader lock taken, and on
SIGTERM a clean exit that releases the lock."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nomadscale.core.clock import SystemClock
from tests.harness.services import ConsulAgent, free_port
from tests.harness.twin import TwinFactory
from tests.service.helpers import run_process_env

pytestmark = [pytest.mark.consul, pytest.mark.slow]


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
    port = free_port()
    notify_path = str(tmp_path / "notify.sock")
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=port, healing=True)  # fmt: skip
    env["NOTIFY_SOCKET"] = notify_path
    env["NOMADSCALE_REPORT_TOKEN"] = "report-token-0001"
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
