"""Load test of the PagerDuty webhook endpoint: signed webhooks at a fixed rate.

Serves ``healing.webhooks.make_app`` with uvicorn on loopback (in-memory KV), sends RATE signed
``incident.annotated`` webhooks per second for SECONDS with httpx (async), and prints p50/p99
latency and how many were accepted. The events match no runbook (recorded and ignored), so the
figures measure verification, de-duplication and hand-off. Target: p99 < 50 ms, none lost.

    python benchmarks/load_webhooks.py [--seconds 60] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx
import uvicorn

from nomadscale.config.settings import Secret
from nomadscale.healing.engine import RunbookEngine
from nomadscale.healing.runbook import load_runbooks
from nomadscale.healing.webhooks import make_app, sign
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.nomad import NomadClient

SECRET = "bench-secret"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body() -> bytes:
    return json.dumps(
        {
            "event": {
                "id": uuid.uuid4().hex,
                "event_type": "incident.annotated",
                "resource_type": "incident",
                "occurred_at": "2026-01-05T00:00:00Z",
                "agent": None,
                "client": None,
                "data": {"incident": {"id": "Q1LOAD"}, "content": "load", "type": "incident_note"},
            }
        }
    ).encode()


async def drive(url: str, seconds: float, rate: int) -> tuple[list[float], dict[int, int]]:
    lat: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def one() -> None:
            b = body()
            headers = {
                "X-PagerDuty-Signature": sign(SECRET, b),
                "X-Webhook-Id": uuid.uuid4().hex,
                "Content-Type": "application/json",
            }
            t0 = time.perf_counter()
            try:
                r = await client.post(url, content=b, headers=headers)
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            lat.append((time.perf_counter() - t0) * 1000)
            codes[code] = codes.get(code, 0) + 1

        tasks = []
        start = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return lat, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=int, default=200)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    engine = RunbookEngine(
        runbooks=load_runbooks([root / "runbooks"]),
        nomad=NomadClient(address="http://127.0.0.1:9"),  # never called: no event matches
        kv=MemoryKV(),
    )
    app = make_app(engine=engine, secrets=[Secret(SECRET)], report_token=Secret("unused"))
    port = _port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}/webhooks/pagerduty"
    lat, codes = asyncio.run(drive(url, args.seconds, args.rate))
    app.state.dispatcher.queue.join()
    server.should_exit = True
    t.join(5)
    sent = int(args.seconds * args.rate)
    q = statistics.quantiles(lat, n=100)
    stats = app.state.dispatcher.stats
    print(f"sent {sent} webhooks at {args.rate}/s for {args.seconds:g}s")
    print(f"latency ms: p50 {q[49]:.2f}  p99 {q[98]:.2f}  max {max(lat):.2f}")
    print(f"status codes: {dict(sorted(codes.items()))}")
    print(
        f"accepted {codes.get(202, 0)}/{sent}; dispatched {stats['accepted']}, "
        f"ignored (no runbook) {stats['ignored']}, errors {stats['errors']}"
    )
    ok = codes.get(202, 0) == sent and q[98] < 50
    print("target p99 < 50 ms, none lost:", "MET" if ok else "NOT MET")


if __name__ == "__main__":
    main()
