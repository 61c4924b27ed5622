"""Rollout time on a 40-node twin, simulated time: with image prefetch vs without (each node
pulls the 7 GB image while it is being replaced). Demand: the development trace around its
peak; prints the forecast, the minimum serving capacity seen and both durations.

    python benchmarks/bench_rollout.py
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nomadscale.core.clock import FakeClock
from nomadscale.deploy.rollout import Rollout
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.sim import Cluster, TwinServer
from tests.deploy.helpers import NEW, TRACE, policy, setup_job

RPM_PER_WORKER = 5000.0
PER_ZONE = 15
PEAK_ROW = 808  # the trace's busiest 10-minute step


class Twin:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.cluster = Cluster.build(nodes=40, zones=("zone-a", "zone-b"), clock=self.clock)
        self.server = TwinServer(self.cluster, host="127.0.0.1", port=0).start()
        self.address = self.server.address

    def advance(self, s: float) -> None:
        self.cluster.advance(s)


def serving(twin: Twin) -> int:
    """Workers serving: the twin's ground truth (a worker Nomad re-watches after an in-place
    update keeps serving; its deployment health is cleared meanwhile)."""
    return sum(1 for a in twin.cluster.job_allocs(("default", "ml-worker")) if a.serving)


def run(*, prefetch: bool) -> dict[str, Any]:
    twin = Twin()
    try:
        nomad = setup_job(twin, count=PER_ZONE)
        demand = TraceDemandSource(TRACE)
        peak_at = demand.trace.start + timedelta(seconds=PEAK_ROW * demand.trace.step_s)
        demand.shift = twin.clock.now() - peak_at + timedelta(hours=1)  # 1 h before the peak
        low = [10**9]

        def watch(st: Any, info: dict[str, Any]) -> None:
            if st.status in ("canary", "rolling"):
                low[0] = min(low[0], serving(twin))

        pol = policy(rpm=RPM_PER_WORKER)
        r = Rollout(policy=pol, nomad=nomad, kv=MemoryKV(clock=twin.clock), clock=twin.clock,
                    demand=demand, reporter=watch, watch_wait_s=0, poll_s=5.0)  # fmt: skip
        plan = r.plan(NEW, prefetch=prefetch)
        t0 = time.perf_counter()
        st = r.start(NEW, prefetch=prefetch)
        return {
            "status": st.status,
            "sim_s": st.timings.get("total_s", 0.0),
            "prefetch_s": st.timings.get("prefetch_s", 0.0),
            "wall_s": time.perf_counter() - t0,
            "upper": plan.forecast_upper or 0.0,
            "need": plan.required_workers,
            "surge": plan.surge,
            "min_serving": low[0],
        }
    finally:
        twin.server.stop()


def main() -> None:
    print(f"40-node twin, 2 zones x {PER_ZONE} workers, {RPM_PER_WORKER:g} rpm/worker, 7 GB image")
    for label, pf in (("with prefetch", True), ("without prefetch", False)):
        r = run(prefetch=pf)
        print(
            f"{label:>17}: {r['status']}, rollout {r['sim_s'] / 60:6.1f} min simulated "
            f"(prefetch {r['prefetch_s'] / 60:.1f} min), wall {r['wall_s']:.1f}s; forecast upper "
            f"{r['upper']:.0f} rpm -> need {r['need']} workers, surge {r['surge']}, "
            f"min serving {r['min_serving']} workers "
            f"({r['min_serving'] * RPM_PER_WORKER:.0f} rpm)"
        )


if __name__ == "__main__":
    main()
