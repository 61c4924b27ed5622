"""Healing test rig: the Nomad twin (FakeClock, two zones of the ekyc-ml policy), the ml-worker
job, the runbook engine on a KV, a loopback PagerDuty, and the webhook app served by uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from nomadscale.config.settings import Secret
from nomadscale.config.validate import load_policy
from nomadscale.core.ports import KVPort
from nomadscale.healing.actions import zone_targets
from nomadscale.healing.engine import EngineLimits, RunbookEngine
from nomadscale.healing.gpucheck import META_PREFIX, encode_meta
from nomadscale.healing.runbook import load_runbooks
from nomadscale.healing.webhooks import make_app
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.pagerduty import PagerDutyIncidents
from tests.harness.pagerduty_server import PagerDutyServer
from tests.harness.services import free_port
from tests.harness.twin import Twin, TwinFactory

ROOT = Path(__file__).resolve().parents[2]
ZONES = ("asia-southeast2-a", "asia-southeast2-b")
WEBHOOK_SECRET = "whsec-test-0123456789"
REPORT_TOKEN = "report-token-test"
HEALTHY_SMI = "0, GPU-5f1c2a9e-8d7b-4c3a-9e21-0a1b2c3d4e5f, NVIDIA L4, 0, 0, 0\n"
REMAP_OK = "00000000:00:04.0, GPU-5f1c2a9e-8d7b-4c3a-9e21-0a1b2c3d4e5f, 0, 0, No, No\n"
XID_79 = "kernel: NVRM: Xid (PCI:0000:00:04): 79, pid=2817, GPU has fallen off the bus.\n"


def worker_job(zones: tuple[str, str] = ZONES) -> dict[str, Any]:
    def group(zone: str, suffix: str) -> dict[str, Any]:
        return {
            "Name": f"ml-worker-{suffix}",
            "Count": 2,
            "Constraints": [{"LTarget": "${node.datacenter}", "RTarget": zone, "Operand": "="}],
            "Tasks": [
                {
                    "Name": "worker",
                    "Driver": "docker",
                    "Config": {"image": "registry.example.com/ekyc/ml-worker:2026.11.1"},
                    "Resources": {
                        "CPU": 1000,
                        "MemoryMB": 1024,
                        "Devices": [{"Name": "nvidia/gpu", "Count": 1}],
                    },
                }
            ],
        }

    return {
        "ID": "ml-worker",
        "Name": "ml-worker",
        "Namespace": "ekyc",
        "Type": "service",
        "Datacenters": list(zones),
        "NodePool": "gpu-l4",
        "TaskGroups": [group(zones[0], "a"), group(zones[1], "b")],
    }


class GpuResponder:
    """Plays the node's gpu-check task: answers ``gpu.check.request`` in node meta."""

    def __init__(self, nomad: NomadClient, nodes: list[str]) -> None:
        self.nomad = nomad
        self.nodes = nodes
        self.outputs = {"query_gpu": HEALTHY_SMI, "remapped_rows": REMAP_OK, "xid": ""}
        self.answered: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for nid in self.nodes:
                meta = self.nomad.node_metadata(nid).meta
                req = meta.get(META_PREFIX + "request")
                if req and meta.get(META_PREFIX + "id") != req:
                    self.nomad.set_node_metadata(nid, encode_meta(req, **self.outputs))
                    self.answered.append(nid)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


@dataclass
class Rig:
    twin: Twin
    nomad: NomadClient
    kv: KVPort
    pd: PagerDutyServer
    engine: RunbookEngine
    url: str
    gpu: GpuResponder
    make_engine: Callable[[], RunbookEngine]
    app: Any = None
    _servers: list[Any] = field(default_factory=list)

    def node_id(self, zone: str, i: int = 0) -> str:
        return sorted(n.id for n in self.twin.cluster.nodes.values() if n.datacenter == zone)[i]

    def wait_run(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            runs = self.engine.list_runs()
            for r in runs:
                if pred(r):
                    return r
            time.sleep(0.02)
        raise AssertionError(f"no run matched in {timeout}s: {self.engine.list_runs()}")


def serve(app: Any) -> tuple[str, Any, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, t


@pytest.fixture
def rig_factory(twin_factory: TwinFactory) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(
        *,
        kv: KVPort | None = None,
        prefix: str = "nomadscale",
        datacenters: tuple[str, str] = ZONES,
    ) -> Rig:
        """``datacenters``: the Nomad datacenters of the nodes and the groups' constraints
        (the policy's zones are always named asia-southeast2-a/b)."""
        twin = twin_factory(nodes=8, zones=datacenters, node_pool="gpu-l4")
        twin.cluster.add_namespace("ekyc")
        nomad = NomadClient(address=twin.address, clock=twin.clock, max_retries=0)
        nomad.register_job(worker_job(datacenters))
        twin.advance(300)
        kv = kv if kv is not None else MemoryKV(clock=twin.clock)
        pd = PagerDutyServer().start()
        notes = PagerDutyIncidents(
            Secret(pd.state.api_key), from_email="ops@example.com", base_url=pd.url
        )
        zones = zone_targets([load_policy(ROOT / "policies" / "ekyc-ml.yaml")])
        runbooks = load_runbooks([ROOT / "runbooks"])

        def make_engine() -> RunbookEngine:
            return RunbookEngine(
                runbooks=runbooks,
                nomad=nomad,
                kv=kv,
                zones=zones,
                notes=notes,
                clock=twin.clock,
                prefix=prefix,
                limits=EngineLimits(poll_s=5.0, backoff_initial_s=1.0),
            )

        engine = make_engine()
        app = make_app(
            engine=engine, secrets=[Secret(WEBHOOK_SECRET)], report_token=Secret(REPORT_TOKEN)
        )
        url, server, thread = serve(app)
        gpu = GpuResponder(nomad, list(twin.cluster.nodes))
        rig = Rig(twin, nomad, kv, pd, engine, url, gpu, make_engine, app, [server, thread])
        made.append(rig)
        return rig

    yield make
    for r in made:
        r.gpu.stop()
        r.engine.stop(timeout=2)
        server, thread = r._servers
        server.should_exit = True
        thread.join(5)
        r.pd.stop()
