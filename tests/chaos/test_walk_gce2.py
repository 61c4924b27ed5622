"""Chaos round gce2: the GPU node pool when the cloud only partly fulfils it, and a leader
killed mid-drain. Real Consul for the lock and the decision records, the twin over HTTP with
its Compute endpoint and its fault hooks (``nomadscale.sim.faults.ComputeFaults``), PagerDuty
and an OAuth token endpoint on loopback; virtual time, except for the real processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.core.errors import ExternalPermanentError
from nomadscale.integrations.consul import ConsulKV, ConsulLock, LockHolder
from nomadscale.integrations.gce import GceMigPool
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.runtime import alerts_for
from nomadscale.service.simulate import worker_job
from nomadscale.sim.compute import ComputeServer, ComputeSim
from nomadscale.sim.faults import STOCKOUT
from tests.chaos.conftest import Record
from tests.chaos.helpers import (
    HoldNth,
    MigRig,
    TokenServer,
    level_series,
    mig_fleet,
    run_env,
    start_service,
    stop_process,
    wait_for,
)
from tests.harness.pagerduty_server import PagerDutyServer
from tests.harness.services import ConsulAgent, free_port, metrics_text
from tests.harness.twin import TwinFactory
from tests.service.helpers import LevelDemand, make_policy

pytestmark = [pytest.mark.consul]


@dataclass
class Rig(MigRig):
    pd: PagerDutyServer

    def alerts(self) -> list[tuple[str, str]]:
        return [(e["event_action"], e["dedup_key"]) for e in self.pd.state.events]


@pytest.fixture
def rig(consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory) -> Iterator[Rig]:
    """3 nodes per zone in MIGs mig-a/b, 3 workers per zone, demand 560 rpm (no change)."""
    twin, sim, clock = mig_fleet(twin_factory)
    cluster = twin.cluster
    policy = make_policy(node_pool=True, alerting={"pagerduty_routing_key_env": "PD_KEY"})
    level = {"rpm": 560.0}
    prefix = consul_prefix.rstrip("/")
    pd = PagerDutyServer().start()
    with ComputeServer(sim) as server:
        nomad = NomadClient(address=twin.address, clock=clock)
        nomad.register_job(worker_job(policy, counts={"zone-a": 3, "zone-b": 3}, image="img:1",
                                      update={"MaxParallel": 0}))  # fmt: skip
        cluster.advance(600)
        kv = ConsulKV(addr=consul_agent.addr)
        lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=15,
                          lock_delay_s=0, holder=LockHolder(host="gce2", pid=0,
                                                            started_at=""))  # fmt: skip
        pool = GceMigPool(project="proj", credentials=AnonymousCredentials(),
                          base_url=server.base_url, clock=clock, poll_s=1,
                          operation_timeout_s=120)  # fmt: skip
        alerts = alerts_for([policy], env={"PD_KEY": "pd-routing-key-0001"}, base_url=pd.url)
        ports = Ports(nomad=nomad, kv=kv, lock=lock, pool_for=lambda _p: pool, alerts=alerts,
                      demand_for=lambda _p: LevelDemand(lambda _t: level["rpm"]))  # fmt: skip
        svc = Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=15), policies=[policy],
                      ports=ports, clock=clock, poll_s=10, check=False)  # fmt: skip
        try:
            yield Rig(twin, sim, svc, level, clock, nomad, kv, prefix, pd)
        finally:
            svc.stop(timeout_s=5)
            pd.stop()


def _cycle(rig: Rig) -> Any:
    rig.clock.sleep(1200)  # the next cycle slot
    res = rig.svc.run_policy("ekyc")
    assert res is not None
    return res.record


def test_a_zone_the_cloud_cannot_fill_is_said_moved_and_alerted_when_it_persists(
    rig: Rig, fault_table: Record
) -> None:
    """zone-b is out of GPUs: the scale-up's new instances there stay CREATING with
    ZONE_RESOURCE_POOL_EXHAUSTED. The next cycle says so in its record (one line), puts the
    workers zone-b cannot host in zone-a (which the cloud can fill), keeps zone-b's MIG asking
    without asking for more, and pages when zone-b is still short a cycle later; the page
    resolves once the zone is restocked and filled."""
    rig.sim.faults.stockout("zone-b")
    rig.demand["rpm"] = 900.0  # 6 -> 11 workers
    first = _cycle(rig)
    assert first.outcome == "applied", first.line()
    want = {z["zone"]: z["count"] for z in first.decision["zones"]}
    total, b = want["zone-a"] + want["zone-b"], want["zone-b"]
    assert b > 3 and rig.sizes() == want  # zone-b asked for b - 3 instances it cannot create
    rig.clock.sleep(300)  # zone-a's new nodes boot and take their workers

    second = _cycle(rig)
    line = f"zone-b: {b - 3} of {b} instances not created: ZONE_RESOURCE_POOL_EXHAUSTED ({b - 3})"
    assert second.inputs["fulfilment"]["zone-b"].startswith(line), second.inputs
    assert line in second.decision["reason"] and line in second.line()
    assert f"zone-b can host 3, short {b - 3}; moved {b - 3} to zone-a" in second.line()
    assert second.outcome == "applied", second.line()
    assert rig.counts() == {"ml-worker-a": total - 3, "ml-worker-b": 3}
    # zone-a grew for the moved workers; zone-b's MIG keeps retrying its b - 3
    assert rig.sizes() == {"zone-a": total - 3, "zone-b": b}
    assert rig.alerts() == []  # seen once: not yet paged
    stored = {r["id"]: r for r in rig.records()}[second.id]
    assert stored["inputs"]["fulfilment"]["zone-b"].startswith(line)

    rig.demand["rpm"] = 1300.0  # more demand: zone-b is not asked for more
    third = _cycle(rig)
    assert third.outcome == "applied", third.line()
    assert rig.sizes()["zone-b"] == b and rig.counts()["ml-worker-b"] == 3
    assert rig.counts()["ml-worker-a"] > total - 3  # the increase went to zone-a
    assert rig.alerts() == [("trigger", "nomadscale/ekyc/zone-short/zone-b")]
    summary = rig.pd.state.events[0]["payload"]["summary"]
    assert line in summary, summary

    rig.sim.faults.restock("zone-b")
    rig.clock.sleep(300)  # the MIG creates the two; they boot and join
    fourth = _cycle(rig)
    assert fourth.inputs["fulfilment"] == {}, fourth.inputs
    assert rig.alerts()[-1] == ("resolve", "nomadscale/ekyc/zone-short/zone-b")
    want = {z["zone"]: z["count"] for z in fourth.decision["zones"]}
    assert abs(want["zone-a"] - want["zone-b"]) <= 1  # back to the odd/even split
    fault_table(
        f"zone-b stockout ({STOCKOUT}) during a scale-up",
        "record says which zone and why; workers moved; paged when it persists; resolved",
        f"{line}; counts {rig.counts()}; alerts {[a for a, _k in rig.alerts()]}",
    )


def test_refused_google_credentials_are_a_one_line_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, twin_factory: TwinFactory
) -> None:
    """A service-account key that Google refuses (disabled, deleted, wrong project): the
    pool built as ``run`` builds it (``google.auth.default()``) answers with one
    ``gce: ...`` line, which the cycle records, instead of google-auth's RefreshError
    escaping the cycle with a traceback."""
    twin = twin_factory(nodes=2, node_pool="gpu")
    sim = ComputeSim(twin.cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    with TokenServer() as tokens, ComputeServer(sim, token=tokens.token) as gce:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                           str(tokens.key_file(tmp_path / "sa.json")))  # fmt: skip
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
        pool = GceMigPool(project="proj", base_url=gce.base_url, retries=1)
        assert pool.size("mig-a", zone="zone-a") == 1  # authenticated through the loopback
        tokens.refuse = True
        pool = GceMigPool(project="proj", base_url=gce.base_url, retries=1)  # a fresh token
        with pytest.raises(ExternalPermanentError) as err:
            pool.size("mig-a", zone="zone-a")
    assert str(err.value) == ("gce: get zone-a/mig-a: Google credentials refused: "
                              "invalid_grant: bad assertion")  # fmt: skip
    assert tokens.granted and tokens.refused


@pytest.mark.prometheus
@pytest.mark.slow
def test_leader_sigkilled_mid_drain_before_the_mig_writes_the_next_leader_converges(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    prometheus_factory: Any,
    tmp_path: Path,
    fault_table: Record,
) -> None:
    """Two real ``nomadscale run`` processes that build ``GceMigPool`` as production does:
    ``google.auth.default()`` reads a service-account key file (``GOOGLE_APPLICATION_
    CREDENTIALS``) whose ``token_uri`` is a loopback token server, and the Compute endpoint
    (``NOMADSCALE_GCE_API_URL``) refuses requests without that token. The leader scales 6 -> 2
    workers and is SIGKILLed while it drains the surplus nodes (its second drain call held),
    before any instance group write. The standby's takeover cycle finishes the drains,
    deletes exactly the drained instances, and the history tells what the killed one did."""
    prefix = consul_prefix.rstrip("/")
    now = time.time()
    prom = prometheus_factory([level_series(120.0, start=now - 7 * 3600, end=now + 600)])
    policy = make_policy(node_pool=True)  # cycle 20m: the next scheduled slot is far away
    twin = twin_factory(nodes=6, node_pool="gpu", clock=SystemClock(), images=("i",))
    cluster = twin.cluster
    cluster.add_namespace("ekyc")
    hold = HoldNth(r"^POST /v1/node/[^/]+/drain$", nth=2)
    cluster.faults = hold
    nomad = NomadClient(address=twin.address)
    nomad.register_job(worker_job(policy, counts={"zone-a": 3, "zone-b": 3}, image="i",
                                  update={"MaxParallel": 0}))  # fmt: skip
    wait_for(lambda: all(g.healthy == 3 for g in nomad.job_status(
        "ml-worker", namespace="ekyc").groups.values()), 30, "the workers")  # fmt: skip
    sim = ComputeSim(cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    sim.add_mig(name="mig-b", zone="zone-b", node_pool="gpu")
    ports = {"a": free_port(), "b": free_port()}
    kv = ConsulKV(addr=consul_agent.addr)

    def history() -> list[dict[str, Any]]:
        return [json.loads(e.value) for e in kv.list(f"{prefix}/decisions/ekyc/")]

    def draining() -> list[str]:
        return sorted(n.name for n in cluster.nodes.values()
                      if n.status != "down" and (n.draining or n.eligibility != "eligible"))  # fmt: skip

    with TokenServer() as tokens, ComputeServer(sim, token=tokens.token) as gce:
        key = tokens.key_file(tmp_path / "sa.json")

        def env(who: str) -> dict[str, str]:
            return run_env(
                tmp_path,
                policy,
                nomad=twin.address,
                consul=consul_agent.addr,
                prometheus=prom.url,
                prefix=prefix,
                lock_ttl="11s",
                http_port=ports[who],
                NOMADSCALE_GCE_API_URL=gce.base_url,
                GOOGLE_APPLICATION_CREDENTIALS=str(key),
                CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
            )  # no gcloud ADC here

        a = start_service(env("a"), tmp_path / "a.log")
        b = None
        try:
            assert hold.holding.wait(40), (tmp_path / "a.log").read_text()[-3000:]
            journal = wait_for(lambda: [r for r in history() if r["outcome"] == "applying"
                                        and r["applied"]], 5, "the journal")  # fmt: skip
            b = start_service(env("b"), tmp_path / "b.log")
            wait_for(lambda: "nomadscale_is_leader 0.0" in metrics_text(ports["b"]), 20, "b up")
            mark = len(sim.events)
            a.send_signal(signal.SIGKILL)
            a.wait(10)
            hold.release.set()  # the held drain is dropped: it never reached Nomad
            assert sim.events[mark:] == [] and [e for e in sim.events
                                                if e["type"] == "mig_delete"] == []  # fmt: skip
            assert tokens.granted, "the killed leader never authenticated"
            sizes_at_kill = {z: sim.size(z, m) for z, m in (("zone-a", "mig-a"),
                                                             ("zone-b", "mig-b"))}  # fmt: skip
            half_drained = draining()

            def converged() -> dict[str, Any] | None:
                return next((r for r in history() if r["outcome"] == "applied"), None)

            done = wait_for(converged, 2 * 11 + 40, "the takeover cycle to apply", every=0.2)
            b.send_signal(signal.SIGTERM)
            assert b.wait(20) == 0
        finally:
            hold.release.set()
            stop_process(a)
            if b is not None:
                stop_process(b)
    assert sizes_at_kill == {"zone-a": 3, "zone-b": 3}, sizes_at_kill
    assert half_drained, "the leader was not killed mid-drain"
    assert done["trigger"] == "takeover", done
    want = {z["zone"]: z["count"] for z in done["decision"]["zones"]}
    st = nomad.job_status("ml-worker", namespace="ekyc")
    assert {g: st.groups[g].desired for g in ("ml-worker-a", "ml-worker-b")} == {
        "ml-worker-a": want["zone-a"], "ml-worker-b": want["zone-b"]}  # fmt: skip
    assert {"zone-a": sim.size("zone-a", "mig-a"), "zone-b": sim.size("zone-b", "mig-b")} == want
    deleted = {n for e in sim.events if e["type"] == "mig_delete" for n in e["instances"]}
    assert set(half_drained) <= deleted  # the killed leader's drains were finished, not undone
    assert draining() == []  # nothing left cordoned or draining
    allocs = [x for xs in cluster.allocs_by_job.values() for x in xs]
    assert not [x.name for x in allocs if x.node_name in deleted and x.client_status == "lost"]
    killed = {r["id"]: r for r in history()}[journal[0]["id"]]
    assert killed["outcome"] == "aborted" and killed["reason"].startswith("interrupted"), killed
    assert all(x.startswith("scale ") for x in killed["applied"]), killed["applied"]
    assert done["inputs"]["interrupted"] == killed["id"]
    assert not tokens.refused, tokens.refused
    fault_table(
        "leader SIGKILL mid-drain, before the MIG writes (real google.auth)",
        "the takeover cycle finishes the drains and deletes exactly those instances",
        f"MIGs {want}; deleted {sorted(deleted)}; killed cycle aborted, interrupted",
    )
