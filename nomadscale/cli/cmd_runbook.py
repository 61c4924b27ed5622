"""``nomadscale runbook list | validate [PATH] | run NAME --param k=v [--dry-run]`` and
``nomadscale watch-maintenance`` and ``nomadscale gpu-check`` (the node-side commands).

Exit codes: 0 ok, 1 invalid runbook / failed run, 2 usage error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from nomadscale.config.settings import Secret, Settings, load_settings
from nomadscale.core.errors import ConfigError, UsageError
from nomadscale.core.paths import path_problem

log = logging.getLogger(__name__)
EXIT_INVALID = 1


def _settings() -> Settings:
    return load_settings()


def _runbook_paths(path: str | None, settings: Settings) -> list[Path]:
    p = Path(path or settings.runbooks)
    problem = path_problem(p)
    if problem is not None:
        raise UsageError(f"runbooks: {problem}")
    return [p]


@click.group("runbook")
def runbook() -> None:
    """Scripted healing runbooks (runbooks/*.yaml)."""


@runbook.command("list")
@click.option("--dir", "path", type=click.Path(), default=None, help="Runbook folder.")
def list_cmd(path: str | None) -> None:
    """List runbooks with their triggers."""
    from nomadscale.healing.runbook import load_runbooks

    for rb in load_runbooks(_runbook_paths(path, _settings())).values():
        trig = []
        if rb.triggers.pagerduty:
            trig.append(f"pagerduty({len(rb.triggers.pagerduty)})")
        if rb.triggers.maintenance:
            trig.append("maintenance")
        if rb.triggers.manual:
            trig.append("manual")
        params = ",".join(rb.parameters) or "-"
        click.echo(f"{rb.name:24} params={params:28} triggers={'+'.join(trig)}  {rb.description}")


@runbook.command("validate")
@click.argument("path", required=False, type=click.Path())
def validate_cmd(path: str | None) -> None:
    """Validate runbook files; print every problem as file:line: field: message."""
    from nomadscale.healing.runbook import load_runbooks

    try:
        rbs = load_runbooks(_runbook_paths(path, _settings()))
    except ConfigError as exc:
        for e in exc.errors:
            click.echo(e)
        raise SystemExit(EXIT_INVALID) from None
    for name in rbs:
        click.echo(f"OK {name}")


def _param(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--param {v!r}: expected key=value")
        if k.strip() in out:  # never silently run with only one of them
            raise UsageError(f"--param {k.strip()}: given more than once")
        out[k.strip()] = val.strip()
    return out


def build_engine(settings: Settings, *, runbooks_path: str | None = None) -> Any:
    """The engine wired from settings: Nomad, Consul KV (or memory), policies, PagerDuty."""
    from nomadscale.config.validate import load_policies
    from nomadscale.healing.actions import zone_targets
    from nomadscale.healing.engine import RunbookEngine
    from nomadscale.healing.runbook import load_runbooks
    from nomadscale.integrations.nomad import NomadClient

    kv: Any
    if settings.consul_addr:
        from nomadscale.integrations.consul import ConsulKV

        token = settings.consul_token.reveal() if settings.consul_token else None
        kv = ConsulKV(addr=settings.consul_addr, token=token)
    else:
        from nomadscale.integrations.memkv import MemoryKV

        kv = MemoryKV()
    policies = load_policies([settings.policies]) if Path(settings.policies).exists() else []
    notes = None
    if settings.pagerduty_api_key and settings.pagerduty_from:
        from nomadscale.integrations.pagerduty import PagerDutyIncidents

        notes = PagerDutyIncidents(
            settings.pagerduty_api_key,
            from_email=settings.pagerduty_from,
            base_url=settings.pagerduty_api_url,
        )
    elif settings.pagerduty_api_key:
        log.warning("NOMADSCALE_PD_FROM is not set: no notes or resolution go to PagerDuty")
    return RunbookEngine(
        runbooks=load_runbooks(_runbook_paths(runbooks_path, settings)),
        nomad=NomadClient.from_settings(settings),
        kv=kv,
        zones=zone_targets(policies),
        notes=notes,
        prefix=settings.kv_prefix,
    )


@runbook.command("run")
@click.argument("name")
@click.option("--param", "params", multiple=True, help="Parameter as key=value (repeatable).")
@click.option("--dry-run", is_flag=True, help="Resolve and check, change nothing.")
@click.option("--dir", "path", type=click.Path(), default=None, help="Runbook folder.")
def run_cmd(name: str, params: tuple[str, ...], dry_run: bool, path: str | None) -> None:
    """Run a runbook now, in this process, and print each step."""
    engine = build_engine(_settings(), runbooks_path=path)
    run = engine.submit(name, _param(params), trigger="manual", dry_run=dry_run)
    if run.get("duplicate"):  # driven elsewhere (e.g. by the service): never twice
        click.echo(f"run {run['id']}: already {run.get('status', 'running')} for these "
                   f"parameters (trigger {run.get('trigger', '-')}); not started again")  # fmt: skip
        raise SystemExit(EXIT_INVALID)
    ok = True
    while True:
        run = _drive(engine, run)
        click.echo(f"run {run['id']}: {run['status']}"
                   + (f" ({run['error']})" if run["error"] else ""))  # fmt: skip
        ok = ok and run["status"] == "succeeded"
        follow = run.get("followup")
        if not follow:
            break
        # a stronger maintenance event came too late for this run: its own run goes on here
        done, run = run, engine.get_run(follow)
        click.echo(f"run {follow}: started for {run['values'].get('event', '-')}, which came "
                   f"too late for run {done['id']}")  # fmt: skip
    if not ok:
        raise SystemExit(EXIT_INVALID)


def _drive(engine: Any, run: dict[str, Any]) -> dict[str, Any]:
    """Drive ``run`` to its end one step call at a time, printing each step's result as it
    comes (a host-maintenance run waits up to hours for the node: on-call sees where it is)."""
    shown = 0
    while True:
        if run["status"] in ("pending", "running"):
            run = engine.run(run["id"], max_calls=1)
        for r in run["results"][shown:]:
            click.echo(f"[{r['phase']} {r['step']}] {r['action']}: {r['status']}: {r['detail']}")
        shown = len(run["results"])
        if run["status"] not in ("pending", "running"):
            return run


@click.command("watch-maintenance")
@click.option("--report-url", required=True, help="nomadscale's /maintenance/report URL.")
@click.option(
    "--metadata-url",
    default="http://metadata.google.internal/computeMetadata/v1",
    show_default=True,
)
@click.option("--node-id", default=None, help="Nomad node id (default: $NOMAD_NODE_ID).")
def watch_maintenance(report_url: str, metadata_url: str, node_id: str | None) -> None:
    """Watch GCE host maintenance events and report them (token: NOMADSCALE_REPORT_TOKEN).

    Logs to stderr as NOMADSCALE_LOG_LEVEL / NOMADSCALE_LOG_JSON say; the token never shows."""
    from nomadscale.core.logs import setup_logging
    from nomadscale.healing.watcher import MaintenanceWatcher
    from nomadscale.integrations.gce_metadata import MetadataClient

    for opt, url in (("--report-url", report_url), ("--metadata-url", metadata_url)):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{opt}: not an http(s) URL: {url!r}")
    settings = _settings()
    node = node_id or os.environ.get("NOMAD_NODE_ID")
    if not node:
        raise UsageError("--node-id: required (or set NOMAD_NODE_ID)")
    token: Secret | None = settings.report_token
    if not token:
        raise UsageError("NOMADSCALE_REPORT_TOKEN (or _FILE): required to report")
    level = settings.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"NOMADSCALE_LOG_LEVEL: unknown level {settings.log_level!r}")
    setup_logging(level=level, json_logs=settings.log_json)
    w = MaintenanceWatcher(
        metadata=MetadataClient(base_url=metadata_url),
        report_url=report_url,
        token=token,
        node=node,
    )
    log.info("watching maintenance events for node %s", node)
    try:
        w.run()
    finally:
        w.close()


@click.command("gpu-check")
@click.option("--check-id", default=None, help="The check asked for (default: $CHECK_ID).")
@click.option("--node-id", default=None, help="Nomad node id (default: $NODE_ID).")
@click.option("--print-script", is_flag=True, help="Print the shell script and exit.")
def gpu_check(check_id: str | None, node_id: str | None, print_script: bool) -> None:
    """Node side of the post-maintenance GPU check (run by the maintenance-watcher job's
    gpu-check task): collect nvidia-smi and kernel-log Xid output and write it to this
    node's meta as gpu.check.* with `nomad node meta apply`; nomadscale parses the verdict.

    Needs nvidia-smi and nomad on PATH, and NOMAD_ADDR / NOMAD_TOKEN for the meta write."""
    import subprocess

    from nomadscale.healing.gpucheck import CHECK_SCRIPT

    if print_script:
        click.echo(CHECK_SCRIPT, nl=False)
        return
    check = check_id or os.environ.get("CHECK_ID")
    node = node_id or os.environ.get("NODE_ID") or os.environ.get("NOMAD_NODE_ID")
    if not check:
        raise UsageError("--check-id: required (or set CHECK_ID)")
    if not node:
        raise UsageError("--node-id: required (or set NODE_ID)")
    env = {**os.environ, "CHECK_ID": check, "NODE_ID": node}
    done = subprocess.run(["/bin/sh", "-c", CHECK_SCRIPT], env=env, check=False)
    if done.returncode:
        click.echo(f"error: gpu check {check}: writing node meta failed "
                   f"(exit {done.returncode})", err=True)  # fmt: skip
        raise SystemExit(EXIT_INVALID)
    click.echo(f"gpu check {check}: results written to node {node} meta")


COMMANDS = [runbook, watch_maintenance, gpu_check]
