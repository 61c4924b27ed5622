"""Nomad twin latency at fleet scale: 2,000 nodes, 20,000 allocations, over real HTTP.

    python benchmarks/bench_twin.py [--nodes 2000] [--allocs 20000] [--repeat 5]

Prints build time and the median/max latency (client side, including JSON decoding unless
noted) of: list nodes (target < 100 ms), list nodes with a filter, scale a job, drain a
node, list allocations (about 1 KB of JSON per allocation) and a job's scale status.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nomadscale.core.clock import FakeClock
from nomadscale.sim import Cluster, TwinServer

JOBS = 20


def _job(i: int, count: int) -> dict:
    return {
        "ID": f"svc-{i:02d}",
        "Type": "service",
        "NodePool": "gpu",
        "Datacenters": ["*"],
        "TaskGroups": [
            {
                "Name": "app",
                "Count": count,
                "Tasks": [
                    {
                        "Name": "app",
                        "Driver": "docker",
                        "Config": {"image": f"app:{i}"},
                        "Resources": {"CPU": 100, "MemoryMB": 128},
                    }
                ],
            }
        ],
    }


def timed(fn, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--allocs", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    cluster = Cluster.build(
        nodes=args.nodes, zones=("zone-a", "zone-b", "zone-c"), clock=FakeClock()
    )
    per_job = args.allocs // JOBS
    with TwinServer(cluster) as twin:
        s = requests.Session()
        base = twin.address
        for i in range(JOBS):
            r = s.post(f"{base}/v1/jobs", json={"Job": _job(i, per_job)}, timeout=120)
            r.raise_for_status()
        cluster.advance(300)
        gc.collect()
        gc.freeze()  # client and twin share this process: keep GC off the twin's objects
        build_s = time.perf_counter() - t0
        live = sum(1 for a in cluster.allocs.values() if a.live)
        print(f"built {len(cluster.nodes)} nodes, {live} running allocations in {build_s:.1f} s")

        rows = []
        rows.append(
            (
                "list nodes",
                *timed(lambda: s.get(f"{base}/v1/nodes").json(), args.repeat),
                "< 100 ms",
            )
        )
        rows.append(
            (
                "list nodes, filter Meta.zone",
                *timed(
                    lambda: s.get(
                        f"{base}/v1/nodes", params={"filter": 'Meta.zone == "zone-b"'}
                    ).json(),
                    args.repeat,
                ),
                "",
            )
        )
        # each scale starts a deployment (Nomad's default update block), which blocks further
        # scaling of that job until it finishes: scale a different job each time
        jobs_to_scale = iter(range(JOBS))
        rows.append(
            (
                "scale +1 (one job)",
                *timed(
                    lambda: s.post(
                        f"{base}/v1/job/svc-{next(jobs_to_scale):02d}/scale",
                        json={"Count": per_job + 1, "Target": {"Group": "app"}},
                    ).raise_for_status(),
                    min(args.repeat, JOBS),
                ),
                "",
            )
        )
        node_ids = iter(sorted(cluster.nodes))
        rows.append(
            (
                "drain a node",
                *timed(
                    lambda: s.post(
                        f"{base}/v1/node/{next(node_ids)}/drain",
                        json={"DrainSpec": {"Deadline": 3600 * 10**9}},
                    ).raise_for_status(),
                    args.repeat,
                ),
                "",
            )
        )
        rows.append(
            (
                "list allocations (bytes only)",
                *timed(lambda: s.get(f"{base}/v1/allocations").content, args.repeat),
                "",
            )
        )
        rows.append(
            (
                "list allocations + client json parse",
                *timed(lambda: s.get(f"{base}/v1/allocations").json(), args.repeat),
                "",
            )
        )
        rows.append(
            (
                "list allocations, no task states",
                *timed(
                    lambda: s.get(f"{base}/v1/allocations", params={"task_states": "false"}).json(),
                    args.repeat,
                ),
                "",
            )
        )
        rows.append(
            (
                "job scale status",
                *timed(lambda: s.get(f"{base}/v1/job/svc-01/scale").json(), args.repeat),
                "",
            )
        )
        t1 = time.perf_counter()
        cluster.advance(600)
        advance_ms = (time.perf_counter() - t1) * 1000

    print(f"{'operation':36} {'median ms':>10} {'max ms':>10}  target")
    for name, med, mx, target in rows:
        print(f"{name:36} {med:10.1f} {mx:10.1f}  {target}")
    print(f"{'advance 600 s (drains, migrations)':36} {advance_ms:10.1f}")


if __name__ == "__main__":
    main()
