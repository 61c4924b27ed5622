"""The service's /metrics and /status over real HTTP, and the sd_notify protocol over a real
unix datagram socket."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

import requests

from nomadscale.service import systemd
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.records import CycleRecord, Metrics, Recorder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_and_status_are_served() -> None:
    metrics = Metrics()
    rec = Recorder(kv=None, metrics=metrics)
    rec.record(
        CycleRecord(
            policy="ekyc", started_at=datetime(2026, 1, 5, tzinfo=UTC), outcome="skipped",
            skipped="deployment", reason="deployment d1 is active",
            zones={"zone-a": {"desired": 3, "actual": 2}},
            decision={"forecast": {"peak": 100.0, "upper": 130.0}, "explain": "x"},
        )
    )  # fmt: skip
    metrics.is_leader.set(1)
    port = _free_port()
    server = HttpServer(
        create_app(registry=metrics.registry, status=lambda: {"leader": "me"}),
        host="127.0.0.1",
        port=port,
    ).start()
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'nomadscale_cycles_skipped_total{policy="ekyc",reason="deployment"} 1.0' in text
        assert 'nomadscale_workers_desired{policy="ekyc",zone="zone-a"} 3.0' in text
        assert 'nomadscale_workers_actual{policy="ekyc",zone="zone-a"} 2.0' in text
        assert 'nomadscale_forecast_upper_rpm{policy="ekyc"} 130.0' in text
        assert "nomadscale_is_leader 1.0" in text
        assert requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json() == {"leader": "me"}
    finally:
        server.stop()


def test_sd_notify_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": path})
        assert sock.recv(100) == b"READY=1"
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path})
        assert sock.recv(100) == b"WATCHDOG=1"
    assert not systemd.notify("READY=1", env={})
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert systemd.watchdog_interval_s({}) is None
