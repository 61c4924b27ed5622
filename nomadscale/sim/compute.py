"""A Compute Engine endpoint for the Nomad twin: zonal managed instance groups whose
instances are Nomad nodes of a shared ``Cluster``.

It runs as its own small HTTP server on loopback (``ComputeServer``), sharing the twin's
``Cluster`` object, and speaks the subset of the Compute REST API that
``nomadscale.integrations.gce.GceMigPool`` uses:

* ``GET  /compute/v1/projects/P/zones/Z/instanceGroupManagers/NAME``: ``targetSize``,
  ``currentActions`` (InstanceGroupManagerActionsSummary: ``none``, ``creating``, ...) and
  ``status.isStable`` (no instance has an action under way).
* ``POST .../instanceGroupManagers/NAME/resize?size=N``: new instances join the twin as Nomad
  nodes (name = instance name, datacenter = zone unless the MIG names another, node pool from
  the MIG config) in status ``initializing``; the twin boots them after its ``boot_s`` on the
  cluster clock, then they pull images as allocations start on them. A zone that cannot
  create them (``ComputeFaults.stockout``) leaves them ``CREATING`` without a VM, with
  ``lastAttempt.errors``; the MIG creates them once the zone can (GCE: "If the group fails to
  create this instance, it will try again until it is successful", ManagedInstance
  ``currentAction``). There is no ``RETRYING`` action in the v1 API: a failing creation stays
  ``CREATING``. Shrinking picks the instances to delete as ``resize_victims`` says.
* ``POST .../listManagedInstances``
* ``POST .../deleteInstances {"instances": [urls]}``: exactly those instances go away (their
  nodes go down) and the target size drops by as many.
* ``GET  .../zones/Z/operations/OP``: an operation is ``DONE`` at once unless
  ``ComputeFaults.operation`` keeps it ``RUNNING`` or ends it with an ``error``.

Faults (``ComputeSim.faults``, a ``nomadscale.sim.faults.ComputeFaults``): error replies with
GCE's JSON error body and an optional ``Retry-After``, latency, dropped connections, failed or
endless operations, stockouts and quota errors.

Every change is appended to ``ComputeSim.events``.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from nomadscale.sim.cluster import Cluster
from nomadscale.sim.faults import ComputeFaults

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
    # instances the zone could not create yet: name -> (error code, message)
    stuck: dict[str, tuple[str, str]] = field(default_factory=dict)


def resize_victims(instances: Iterable[tuple[str, str, datetime | None]], n: int) -> list[str]:
    """The ``n`` instances a resize down deletes, from ``(name, state, created)``; state is
    ``stuck`` (no VM yet), ``booting`` or ``running``.

    GCE documents the choice as arbitrary but weighing "the status of the VM instance" and
    "the health of the VM instance" (instanceGroupManagers.resize, REST v1 reference): VMs that
    are not running go before running ones. So: instances without a VM first, then booting
    ones, then running ones; within each, the newest first; equal creation times by name
    (descending), so the choice never depends on insertion order."""
    rank = {"stuck": 0, "booting": 1, "running": 2}
    items = list(instances)
    by_name = sorted(items, key=lambda x: x[0], reverse=True)
    newest = sorted(
        by_name, key=lambda x: -(x[2].timestamp() if x[2] is not None else float("inf"))
    )
    ordered = sorted(newest, key=lambda x: rank.get(x[1], 2))
    return [name for name, _state, _created in ordered[: max(0, n)]]


class ComputeSim:
    """The MIGs of one project, backed by the twin's nodes. Thread-safe (cluster lock)."""

    def __init__(
        self, cluster: Cluster, *, project: str, faults: ComputeFaults | None = None
    ) -> None:
        self.cluster = cluster
        self.project = project
        self.faults = faults or ComputeFaults()
        self.migs: dict[tuple[str, str], Mig] = {}
        self.events: list[dict[str, Any]] = []
        self.operations: dict[str, dict[str, Any]] = {}
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
        for n in list(mig.stuck):  # the MIG retries: created once the zone can
            err = self.faults.take_creation(mig.zone, project=self.project)
            if err is not None:
                mig.stuck[n] = err
                break
            del mig.stuck[n]
            self._boot(mig, n)
            self._emit("mig_created", zone=mig.zone, mig=mig.name, instance=n)
        return mig.instances

    def _create(self, mig: Mig) -> str:
        name = f"{mig.name}-{next(self._seq):04d}{uuid.uuid4().hex[:4]}"
        err = self.faults.take_creation(mig.zone, project=self.project)
        if err is not None:
            mig.stuck[name] = err
            return name
        self._boot(mig, name)
        return name

    def _boot(self, mig: Mig, name: str) -> None:
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

    def _remove(self, mig: Mig, name: str) -> None:
        if mig.stuck.pop(name, None) is not None:
            return
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
            while len(live) + len(mig.stuck) < size:
                created.append(self._create(mig))
            have = len(live) + len(mig.stuck)
            if have > size:
                for n in resize_victims(self._states(mig), have - size):
                    self._remove(mig, n)
                    removed.append(n)
            mig.target_size = size
            self._emit(
                "mig_resize", zone=zone, mig=name, size=size, previous=before,
                created=created, removed=removed,
            )  # fmt: skip

    def check_instances(self, zone: str, name: str, names: list[str]) -> None:
        """ValueError when one of ``names`` is not an instance of the MIG."""
        with self.cluster.lock:
            mig = self._get(zone, name)
            self._live(mig)
            unknown = [n for n in names if n not in mig.instances and n not in mig.stuck]
            if unknown:
                raise ValueError(f"instances not in {zone}/{name}: {', '.join(unknown)}")

    def delete_instances(self, zone: str, name: str, names: list[str]) -> None:
        with self.cluster.lock:
            mig = self._get(zone, name)
            self.check_instances(zone, name, names)
            for n in names:
                self._remove(mig, n)
            mig.target_size = max(0, mig.target_size - len(names))
            self._emit("mig_delete", zone=zone, mig=name, instances=list(names))

    def _states(self, mig: Mig) -> list[tuple[str, str, datetime | None]]:
        out: list[tuple[str, str, datetime | None]] = [(n, "stuck", None) for n in mig.stuck]
        for n, nid in mig.instances.items():
            ready = self.cluster.nodes[nid].status == "ready"
            out.append((n, "running" if ready else "booting", mig.created.get(n)))
        return out

    def describe(self, zone: str, name: str) -> dict[str, Any]:
        """The instanceGroupManagers.get reply: target size, current actions, stability."""
        with self.cluster.lock:
            mig = self._get(zone, name)
            self._live(mig)
            states = [state for _n, state, _c in self._states(mig)]
            creating = sum(1 for st in states if st != "running")
            actions = {k: 0 for k in ("none", "creating", "creatingWithoutRetries", "verifying",
                                      "recreating", "deleting", "abandoning", "restarting",
                                      "refreshing", "resuming", "starting", "stopping",
                                      "suspending")}  # fmt: skip
            actions.update(none=len(states) - creating, creating=creating)
            return {
                "kind": "compute#instanceGroupManager",
                "name": name,
                "zone": f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{zone}",
                "targetSize": mig.target_size,
                "currentActions": actions,
                "status": {"isStable": creating == 0},
            }

    def list_instances(self, zone: str, name: str) -> list[dict[str, Any]]:
        with self.cluster.lock:
            mig = self._get(zone, name)
            base = f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{zone}"
            out: list[dict[str, Any]] = []
            for n, nid in self._live(mig).items():
                node = self.cluster.nodes[nid]
                status = "RUNNING" if node.status == "ready" else "STAGING"
                out.append(
                    {
                        "instance": f"{base}/instances/{n}",
                        "name": n,
                        "id": str(abs(hash(nid)) % 10**18),
                        "instanceStatus": status,
                        "currentAction": "NONE" if status == "RUNNING" else "CREATING",
                        "creationTimestamp": mig.created[n].astimezone(UTC).isoformat(),
                    }
                )
            for n, (code, message) in mig.stuck.items():  # no VM: no id, status nor time
                out.append(
                    {
                        "instance": f"{base}/instances/{n}",
                        "name": n,
                        "currentAction": "CREATING",
                        "lastAttempt": {"errors": {"errors": [{"code": code,
                                                               "message": message}]}},
                    }
                )  # fmt: skip
            return out

    def operation(self, zone: str, kind: str, fault: Any = None) -> dict[str, Any]:
        """A new zone operation: DONE, or as ``fault`` (an ``OperationFault``) says. Returns
        the insert reply; ``GET operations/NAME`` answers from ``operations``."""
        name = f"operation-{uuid.uuid4().hex[:16]}"
        op: dict[str, Any] = {"kind": "compute#operation", "name": name, "zone": zone,
                              "operationType": kind, "status": "DONE", "progress": 100}  # fmt: skip
        reply = dict(op)
        if fault is not None:
            reply.update(status="RUNNING", progress=0)
            if fault.ends == "never":
                op.update(status="RUNNING", progress=0)
            else:  # DONE with an error, as GCE reports a failed operation
                op.update(httpErrorStatusCode=400, httpErrorMessage="BAD REQUEST",
                          error={"errors": [{"code": fault.code,
                                             "message": fault.message}]})  # fmt: skip
        with self.cluster.lock:
            self.operations[name] = op
        return reply


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(
        self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._reply(code, {"error": {"code": code, "message": message, "errors": []}}, headers)

    def _write(self, zone: str, kind: str, target: str, apply: Any) -> None:
        """A write answered with a zone operation; an operation fault may skip the write."""
        sim = self.server.sim
        fault = sim.faults.take_operation(self.command, target)
        if fault is None or fault.apply:
            apply()
        self._reply(200, sim.operation(zone, kind, fault))

    def _handle(self, method: str) -> None:
        sim = self.server.sim
        self.server.calls += 1
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        token = self.server.token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            self._error(401, "Request had invalid authentication credentials.",
                        {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})  # fmt: skip
            return
        decision = sim.faults.check(method, url.path)
        if decision.latency_s > 0:
            time.sleep(decision.latency_s)
        if decision.drop:
            self.close_connection = True
            return
        if decision.fail is not None:
            status, message = decision.fail
            extra = {"Retry-After": decision.retry_after} if decision.retry_after else None
            self._error(status, message, extra)
            return
        m = _PATH.match(url.path)
        if not m:
            self._error(404, f"The resource '{url.path}' was not found")
            return
        if m.group("project") != sim.project:
            self._error(404, f"project {m.group('project')} not found")
            return
        zone = m.group("zone")
        if m.group("op"):
            with sim.cluster.lock:
                op = sim.operations.get(m.group("op"))
            if op is None:
                self._error(404, f"The resource 'operations/{m.group('op')}' was not found")
            else:
                self._reply(200, op)
            return
        mig, verb = m.group("mig"), m.group("verb")
        body: dict[str, Any] = {}
        if raw:
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._error(400, "Invalid JSON payload received.")
                return
        try:
            if method == "GET" and verb is None:
                self._reply(200, sim.describe(zone, mig))
            elif method == "POST" and verb == "resize":
                size = parse_qs(url.query).get("size", [""])[0]
                if not size.isdigit():
                    self._error(400, "Invalid value for field 'size'")
                    return
                sim.size(zone, mig)  # 404 before any operation
                self._write(zone, "compute.instanceGroupManagers.resize", url.path,
                            lambda: sim.resize(zone, mig, int(size)))  # fmt: skip
            elif method == "POST" and verb == "listManagedInstances":
                self._reply(200, {"managedInstances": sim.list_instances(zone, mig)})
            elif method == "POST" and verb == "deleteInstances":
                urls = body.get("instances") or []
                names = [str(u).rstrip("/").rsplit("/", 1)[-1] for u in urls]
                sim.check_instances(zone, mig, names)  # 400 before any operation
                self._write(zone, "compute.instanceGroupManagers.deleteInstances", url.path,
                            lambda: sim.delete_instances(zone, mig, names))  # fmt: skip
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

    def __init__(self, addr: tuple[str, int], sim: ComputeSim, token: str | None) -> None:
        super().__init__(addr, _Handler)
        self.sim = sim
        self.calls = 0
        self.token = token


class ComputeServer:
    """Serve ``sim`` over HTTP on loopback. ``base_url`` is what ``GceMigPool`` takes. With
    ``token``, every request needs ``Authorization: Bearer <token>`` (401 otherwise, as GCE
    answers a missing or wrong OAuth token)."""

    def __init__(
        self, sim: ComputeSim, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ) -> None:
        self.sim = sim
        self._server = _Server((host, port), sim, token)
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
