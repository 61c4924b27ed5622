"""A Compute Engine endpoint for the Nomad twin: zonal managed instance groups whose
instances are Nomad nodes of a shared ``Cluster``.

It runs as its own small HTTP server on loopback (``ComputeServer``), sharing the twin's
``Cluster`` object, and speaks the subset of the Compute REST API that
``nomadscale.integrations.gce.GceMigPool`` uses:

* ``GET  /compute/v1/projects/P/zones/Z/instanceGroupManagers/NAME``
* ``POST .../instanceGroupManagers/NAME/resize?size=N``: new instances join the twin as Nomad
  nodes (name = instance name, datacenter = zone unless the MIG names another, node pool from the MIG config) in status
  ``initializing``; the twin boots them after its ``boot_s`` on the cluster clock, then they
  pull images as allocations start on them. Shrinking removes the newest instances.
* ``POST .../listManagedInstances``
* ``POST .../deleteInstances {"instances": [urls]}``: exactly those instances go away (their
  nodes go down) and the target size drops by as many.
* ``GET  .../zones/Z/operations/OP``: every operation is ``DONE`` at once.

Every change is appended to ``ComputeSim.events``.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from nomadscale.sim.cluster import Cluster

_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/"
    r"(?:(?P<kind>instanceGroupManagers)/(?P<mig>[^/]+)(?:/(?P<verb>[A-Za-z]+))?"
    r"|operations/(?P<op>[^/]+))$"
)


@dataclass
class Mig:
    name: str
    zone: str
    node_pool: str
    node_class: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    datacenter: str = ""  # the Nomad datacenter of its nodes ("": named like the zone)
    target_size: int = 0
    instances: dict[str, str] = field(default_factory=dict)  # instance name -> node id
    created: dict[str, datetime] = field(default_factory=dict)


class ComputeSim:
    """The MIGs of one project, backed by the twin's nodes. Thread-safe (cluster lock)."""

    def __init__(self, cluster: Cluster, *, project: str) -> None:
        self.cluster = cluster
        self.project = project
        self.migs: dict[tuple[str, str], Mig] = {}
        self.events: list[dict[str, Any]] = []
        self._seq = itertools.count(1)

    def add_mig(
        self,
        *,
        name: str,
        zone: str,
        node_pool: str,
        node_class: str = "",
        meta: dict[str, str] | None = None,
        images: Iterable[str] = (),
        adopt_existing: bool = True,
        datacenter: str | None = None,
    ) -> Mig:
        """Declare a MIG. With ``adopt_existing`` the twin's live nodes in that zone and pool
        become its instances (so a pre-built fleet is managed from the start)."""
        with self.cluster.lock:
            dc = datacenter or zone
            mig = Mig(name, zone, node_pool, node_class, dict(meta or {}), tuple(images), dc)
            if adopt_existing:
                for node in sorted(self.cluster.nodes.values(), key=lambda n: n.create_index):
                    if (
                        node.datacenter == dc
                        and node.node_pool == node_pool
                        and node.status != "down"
                    ):
                        mig.instances[node.name] = node.id
                        mig.created[node.name] = self.cluster.now_dt()
            mig.target_size = len(mig.instances)
            self.migs[(zone, name)] = mig
            return mig

    def _emit(self, type_: str, **fields: Any) -> None:
        self.events.append({"time": self.cluster.now_dt(), "type": type_, **fields})

    def _get(self, zone: str, name: str) -> Mig:
        mig = self.migs.get((zone, name))
        if mig is None:
            raise LookupError(f"instanceGroupManager {zone}/{name} not found")
        return mig

    def _live(self, mig: Mig) -> dict[str, str]:
        """Drop instances whose node went away outside the MIG (e.g. ``lose_node``)."""
        gone = [
            n
            for n, nid in mig.instances.items()
            if nid not in self.cluster.nodes or self.cluster.nodes[nid].status == "down"
        ]
        for n in gone:
            mig.instances.pop(n, None)
            mig.created.pop(n, None)
        return mig.instances

    def _create(self, mig: Mig) -> str:
        name = f"{mig.name}-{next(self._seq):04d}{uuid.uuid4().hex[:4]}"
        meta = {"zone": mig.zone, **mig.meta}
        node_id = self.cluster.add_node(
            name=name,
            datacenter=mig.datacenter or mig.zone,
            node_pool=mig.node_pool,
            node_class=mig.node_class,
            meta=meta,
            images=mig.images,
            status="initializing",
        )
        mig.instances[name] = node_id
        mig.created[name] = self.cluster.now_dt()
        return name

    def _remove(self, mig: Mig, name: str) -> None:
        node_id = mig.instances.pop(name)
        mig.created.pop(name, None)
        node = self.cluster.nodes.get(node_id)
        if node is not None and node.status != "down":
            self.cluster.lose_node(node_id)

    def size(self, zone: str, name: str) -> int:
        with self.cluster.lock:
            return self._get(zone, name).target_size

    def resize(self, zone: str, name: str, size: int) -> None:
        with self.cluster.lock:
            mig = self._get(zone, name)
            live = self._live(mig)
            before = mig.target_size
            created: list[str] = []
            removed: list[str] = []
            while len(live) < size:
                created.append(self._create(mig))
            if len(live) > size:
                newest = sorted(live, key=lambda n: mig.created[n], reverse=True)
                for n in newest[: len(live) - size]:
                    self._remove(mig, n)
                    removed.append(n)
            mig.target_size = size
            self._emit(
                "mig_resize", zone=zone, mig=name, size=size, previous=before,
                created=created, removed=removed,
            )  # fmt: skip

    def delete_instances(self, zone: str, name: str, names: list[str]) -> None:
        with self.cluster.lock:
            mig = self._get(zone, name)
            self._live(mig)
            unknown = [n for n in names if n not in mig.instances]
            if unknown:
                raise ValueError(f"instances not in {zone}/{name}: {', '.join(unknown)}")
            for n in names:
                self._remove(mig, n)
            mig.target_size = max(0, mig.target_size - len(names))
            self._emit("mig_delete", zone=zone, mig=name, instances=list(names))

    def list_instances(self, zone: str, name: str) -> list[dict[str, Any]]:
        with self.cluster.lock:
            mig = self._get(zone, name)
            out = []
            for n, nid in self._live(mig).items():
                node = self.cluster.nodes[nid]
                status = "RUNNING" if node.status == "ready" else "STAGING"
                out.append(
                    {
                        "instance": f"https://www.googleapis.com/compute/v1/projects/"
                        f"{self.project}/zones/{zone}/instances/{n}",
                        "id": str(abs(hash(nid)) % 10**18),
                        "instanceStatus": status,
                        "currentAction": "NONE" if status == "RUNNING" else "CREATING",
                        "creationTimestamp": mig.created[n].astimezone(UTC).isoformat(),
                    }
                )
            return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._reply(code, {"error": {"code": code, "message": message, "errors": []}})

    def _op(self, zone: str, kind: str) -> None:
        name = f"operation-{uuid.uuid4().hex[:16]}"
        self._reply(200, {"kind": "compute#operation", "name": name, "zone": zone,
                          "operationType": kind, "status": "DONE", "progress": 100})  # fmt: skip

    def _handle(self, method: str) -> None:
        sim = self.server.sim
        self.server.calls += 1
        url = urlparse(self.path)
        m = _PATH.match(url.path)
        if not m:
            self._error(404, f"The resource '{url.path}' was not found")
            return
        if m.group("project") != sim.project:
            self._error(404, f"project {m.group('project')} not found")
            return
        zone = m.group("zone")
        if m.group("op"):
            self._reply(200, {"name": m.group("op"), "zone": zone, "status": "DONE"})
            return
        mig, verb = m.group("mig"), m.group("verb")
        body: dict[str, Any] = {}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._error(400, "Invalid JSON payload received.")
                return
        try:
            if method == "GET" and verb is None:
                self._reply(200, {"name": mig, "zone": zone, "targetSize": sim.size(zone, mig)})
            elif method == "POST" and verb == "resize":
                raw = parse_qs(url.query).get("size", [""])[0]
                if not raw.isdigit():
                    self._error(400, "Invalid value for field 'size'")
                    return
                sim.resize(zone, mig, int(raw))
                self._op(zone, "compute.instanceGroupManagers.resize")
            elif method == "POST" and verb == "listManagedInstances":
                self._reply(200, {"managedInstances": sim.list_instances(zone, mig)})
            elif method == "POST" and verb == "deleteInstances":
                urls = body.get("instances") or []
                names = [str(u).rstrip("/").rsplit("/", 1)[-1] for u in urls]
                sim.delete_instances(zone, mig, names)
                self._op(zone, "compute.instanceGroupManagers.deleteInstances")
            else:
                self._error(405, f"{method} not allowed on {url.path}")
        except LookupError as e:
            self._error(404, str(e).strip("'\""))
        except ValueError as e:
            self._error(400, str(e))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: ComputeSim) -> None:
        super().__init__(addr, _Handler)
        self.sim = sim
        self.calls = 0


class ComputeServer:
    """Serve ``sim`` over HTTP on loopback. ``base_url`` is what ``GceMigPool`` takes."""

    def __init__(self, sim: ComputeSim, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim
        self._server = _Server((host, port), sim)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/compute/v1"

    @property
    def calls(self) -> int:
        return self._server.calls

    def start(self) -> ComputeServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sim-compute",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ComputeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
