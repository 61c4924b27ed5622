"""``nomadscale sim``: run the Nomad twin as a local server.

    nomadscale sim serve --port 4646 --nodes 40 --zones zone-a,zone-b --node-pool gpu
    nomadscale sim serve --acl-token-file token.txt --speed 10   # 10x virtual time
    nomadscale sim serve --job jobs/ml-worker.nomad.hcl          # with the shipped worker job
    nomadscale sim serve --job jobs/ml-worker.nomad.hcl --gce-policy policies/ekyc-ml.yaml

Point ``NOMAD_ADDR`` (and nomadscale) at the printed address. With ``--gce-policy`` it also
serves the Compute Engine MIGs the policy names (its zones' ``instance_group``, adopting the
twin's nodes of that Nomad datacenter and pool) and a GCE metadata server that gives
``google.auth.default()`` a token, and prints the ``export`` lines that point nomadscale at
them. Ctrl-C stops it (exit 0); a bad option or a --job file that cannot be registered exits
2, a --gce-policy file that is not a valid policy 1, each with one line.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=4646,
    show_default=True,
    help="0 picks a free port.",
)
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
@click.option(
    "--image-pull-mbps",
    type=float,
    default=800.0,
    show_default=True,
    help="How fast nodes pull images (a 7 GB image takes 70 s at 800).",
)
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
@click.option(
    "--gce-policy",
    "gce_policies",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also serve the GCE managed instance groups this policy names (and a metadata "
    "server for credentials); repeatable.",
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
    gce_policies: tuple[Path, ...],
) -> None:
    """Serve a simulated cluster until Ctrl-C.

    Exits 0 on Ctrl-C, 2 on a bad option (a port in use, a --job file that cannot be read or
    registered), 1 when a --gce-policy file is not a valid policy; errors are one line on
    stderr."""
    from nomadscale.sim import Cluster, TwinServer
    from nomadscale.sim.speed import ScaledClock

    zone_list = tuple(z.strip() for z in zones.split(",") if z.strip())
    if not zone_list:
        raise UsageError("--zones: give at least one zone, e.g. zone-a,zone-b")
    if not (math.isfinite(speed) and speed > 0):
        raise UsageError(f"--speed: must be a number greater than 0, not {speed:g}")
    if not (math.isfinite(image_pull_mbps) and image_pull_mbps > 0):
        raise UsageError(
            f"--image-pull-mbps: must be a number greater than 0, not {image_pull_mbps:g}"
        )
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
    gce = _gce_sim(cluster, gce_policies, node_class=node_class) if gce_policies else None
    try:
        twin = TwinServer(cluster, host=host, port=port).start()
    except OSError as e:
        raise UsageError(f"--port: cannot listen on {host}:{port}: {e}") from None
    servers: list[Any] = [twin]
    click.echo(
        f"Nomad twin at {twin.address}: {nodes} nodes in {', '.join(zone_list)} "
        f"(pool {node_pool}, speed x{speed:g}{', ACL on' if token else ''}). Ctrl-C to stop."
    )
    for line in registered:
        click.echo(line)
    if gce is not None:
        from nomadscale.sim.compute import ComputeServer

        compute = ComputeServer(gce, host=host, port=0).start()
        metadata = _MetadataServer(host, project=gce.project).start()
        servers += [compute, metadata]
        migs = ", ".join(f"{m.zone}/{m.name}={len(m.instances)}" for m in gce.migs.values())
        click.echo(f"GCE project {gce.project}: managed instance groups {migs}")
        click.echo(f"export NOMAD_ADDR={twin.address}")
        click.echo(f"export NOMADSCALE_GCE_API_URL={compute.base_url}")
        # google.auth.default() finds "the VM's service account" here (google/auth/
        # compute_engine/_metadata.py reads both variables when it is imported)
        click.echo(
            f"export GCE_METADATA_HOST={metadata.address} GCE_METADATA_IP={metadata.address}"
        )
    try:
        while True:
            time.sleep(0.2)
            cluster.process_due()  # state moves on even when nobody asks
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        for server in reversed(servers):
            server.stop()


def _register_file(cluster: Any, path: Path) -> str:
    """Register one job file the way ``nomad job run`` would; a bad file is a usage error."""
    from nomadscale.sim import jobs, jobspec
    from nomadscale.sim.model import ApiError

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--job: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--job: {path}: not a UTF-8 text file") from None
    try:
        spec = jobspec.parse_hcl(text)
        ns = str(spec.get("Namespace") or "default")
        if ns not in cluster.namespaces:
            cluster.add_namespace(ns)
        with cluster.lock:
            jobs.register(cluster, spec)
    except ApiError as e:
        raise UsageError(f"--job: {path}: {' '.join(e.message.split())}") from None
    except (ValueError, TypeError, KeyError) as e:
        # a field of the wrong type (count = "abc") fails in the twin's canonicalization
        raise UsageError(f"--job: {path}: invalid job: {e}") from None
    groups = ", ".join(f"{g['Name']}={g.get('Count', 1)}" for g in spec.get("TaskGroups") or [])
    return f"registered {spec['ID']} ({spec.get('Type', 'service')}) in namespace {ns}: {groups}"


def _gce_sim(cluster: Any, files: tuple[Path, ...], *, node_class: str) -> Any:
    """A ``ComputeSim`` with the MIGs of ``files``' zones, each adopting the twin's nodes of
    the Nomad datacenter its task group is pinned to (else the zone's name) and its pool."""
    from nomadscale.config.policy import load_policy
    from nomadscale.core.ports import pinned_datacenter
    from nomadscale.sim.compute import ComputeSim

    policies = [load_policy(f) for f in files]  # an invalid policy: its errors, exit 1
    projects = {p.target.node_pool.project for p in policies if p.target.node_pool is not None}
    if len(projects) != 1:
        found = ", ".join(sorted(projects)) or "none has target.node_pool"
        raise UsageError(f"--gce-policy: give policies of one GCE project ({found})")
    sim = ComputeSim(cluster, project=projects.pop())
    for pol in policies:
        job = cluster.jobs.get((pol.target.namespace, pol.target.job))
        for z in pol.zones.items:
            if z.instance_group:
                dc = (pinned_datacenter(job.spec, z.group) if job is not None else None) or z.name
                sim.add_mig(name=z.instance_group, zone=z.name, node_pool=z.node_pool,
                            node_class=node_class, datacenter=dc)  # fmt: skip
    return sim


class _MetadataServer:
    """The few GCE metadata server answers ``google.auth.default()`` needs on a VM: the ping
    (``Metadata-Flavor: Google``), the project id, the default service account and a token
    for it. Requests without ``Metadata-Flavor: Google`` get 403, as on GCE."""

    def __init__(self, host: str, *, project: str) -> None:
        email = f"nomadscale-sim@{project}.iam.gserviceaccount.com"
        answers: dict[str, Any] = {
            "/computeMetadata/v1/project/project-id": project,
            "/computeMetadata/v1/instance/service-accounts/default/": {
                "email": email, "aliases": ["default"],
                "scopes": ["https://www.googleapis.com/auth/compute"],
            },
        }  # fmt: skip

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metadata: " + format, *args)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("", "/"):  # the ping: only the header counts
                    body: Any = ""
                elif self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header.")
                elif path.endswith("/token") and "/service-accounts/" in path:
                    body = {"access_token": "sim", "expires_in": 3600, "token_type": "Bearer"}
                elif path in answers:
                    body = answers[path]
                else:
                    return self._send(404, "not found")
                self._send(200, body if isinstance(body, str) else json.dumps(body))

            def _send(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sim-metadata", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> _MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
