"""The shipped example set works together: policies/ekyc-ml.yaml names the job, namespace,
groups, node pool and prefetch job that jobs/*.nomad.hcl define, and ``nomadscale sim serve
--job`` brings them up the way ``nomad job run`` would on the Vagrant cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nomadscale.config.policy import load_policy
from nomadscale.core.ports import pinned_datacenter
from nomadscale.deploy.preflight import preflight
from nomadscale.integrations.nomad import NomadClient

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "ekyc-ml.yaml"
JOBS = ROOT / "jobs"


def _parse(twin, name: str) -> dict:  # type: ignore[no-untyped-def]
    return NomadClient(address=twin.address).parse_hcl((JOBS / name).read_text())


def test_policy_names_what_the_job_files_define(twin) -> None:  # type: ignore[no-untyped-def]
    pol = load_policy(POLICY)
    pools = {z.node_pool for z in pol.zones.items}
    worker = _parse(twin, f"{pol.target.job}.nomad.hcl")
    assert worker["ID"] == pol.target.job
    assert worker["Namespace"] == pol.target.namespace
    assert {worker["NodePool"]} == pools
    groups = {g["Name"] for g in worker["TaskGroups"]}
    assert {z.group for z in pol.zones.items} <= groups
    # each zone's group is pinned to its own datacenter
    dcs = {pinned_datacenter(worker, z.group) for z in pol.zones.items}
    assert None not in dcs and len(dcs) == len(pol.zones.items)
    assert pol.deploy is not None
    # the policy's golden image is a new tag of the image the job runs (a rollout changes the
    # tag, never the repository), and it is not the tag already running
    running = {t["Config"]["image"] for g in worker["TaskGroups"] for t in g["Tasks"]
               if t["Driver"] == "docker"}  # fmt: skip
    assert len(running) == 1, running
    (now,) = running
    assert pol.deploy.image.rsplit(":", 1)[0] == now.rsplit(":", 1)[0], (pol.deploy.image, now)
    assert pol.deploy.image != now
    prefetch = _parse(twin, f"{pol.deploy.prefetch_job}.nomad.hcl")
    assert prefetch["Type"] == "sysbatch"
    assert prefetch["Namespace"] == pol.target.namespace
    assert {prefetch["NodePool"]} == pools
    assert prefetch["ParameterizedJob"]["MetaRequired"] == ["image"]
    watcher = _parse(twin, "maintenance-watcher.nomad.hcl")
    assert watcher["Type"] == "system" and {watcher["NodePool"]} == pools


def _start_sim(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomadscale", "sim", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if "Nomad twin at " not in first:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"sim serve did not start: {first}{err}")
    return proc, first.split("Nomad twin at ", 1)[1].split(": ", 1)[0]


def test_sim_serve_runs_the_shipped_jobs_for_the_shipped_policy() -> None:
    pol = load_policy(POLICY)
    files = [str(JOBS / f) for f in ("ml-worker.nomad.hcl", "image-prefetch.nomad.hcl",
                                     "maintenance-watcher.nomad.hcl")]  # fmt: skip
    proc, address = _start_sim("--nodes", "8", "--speed", "200",
                               *[a for f in files for a in ("--job", f)])  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in files]
        assert lines[0].startswith("registered ml-worker (service) in namespace ekyc")
        nomad = NomadClient(address=address, namespace=pol.target.namespace)
        deadline = time.monotonic() + 30
        while True:  # image pull and health at 200x: about a second
            st = nomad.job_status(pol.target.job, namespace=pol.target.namespace)
            dep = nomad.latest_deployment(pol.target.job, namespace=pol.target.namespace)
            if dep is not None and dep.status == "successful":
                break
            assert time.monotonic() < deadline, f"deployment did not finish: {st}"
            time.sleep(0.2)
        assert nomad.serving_counts(pol.target.job, namespace=pol.target.namespace) == {
            z.group: 2 for z in pol.zones.items
        }
        # the rollout's preflight finds both zones' groups and their nodes in the policy's pool
        plan = preflight(pol, nomad, now=datetime.now(UTC), demand=None)
        assert [(z.group, z.count) for z in plan.zones] == [(z.group, 2) for z in pol.zones.items]
        assert all(z.nodes and z.free >= 1 for z in plan.zones)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # waits and closes the pipes


def test_sim_serve_rejects_a_bad_job_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nomad.hcl"
    bad.write_text('job "x" {\n')
    out = subprocess.run(
        [sys.executable, "-m", "nomadscale", "sim", "serve", "--port", "0", "--job", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: --job: {bad}: Failed to parse job: ")


def _tasks(job: dict) -> list[dict]:  # type: ignore[type-arg]
    return [t for tg in job["TaskGroups"] for t in tg["Tasks"]]


def test_the_job_files_run_nomadscale_with_a_command_line_and_settings_it_accepts(
    twin,  # type: ignore[no-untyped-def]
) -> None:
    """jobs/nomadscale.nomad.hcl ran ``nomadscale run --http-host 0.0.0.0``: no such
    option, so the job exited 2 and restarted forever; its service was registered in Nomad's
    own catalog while the watcher reports to ``nomadscale.service.consul:9464`` (a dynamic
    port), and it never set the report token, so /maintenance/report was never served."""
    import re

    import click

    from nomadscale.cli.main import _register, cli
    from nomadscale.config.settings import _ENV, _SECRET_FILES

    _register()
    checked = 0
    for path in sorted(JOBS.glob("*.nomad.hcl")):
        job = _parse(twin, path.name)
        for task in _tasks(job):
            config = task.get("Config") or {}
            if Path(str(config.get("command", ""))).name != "nomadscale":
                continue
            args = [str(a) for a in config.get("args", [])]
            ctx = click.Context(cli, info_name="nomadscale")
            cmd = cli.get_command(ctx, args[0])
            assert cmd is not None, f"{path.name}: {args}: no command {args[0]!r}"
            try:
                cmd.make_context(args[0], args[1:], parent=ctx)
            except click.UsageError as e:
                pytest.fail(f"{path.name} task {task['Name']}: {args}: {e.format_message()}")
            names = set(task.get("Env") or {})
            for tmpl in task.get("Templates") or []:
                names |= set(re.findall(r"^\s*([A-Z][A-Z0-9_]*)=", tmpl["EmbeddedTmpl"], re.M))
            # variables the job only interpolates into args, and the policy's routing key
            names -= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", " ".join(args)))
            names -= {load_policy(POLICY).alerting.pagerduty_routing_key_env}
            unknown = {n for n in names if n not in _ENV and n not in _SECRET_FILES}
            assert not unknown, f"{path.name}: not settings nomadscale reads: {sorted(unknown)}"
            checked += 1
    assert checked >= 2  # the service and the maintenance watcher

    svc_job = _parse(twin, "nomadscale.nomad.hcl")
    (group,) = svc_job["TaskGroups"]
    (service,) = group["Services"]
    (task,) = group["Tasks"]
    assert service["Provider"] == "consul" and service["Name"] == "nomadscale"
    assert "NOMADSCALE_REPORT_TOKEN" in task["Templates"][0]["EmbeddedTmpl"]
    (port,) = group["Networks"][0]["ReservedPorts"]
    watcher = (JOBS / "maintenance-watcher.nomad.hcl").read_text()
    assert f"http://nomadscale.service.consul:{port['Value']}/maintenance/report" in watcher
    assert task["Env"]["NOMADSCALE_HTTP_HOST"] == "0.0.0.0"


def test_the_systemd_unit_reloads_with_the_signal_the_service_reloads_on() -> None:
    """`systemctl reload nomadscale` must reach the service's SIGHUP reload
    (tests/service/test_reload.py drives it with real signals); without ExecReload systemd
    refuses the reload, and a HUP sent by hand used to kill the service."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "systemd" / "nomadscale.service")
    assert unit["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Service"]["Type"] in ("notify", "notify-reload")
