"""A webhook app on the Nomad twin (shared by the fuzz and security tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from nomadscale.config.settings import Secret
from nomadscale.config.validate import load_policy
from nomadscale.core.clock import FakeClock
from nomadscale.healing.actions import zone_targets
from nomadscale.healing.engine import RunbookEngine
from nomadscale.healing.runbook import load_runbooks
from nomadscale.healing.webhooks import make_app
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.sim import Cluster, TwinServer
from tests.harness.services import free_port

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec-FUZZ-7f3a9c1e5b"
REPORT_TOKEN = "report-FUZZ-2b8d4f6a0c"


@dataclass
class WebhookRig:
    app: Any
    engine: RunbookEngine
    nomad: NomadClient
    twin: TwinServer


def webhook_rig() -> Iterator[WebhookRig]:
    clock = FakeClock()
    cluster = Cluster.build(
        nodes=4, zones=("asia-southeast2-a", "asia-southeast2-b"), node_pool="gpu-l4", clock=clock
    )
    twin = TwinServer(cluster).start()
    nomad = NomadClient(address=twin.address, clock=clock, max_retries=0)
    engine = RunbookEngine(
        runbooks=load_runbooks([ROOT / "runbooks"]),
        nomad=nomad,
        kv=MemoryKV(clock=clock),
        zones=zone_targets([load_policy(ROOT / "policies" / "ekyc-ml.yaml")]),
        clock=clock,
    )
    app = make_app(
        engine=engine, secrets=[Secret(WEBHOOK_SECRET)], report_token=Secret(REPORT_TOKEN)
    )
    try:
        yield WebhookRig(app=app, engine=engine, nomad=nomad, twin=twin)
    finally:
        nomad.close()
        twin.stop()


def serve(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
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
