"""Load test of the PagerDuty webhook endpoint: signed webhooks at a fixed rate.

The server and the load generator run in SEPARATE processes (they used to share one process
and its GIL, and the generator's own CPU time showed up as server latency):

* server: ``python -m uvicorn --factory benchmarks.load_webhooks:server_app`` serving
  ``healing.webhooks.make_app`` (in-memory KV) plus ``GET /bench/stats`` (dispatcher counts);
* generator: this process, RATE signed ``incident.annotated`` webhooks per second for SECONDS
  over 64 persistent HTTP/1.1 connections (plain asyncio streams, see ``Conn`` for why not
  httpx), each request due at its scheduled time and timed from then (open loop: a slow
  server does not slow the senders down, so queueing shows up as latency).

The events match no runbook (recorded and ignored), so the figures measure verification,
de-duplication and hand-off. Prints p50/p99 latency and how many were accepted.
Target: p99 < 50 ms, none lost.

    python benchmarks/load_webhooks.py [--seconds 60] [--rate 200] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_app() -> Any:
    """uvicorn factory (runs in the server process)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from nomadscale.config.settings import Secret
    from nomadscale.healing.engine import RunbookEngine
    from nomadscale.healing.runbook import load_runbooks
    from nomadscale.healing.webhooks import make_app
    from nomadscale.integrations.memkv import MemoryKV
    from nomadscale.integrations.nomad import NomadClient

    engine = RunbookEngine(
        runbooks=load_runbooks([ROOT / "runbooks"]),
        nomad=NomadClient(address="http://127.0.0.1:9"),  # never called: no event matches
        kv=MemoryKV(),
    )
    app = make_app(engine=engine, secrets=[Secret(SECRET)], report_token=Secret("unused"))
    disp = app.state.dispatcher

    async def stats(_req: Request) -> JSONResponse:
        return JSONResponse({**disp.stats, "queued": disp.queue.qsize()})

    app.router.routes.append(Route("/bench/stats", stats))
    return app


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


def signed(secret: str) -> tuple[bytes, dict[str, str]]:
    from nomadscale.healing.webhooks import sign

    b = body()
    headers = {
        "X-PagerDuty-Signature": sign(secret, b),
        "X-Webhook-Id": uuid.uuid4().hex,
        "Content-Type": "application/json",
    }
    return b, headers


class Conn:
    """One persistent HTTP/1.1 connection, one request at a time (asyncio streams).

    httpx's async pool was the real bottleneck of this benchmark: with hundreds of requests
    in flight, httpcore re-scans every queued request against every connection on each
    event (``ConnectionPool._assign_requests_to_connections``, O(requests x connections)),
    which pinned the generator's CPU and showed up as seconds of "server" latency."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        return await self.request("POST", path, body, headers)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> int:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        headers = headers or {}
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    port: int, path: str, seconds: float, rate: int, *, conns: int = 64
) -> tuple[list[float], dict[int, int], float]:
    """Open-loop load: request i is due at ``start + i / rate`` and its latency is measured
    from that moment (waiting for a free connection counts). Bodies are signed up front so
    the generator's own CPU time stays out of the figures. Returns the latencies (ms), the
    status codes and the worst lag of the sender behind its schedule (ms)."""
    n = int(seconds * rate)
    reqs = [signed(SECRET) for _ in range(n)]
    lat: list[float] = []
    codes: dict[int, int] = {}
    lag = 0.0
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    pool = [Conn("127.0.0.1", port) for _ in range(conns)]
    for c in pool:
        idle.put_nowait(c)

    async def one(due: float, b: bytes, headers: dict[str, str]) -> None:
        conn = await idle.get()
        try:
            code = await conn.post(path, b, headers)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            conn.close()
            code = 0
        finally:
            idle.put_nowait(conn)
        lat.append((time.perf_counter() - due) * 1000)
        codes[code] = codes.get(code, 0) + 1

    tasks = []
    start = time.perf_counter()
    for i, (b, headers) in enumerate(reqs):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay * 1000)
        tasks.append(asyncio.create_task(one(due, b, headers)))
    await asyncio.gather(*tasks)
    for c in pool:
        c.close()
    return lat, codes, lag


def start_server(port: int, profile: str | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += [
        "-m", "uvicorn", "--factory", "benchmarks.load_webhooks:server_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        "--no-access-log", "--lifespan", "off",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/bench/stats", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"the webhook server exited with {proc.returncode}") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the webhook server did not start within 30s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--profile", help="cProfile the server process into this file")
    args = ap.parse_args()
    if str(ROOT) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(ROOT))
    port = _port()
    server = start_server(port, args.profile)
    try:
        lat, codes, lag = asyncio.run(drive(port, "/webhooks/pagerduty", args.seconds, args.rate))
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the dispatcher to drain its queue
            stats = httpx.get(f"http://127.0.0.1:{port}/bench/stats", timeout=5).json()
            if not stats["queued"]:
                break
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGINT)  # lets cProfile write its file
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    sent = int(args.seconds * args.rate)
    q = statistics.quantiles(lat, n=100)
    print(
        f"sent {sent} webhooks at {args.rate}/s for {args.seconds:g}s (server in its own process)"
    )
    print(f"latency ms: p50 {q[49]:.2f}  p99 {q[98]:.2f}  max {max(lat):.2f}")
    print(f"sender lag behind schedule: max {lag:.1f} ms")
    print(f"status codes: {dict(sorted(codes.items()))}")
    print(
        f"accepted {codes.get(202, 0)}/{sent}; dispatched {stats.get('accepted')}, "
        f"ignored (no runbook) {stats.get('ignored')}, errors {stats.get('errors')}"
    )
    ok = codes.get(202, 0) == sent and q[98] < 50
    print("target p99 < 50 ms, none lost:", "MET" if ok else "NOT MET")
    if args.profile:
        print(f"server profile written to {args.profile} (python -m pstats {args.profile})")


if __name__ == "__main__":
    main()
