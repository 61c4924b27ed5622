"""Per-policy PagerDuty routing (over the loopback PagerDuty server), and the one-line error
of ``run`` on a broken configuration (through the real ``python -m nomadscale``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nomadscale.service.runtime import alerts_for
from tests.harness.pagerduty_server import PagerDutyServer
from tests.service.helpers import make_policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pd() -> Iterator[PagerDutyServer]:
    server = PagerDutyServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_each_policy_alerts_with_its_own_routing_key(pd: PagerDutyServer) -> None:
    a = make_policy(name="ekyc", alerting={"pagerduty_routing_key_env": "PD_KEY_EKYC"})
    b = make_policy(name="ocr", alerting={"pagerduty_routing_key_env": "PD_KEY_OCR"})
    c = make_policy(name="quiet")  # no routing key: its alerts are dropped (and logged)
    env = {"PD_KEY_EKYC": "key-ekyc-0001", "PD_KEY_OCR": "key-ocr-0002"}
    alerts = alerts_for([a, b, c], env=env, base_url=pd.url)
    assert alerts is not None and "key-" not in repr(alerts)
    alerts.trigger(dedup_key="nomadscale/ocr/cycles-failing", summary="ocr failing",
                   severity="error", details={"policy": "ocr"})  # fmt: skip
    alerts.trigger(dedup_key="nomadscale/ekyc/drain/n1", summary="ekyc drain stuck",
                   severity="warning", details={"node": "n1"})  # fmt: skip
    alerts.resolve(dedup_key="nomadscale/ocr/cycles-failing")
    alerts.trigger(dedup_key="nomadscale/quiet/capacity", summary="x", severity="error",
                   details={"policy": "quiet"})  # fmt: skip
    sent = [(e["routing_key"], e["event_action"], e["dedup_key"]) for e in pd.state.events]
    assert sent == [
        ("key-ocr-0002", "trigger", "nomadscale/ocr/cycles-failing"),
        ("key-ekyc-0001", "trigger", "nomadscale/ekyc/drain/n1"),
        ("key-ocr-0002", "resolve", "nomadscale/ocr/cycles-failing"),
    ]
    assert alerts_for([c], env=env) is None


def _nomadscale(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))}
    return subprocess.run(
        [sys.executable, "-m", "nomadscale", *args], env={**base, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_run_reports_a_config_error_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("{}\n")
    bad = tmp_path / "policies"
    bad.mkdir()
    doc = make_policy().to_yaml_dict()
    doc["cycle"] = "7m"  # does not divide a day
    doc["lead_time"] = "5m"  # (shorter than the cycle: the one mistake in the file)
    (bad / "ekyc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {"NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"), "NOMADSCALE_POLICIES": str(bad)}
    for extra, want in (
        ({}, f"{bad / 'ekyc.yaml'}:2: cycle: must be whole minutes"),
        ({"NOMADSCALE_LOG_LEVEL": "verbose"}, "NOMADSCALE_LOG_LEVEL: unknown level 'verbose'"),
    ):
        res = _nomadscale("run", "--once", env={**env, **extra})
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], res.stderr
        assert "Traceback" not in res.stderr + res.stdout
