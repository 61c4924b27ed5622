"""``nomadscale sim``: run the Nomad twin as a local server.

    nomadscale sim serve --port 4646 --nodes 40 --zones zone-a,zone-b --node-pool gpu
    nomadscale sim serve --acl-token-file token.txt --speed 10   # 10x virtual time
    nomadscale sim serve --job jobs/ml-worker.nomad.hcl          # with the shipped worker job

Point ``NOMAD_ADDR`` (and nomadscale) at the printed address. Ctrl-C stops it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

from nomadscale.core.errors import UsageError

log = logging.getLogger(__name__)


@click.group("sim")
def sim() -> None:
    """The Nomad twin: a simulated Nomad HTTP API for demos and tests."""


@sim.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=4646, show_default=True, help="0 picks a free port.")
@click.option("--nodes", type=click.IntRange(min=0), default=6, show_default=True)
@click.option(
    "--zones",
    default="zone-a,zone-b",
    show_default=True,
    help="Comma-separated zones; nodes are spread over them (Datacenter = zone).",
)
@click.option(
    "--node-pool",
    default="gpu-l4",
    show_default=True,
    help="The nodes' pool (the shipped job files and policy use gpu-l4).",
)
@click.option("--node-class", default="gpu-l4", show_default=True)
@click.option("--image-pull-mbps", type=float, default=800.0, show_default=True)
@click.option(
    "--acl-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the one valid ACL token (enables ACLs).",
)
@click.option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    help="Virtual time multiplier (10 = ten virtual seconds per real second).",
)
@click.option(
    "--job",
    "job_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Nomad job file (HCL) to register at start, creating its namespace; repeatable.",
)
def serve(
    host: str,
    port: int,
    nodes: int,
    zones: str,
    node_pool: str,
    node_class: str,
    image_pull_mbps: float,
    acl_token_file: Path | None,
    speed: float,
    job_files: tuple[Path, ...],
) -> None:
    """Serve a simulated cluster until Ctrl-C."""
    from nomadscale.sim import Cluster, TwinServer
    from nomadscale.sim.speed import ScaledClock

    zone_list = tuple(z.strip() for z in zones.split(",") if z.strip())
    if not zone_list:
        raise UsageError("--zones: give at least one zone, e.g. zone-a,zone-b")
    if speed <= 0:
        raise UsageError("--speed: must be greater than 0")
    token = None
    if acl_token_file is not None:
        try:
            token = acl_token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UsageError(f"--acl-token-file: cannot read {acl_token_file}: {e}") from None
        if not token:
            raise UsageError(f"--acl-token-file: {acl_token_file} is empty")
    cluster = Cluster.build(
        nodes=nodes,
        zones=zone_list,
        node_pool=node_pool,
        node_class=node_class,
        clock=ScaledClock(speed),
        image_pull_mbps=image_pull_mbps,
        acl_token=token,
    )
    registered = [_register_file(cluster, f) for f in job_files]
    try:
        twin = TwinServer(cluster, host=host, port=port).start()
    except OSError as e:
        raise UsageError(f"--port: cannot listen on {host}:{port}: {e}") from None
    click.echo(
        f"Nomad twin at {twin.address}: {nodes} nodes in {', '.join(zone_list)} "
        f"(pool {node_pool}, speed x{speed:g}{', ACL on' if token else ''}). Ctrl-C to stop."
    )
    for line in registered:
        click.echo(line)
    try:
        while True:
            time.sleep(0.2)
            cluster.process_due()  # state moves on even when nobody asks
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        twin.stop()


def _register_file(cluster: Any, path: Path) -> str:
    """Register one job file the way ``nomad job run`` would; a bad file is a usage error."""
    from nomadscale.sim import jobs, jobspec
    from nomadscale.sim.model import ApiError

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--job: cannot read {path}: {e.strerror}") from None
    try:
        spec = jobspec.parse_hcl(text)
        ns = str(spec.get("Namespace") or "default")
        if ns not in cluster.namespaces:
            cluster.add_namespace(ns)
        with cluster.lock:
            jobs.register(cluster, spec)
    except ApiError as e:
        raise UsageError(f"--job: {path}: {e.message}") from None
    groups = ", ".join(f"{g['Name']}={g.get('Count', 1)}" for g in spec.get("TaskGroups") or [])
    return f"registered {spec['ID']} ({spec.get('Type', 'service')}) in namespace {ns}: {groups}"
