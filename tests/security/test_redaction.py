"""Secrets from the settings are masked in every log line, whoever formats them, and the
PagerDuty endpoints can be pointed elsewhere (an EU account, a proxy) by setting."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from nomadscale.cli.cmd_runbook import build_engine
from nomadscale.config.settings import load_settings
from nomadscale.core.logs import setup_logging
from tests.harness.pagerduty_server import PagerDutyServer

NOMAD = "nomad-REDACT-7a11-4bad-b0a7-c0ffee000010"
PD_FILE = "pd-REDACT-FROMFILE-u+qrstuvwxyz"
CONSUL_YAML = "consul-REDACT-yaml-9999-4bad-b0a7"
HOOKS = ("hook-REDACT-old-secret", "hook-REDACT-new-secret")


def test_every_configured_secret_is_masked_in_log_lines(tmp_path: Path) -> None:
    """A client library's exception text or a careless debug line carrying a token: the
    service's log formatter (plain and JSON) prints *** instead, for secrets given in the
    environment, in a *_FILE and in the settings file."""
    (tmp_path / "pd").write_text(PD_FILE + "\n")
    (tmp_path / "cfg.yaml").write_text(f"consul_token: {CONSUL_YAML}\n")
    load_settings(
        {
            "NOMAD_TOKEN": NOMAD,
            "NOMADSCALE_PD_API_KEY_FILE": str(tmp_path / "pd"),
            "NOMADSCALE_WEBHOOK_SECRETS": ",".join(HOOKS),
        },
        config_file=str(tmp_path / "cfg.yaml"),
    )
    secrets = (NOMAD, PD_FILE, CONSUL_YAML, *HOOKS)
    log = logging.getLogger("nomadscale.test.redaction")
    for json_logs in (False, True):
        out = io.StringIO()
        setup_logging(level="DEBUG", json_logs=json_logs, stream=out)
        try:
            for s in secrets:
                log.warning("request failed: 403 for token %s", s)
            try:
                raise RuntimeError(f"upstream said: bad key {PD_FILE}")
            except RuntimeError:
                log.exception("call failed")
        finally:
            logging.getLogger().handlers.clear()
        text = out.getvalue()
        assert text.count("***") >= len(secrets) + 1, text
        for s in secrets:
            assert s not in text


@pytest.fixture()
def pd() -> PagerDutyServer:
    s = PagerDutyServer().start()
    yield s  # type: ignore[misc]
    s.stop()


def test_incident_notes_go_to_the_configured_pagerduty_api(
    pd: PagerDutyServer, tmp_path: Path
) -> None:
    (tmp_path / "nomadscale.yaml").write_text("{}\n")
    settings = load_settings(
        {
            "NOMAD_ADDR": "http://127.0.0.1:1",
            "NOMADSCALE_POLICIES": str(tmp_path / "none"),
            "NOMADSCALE_RUNBOOKS": str(Path(__file__).resolve().parents[2] / "runbooks"),
            "NOMADSCALE_PD_API_KEY": pd.state.api_key,
            "NOMADSCALE_PD_FROM": "ops@example.com",
            "NOMADSCALE_PD_API_URL": pd.url,
            "NOMADSCALE_CONFIG": str(tmp_path / "nomadscale.yaml"),
        }
    )
    engine = build_engine(settings)
    pd.open_incident("PABC123")
    engine.notes.add_note("PABC123", "nomadscale: node gpu-7 drained")
    assert [n["content"] for n in pd.state.notes["PABC123"]] == ["nomadscale: node gpu-7 drained"]
