"""Tokens never show: run representative operations with distinctive tokens (Settings from env
and files, NomadClient against the ACL twin, ConsulKV against an ACL Consul, the webhook
secret and report token, a failed cycle's decision record) capturing every log record at DEBUG
and everything printed, then grep it all for the tokens."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from nomadscale.config.settings import Secret, load_settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ConfigError, ExternalPermanentError, NomadscaleError
from nomadscale.core.logs import setup_logging
from nomadscale.healing.webhooks import sign
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.service.control import Control
from nomadscale.service.cycle import CycleRunner, Ports
from nomadscale.service.records import Recorder
from nomadscale.service.simulate import default_policy, default_trace
from nomadscale.sim import Cluster, TwinServer
from tests.fuzz.webhook_rig import REPORT_TOKEN, WEBHOOK_SECRET, WebhookRig, webhook_rig
from tests.harness.services import ConsulAgent

NOMAD_TOKEN = "nomad-SECRET-5ca1ab1e-0000-4bad-b0a7-c0ffee000001"
WRONG_NOMAD = "nomad-WRONG-deadbeef-1111-4bad-b0a7-c0ffee000002"
CONSUL_WRONG = "consul-WRONG-0badf00d-2222-4bad-b0a7-c0ffee000003"
PD_KEY = "pd-SECRET-u+abcdefghijklmnop"
FILE_TOKEN = "nomad-FROMFILE-3333-4bad-b0a7-c0ffee000004"
TOKENS = [NOMAD_TOKEN, WRONG_NOMAD, CONSUL_WRONG, PD_KEY, FILE_TOKEN, WEBHOOK_SECRET]


@pytest.fixture
def everything(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[list[str]]:
    """Text to grep: append error strings/reprs here; log records and output are added."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    yield seen
    out = capsys.readouterr()
    seen += [out.out, out.err, caplog.text]
    seen += [r.getMessage() for r in caplog.records]
    seen += [repr(r.args) for r in caplog.records]
    blob = "\n".join(seen)
    for token in TOKENS:
        assert token not in blob, f"token {token[:12]}... leaked"


def test_settings_from_env_and_files(tmp_path: Path, everything: list[str]) -> None:
    (tmp_path / "token").write_text(FILE_TOKEN + "\n")
    (tmp_path / "cfg.yaml").write_text("{}\n")
    env = {
        "NOMADSCALE_CONFIG": str(tmp_path / "cfg.yaml"),
        "NOMAD_TOKEN_FILE": str(tmp_path / "token"),
        "CONSUL_HTTP_TOKEN": CONSUL_WRONG,
        "NOMADSCALE_PD_API_KEY": PD_KEY,
        "NOMADSCALE_WEBHOOK_SECRETS": f"{WEBHOOK_SECRET},other-secret-xyz",
    }
    s = load_settings(env)
    assert s.nomad_token is not None and s.nomad_token.reveal() == FILE_TOKEN
    everything += [repr(s), str(s), json.dumps(s.describe(), default=str)]
    everything += [repr(s.nomad_token), str(s.nomad_token), f"{s.pagerduty_api_key}"]
    logging.getLogger("nomadscale.test").info("settings %s", s)
    print(s, s.describe())
    # a broken setting next to the tokens: the error names the variable, not the tokens
    with pytest.raises(ConfigError) as info:
        load_settings({**env, "NOMADSCALE_HTTP_PORT": "x"})
    everything.append(str(info.value))
    # a token in the config file (not the env) is a Secret too
    (tmp_path / "cfg2.yaml").write_text(f"nomad_token: {NOMAD_TOKEN}\nhttp_port: nope\n")
    with pytest.raises(ConfigError) as info:
        load_settings({"NOMADSCALE_CONFIG": str(tmp_path / "cfg2.yaml")})
    everything.append(str(info.value))


def test_a_token_file_in_the_environment_wins_over_a_token_in_the_settings_file(
    tmp_path: Path,
) -> None:
    """The environment wins over the settings file, and NOMAD_TOKEN_FILE is the
    environment's: a stale token left in nomadscale.yaml shadowed the rotated file."""
    (tmp_path / "token").write_text(FILE_TOKEN + "\n")
    (tmp_path / "cfg.yaml").write_text(f"nomad_token: {NOMAD_TOKEN}\n")
    env = {"NOMADSCALE_CONFIG": str(tmp_path / "cfg.yaml")}
    s = load_settings({**env, "NOMAD_TOKEN_FILE": str(tmp_path / "token")})
    assert s.nomad_token is not None and s.nomad_token.reveal() == FILE_TOKEN
    s = load_settings(env)
    assert s.nomad_token is not None and s.nomad_token.reveal() == NOMAD_TOKEN
    both = {**env, "NOMAD_TOKEN_FILE": str(tmp_path / "token"), "NOMAD_TOKEN": CONSUL_WRONG}
    s = load_settings(both)
    assert s.nomad_token is not None and s.nomad_token.reveal() == CONSUL_WRONG


def test_unknown_setting_in_config_file_does_not_echo_its_value(
    tmp_path: Path, everything: list[str]
) -> None:
    """A token pasted under a misspelt key (nomad_tokne) must not be echoed back."""
    (tmp_path / "cfg.yaml").write_text(f"nomad_tokne: {NOMAD_TOKEN}\n")
    with pytest.raises(ConfigError) as info:
        load_settings({"NOMADSCALE_CONFIG": str(tmp_path / "cfg.yaml")})
    everything.append(str(info.value))
    assert "nomad_tokne" in str(info.value)


@pytest.fixture
def acl_twin() -> Iterator[TwinServer]:
    cluster = Cluster.build(nodes=2, clock=FakeClock(), acl_token=NOMAD_TOKEN)
    server = TwinServer(cluster).start()
    yield server
    server.stop()


def test_nomad_client_right_and_wrong_token(acl_twin: TwinServer, everything: list[str]) -> None:
    right = NomadClient(address=acl_twin.address, token=Secret(NOMAD_TOKEN), clock=FakeClock())
    assert len(right.list_nodes()) == 2
    everything.append(repr(right))
    for token in (Secret(WRONG_NOMAD), WRONG_NOMAD, None):
        c = NomadClient(address=acl_twin.address, token=token, clock=FakeClock(), max_retries=1)
        with pytest.raises(ExternalPermanentError) as info:
            c.list_nodes()
        assert info.value.status == 403
        everything += [str(info.value), repr(info.value), repr(c), repr(c.__dict__)]
        c.close()
    right.close()


def test_json_logs_of_a_failed_call(
    acl_twin: TwinServer, everything: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The service's own log format (JSON, redacting) with the token in an exception."""
    import sys

    setup_logging(level="DEBUG", json_logs=True, stream=sys.stdout)
    try:
        c = NomadClient(address=acl_twin.address, token=WRONG_NOMAD, clock=FakeClock())
        try:
            c.list_nodes()
        except NomadscaleError:
            logging.getLogger("nomadscale.test").exception("call failed")
        c.close()
    finally:
        logging.getLogger().handlers.clear()


def test_failed_cycle_record_has_no_token(acl_twin: TwinServer, everything: list[str]) -> None:
    """A whole cycle against Nomad with a wrong token: the stored decision record, its log
    line and the metrics carry the error but not the token."""
    clock = FakeClock()
    kv = MemoryKV(clock=clock)
    lock = MemoryLock(kv=kv, key="nomadscale/leader")
    lock.acquire()
    policy = default_policy(default_trace())
    nomad = NomadClient(address=acl_twin.address, token=Secret(WRONG_NOMAD), clock=clock)
    recorder = Recorder(kv=kv, log_json=True)
    runner = CycleRunner(
        policy=policy,
        ports=Ports(
            nomad=nomad, kv=kv, lock=lock, demand_for=lambda p: TraceDemandSource(default_trace())
        ),
        control=Control(kv),
        recorder=recorder,
        clock=clock,
    )
    res = runner.run(leader=True)
    assert res.record.outcome == "failed", res.record.line()
    stored = [e.value.decode() for e in kv.list("nomadscale/decisions/")]
    assert stored and "403" in stored[0]
    from prometheus_client import generate_latest

    everything += [*stored, res.record.line(), generate_latest(recorder.metrics.registry).decode()]
    nomad.close()


@pytest.mark.consul
def test_consul_kv_wrong_token(consul_agent_acl: ConsulAgent, everything: list[str]) -> None:
    assert consul_agent_acl.token
    good = ConsulKV(addr=consul_agent_acl.addr, token=consul_agent_acl.token)
    good.put("secrets-test/k", b"v")
    bad = ConsulKV(addr=consul_agent_acl.addr, token=CONSUL_WRONG)
    for call in (lambda: bad.get("secrets-test/k"), lambda: bad.put("secrets-test/k", b"x")):
        with pytest.raises(NomadscaleError) as info:
            call()
        everything += [str(info.value), repr(info.value)]
    everything += [repr(bad), repr(good), repr(bad.__dict__)]
    TOKENS.append(consul_agent_acl.token)
    try:
        good.delete("secrets-test/k")
    finally:
        pass


@pytest.fixture(scope="module")
def rig() -> Iterator[WebhookRig]:
    yield from webhook_rig()


def test_webhook_secret_and_report_token(rig: WebhookRig, everything: list[str]) -> None:
    TOKENS.append(REPORT_TOKEN)
    with TestClient(rig.app) as client:
        body = b'{"event": {"id": "E1", "event_type": "incident.triggered", "data": {}}}'
        for sig in (None, "v1=" + "0" * 64, sign("guess", body), sign(WEBHOOK_SECRET, body)):
            headers = {"x-pagerduty-signature": sig} if sig else {}
            r = client.post("/webhooks/pagerduty", content=body, headers=headers)
            everything += [r.text, json.dumps(dict(r.headers))]
        for auth in (None, "Bearer nope", f"Bearer {REPORT_TOKEN}"):
            headers = {"authorization": auth} if auth else {}
            r = client.post(
                "/maintenance/report", json={"node": "x", "event": "NONE"}, headers=headers
            )
            everything += [r.text, json.dumps(dict(r.headers))]
    everything.append(repr(rig.app.state.dispatcher.__dict__))
