"""The autoscaling service as an operator runs it: ``run --once`` (its lock, its exit status),
``status`` (who leads, the table), ``plan`` (its exit status), the HTTP endpoint's start-up
errors and secrets kept out of the logs and the decision records. Real Consul, the twin over
HTTP and real ``nomadscale`` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.records import CycleRecord, Recorder
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent, free_port
from tests.harness.twin import TwinFactory
from tests.service.helpers import ROOT, constant, make_policy, run_process_env

pytestmark = [pytest.mark.consul]


def _nomadscale(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nomadscale", *args], env=env,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip


def _cli(*args: str, env: dict[str, str]) -> Any:
    _register()
    return CliRunner().invoke(cli, list(args), env=env)


def _no_deployment(nomad: NomadClient, *, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while nomad.job_status("ml-worker", namespace="ekyc").active_deployment is not None:
        assert time.monotonic() < deadline, "the twin's deployment did not end"
        time.sleep(0.2)


# --- run --once -------------------------------------------------------------------------


def test_run_once_keeps_its_lock_through_a_long_cycle_and_records_it(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory
) -> None:
    """A cycle that scales both zones waits for the first zone's Nomad deployment (minutes
    in production). ``run --once`` has no lock tick: its lock used to expire meanwhile, so
    the second zone was abandoned ("leader lock lost") and the record of a cycle that did
    scale never reached Consul."""
    ttl, min_healthy_s = 1.0, 4.0  # Consul frees the key 2 x TTL after the last renewal
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=12, clock=SystemClock(), node_pool="default", images=("i",))
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address)
    nomad.register_job(worker_job(policy, counts={"zone-a": 2, "zone-b": 2}, image="i",
                                  update={"MinHealthyTime": int(min_healthy_s * 1e9)}))  # fmt: skip
    _no_deployment(nomad)
    lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=ttl, lock_delay_s=0)
    ports = Ports(nomad=NomadClient(address=twin.address), kv=ConsulKV(addr=consul_agent.addr),
                  lock=lock, demand_for=lambda _p: constant(550.0))  # both zones grow  # fmt: skip
    svc = Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=ttl), policies=[policy],
                  ports=ports, clock=SystemClock(), renew_s=0.3, poll_s=0.5,
                  check=False)  # fmt: skip
    try:
        [res] = svc.run_once()
        rec = res.record
        assert rec.outcome == "applied", rec.line()
        assert [a.split(" 2 -> ")[0] for a in rec.applied] == [
            "scale zone-a/ml-worker-a", "scale zone-b/ml-worker-b",
        ]  # fmt: skip
        assert rec.duration_s > 2 * ttl  # it did outlive the lock's TTL
        assert lock.held()
        stored = Recorder(kv=ConsulKV(addr=consul_agent.addr), prefix=prefix).history("ekyc")
        assert [r["id"] for r in stored] == [rec.id]
        assert stored[0]["applied"] == rec.applied
    finally:
        svc.stop(timeout_s=10)


def test_run_once_exits_1_when_consul_is_unreachable(
    twin_factory: TwinFactory, tmp_path: Path
) -> None:
    """Nothing can run without the lock: a cron'd ``run --once`` must not exit 0 with a
    record saying "not the leader" (which reads as: another instance acts)."""
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=f"http://127.0.0.1:{free_port()}", prefix="walk",
                          twin=twin, tmp_path=tmp_path, port=free_port())  # fmt: skip
    res = _nomadscale("run", "--once", "--no-http", env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 cycles did not complete: ekyc: leader lock unavailable")
    assert "unreachable" in last
    assert "not the leader" not in res.stderr


def test_run_once_keeps_a_url_password_out_of_logs_and_records_and_exits_1(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    """``PROMETHEUS_URL=http://user:password@host`` is how a scraper credential is given; the
    effective settings logged at start, the client's error text in the log, the decision
    record in Consul and the exit message all used to show the password."""
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=free_port())  # fmt: skip
    password, token = "pw-Zq81xLw0", "nomad-token-55aa77"
    env["PROMETHEUS_URL"] = f"http://scraper:{password}@127.0.0.1:{free_port()}"
    env["NOMAD_TOKEN"] = token  # the twin has no ACLs: any token is accepted
    res = _nomadscale("run", "--once", "--no-http", env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-2000:]  # the cycle failed: Prometheus is unreachable
    assert "effective settings" in out and "scraper:***@127.0.0.1" in out
    assert "prometheus" in res.stderr.strip().splitlines()[-1]
    assert password not in out and token not in out
    [stored] = Recorder(kv=ConsulKV(addr=consul_agent.addr), prefix=prefix).history("ekyc")
    assert stored["outcome"] == "failed" and stored["errors"]
    assert password not in json.dumps(stored)


# --- status ------------------------------------------------------------------------------


def test_status_names_no_leader_once_the_lock_is_released_and_shows_outcomes(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    """A released (or expired) lock keeps its last holder as the key's value: ``status`` used
    to name that long-gone process as the leader. The table used to swallow the outcome
    ("[skipped]" read as rich markup) and cut two long zone names to the same prefix."""
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=4, clock=SystemClock())
    twin.cluster.add_namespace("ekyc")
    policy = make_policy(zones={"split": "odd-even", "list": [
        {"name": "asia-southeast2-a", "group": "ml-worker-a", "node_pool": "gpu"},
        {"name": "asia-southeast2-b", "group": "ml-worker-b", "node_pool": "gpu"},
    ]})  # fmt: skip
    NomadClient(address=twin.address).register_job(
        worker_job(policy, counts={"asia-southeast2-a": 1, "asia-southeast2-b": 1}, image="i",
                   update={"MaxParallel": 0})
    )  # fmt: skip
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    env = {"NOMAD_ADDR": twin.address, "CONSUL_HTTP_ADDR": consul_agent.addr,
           "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
           "NOMADSCALE_POLICIES": str(tmp_path / "policies"), "NOMADSCALE_KV_PREFIX": prefix}  # fmt: skip
    Recorder(kv=ConsulKV(addr=consul_agent.addr), prefix=prefix).record(
        CycleRecord(
            policy="ekyc",
            started_at=SystemClock().now(),
            outcome="skipped",
            skipped="paused",
            reason="paused by ops: db migration",
            id="r1",
        )
    )
    lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", lock_delay_s=0,
                      holder=LockHolder(host="ops-7", pid=4242, started_at="then"))  # fmt: skip
    assert lock.acquire()
    res = _cli("status", "--json", env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["leader"] == "ops-7 pid 4242 (since then)"

    lock.release()
    res = _cli("status", "--json", env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["leader"] is None
    res = _cli("status", env={**env, "COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "leader: none"
    assert "[skipped]" in res.output
    assert "asia-southeast2-a" in res.output and "asia-southeast2-b" in res.output


# --- plan --------------------------------------------------------------------------------


def test_plan_exits_1_when_its_cycle_fails(twin_factory: TwinFactory, tmp_path: Path) -> None:
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr="", prefix="walk", twin=twin, tmp_path=tmp_path,
                          port=free_port())  # fmt: skip
    env = {k: v for k, v in env.items() if k != "CONSUL_HTTP_ADDR"}  # a dry run: no Consul
    env["PROMETHEUS_URL"] = f"http://127.0.0.1:{free_port()}"
    res = _nomadscale("plan", "ekyc", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ekyc: plan failed: prometheus")
    assert "nothing to change" not in res.stdout


# --- HTTP --------------------------------------------------------------------------------


def _env_without_consul(tmp_path: Path) -> dict[str, str]:
    """A process environment with one valid policy and a Consul address nothing listens on."""
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "ekyc.yaml").write_text(yaml.safe_dump(make_policy().to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "CONSUL_HTTP_ADDR": f"http://127.0.0.1:{free_port()}",
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(pol), "PYTHONPATH": str(ROOT),
    }  # fmt: skip


def test_run_reports_http_start_failures_in_one_line_and_logs_json(tmp_path: Path) -> None:
    """A port out of range used to print a thread traceback; uvicorn's own error line was
    plain text in the middle of JSON logs."""
    env = _env_without_consul(tmp_path)
    res = _nomadscale("run", env={**env, "NOMADSCALE_HTTP_PORT": "70000"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "error: NOMADSCALE_HTTP_PORT: 70000 is not a TCP port (0-65535)"
    )
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _nomadscale("run", env={**env, "NOMADSCALE_HTTP_PORT": str(port),
                                      "NOMADSCALE_LOG_JSON": "true"})  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    *logs, last = res.stderr.strip().splitlines()
    assert last.startswith(
        f"error: NOMADSCALE_HTTP_HOST/PORT: cannot serve HTTP on 127.0.0.1:{port}"
    )
    docs = [json.loads(line) for line in logs]  # every log line is JSON, uvicorn's too
    assert any(d["logger"] == "uvicorn.error" and "address already in use" in d["message"]
               for d in docs)  # fmt: skip


# --- forecast / simulate: mistakes found before the work, not after ----------------------


def test_forecast_and_simulate_reject_unwritable_outputs_in_one_line(tmp_path: Path) -> None:
    from nomadscale.data import bundled_trace_path

    doc = make_policy().to_yaml_dict()
    doc["demand"] = {"source": "trace", "trace": str(bundled_trace_path()), "step": "10m"}
    pol = tmp_path / "ekyc.yaml"
    pol.write_text(yaml.safe_dump(doc))
    env = {"NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml")}
    (tmp_path / "settings.yaml").write_text("{}\n")
    res = _cli("forecast", str(pol), "--plot", str(tmp_path / "no-such-dir" / "f.png"), env=env)
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: --plot {tmp_path / 'no-such-dir' / 'f.png'}: folder "
        f"{tmp_path / 'no-such-dir'} does not exist"
    )
    (tmp_path / "file").write_text("")
    res = _cli("simulate", "--days", "0.1", "--out", str(tmp_path / "file" / "out"), env=env)
    assert res.exit_code == 2, res.output
    assert (
        res.output.strip()
        .splitlines()[-1]
        .startswith(f"error: --out {tmp_path / 'file' / 'out'}: cannot create the folder")
    )


def test_forecast_plot_mistakes_are_one_line_before_any_work_and_write_nothing(
    tmp_path: Path,
) -> None:
    """``--plot x.csv`` ended in matplotlib's traceback after the forecast was printed, and
    ``--plot`` naming the policy's trace overwrote the trace with an image."""
    from nomadscale.data import bundled_trace_path

    trace = tmp_path / "trace.csv"
    trace.write_bytes(bundled_trace_path().read_bytes())
    doc = make_policy().to_yaml_dict()
    doc["demand"] = {"source": "trace", "trace": str(trace), "step": "10m"}
    pol = tmp_path / "ekyc.yaml"
    pol.write_text(yaml.safe_dump(doc))
    env = {"NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml")}
    (tmp_path / "settings.yaml").write_text("{}\n")
    before = trace.read_bytes()
    for target, message in (
        (tmp_path / "f.csv", "cannot draw a '.csv' file (use .png, .svg or .pdf)"),
        (trace, "is the trace file; write the output elsewhere"),
        (pol, "is the policy file; write the output elsewhere"),
    ):
        res = _cli("forecast", str(pol), "--plot", str(target), env=env)
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines() == [f"error: --plot {target}: {message}"]
    assert trace.read_bytes() == before and not (tmp_path / "f.csv").exists()
    res = _cli("forecast", str(pol), "--plot", str(tmp_path / "f.svg"), env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_simulate_with_an_unreachable_consul_fails_at_once(tmp_path: Path) -> None:
    """It used to run every cycle without the lock (all skipped) and report the initial
    fleet's availability as the autoscaler's, exit 0."""
    addr = f"http://127.0.0.1:{free_port()}"
    res = _cli("simulate", "--days", "0.1", "--consul", addr, "--out", str(tmp_path), env={})
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: --consul {addr}: consul session create: {addr} unreachable"
    )


# --- serve -------------------------------------------------------------------------------


def test_serve_logs_its_settings_without_secrets_its_port_and_stops_on_sigterm(
    consul_agent: ConsulAgent, consul_prefix: str, tmp_path: Path
) -> None:
    import re
    import signal
    import urllib.request

    token = "report-token-7f3a9c"
    (tmp_path / "settings.yaml").write_text("{}\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "CONSUL_HTTP_ADDR": consul_agent.addr, "NOMAD_ADDR": f"http://127.0.0.1:{free_port()}",
        "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_KV_PREFIX": consul_prefix.rstrip("/"), "NOMADSCALE_HTTP_PORT": "0",
        "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"), "NOMADSCALE_REPORT_TOKEN": token,
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "nomadscale", "serve"], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"http: serving on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port > 0, "".join(lines)  # the port actually bound, not the 0 asked for
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines.extend(proc.stderr.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    err = "\n".join(lines)
    assert "effective settings" in err and "'report_token': '<set>'" in err, err
    assert token not in err and "received SIGTERM" in err


# --- SIGTERM during run --once -----------------------------------------------------------


def test_sigterm_stops_run_once_between_two_writes_and_releases_the_lock(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    prometheus_factory: Any,
    tmp_path: Path,
) -> None:
    """``run --once`` (a systemd timer's oneshot, a cron job) used to die wherever SIGTERM or
    Ctrl-C hit it: the lock stayed held until its TTL ran out, and a cycle could stop between
    any two steps. Now it stops as the service does: before the next write, lock released."""
    import signal

    import numpy as np

    from nomadscale.core.clock import FakeClock
    from tests.harness.promdata import Series

    prefix = consul_prefix.rstrip("/")
    # the twin's clock stands still: zone a's deployment never ends, so the cycle waits
    # for it before scaling zone b (as it does for minutes in production)
    twin = twin_factory(nodes=12, clock=FakeClock(), node_pool="default", images=("i",))
    twin.cluster.add_namespace("ekyc")
    policy = make_policy()
    nomad = NomadClient(address=twin.address)
    nomad.register_job(worker_job(policy, counts={"zone-a": 2, "zone-b": 2}, image="i"))
    twin.advance(600)  # the initial deployment ends
    assert nomad.job_status("ml-worker", namespace="ekyc").active_deployment is None
    now = time.time() // 60 * 60
    ts = np.arange(now - 6 * 3600, now + 60, 60.0)
    prom = prometheus_factory([Series(name="demand", timestamps=ts, values=np.full(len(ts), 550.0))],
                              lookback_s=600)  # fmt: skip
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOMAD", "CONSUL"))},
        "NOMAD_ADDR": twin.address, "CONSUL_HTTP_ADDR": consul_agent.addr,
        "PROMETHEUS_URL": prom.url, "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"), "NOMADSCALE_KV_PREFIX": prefix,
        "NOMADSCALE_LOCK_TTL": "15s", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "nomadscale", "run", "--once", "--no-http"],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "ekyc: scale zone-a/ml-worker-a 2 -> " in line:
                break
        else:
            raise AssertionError("".join(lines))
        time.sleep(1.0)  # now waiting for zone a's deployment
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1, "".join(lines)
        lines.extend(proc.stderr.read().splitlines(keepends=True))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    err = "".join(lines)
    assert "received SIGTERM" in err and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: 1 of 1 cycles did not complete: ekyc: shutting down")
    ), err
    status = nomad.job_status("ml-worker", namespace="ekyc")
    assert status.groups["ml-worker-b"].desired == 2  # zone b was not started
    assert ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader").leader() is None
    [stored] = Recorder(kv=ConsulKV(addr=consul_agent.addr), prefix=prefix).history("ekyc")
    assert stored["outcome"] == "aborted" and len(stored["applied"]) == 1


def test_a_lock_ttl_that_does_not_fit_names_the_setting(tmp_path: Path) -> None:
    """The errors used to read "lock ttl 5s: ..." / "policy ekyc: cycle 1200s must be ...":
    nothing said which knob to turn."""
    env = _env_without_consul(tmp_path)
    for ttl, secs in (("5s", "5"), ("1h", "3600")):
        res = _nomadscale("run", "--once", env={**env, "NOMADSCALE_LOCK_TTL": ttl})
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert lines and all(
            ln.startswith(f"error: NOMADSCALE_LOCK_TTL={secs}s: ") for ln in lines
        ), res.stderr
