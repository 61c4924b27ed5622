"""One service cycle over 50 policies against a 2,000-node Nomad twin (+ its GCE endpoint).

Each policy reads a realistic history: 28 days of 5-minute steps (``--lookback``). At start-up
the service warms every policy's forecaster from that whole lookback in the background
(``Service.warm_up``, timed here on its own); every cycle, the first one included, then feeds
only the steps that ended since. ``--cold`` skips the warm-up (a cycle that must warm-start). Prints the wall time of each cycle (target <= 2 s for a steady
fleet) and the number of Nomad and GCE HTTP calls: they must grow with the number of policies
and of changed nodes, not with the number of nodes.
Run:  python benchmarks/bench_cycle.py [--policies 50] [--nodes 2000] [--lookback 28d]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.auth.credentials import AnonymousCredentials

from nomadscale.config.policy import Policy
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.ports import DemandSeries
from nomadscale.integrations.gce import GceMigPool
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.simulate import _SimClock, worker_job
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.compute import ComputeServer, ComputeSim
from nomadscale.sim.server import TwinServer

RPM = 100.0
CALLS: Counter[str] = Counter()
_orig = requests.Session.request


def _counting(self: requests.Session, method: str, url: str, *a: Any, **k: Any) -> Any:
    CALLS["gce" if "/compute/v1/" in str(url) else "nomad"] += 1
    return _orig(self, method, url, *a, **k)


requests.Session.request = _counting  # type: ignore[method-assign]


class Level:
    def __init__(self, rpm: float) -> None:
        self.rpm = rpm

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        n = int(lookback_s // step_s)
        last = math.floor(end.timestamp() / step_s) * step_s
        start = datetime.fromtimestamp(last - n * step_s, tz=end.tzinfo)
        return DemandSeries(start=start, step_s=step_s, values=np.full(n, self.rpm))


def policy(i: int, lookback: str) -> Policy:
    zones = [
        {
            "name": z,
            "group": f"w-{z[-1]}",
            "node_pool": f"pool-{i}",
            "instance_group": f"mig-{i}-{z[-1]}",
        }
        for z in ("zone-a", "zone-b")
    ]
    return Policy.model_validate(
        {
            "name": f"p{i:02d}",
            "demand": {"source": "prometheus", "query": "q", "step": "5m", "lookback": lookback},
            "capacity": {"rpm_per_worker": RPM},
            "bounds": {"min": 1, "max": 100, "max_step_up": 50, "max_step_down": 50},
            "zones": {"split": "odd-even", "list": zones},
            "target": {
                "job": f"job-{i:02d}",
                "namespace": "default",
                "node_pool": {"provider": "gce-mig", "project": "bench", "drain_deadline": "5m"},
            },
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--changed", type=int, default=10, help="policies that scale in by 2 nodes")
    ap.add_argument("--lookback", default="28d", help="history each policy reads (default 28d)")
    ap.add_argument("--cold", action="store_true", help="no start-up warm-up: cycle 1 warms")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_policy = args.nodes // args.policies
    fake = FakeClock()
    cluster = Cluster(clock=fake)
    compute = ComputeSim(cluster, project="bench")
    policies = [policy(i, args.lookback) for i in range(args.policies)]
    for i, p in enumerate(policies):
        for j in range(per_policy):
            zone = ("zone-a", "zone-b")[j % 2]
            cluster.add_node(name=f"n{i:02d}-{j:03d}", datacenter=zone, node_pool=f"pool-{i}",
                             node_class="gpu", meta={"zone": zone})  # fmt: skip
        for z in p.zones.items:
            compute.add_mig(name=str(z.instance_group), zone=z.name, node_pool=z.node_pool)
    clock = _SimClock(fake, cluster.advance)
    twin = TwinServer(cluster, host="127.0.0.1", port=0).start()
    gce = ComputeServer(compute).start()
    try:
        nomad = NomadClient(address=twin.address, clock=clock)
        half = per_policy // 2
        # steady demand: every policy's fleet is exactly right (on a flat history the
        # calibrated bound sits just above the level)
        demand = {p.name: Level((per_policy - 0.5) * RPM) for p in policies}
        for p in policies:
            nomad.register_job(worker_job(p, counts={"zone-a": half, "zone-b": half}, image="i"))
        cluster.advance(900)
        kv = MemoryKV(clock=clock)
        lock = MemoryLock(kv=kv, key="bench/leader", ttl_s=30, lock_delay_s=0)
        clock.on_tick = lock.acquire
        pool = GceMigPool(project="bench", credentials=AnonymousCredentials(),
                          base_url=gce.base_url, clock=clock, poll_s=1)  # fmt: skip
        ports = Ports(nomad=nomad, kv=kv, lock=lock, pool_for=lambda _p: pool,
                      demand_for=lambda p: demand[p.name])  # fmt: skip
        svc = Service(settings=Settings(kv_prefix="bench"), policies=policies, ports=ports,
                      clock=clock, poll_s=15)  # fmt: skip
        # to 5 s into a cron slot, as the scheduler fires: the warm-up anchors there
        cluster.advance(1200 - fake.now().timestamp() % 1200 + 5)
        if not args.cold:
            t0 = time.perf_counter()
            svc.warm_up()  # start() runs this in the background before the first slot
            print(f"start-up warm-up (background) policies={len(policies)} "
                  f"wall={time.perf_counter() - t0:.2f}s")  # fmt: skip
        for label, changed in (("first", 0), ("steady", 0), ("scale-in", args.changed)):
            for p in policies[:changed]:
                demand[p.name].rpm = (per_policy - 2.5) * RPM
            cluster.advance(1200)
            CALLS.clear()
            t0 = time.perf_counter()
            results = svc.run_once()
            wall = time.perf_counter() - t0
            outcomes = Counter(r.record.outcome for r in results)
            deleted = sum(len(e["instances"]) for e in compute.events if e["type"] == "mig_delete")
            print(
                f"{label:9s} policies={len(policies)} nodes={len(cluster.nodes)} "
                f"wall={wall:.2f}s nomad_calls={CALLS['nomad']} gce_calls={CALLS['gce']} "
                f"outcomes={dict(outcomes)} nodes_deleted_total={deleted}"
            )
    finally:
        gce.stop()
        twin.stop()


if __name__ == "__main__":
    main()
