"""Load test of the running service: HTTP at a fixed rate while it performs cycles.

Starts, each in its own process: a Consul dev agent, the Nomad twin with NODES nodes
(``nomadscale sim serve``) and ``python -m nomadscale run`` (webhooks mounted through
NOMADSCALE_WEBHOOK_SECRETS; demand from a synthetic trace ending in the future; cycle 2m).
This process then sends RATE requests/s for SECONDS (open loop, 64 keep-alive connections):
50 % signed PagerDuty webhooks, 25 % ``GET /status``, 25 % ``GET /metrics``, and every
KICK seconds sets zone-a's count off (someone else's write) and asks the leader to "apply now"
so cycles really read, decide and write during the load. Prints p50/p99 latency per endpoint,
errors (target 0) and the cycles' durations from the decision records in Consul.

    python benchmarks/load_service.py [--seconds 60] [--rate 200] [--nodes 2000] [--kick 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret"
POLICY = "bench"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def consul_binary() -> str:
    cache = Path(os.environ.get("NOMADSCALE_CACHE", str(Path.home() / ".cache" / "nomadscale")))
    for cand in (os.environ.get("NOMADSCALE_CONSUL_BIN"), str(cache / "consul/usr/bin/consul"),
                 shutil.which("consul")):  # fmt: skip
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("consul not found: run `bash scripts/install-services.sh` (as root)")


def wait_http(url: str, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not up after {timeout:g}s ({url})")


def write_trace(path: Path) -> None:
    """Two days of 1-minute steps up to an hour from now: a diurnal curve, 2000-6000 rpm."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    rows = ["timestamp,requests"]
    t = now - timedelta(days=2)
    while t < now + timedelta(hours=1):
        day = (t.hour * 60 + t.minute) / 1440
        rows.append(f"{t:%Y-%m-%dT%H:%M:%SZ},{4000 + 2000 * math.sin(2 * math.pi * day):.0f}")
        t += timedelta(minutes=1)
    path.write_text("\n".join(rows) + "\n")


def policy_doc(trace: Path) -> dict[str, Any]:
    return {
        "name": POLICY, "cycle": "2m", "lead_time": "1m",
        "demand": {"source": "trace", "trace": str(trace), "step": "1m"},
        "capacity": {"rpm_per_worker": 200},
        "bounds": {"min": 2, "max": 400, "max_step_up": 100, "max_step_down": 100},
        "zones": {"split": "odd-even", "list": [
            {"name": "zone-a", "group": "ml-worker-a", "node_pool": "gpu"},
            {"name": "zone-b", "group": "ml-worker-b", "node_pool": "gpu"},
        ]},
        "target": {"job": "ml-worker", "namespace": "default"},
    }  # fmt: skip


class Stack:
    """Consul, the twin and the service as child processes; logs in ``workdir``."""

    def __init__(self, workdir: Path, nodes: int) -> None:
        self.workdir, self.nodes = workdir, nodes
        self.procs: list[subprocess.Popen[bytes]] = []
        self.consul_port, self.twin_port, self.http_port = _port(), _port(), _port()
        self.prefix = f"bench/{uuid.uuid4().hex[:8]}"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Any:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=ROOT)  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        ports = {"http": self.consul_port, "dns": -1, "grpc": -1, "serf_lan": _port(),
                 "serf_wan": _port(), "server": _port()}  # fmt: skip
        hcl = self.workdir / "consul.hcl"
        hcl.write_text("ports { " + " ".join(f"{k} = {v}" for k, v in ports.items()) + " }\n")
        consul = self._spawn("consul", [consul_binary(), "agent", "-dev", "-bind=127.0.0.1",
                                        "-client=127.0.0.1", f"-config-file={hcl}"])  # fmt: skip
        wait_http(f"{self.consul_addr}/v1/status/leader", "consul", consul)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        twin = self._spawn("twin", [sys.executable, "-m", "nomadscale", "sim", "serve",
                                    "--port", str(self.twin_port), "--nodes", str(self.nodes),
                                    "--zones", "zone-a,zone-b", "--node-pool", "gpu"], env)  # fmt: skip
        wait_http(f"{self.twin_addr}/v1/status/leader", "twin", twin)
        self.register_job()
        trace = self.workdir / "trace.csv"
        write_trace(trace)
        pdir = self.workdir / "policies"
        pdir.mkdir()
        (pdir / f"{POLICY}.yaml").write_text(yaml.safe_dump(policy_doc(trace)))
        (self.workdir / "settings.yaml").write_text("{}\n")
        senv = {k: v for k, v in env.items() if not k.startswith(("NOMAD", "CONSUL"))}
        senv.update({
            "NOMAD_ADDR": self.twin_addr, "CONSUL_HTTP_ADDR": self.consul_addr,
            "NOMADSCALE_CONFIG": str(self.workdir / "settings.yaml"),
            "NOMADSCALE_POLICIES": str(pdir), "NOMADSCALE_RUNBOOKS": str(ROOT / "runbooks"),
            "NOMADSCALE_KV_PREFIX": self.prefix, "NOMADSCALE_HTTP_PORT": str(self.http_port),
            "NOMADSCALE_WEBHOOK_SECRETS": SECRET, "NOMADSCALE_LOCK_TTL": "15s",
        })  # fmt: skip
        svc = self._spawn("service", [sys.executable, "-m", "nomadscale", "run"], senv)
        wait_http(f"{self.service_url}/healthz", "nomadscale run", svc)
        end = time.monotonic() + 30
        while "nomadscale_is_leader 1.0" not in httpx.get(f"{self.service_url}/metrics").text:
            if time.monotonic() > end:
                raise SystemExit("the service did not take the leader lock within 30s")
            time.sleep(0.2)

    @property
    def consul_addr(self) -> str:
        return f"http://127.0.0.1:{self.consul_port}"

    @property
    def twin_addr(self) -> str:
        return f"http://127.0.0.1:{self.twin_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def register_job(self) -> None:
        from nomadscale.config.policy import Policy
        from nomadscale.integrations.nomad import NomadClient
        from nomadscale.service.simulate import worker_job

        pol = Policy.model_validate({**policy_doc(Path(__file__)), "demand": {
            "source": "prometheus", "query": "x", "step": "1m"}})  # fmt: skip
        job = worker_job(pol, counts={"zone-a": 10, "zone-b": 10}, image="i",
                         update={"MaxParallel": 0})  # fmt: skip
        job["NodePool"] = "gpu"
        NomadClient(address=self.twin_addr).register_job(job)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def kicker(stack: Stack, every_s: float, stop: threading.Event, kicks: list[str]) -> None:
    """Someone else's write to zone-a, then "apply now": each kick is a cycle that writes."""
    from nomadscale.integrations.consul import ConsulKV
    from nomadscale.integrations.nomad import NomadClient
    from nomadscale.service.control import Control

    nomad = NomadClient(address=stack.twin_addr)
    control = Control(ConsulKV(addr=stack.consul_addr), prefix=stack.prefix)
    while not stop.wait(every_s):
        nomad.scale("ml-worker", "ml-worker-a", 1, message="load: drift", namespace="default")
        kicks.append(control.request_kick(POLICY, reason="load", now=datetime.now(UTC)))


async def drive(port: int, seconds: float, rate: int) -> dict[str, list[tuple[float, int]]]:
    from benchmarks.load_webhooks import Conn, signed

    n = int(seconds * rate)
    plan: list[tuple[str, str, bytes, dict[str, str]]] = []
    for i in range(n):
        if i % 4 in (0, 2):
            b, h = signed(SECRET)
            plan.append(("webhook", "/webhooks/pagerduty", b, h))
        elif i % 4 == 1:
            plan.append(("status", "/status", b"", {}))
        else:
            plan.append(("metrics", "/metrics", b"", {}))
    out: dict[str, list[tuple[float, int]]] = {"webhook": [], "status": [], "metrics": []}
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    pool = [Conn("127.0.0.1", port) for _ in range(64)]
    for c in pool:
        idle.put_nowait(c)

    async def one(due: float, kind: str, path: str, b: bytes, h: dict[str, str]) -> None:
        conn = await idle.get()
        try:
            code = await conn.request("POST" if b else "GET", path, b, h)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            conn.close()
            code = 0
        finally:
            idle.put_nowait(conn)
        out[kind].append(((time.perf_counter() - due) * 1000, code))

    tasks = []
    start = time.perf_counter()
    for i, (kind, path, b, h) in enumerate(plan):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due, kind, path, b, h)))
    await asyncio.gather(*tasks)
    for c in pool:
        c.close()
    return out


def cycle_records(stack: Stack) -> list[dict[str, Any]]:
    from nomadscale.integrations.consul import ConsulKV

    kv = ConsulKV(addr=stack.consul_addr)
    return [json.loads(e.value) for e in kv.list(f"{stack.prefix}/decisions/{POLICY}/")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--kick", type=float, default=10.0, help="seconds between forced cycles")
    args = ap.parse_args()
    if str(ROOT) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="nomadscale-load-"))
    stack = Stack(workdir, args.nodes)
    stop = threading.Event()
    kicks: list[str] = []
    try:
        t0 = time.monotonic()
        stack.start()
        print(f"stack up in {time.monotonic() - t0:.1f}s ({args.nodes}-node twin; logs {workdir})")
        began = datetime.now(UTC)
        k = threading.Thread(target=kicker, args=(stack, args.kick, stop, kicks), daemon=True)
        k.start()
        res = asyncio.run(drive(stack.http_port, args.seconds, args.rate))
        stop.set()
        k.join(10)
        time.sleep(2)  # let the last kicked cycle finish
        records = [r for r in cycle_records(stack) if r["started_at"] >= began.isoformat()]
    finally:
        stop.set()
        stack.stop()
    total = sum(len(v) for v in res.values())
    errors = sum(1 for v in res.values() for _ms, code in v if code not in (200, 202))
    print(f"sent {total} requests at {args.rate}/s for {args.seconds:g}s; errors {errors}")
    for kind, vals in res.items():
        lat = [ms for ms, _c in vals]
        q = statistics.quantiles(lat, n=100)
        codes: dict[int, int] = {}
        for _ms, c in vals:
            codes[c] = codes.get(c, 0) + 1
        print(f"  {kind:8s} n={len(vals):5d}  p50 {q[49]:7.2f} ms  p99 {q[98]:7.2f} ms  "
              f"max {max(lat):8.2f} ms  codes {dict(sorted(codes.items()))}")  # fmt: skip
    durs = sorted(float(r["duration_s"]) for r in records)
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    if durs:
        print(f"cycles during the load: {len(durs)} ({outcomes}), {len(kicks)} kicks; duration "
              f"p50 {statistics.median(durs) * 1000:.0f} ms, max {durs[-1] * 1000:.0f} ms")  # fmt: skip
    else:
        print(f"no cycle records during the load ({len(kicks)} kicks): see {workdir}/service.log")
    p99 = max(statistics.quantiles([ms for ms, _c in v], n=100)[98] for v in res.values())
    print("target 0 errors:", "MET" if errors == 0 else "NOT MET", f"(worst p99 {p99:.1f} ms)")


if __name__ == "__main__":
    main()
