"""Manual control from the CLI (click CliRunner) against a REAL Consul and the twin: an
override is applied by the next cycle, expires on time (FakeClock) and shows in ``status``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nomadscale.cli.cmd_control import COMMANDS as CONTROL_COMMANDS
from nomadscale.cli.cmd_service import COMMANDS as SERVICE_COMMANDS
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent
from tests.harness.twin import TwinFactory
from tests.service.helpers import constant, make_policy

pytestmark = pytest.mark.consul

CMD = {c.name: c for c in (*CONTROL_COMMANDS, *SERVICE_COMMANDS)}


def test_override_from_cli_is_applied_expires_and_shows_in_status(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = consul_prefix.rstrip("/")
    policy = make_policy()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    twin = twin_factory(nodes=12, clock=clock)
    twin.cluster.add_namespace("ekyc")
    nomad = NomadClient(address=twin.address, clock=clock)
    nomad.register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    for var, value in {
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "NOMAD_ADDR": twin.address,
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
        "NOMADSCALE_CONFIG": str(tmp_path / "none.yaml"),
    }.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "none.yaml").write_text("{}\n")
    lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=30, lock_delay_s=0)
    ports = Ports(nomad=nomad, kv=ConsulKV(addr=consul_agent.addr), lock=lock,
                  demand_for=lambda _p: constant(120.0))  # fmt: skip
    svc = Service(settings=Settings(kv_prefix=prefix), policies=[policy], ports=ports,
                  clock=clock)  # fmt: skip

    def cycle() -> dict[str, int]:
        clock.advance(1200)
        out = svc.run_policy(policy.name)
        assert out is not None and out.record.outcome in ("applied", "unchanged"), out
        st = nomad.job_status("ml-worker", namespace="ekyc")
        return {g: s.desired for g, s in st.groups.items()}

    runner = CliRunner()
    try:
        assert cycle() == {"ml-worker-a": 1, "ml-worker-b": 1}  # 120 rpm -> 2 workers
        res = runner.invoke(CMD["override"], ["set", "ekyc", "--fixed", "9", "--for", "2h",
                                              "--reason", "month-end load test"])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert "fixed 9" in res.output
        assert cycle() == {"ml-worker-a": 5, "ml-worker-b": 4}
        last = svc.recorder.last[policy.name]
        assert last.decision is not None and "fixed 9" in (last.decision["override"] or "")

        res = runner.invoke(CMD["status"], ["--json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.output)
        p = doc["policies"]["ekyc"]
        assert [(o["kind"], o["value"], o["reason"]) for o in p["overrides"]] == [
            ("fixed", 9, "month-end load test")
        ]
        assert p["zones"]["zone-a"]["desired"] == 5 and p["zones"]["zone-b"]["desired"] == 4
        assert p["decisions"][0]["decision"]["desired"] == 9
        assert doc["leader"] is not None
        listed = runner.invoke(CMD["override"], ["list"])
        assert "ekyc: fixed 9" in listed.output and "month-end load test" in listed.output

        clock.advance(2 * 3600)  # the override expires
        assert cycle() == {"ml-worker-a": 1, "ml-worker-b": 1}
        assert svc.status()["policies"]["ekyc"]["overrides"] == []  # on the service's clock
        assert "fixed 9" not in (svc.recorder.last[policy.name].decision or {}).get("explain", "")

        # pause / resume and scale --now go through the same KV state
        assert runner.invoke(CMD["pause"], ["ekyc", "--reason", "incident"]).exit_code == 0
        clock.advance(1200)
        out = svc.run_policy(policy.name)
        assert out is not None and out.record.skipped == "paused"
        assert runner.invoke(CMD["resume"], ["ekyc"]).exit_code == 0
        res = runner.invoke(
            CMD["scale"], ["ekyc", "--count", "4", "--for", "12h", "--reason", "demo", "--now"]
        )
        assert res.exit_code == 0 and "kick" in res.output, res.output
        assert svc.control.kick("ekyc") is not None
        assert cycle() == {"ml-worker-a": 2, "ml-worker-b": 2}
        # during a deploy rollout the cycle holds the policy: --now says so, not "now"
        key = svc.control.deploy_key("ekyc")
        rollout = {"active": True, "status": "rolling", "image": "reg/ml:2"}
        svc.control.kv.put(key, json.dumps(rollout).encode())
        res = runner.invoke(CMD["scale"], ["ekyc", "--count", "6", "--reason", "x", "--now"])
        assert res.exit_code == 0, res.output
        assert res.output.strip().endswith(
            "a deploy rollout rolling of reg/ml:2 holds it, so it applies once the rollout ends"
        ), res.output
        svc.control.kv.delete(key)
        bad = runner.invoke(CMD["override"], ["set", "nope", "--min", "3", "--reason", "x"])
        assert bad.exit_code != 0 and "unknown" in str(bad.exception or bad.output)
    finally:
        svc.stop()
    assert clock.now() > datetime.now(UTC) + timedelta(hours=1)


def test_a_kick_makes_the_running_leader_apply_at_once(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory
) -> None:
    from nomadscale.core.clock import SystemClock

    prefix = consul_prefix.rstrip("/")
    policy = make_policy()
    twin = twin_factory(nodes=12, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    nomad = NomadClient(address=twin.address)
    nomad.register_job(
        worker_job(policy, counts={"zone-a": 1, "zone-b": 1}, image="i", update={"MaxParallel": 0})
    )
    kv = ConsulKV(addr=consul_agent.addr)
    lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=10, lock_delay_s=0)
    ports = Ports(nomad=nomad, kv=kv, lock=lock, demand_for=lambda _p: constant(120.0))
    svc = Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=10), policies=[policy],
                  ports=ports, clock=SystemClock(), renew_s=0.3, every_s=30, check=False)  # fmt: skip
    svc.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while not svc.leader and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.leader
        before = len(svc.recorder.recent)
        svc.control.set_override("ekyc", kind="fixed", value=6, reason="now", who="t",
                                 now=SystemClock().now(), duration=timedelta(hours=1))  # fmt: skip
        svc.control.request_kick("ekyc", reason="test", now=SystemClock().now(), who="t")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            st = nomad.job_status("ml-worker", namespace="ekyc")
            if sum(g.desired for g in st.groups.values()) == 6:
                break
            time.sleep(0.1)
        assert {g: s.desired for g, s in st.groups.items()} == {"ml-worker-a": 3, "ml-worker-b": 3}
        assert len(svc.recorder.recent) > before
    finally:
        svc.stop(timeout_s=5)
