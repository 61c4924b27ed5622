"""Adapter latencies against a 2,000-node twin over loopback HTTP.

Usage: python benchmarks/bench_nomad_api.py [--nodes 2000] [--calls 50]
Prints p50/p95 (ms) for: list nodes of a pool, list nodes with alloc counts, scale, drain,
job_status.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nomadscale.core.clock import FakeClock
from nomadscale.integrations.nomad import NomadClient
from tests.contract.env import service_job, settle, twin_target


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(name: str, fn: Callable[[int], object], calls: int) -> None:
    fn(0)  # warm up
    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i + 1)
        samples.append((time.perf_counter() - t0) * 1000)
    print(
        f"{name:<32} p50 {_pct(samples, 0.5):8.2f} ms   p95 {_pct(samples, 0.95):8.2f} ms"
        f"   mean {statistics.fmean(samples):8.2f} ms   (n={calls})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--workers", type=int, default=400, help="allocations per group")
    args = ap.parse_args()

    t0 = time.perf_counter()
    with twin_target(nodes=args.nodes) as target:
        client = NomadClient(address=target.address, clock=FakeClock(), timeout=30)
        job = service_job("ml-worker", count=args.workers)
        job["Update"]["MaxParallel"] = 0  # no deployments: back-to-back scale calls are allowed
        client.register_job(job)
        settle(client, target, "ml-worker", max_s=36_000)
        nodes = client.list_nodes(node_pool="gpu")
        running = sum(n.allocs_running for n in client.list_nodes(with_allocs=True))
        print(
            f"twin: {len(nodes)} nodes, {running} running allocations "
            f"(setup {time.perf_counter() - t0:.1f}s)"
        )
        ids = [n.id for n in nodes]

        measure("list_nodes(pool)", lambda i: client.list_nodes(node_pool="gpu"), args.calls)
        measure(
            "list_nodes(pool, with_allocs)",
            lambda i: client.list_nodes(node_pool="gpu", with_allocs=True),
            args.calls,
        )
        measure(
            "list_nodes(pool, zone)",
            lambda i: client.list_nodes(node_pool="gpu", datacenter="zone-a"),
            args.calls,
        )
        measure(
            "scale",
            lambda i: client.scale(
                "ml-worker", "ml-worker-b", args.workers + (i % 2), message="bench"
            ),
            args.calls,
        )
        measure(
            "drain",
            lambda i: client.drain(ids[i % len(ids)], deadline_s=3600, meta={"reason": "bench"}),
            args.calls,
        )
        measure("job_status", lambda i: client.job_status("ml-worker"), args.calls)
        client.close()


if __name__ == "__main__":
    main()
