"""Rollout metrics on the service's /metrics over real HTTP, read from a real Consul at scrape
time: the state a `nomadscale deploy` process writes (``deploy.state.StateStore``) shows as
status, progress, surge, rollback and last-progress series; an unreachable or frozen Consul
leaves the scrape working with ``nomadscale_kv_up 0``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from nomadscale.core.ports import KVPort
from nomadscale.deploy.state import RUNNING_PHASES, TERMINAL, RolloutState, StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.memkv import MemoryKV
from nomadscale.service.http import HttpServer, create_app
from nomadscale.service.ops_metrics import DEPLOY_STATUSES, DeployCollector
from nomadscale.service.records import CycleRecord, Metrics
from tests.harness.services import ConsulAgent, free_port

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
T1 = datetime(2026, 1, 5, 8, 17, 30, tzinfo=UTC)
T2 = datetime(2026, 1, 5, 8, 30, tzinfo=UTC)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, *, timeout: float = 10) -> Samples:
    resp = requests.get(f"{url}/metrics", timeout=timeout)
    assert resp.status_code == 200
    out: Samples = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@contextmanager
def serve(kv: KVPort, *, prefix: str, **collector: float) -> Iterator[str]:
    metrics = Metrics()
    metrics.observe(CycleRecord(policy="ekyc", started_at=T0, outcome="unchanged"))
    metrics.registry.register(DeployCollector(kv, prefix=prefix, **collector))
    app = create_app(registry=metrics.registry, status=lambda: {"leader": "me"})
    server = HttpServer(app, host="127.0.0.1", port=free_port()).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def rolling_state() -> RolloutState:
    st = RolloutState(
        policy="ekyc", image="registry.example.com/ekyc/ml-worker:2026.12.1",
        job_id="ml-worker", namespace="ekyc", status="rolling",
        previous_image="registry.example.com/ekyc/ml-worker:2026.11.1",
        zones=["ml-worker-a", "ml-worker-b"], zones_done=["ml-worker-a"],
        current_zone="ml-worker-b", started_at=T0.isoformat(), updated_at=T1.isoformat(),
    )  # fmt: skip
    st.prefetch = {"wanted": True, "ok": ["n1", "n2", "n3"], "failed": {"n4": "pull timeout"}}
    st.surge = {"group": "ml-worker-b", "from": 2, "to": 3, "released": False}
    return st


def test_status_list_is_the_rollouts_own() -> None:
    assert DEPLOY_STATUSES == RUNNING_PHASES + TERMINAL


@pytest.mark.consul
def test_rollout_state_in_consul_shows_on_metrics(
    consul_agent: ConsulAgent, consul_prefix: str
) -> None:
    prefix = consul_prefix.rstrip("/")
    kv = ConsulKV(addr=consul_agent.addr)
    store = StateStore(kv, prefix=prefix)
    st = rolling_state()
    index = store.create(st)
    done = RolloutState(
        policy="asr", image="registry.example.com/asr:7", job_id="asr", namespace="asr",
        status="completed", zones=["asr-a"], zones_done=["asr-a"],
        started_at=T0.isoformat(), updated_at=T0.isoformat(), finished_at=T0.isoformat(),
    )  # fmt: skip
    store.create(done)
    kv.put(f"{prefix}/deploy/broken/state", b"not json")  # skipped, not a failed scrape
    kv.put(f"{prefix}/deploy/ekyc/notes", b"{}")  # not a rollout record
    with serve(kv, prefix=prefix, max_age_s=0) as url:
        m = scrape(url)
        assert value(m, "nomadscale_kv_up") == 1.0
        assert value(m, "nomadscale_cycles_total", policy="ekyc", outcome="unchanged") == 1.0
        for s in DEPLOY_STATUSES:
            assert value(m, "nomadscale_deploy_status", policy="ekyc", status=s) == (
                1.0 if s == "rolling" else 0.0
            ), s
        assert value(m, "nomadscale_deploy_status", policy="asr", status="completed") == 1.0
        assert value(m, "nomadscale_deploy_zones_done", policy="ekyc") == 1.0
        assert value(m, "nomadscale_deploy_zones", policy="ekyc") == 2.0
        assert value(m, "nomadscale_deploy_prefetch_nodes", policy="ekyc", result="ok") == 3.0
        assert value(m, "nomadscale_deploy_prefetch_nodes", policy="ekyc", result="failed") == 1
        assert value(m, "nomadscale_deploy_surge_workers", policy="ekyc") == 1.0
        assert value(m, "nomadscale_deploy_rollback", policy="ekyc") == 0.0
        assert value(m, "nomadscale_deploy_last_progress_timestamp_seconds", policy="ekyc") == (
            T1.timestamp()
        )
        assert value(
            m, "nomadscale_deploy_info", policy="ekyc", rollout=st.id, image=st.image,
            previous_image="registry.example.com/ekyc/ml-worker:2026.11.1",
        ) == 1.0  # fmt: skip
        assert not any(labels and dict(labels).get("policy") == "broken" for _, labels in m)

        # the rollout process moves on: rolling back, surge released
        st.status, st.updated_at = "rolling-back", T2.isoformat()
        assert st.surge is not None
        st.surge["released"] = True
        store.save(st, index)
        m = scrape(url)
        assert value(m, "nomadscale_deploy_status", policy="ekyc", status="rolling-back") == 1
        assert value(m, "nomadscale_deploy_status", policy="ekyc", status="rolling") == 0.0
        assert value(m, "nomadscale_deploy_rollback", policy="ekyc") == 1.0
        assert value(m, "nomadscale_deploy_surge_workers", policy="ekyc") == 0.0
        assert value(m, "nomadscale_deploy_last_progress_timestamp_seconds", policy="ekyc") == (
            T2.timestamp()
        )


def test_unreachable_kv_still_scrapes_with_kv_up_0() -> None:
    kv = ConsulKV(addr=f"http://127.0.0.1:{free_port()}", timeout=1.0)  # nothing listens
    with serve(kv, prefix="nomadscale", max_age_s=0) as url:
        m = scrape(url)
        assert value(m, "nomadscale_kv_up") == 0.0
        assert value(m, "nomadscale_cycles_total", policy="ekyc", outcome="unchanged") == 1.0
        assert "nomadscale_deploy_status" not in names(m)


def test_memory_kv_without_rollouts_exports_kv_up_only() -> None:
    with serve(MemoryKV(), prefix="/nomadscale/", max_age_s=0) as url:
        m = scrape(url)
        assert value(m, "nomadscale_kv_up") == 1.0
        assert not {n for n in names(m) if n.startswith("nomadscale_deploy_")}


@pytest.mark.consul
def test_frozen_consul_neither_stalls_the_scrape_nor_other_requests(
    consul_agent: ConsulAgent, consul_prefix: str
) -> None:
    prefix = consul_prefix.rstrip("/")
    kv = ConsulKV(addr=consul_agent.addr)  # 5 s client timeout
    StateStore(kv, prefix=prefix).create(rolling_state())
    with serve(kv, prefix=prefix, max_age_s=0, timeout_s=1.5) as url:
        assert value(scrape(url), "nomadscale_kv_up") == 1.0
        consul_agent.suspend()
        try:
            got: dict[str, float] = {}

            def slow_scrape() -> None:
                t0 = time.monotonic()
                m = scrape(url)
                got["took"] = time.monotonic() - t0
                got["kv_up"] = value(m, "nomadscale_kv_up") or 0.0
                got["status"] = 1.0 if "nomadscale_deploy_status" in names(m) else 0.0

            t = threading.Thread(target=slow_scrape, daemon=True)
            t.start()
            time.sleep(0.3)  # that scrape is waiting on Consul now
            t0 = time.monotonic()
            assert requests.get(f"{url}/status", timeout=5).json() == {"leader": "me"}
            assert time.monotonic() - t0 < 0.3
            t.join(10)
            assert got["kv_up"] == 0.0 and got["status"] == 0.0
            assert 1.4 <= got["took"] < 3.0, got  # the collector's deadline, not Consul's 5 s
        finally:
            consul_agent.resume()
        deadline = time.monotonic() + 10
        while value(m := scrape(url), "nomadscale_kv_up") != 1.0:
            assert time.monotonic() < deadline, "kv_up did not come back after Consul resumed"
            time.sleep(0.1)
        assert value(m, "nomadscale_deploy_status", policy="ekyc", status="rolling") == 1.0
