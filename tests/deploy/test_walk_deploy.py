"""A rollout as an operator walks through it: ``nomadscale deploy ...`` on the command line
against the Nomad twin and a real Consul (a dry run on a trace policy, abort and resume of a
finished or missing rollout, an SLI gate without Prometheus), a rollout stopped between
registering a zone's job version and recording its deployment (resume, abort), and the golden
image the rest of nomadscale keeps on the nodes after a rollback or a rollout without
prefetch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from nomadscale.config.policy import load_policy
from nomadscale.core.errors import ConflictError
from nomadscale.deploy.preflight import estimate_seconds, forecast_upper
from nomadscale.deploy.rollout import Rollout
from nomadscale.deploy.state import StateStore
from nomadscale.integrations.consul import ConsulKV
from nomadscale.integrations.nomad import NomadClient
from nomadscale.integrations.tracefile import TraceDemandSource
from nomadscale.sim.speed import ScaledClock
from tests.deploy.helpers import NEW, OLD, ROOT, TRACE, images_running, policy, setup_job

pytestmark = pytest.mark.consul

SLI = """
  sli:
    error_rate_query: max(ekyc_error_ratio{image="{image}"})
    max_error_rate: 0.01
"""


def policy_file(tmp_path: Path, *, rpm: float = 40000.0, sli: bool = False) -> Path:
    """The ekyc-ml policy for the twin's shape with trace demand (the bundled trace, which
    ended long before the wall clock); at its end 4 workers serve it with room to spare."""
    f = tmp_path / "ekyc-ml.yaml"
    f.write_text(
        f"""name: ekyc-ml
demand:
  source: trace
  trace: {TRACE}
  step: 10m
capacity:
  rpm_per_worker: {rpm}
bounds:
  min: 1
  max: 40
zones:
  list:
    - {{name: zone-a, group: ml-worker-a, node_pool: gpu}}
    - {{name: zone-b, group: ml-worker-b, node_pool: gpu}}
target:
  job: ml-worker
  namespace: default
deploy:
  image: {NEW}
  image_size: 7GB
  canary: 1
  min_healthy_time: 30s
  healthy_deadline: 5m
  progress_deadline: 10m
"""
        + (SLI if sli else "")
    )
    return f


def cli(
    twin: Any, consul_agent: Any, prefix: str, tmp_path: Path, *args: str, **extra: str
) -> Result:
    """``nomadscale ARGS`` as an operator runs it (settings from the environment)."""
    from nomadscale.cli.main import _register
    from nomadscale.cli.main import cli as root

    _register()
    config = tmp_path / "nomadscale.yaml"
    config.write_text("{}\n")
    env = {
        "NOMADSCALE_CONFIG": str(config),
        "NOMADSCALE_POLICIES": str(tmp_path),
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "CONSUL_HTTP_TOKEN": consul_agent.token or "",
        "NOMADSCALE_KV_PREFIX": prefix,
        "NOMAD_ADDR": twin.address,
        "PROMETHEUS_URL": "",
        **extra,
    }
    return CliRunner().invoke(root, list(args), env=env)


def one_line(result: Result) -> str:
    """The one-line error of a user mistake (no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# --- the dry run of a trace policy -----------------------------------------------------------


def test_dry_run_on_a_trace_policy_plans_at_the_end_of_the_trace(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    setup_job(twin)  # 2 workers per zone on 3 nodes: room for the canary, not for a surge too
    f = policy_file(tmp_path)
    res = cli(twin, consul_agent, consul_prefix, tmp_path,
              "deploy", "start", str(f), "--image", NEW, "--dry-run")  # fmt: skip
    assert res.exit_code == 0, res.output
    # the forecast `nomadscale plan` and `forecast` make: right after the trace's last step
    pol = load_policy(f)
    src = TraceDemandSource(TRACE)
    upper = forecast_upper(pol, src, now=src.trace.end,
                           horizon_s=estimate_seconds(pol, 4, prefetched=True))  # fmt: skip
    assert upper is not None and upper < 3 * 40000
    out = " ".join(res.output.split())
    assert f"upper {upper:.0f} rpm" in out
    assert "no surge" in out and "no recent demand data" not in out
    assert (
        StateStore(ConsulKV(addr=consul_agent.addr), prefix=consul_prefix).load("ekyc-ml")[0]
        is None
    )


# --- abort and resume as commands --------------------------------------------------------------


def test_abort_and_resume_answer_what_happened(
    twin: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    nomad = setup_job(twin)
    f = policy_file(tmp_path)
    kv = ConsulKV(addr=consul_agent.addr)

    no_record = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "abort", str(f))
    assert no_record.exit_code == 2
    assert "no rollout recorded" in one_line(no_record)
    shown = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "status", str(f), "--json")
    assert shown.exit_code == 0 and json.loads(shown.output) is None

    class Crash(Exception):
        pass

    def crash(st: Any, info: dict[str, Any]) -> None:
        if info.get("phase") == "prefetch":
            raise Crash

    with pytest.raises(Crash):
        Rollout(policy=load_policy(f), nomad=nomad, kv=kv, clock=twin.clock,
                prefix=consul_prefix, reporter=crash, watch_wait_s=0).start(NEW)  # fmt: skip

    # the plan of a second rollout says the start would be refused
    dry = cli(twin, consul_agent, consul_prefix, tmp_path,
              "deploy", "start", str(f), "--image", NEW, "--dry-run")  # fmt: skip
    assert dry.exit_code == 1 and "refused" in dry.output, dry.output
    running = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "status", "--json")
    assert [d["status"] for d in json.loads(running.output)] == ["prefetch"]

    aborted = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "abort", str(f))
    assert aborted.exit_code == 0, aborted.output  # what the operator asked for happened
    assert "aborted" in aborted.output
    assert images_running(twin) == {OLD: 4}

    again = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "abort", str(f))
    assert again.exit_code == 1
    assert "nothing to abort" in one_line(again) and "aborted" in again.output
    resumed = cli(twin, consul_agent, consul_prefix, tmp_path, "deploy", "resume", str(f))
    assert resumed.exit_code == 1
    assert "nothing to resume" in one_line(resumed)


def test_start_refuses_an_sli_gate_without_prometheus(
    twin_factory: Any, consul_agent: Any, consul_prefix: str, tmp_path: Path
) -> None:
    twin = twin_factory(clock=ScaledClock(300))
    nomad = NomadClient(address=twin.address)
    spec = nomad.parse_hcl((ROOT / "jobs" / "ml-worker.nomad.hcl").read_text())
    spec["Namespace"], spec["NodePool"] = "default", "gpu"
    nomad.register_job(spec)
    f = policy_file(tmp_path, sli=True)
    res = cli(twin, consul_agent, consul_prefix, tmp_path,
              "deploy", "start", str(f), "--image", NEW, "--yes")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "PROMETHEUS_URL" in one_line(res) and "deploy.sli" in res.output
    assert (
        StateStore(ConsulKV(addr=consul_agent.addr), prefix=consul_prefix).load("ekyc-ml")[0]
        is None
    )
    assert NEW not in images_running(twin)


# --- stopped between registering a zone's version and recording its deployment ---------------


class OutageAfterZoneRegister(NomadClient):
    """The real client; right after the zone's job version is registered, Nomad's deployment
    endpoints answer 500 (a leader election, a network cut) until ``twin.faults.clear()``."""

    def __init__(self, twin: Any) -> None:
        super().__init__(address=twin.address, clock=twin.clock)
        self.twin, self.hit = twin, False

    def register_job(self, spec: dict[str, Any], **kw: Any) -> Any:
        out = super().register_job(spec, **kw)
        if not self.hit and spec.get("ID") == "ml-worker":
            self.hit = True
            self.twin.cluster.faults.fail("/v1/job/ml-worker/deployment", status=500)
        return out


def stopped_after_zone_register(twin: Any, kv: Any, prefix: str) -> Any:
    setup_job(twin)
    nomad = OutageAfterZoneRegister(twin)
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=prefix,
                 watch_wait_s=0, outage_limit_s=60).start(NEW, prefetch=False)  # fmt: skip
    assert nomad.hit and st.status == "paused" and st.deployment_id is None, st.log
    twin.cluster.faults.clear()
    client = NomadClient(address=twin.address, clock=twin.clock)
    zone_a = client.get_job("ml-worker").spec["TaskGroups"][0]
    assert zone_a["Name"] == "ml-worker-a" and zone_a["Tasks"][0]["Config"]["image"] == NEW
    return client


def test_resume_follows_the_zone_version_registered_before_the_stop(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    kv = ConsulKV(addr=consul_agent.addr)
    nomad = stopped_after_zone_register(twin, kv, consul_prefix)
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                 watch_wait_s=0).resume()  # fmt: skip
    assert st is not None and st.status == "completed", st and st.log
    assert images_running(twin) == {NEW: 4}
    assert st.zones_done == ["ml-worker-a", "ml-worker-b"]


def test_abort_rolls_back_the_zone_version_registered_before_the_stop(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    kv = ConsulKV(addr=consul_agent.addr)
    nomad = stopped_after_zone_register(twin, kv, consul_prefix)
    t0 = twin.clock.now()
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                 watch_wait_s=0).abort()  # fmt: skip
    assert st is not None and st.status == "aborted", st and st.log
    assert (twin.clock.now() - t0).total_seconds() < 300  # not the progress deadline
    twin.advance(600)
    assert images_running(twin) == {OLD: 4}
    spec = nomad.get_job("ml-worker").spec
    assert {t["Config"]["image"] for tg in spec["TaskGroups"] for t in tg["Tasks"]} == {OLD}


# --- the golden image (node warm-ups pull it, image prunes keep only it) ---------------------


def test_a_rolled_back_rollout_gives_the_golden_image_back(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    nomad = setup_job(twin)
    kv = ConsulKV(addr=consul_agent.addr)
    store = StateStore(kv, prefix=consul_prefix)
    store.set_golden_image("ekyc-ml", OLD)

    def bad_canary(st: Any, info: dict[str, Any]) -> None:
        if st.prefetch.get("ok") and not twin.cluster.faults.image_is_bad(NEW):
            twin.cluster.faults.unhealthy_image(NEW)  # prefetched fine, fails once it serves

    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                 reporter=bad_canary, watch_wait_s=0).start(NEW)  # fmt: skip
    assert st.status == "rolled_back", st.reason
    assert sorted(st.prefetch["ok"]) == sorted(twin.cluster.nodes)
    assert images_running(twin) == {OLD: 4}
    assert store.golden_image("ekyc-ml") == OLD


def test_a_rollout_without_prefetch_makes_its_image_golden(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    nomad = setup_job(twin)
    kv = ConsulKV(addr=consul_agent.addr)
    store = StateStore(kv, prefix=consul_prefix)
    store.set_golden_image("ekyc-ml", OLD)
    st = Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                 watch_wait_s=0).start(NEW, prefetch=False)  # fmt: skip
    assert st.status == "completed", st.reason
    assert images_running(twin) == {NEW: 4}
    assert store.golden_image("ekyc-ml") == NEW


def test_an_abort_during_the_prefetch_keeps_the_golden_image(
    twin: Any, consul_agent: Any, consul_prefix: str
) -> None:
    """``deploy abort`` from another shell while the rollout prefetches: the prefetching
    process stops at its next write and leaves the golden image alone."""
    nomad = setup_job(twin)
    kv = ConsulKV(addr=consul_agent.addr)
    store = StateStore(kv, prefix=consul_prefix)
    store.set_golden_image("ekyc-ml", OLD)
    aborted: list[Any] = []

    def operator_aborts(st: Any, info: dict[str, Any]) -> None:
        if info.get("phase") == "prefetch" and not aborted:
            aborted.append(Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock,
                                   prefix=consul_prefix, watch_wait_s=0).abort())  # fmt: skip

    with pytest.raises(ConflictError, match="aborted"):
        Rollout(policy=policy(), nomad=nomad, kv=kv, clock=twin.clock, prefix=consul_prefix,
                reporter=operator_aborts, watch_wait_s=0).start(NEW)  # fmt: skip
    assert aborted and aborted[0].status == "aborted"
    assert store.golden_image("ekyc-ml") == OLD
    assert images_running(twin) == {OLD: 4}
