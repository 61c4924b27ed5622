"""What an operator reads after a failover: decision records that say which host decided and
what started the cycle (a scheduled tick, an apply-now kick, a takeover, ``run --once``), the
lock's release logged as what happened (released, or already lost), and the healing engine's
workers stopped when the HTTP endpoint cannot start. Real Consul, the twin over HTTP."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
import yaml
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock, SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.records import Recorder
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent
from tests.harness.twin import TwinFactory
from tests.service.helpers import ROOT, constant, make_policy

pytestmark = [pytest.mark.consul]


def _cli(*args: str, env: dict[str, str]) -> Any:
    _register()
    return CliRunner().invoke(cli, list(args), env=env)


def _status_env(agent: ConsulAgent, prefix: str, nomad_addr: str, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(make_policy().to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    return {"NOMAD_ADDR": nomad_addr, "CONSUL_HTTP_ADDR": agent.addr,
            "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
            "NOMADSCALE_POLICIES": str(tmp_path / "policies"), "NOMADSCALE_KV_PREFIX": prefix}  # fmt: skip


# --- 1. host and trigger in every decision record -------------------------------------------


def _service(agent: ConsulAgent, prefix: str, nomad_addr: str, clock: FakeClock,
             host: str) -> Service:  # fmt: skip
    lock = ConsulLock(addr=agent.addr, key=f"{prefix}/leader", ttl_s=10.0, lock_delay_s=0)
    ports = Ports(nomad=NomadClient(address=nomad_addr), kv=ConsulKV(addr=agent.addr), lock=lock,
                  demand_for=lambda _p: constant(300.0))  # fmt: skip
    return Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=10.0),
                   policies=[make_policy()], ports=ports, clock=clock, renew_s=0.3,
                   check=False, host=host)  # fmt: skip


def test_records_name_the_host_and_the_trigger_of_every_cycle_across_a_failover(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ops-a runs ``--once``, a scheduled cycle and an apply-now kick, then stops; ops-b takes
    over and runs its takeover cycle. Every stored record, its log line, ``/status`` and
    ``nomadscale status --json`` say who decided and why the cycle ran."""
    caplog.set_level(logging.INFO, logger="nomadscale.service.records")
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=8, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    NomadClient(address=twin.address).register_job(
        worker_job(make_policy(), counts={"zone-a": 2, "zone-b": 2}, image="i",
                   update={"MaxParallel": 0})
    )  # fmt: skip
    clock = FakeClock(SystemClock().now())  # a fresh cycle slot whenever the test says so
    a = _service(consul_agent, prefix, twin.address, clock, "ops-a")
    b = _service(consul_agent, prefix, twin.address, clock, "ops-b")
    try:
        [once] = a.run_once()
        clock.advance(20 * 60)
        a._scheduled("ekyc")
        a._kicked("ekyc", "kick-1")
        a.stop(timeout_s=10)
        assert [(r.host, r.trigger) for r in a.recorder.recent] == [
            ("ops-a", "once"), ("ops-a", "scheduled"), ("ops-a", "apply-now"),
        ]  # fmt: skip
        assert once.record.host == "ops-a" and once.record.trigger == "once"

        clock.advance(20 * 60)
        b.start()
        deadline = time.monotonic() + 20.0
        while not b.recorder.recent and time.monotonic() < deadline:
            time.sleep(0.05)
        [took] = list(b.recorder.recent)
        assert (took.host, took.trigger) == ("ops-b", "takeover"), took.line()
        last = b.status()["policies"]["ekyc"]["last"]  # what /status serves
        assert (last["host"], last["trigger"]) == ("ops-b", "takeover")
    finally:
        b.stop(timeout_s=10)
        a.stop(timeout_s=10)

    stored = Recorder(kv=ConsulKV(addr=consul_agent.addr), prefix=prefix).history("ekyc")
    assert sorted((d["host"], d["trigger"]) for d in stored) == [
        ("ops-a", "apply-now"), ("ops-a", "once"), ("ops-a", "scheduled"), ("ops-b", "takeover"),
    ]  # fmt: skip
    assert (stored[0]["host"], stored[0]["trigger"]) == ("ops-b", "takeover")  # newest first
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle ekyc")]
    assert len(lines) == 4
    assert "(takeover on ops-b)" in lines[-1] and "(once on ops-a)" in lines[0], lines

    env = _status_env(consul_agent, prefix, twin.address, tmp_path)
    res = _cli("status", "--json", env=env)
    assert res.exit_code == 0, res.output
    decisions = json.loads(res.output)["policies"]["ekyc"]["decisions"]
    assert (decisions[0]["host"], decisions[0]["trigger"]) == ("ops-b", "takeover")
    res = _cli("status", env={**env, "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "(takeover on ops-b)" in res.output


def test_status_reads_records_stored_before_host_and_trigger(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    """Records written by an older nomadscale have neither field: ``status`` shows them with
    ``host``/``trigger`` null (JSON) and the table as before."""
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=2, clock=SystemClock())
    kv = ConsulKV(addr=consul_agent.addr)
    old = {"policy": "ekyc", "started_at": "2025-06-01T10:00:00+00:00", "outcome": "skipped",
           "id": "old1", "duration_s": 0.1, "dry_run": False, "skipped": "paused",
           "reason": "paused by ops: db migration", "decision": None, "inputs": {}, "zones": {},
           "actions": [], "applied": [], "errors": [], "error_kinds": []}  # fmt: skip
    kv.put(f"{prefix}/decisions/ekyc/20250601T100000Z-old1", json.dumps(old).encode())
    env = _status_env(consul_agent, prefix, twin.address, tmp_path)
    res = _cli("status", "--json", env=env)
    assert res.exit_code == 0, res.output
    [d] = json.loads(res.output)["policies"]["ekyc"]["decisions"]
    assert d["id"] == "old1" and d["host"] is None and d["trigger"] is None
    res = _cli("status", env={**env, "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "[skipped] paused by ops: db migration" in res.output
    assert " on " not in res.output  # no "(? on ?)" for what is not known


def test_status_exits_1_when_nomad_refuses_the_token_and_shows_what_each_host_loaded(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    """A token Nomad refuses (403) showed 'None' counts and exited 0, so a script took the
    fleet for read. Now '-' counts, the row says why, exit 1 after the table; and the
    policies each running service loaded (its last reload) show at the top."""
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=2, clock=SystemClock(), acl_token="right-token")
    env = _status_env(consul_agent, prefix, twin.address, tmp_path)
    loaded = {"from": "/etc/nomadscale/policies", "loaded_at": "2026-11-22T10:00:00+00:00",
              "policies": {"ekyc": "/etc/nomadscale/policies/ekyc.yaml"},
              "last_reload": {"at": "2026-11-22T10:00:00+00:00", "result": "failed",
                              "errors": ["ekyc.yaml:3: bounds.min: must be >= 0", "x"],
                              "changes": []}}  # fmt: skip
    ConsulKV(addr=consul_agent.addr).put(f"{prefix}/loaded/ops-a", json.dumps(loaded).encode())
    res = _cli("status", env={**env, "NOMAD_TOKEN": "wrong-token", "COLUMNS": "250"})
    assert res.exit_code == 1, res.output
    out = res.output.splitlines()
    assert out[1] == (
        "ops-a: 1 policy loaded at 2026-11-22T10:00:00+00:00; last reload "
        "2026-11-22T10:00:00+00:00 failed: ekyc.yaml:3: bounds.min: must be >= 0 (+1 more)"
    ), out
    assert "None" not in res.output and "job: " in res.output
    assert out[-1] == "error: cannot read the job of ekyc from Nomad", out
    res = _cli("status", "--json", env={**env, "NOMAD_TOKEN": "wrong-token"})
    assert res.exit_code == 1
    doc = json.loads(res.output[: res.output.rindex("}") + 1])
    assert doc["policies"]["ekyc"]["job_unreadable"] is True
    assert doc["loaded"]["ops-a"]["last_reload"]["result"] == "failed"
    # the right token, no job deployed yet: shown, exit 0
    res = _cli("status", env={**env, "NOMAD_TOKEN": "right-token", "COLUMNS": "250"})
    assert res.exit_code == 0, res.output


# --- 2. releasing a lock that was already lost -----------------------------------------------


def test_release_logs_released_only_when_the_lock_was_still_ours(
    consul_agent: ConsulAgent, consul_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Consul invalidated a's session (node check failed, TTL expired, operator) and b took the
    key: a's shutdown used to log "released" at INFO although it had lost the lock."""
    caplog.set_level(logging.INFO, logger="nomadscale.integrations.consul")
    key = f"{consul_prefix}leader"
    raw = consul.Consul(host="127.0.0.1", port=consul_agent.http_port)
    a = ConsulLock(addr=consul_agent.addr, key=key, lock_delay_s=0)
    b = ConsulLock(addr=consul_agent.addr, key=key, lock_delay_s=0)
    assert a.acquire()
    assert a.session_id is not None
    raw.session.destroy(a.session_id)
    assert b.acquire()

    caplog.clear()
    a.release()
    [rec] = [r for r in caplog.records if "consul lock" in r.getMessage()]
    assert rec.levelno == logging.WARNING, rec.getMessage()
    assert "already lost" in rec.getMessage() and "released" not in rec.getMessage()
    assert b.held() and a.session_id is None

    c = ConsulLock(addr=consul_agent.addr, key=key, lock_delay_s=0)
    assert not c.acquire()  # a standby: its session never held the key
    caplog.clear()
    c.release()
    [rec] = [r for r in caplog.records if "consul lock" in r.getMessage()]
    assert rec.levelno == logging.INFO and "not held" in rec.getMessage(), rec.getMessage()

    caplog.clear()
    b.release()
    [rec] = [r for r in caplog.records if "consul lock" in r.getMessage()]
    assert rec.levelno == logging.INFO and rec.getMessage().endswith(": released")
    assert b.leader() is None


# --- 3. the healing engine is stopped when HTTP cannot start ----------------------------------


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run ``serve``/``run`` in this process: no signal handlers taken over, no logging set-up."""
    import nomadscale.cli.cmd_run as cmd_run
    from nomadscale.service.runtime import StopSignals

    made: list[StopSignals] = []

    def install(self: StopSignals) -> StopSignals:
        made.append(self)
        return self

    monkeypatch.setattr(StopSignals, "install", install)
    monkeypatch.setattr(cmd_run, "_logging", lambda _s: None)
    yield
    for s in made:
        s._rx.close()
        s._tx.close()


def _runbook_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("runbook-worker")]


@pytest.mark.parametrize("command", ["serve", "run"])
def test_the_healing_engine_stops_when_http_cannot_start(
    command: str, in_process: None, tmp_path: Path
) -> None:
    """Both start the healing engine's workers before the HTTP server; a port in use ended the
    command with its workers still running (to the end of the process)."""
    before = set(_runbook_workers())
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(make_policy().to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
            "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
            "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
            "NOMADSCALE_REPORT_TOKEN": "report-token-1",
            "NOMADSCALE_HTTP_PORT": str(port),
            "NOMAD_ADDR": "http://127.0.0.1:9",
        }
        if command == "run":  # the service needs a Consul address (not reached here)
            env["CONSUL_HTTP_ADDR"] = "http://127.0.0.1:9"
        res = _cli(command, env=env)
    assert res.exit_code == 1, res.output
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in res.output
    deadline = time.monotonic() + 10.0
    while set(_runbook_workers()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(_runbook_workers()) - before, "the healing engine's workers still run"
