"""Reloading the policies without a restart (SIGHUP, ``systemctl reload nomadscale``).

An operator edits ``/etc/nomadscale/policies`` and reloads: an invalid file changes nothing
(one line per error, the old set keeps running), a valid set is applied as a difference
(added, changed from the next cycle, removed once its running cycle ended), the leader lock
is kept, and systemd hears RELOADING=1 then READY=1. Real Consul, the twin over HTTP, a real
``nomadscale run`` process and real signals; in-process with a FakeClock for the ordering of
a reload against a running cycle."""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from nomadscale.config.policy import Policy, load_policies
from nomadscale.config.settings import Settings
from nomadscale.core.clock import FakeClock, SystemClock
from nomadscale.core.ports import DemandSeries
from nomadscale.integrations.consul import ConsulKV, ConsulLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from nomadscale.service.reload import Reloader
from nomadscale.service.simulate import worker_job
from tests.harness.services import ConsulAgent, free_port, metrics_text
from tests.harness.twin import TwinFactory
from tests.service.helpers import constant, make_policy, run_process_env

pytestmark = pytest.mark.consul


def _write(folder: Path, policy: Policy) -> Path:
    path = folder / f"{policy.name}.yaml"
    path.write_text(yaml.safe_dump(policy.to_yaml_dict()))
    return path


def _wait(what: str, ok: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class GatedDemand:
    """Level demand whose ``history`` blocks while its policy's gate is closed: a cycle
    stuck reading Prometheus, as long as the test wants."""

    def __init__(self, name: str, rig: Rig) -> None:
        self.name, self.rig = name, rig
        self.level = constant(550.0)  # 6 workers of 100 rpm, more with the headroom

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        self.rig.entered[self.name].set()
        assert self.rig.opened[self.name].wait(20), "the gate was never opened"
        return self.level.history(end=end, lookback_s=lookback_s, step_s=step_s)


@dataclass
class Rig:
    svc: Service
    clock: FakeClock
    folder: Path
    nomad: NomadClient
    notes: list[str]
    entered: dict[str, threading.Event]
    opened: dict[str, threading.Event]
    reloader: Reloader | None = None

    def hold(self, name: str) -> None:
        self.entered[name].clear()
        self.opened[name].clear()

    def release(self, name: str) -> None:
        self.opened[name].set()

    def next_slot(self) -> None:
        """Move to the next 20-minute slot, as the cron fires (a cycle's waits move the
        FakeClock on by a varying amount)."""
        slot = (math.floor(self.clock.now().timestamp() / 1200) + 1) * 1200
        self.clock.set(datetime.fromtimestamp(slot, tz=UTC))

    def desired(self, job: str) -> int:
        st = self.nomad.job_status(job, namespace="ekyc")
        return sum(g.desired for g in st.groups.values())


@pytest.fixture
def rig(consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory,
        tmp_path: Path) -> Iterator[Rig]:  # fmt: skip
    prefix = consul_prefix.rstrip("/")
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    twin = twin_factory(nodes=24, clock=clock)
    twin.cluster.add_namespace("ekyc")
    nomad = NomadClient(address=twin.address, clock=clock)
    folder = tmp_path / "policies"
    folder.mkdir()
    for p in (make_policy(), make_policy(name="other", target={"job": "ml-other",
                                                                "namespace": "ekyc"})):  # fmt: skip
        nomad.register_job(worker_job(p, counts={"zone-a": 1, "zone-b": 1}, image="i",
                                      update={"MaxParallel": 0}))  # fmt: skip
        _write(folder, p)
    entered: dict[str, threading.Event] = {}
    opened: dict[str, threading.Event] = {}
    for name in ("ekyc", "other", "new"):
        entered[name], opened[name] = threading.Event(), threading.Event()
        opened[name].set()
    lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=30, lock_delay_s=0)
    holder: list[Rig] = []
    ports = Ports(nomad=nomad, kv=ConsulKV(addr=consul_agent.addr), lock=lock,
                  demand_for=lambda p: GatedDemand(p.name, holder[0]))  # fmt: skip
    svc = Service(settings=Settings(kv_prefix=prefix), policies=load_policies([folder]),
                  ports=ports, clock=clock)  # fmt: skip
    r = Rig(svc=svc, clock=clock, folder=folder, nomad=nomad, notes=[], entered=entered,
            opened=opened)  # fmt: skip
    holder.append(r)
    r.reloader = Reloader(svc, load=lambda: load_policies([folder]), source=str(folder),
                          notify=r.notes.append, poll_s=0.02)  # fmt: skip
    try:
        yield r
    finally:
        for ev in opened.values():
            ev.set()
        if r.reloader is not None:
            r.reloader.stop()
        svc.stop(timeout_s=5)


def _cycle(r: Rig, name: str) -> Any:
    out = r.svc.run_policy(name)
    assert out is not None
    return out


def test_a_reload_during_a_cycle_waits_for_it_then_applies_from_the_next_cycle(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig
    assert r.reloader is not None
    r.next_slot()
    first = _cycle(r, "ekyc")
    assert first.record.outcome == "applied" and r.desired("ml-worker") > 3, first.record
    kept = r.svc.runners["ekyc"].forecaster
    assert kept.warm

    # the operator caps the fleet at 3 while the next cycle is stuck reading demand
    _write(r.folder, make_policy(bounds={"min": 1, "max": 3, "max_step_up": 20,
                                         "max_step_down": 20}))  # fmt: skip
    r.next_slot()
    r.hold("ekyc")
    out: list[Any] = []
    cycle = threading.Thread(target=lambda: out.append(_cycle(r, "ekyc")))
    cycle.start()
    assert r.entered["ekyc"].wait(10)

    loads: list[int] = []
    active = [0]
    load = r.reloader.load

    def counting_load() -> Any:  # records whether two reloads ever overlap
        active[0] += 1
        loads.append(active[0])
        try:
            time.sleep(0.05)
            return load()
        finally:
            active[0] -= 1

    r.reloader.load = counting_load
    r.reloader.start()
    with caplog.at_level(logging.INFO, logger="nomadscale.service.reload"):
        r.reloader.request()
        _wait("the reload to wait for the cycle", lambda: "waiting for the running cycle"
              in caplog.text)  # fmt: skip
        r.reloader.request()  # a second SIGHUP while the first reload waits
        time.sleep(0.3)
        # the cycle is not interrupted and the policy is not swapped under it
        assert cycle.is_alive() and r.svc.policies["ekyc"].bounds.max == 40
        r.release("ekyc")
        cycle.join(10)
        _wait("the reload", lambda: r.svc.policies["ekyc"].bounds.max == 3)
        _wait("the reloads to end", lambda: r.reloader is not None and not r.reloader._mu.locked()
              and not r.reloader._wanted.is_set())  # fmt: skip
    [running] = out
    # it ran to its end, with the policy it started with
    assert running.record.outcome == "unchanged", running.record
    assert running.decision.desired == r.desired("ml-worker") > 3
    assert loads and max(loads) == 1 and len(loads) <= 2  # in order, never two at once
    assert "policy ekyc (" in caplog.text and "changed bounds" in caplog.text
    assert "forecaster kept" in caplog.text
    assert r.svc.runners["ekyc"].forecaster is kept  # warm: only the new steps are read
    assert r.notes[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and r.notes[1] == "READY=1"

    r.next_slot()
    after = _cycle(r, "ekyc")
    assert after.record.outcome == "applied" and after.decision.desired == 3, after.record
    assert r.desired("ml-worker") == 3
    # warm: only the new steps read (incremental, or a re-warm from the kept steps when
    # the shared forecast origin moved at this slot), never a fresh warm start
    assert after.record.inputs["forecast"].startswith(("incremental", "rewarm")), after.record
    assert r.svc.ports.lock.held()  # the lock was never let go


def test_an_invalid_file_keeps_every_policy_running_and_says_why(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig
    assert r.reloader is not None
    before = r.svc.policies
    _write(r.folder, make_policy(bounds={"min": 1, "max": 3, "max_step_up": 20,
                                         "max_step_down": 20}))  # valid change  # fmt: skip
    (r.folder / "broken.yaml").write_text("name: broken\ncycle: 7m\nbounds: {min: 5, max: 2}\n")
    with caplog.at_level(logging.INFO, logger="nomadscale.service.reload"):
        res = r.reloader.reload()
    assert res["result"] == "failed"
    assert r.svc.policies is before and r.svc.policies["ekyc"].bounds.max == 40
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == len(res["errors"]) + 1 >= 3  # one line each, then the summary
    assert all(e.startswith(f"reload: {r.folder / 'broken.yaml'}:") for e in errors[:-1])
    assert any("cycle" in e for e in errors) and any("bounds" in e for e in errors)
    assert errors[-1].startswith(f"reload failed: {len(res['errors'])} errors in {r.folder}")
    assert "nothing changed, 2 policies loaded at" in errors[-1] and "not reloaded" in errors[-1]
    st = r.svc.status()["loaded"]
    assert st["last_reload"]["result"] == "failed" and st["last_failed_reload"] == res
    assert 'nomadscale_reload_total{result="failed"} 1.0' in _metrics(r.svc)
    assert r.notes[-1].startswith("READY=1\nSTATUS=reload failed")

    (r.folder / "broken.yaml").unlink()  # fixed: the same reload now applies
    assert r.reloader.reload()["result"] == "ok"
    assert r.svc.policies["ekyc"].bounds.max == 3
    st = r.svc.status()["loaded"]
    assert st["last_reload"]["result"] == "ok" and st["last_failed_reload"]["result"] == "failed"
    assert 'nomadscale_reload_total{result="ok"} 1.0' in _metrics(r.svc)


def test_a_shutdown_ends_a_reload_that_waits_for_a_cycle(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while a reload waits for a long cycle: the reload gives up (nothing half
    swapped), the shutdown is not held up by it."""
    r = rig
    assert r.reloader is not None
    r.next_slot()
    r.hold("ekyc")
    cycle = threading.Thread(target=lambda: _cycle(r, "ekyc"))
    cycle.start()
    assert r.entered["ekyc"].wait(10)
    (r.folder / "ekyc.yaml").unlink()
    done: list[dict[str, Any]] = []
    with caplog.at_level(logging.INFO, logger="nomadscale.service.reload"):
        reload = threading.Thread(target=lambda: done.append(r.reloader.reload()))  # type: ignore[union-attr]
        reload.start()
        _wait("the reload to wait", lambda: "cycle of policy ekyc" in caplog.text)
        r.svc.stop_event.set()  # what stop() does first
        reload.join(5)
        assert not reload.is_alive()
    assert done[0]["result"] == "stopped" and "ekyc" in r.svc.policies
    assert r.notes[-1] == "READY=1"
    r.release("ekyc")
    cycle.join(10)


def _metrics(svc: Service) -> str:
    from prometheus_client import generate_latest

    return generate_latest(svc.metrics.registry).decode()


def test_added_removed_and_rebuilt_policies_with_the_scheduler_running(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig
    assert r.reloader is not None
    r.svc.start()
    sched = r.svc._scheduler
    assert sched is not None
    _wait("the leader lock", lambda: r.svc.leader)
    _wait("the start-up warm-up", lambda: all(x.forecaster.warm for x in r.svc.runners.values()))
    ekyc_forecaster = r.svc.runners["ekyc"].forecaster
    r.nomad.register_job(worker_job(make_policy(name="new", target={"job": "ml-new",
                                                                    "namespace": "ekyc"}),
                                    counts={"zone-a": 1, "zone-b": 1}, image="i"))  # fmt: skip
    # "other" is in a cycle when the operator deletes its file
    r.next_slot()
    r.hold("other")
    busy = threading.Thread(target=lambda: _cycle(r, "other"))
    busy.start()
    assert r.entered["other"].wait(10)
    (r.folder / "other.yaml").unlink()
    _write(r.folder, make_policy(name="new", target={"job": "ml-new", "namespace": "ekyc"}))
    demand = {"source": "prometheus", "query": "demand", "step": "1m", "lookback": "3h"}
    _write(r.folder, make_policy(demand=demand))  # the forecast reads another lookback
    with caplog.at_level(logging.INFO, logger="nomadscale.service.reload"):
        done: list[dict[str, Any]] = []
        reload = threading.Thread(target=lambda: done.append(r.reloader.reload()))  # type: ignore[union-attr]
        reload.start()
        _wait("the new policy", lambda: "new" in r.svc.policies)  # added first, at once
        assert sched.get_job("cycle-new") is not None
        _wait("the reload to wait for other's cycle", lambda: "cycle of policy other"
              in caplog.text)  # fmt: skip
        assert "other" in r.svc.policies and sched.get_job("cycle-other") is not None
        r.release("other")
        busy.join(10)
        reload.join(10)
    assert done and done[0]["result"] == "ok", done
    assert sorted(r.svc.policies) == ["ekyc", "new"]
    assert sched.get_job("cycle-other") is None and sched.get_job("cycle-ekyc") is not None
    assert r.svc.run_policy("other") is None  # a queued kick or takeover job of it: no-op
    assert r.svc.runners["ekyc"].forecaster is not ekyc_forecaster  # rebuilt: new lookback
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith(
        "reload: policy ")]  # fmt: skip
    assert len(lines) == 3, lines  # one line per effective change, none for the rest
    assert any("policy new (" in x and "added" in x for x in lines)
    assert any("policy other (" in x and "removed" in x for x in lines)
    assert any("changed demand" in x and "forecaster rebuilt" in x for x in lines)
    assert "1 added, 1 changed, 1 removed, 0 unchanged" in caplog.text
    _wait("the new forecasters to warm up",
          lambda: all(x.forecaster.warm for x in r.svc.runners.values()))  # fmt: skip
    st = r.svc.status()
    assert sorted(st["policies"]) == ["ekyc", "new"]
    assert st["policies"]["new"]["file"] == str(r.folder / "new.yaml")
    assert st["loaded"]["loaded_at"] == done[0]["at"]
    entry = r.svc.ports.kv.get(f"{r.svc.control.prefix}/loaded/{r.svc.recorder.host}")
    assert entry is not None  # for `nomadscale status` on any host
    doc = json.loads(entry.value)
    assert sorted(doc["policies"]) == ["ekyc", "new"]
    assert "nomadscale_policies_loaded 2.0" in _metrics(r.svc)
    assert r.svc.leader and r.svc.ports.lock.held()


# --- a real `nomadscale run` process and real SIGHUPs -------------------------------------


class Proc:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        return dict(json.loads(r.read()))


def _session(consul: ConsulAgent, prefix: str) -> str | None:
    with urllib.request.urlopen(f"{consul.addr}/v1/kv/{prefix}/leader", timeout=2) as r:
        return json.loads(r.read())[0].get("Session")


@pytest.mark.slow
def test_sighup_reloads_a_running_service_and_keeps_its_lock(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory, tmp_path: Path
) -> None:
    prefix = consul_prefix.rstrip("/")
    port = free_port()
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=port)  # fmt: skip
    notify_path = str(tmp_path / "notify.sock")
    env["NOTIFY_SOCKET"] = notify_path
    folder = tmp_path / "policies"
    code = "from nomadscale.cli.cmd_run import run; run.main([])"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        sock.settimeout(20)

        def note() -> str:
            while True:  # the watchdog pings come every 10 s: not what these tests are about
                msg = sock.recv(200).decode()
                if msg != "WATCHDOG=1":
                    return msg

        proc = Proc([sys.executable, "-c", code], env)
        try:
            assert note() == "READY=1", proc.text[-3000:]
            _wait("the lock", lambda: "nomadscale_is_leader 1.0" in metrics_text(port))
            session = _session(consul_agent, prefix)
            assert session
            st = _status(port)
            assert list(st["policies"]) == ["ekyc"] and st["loaded"]["last_reload"] is None
            started_at = st["loaded"]["loaded_at"]

            # a broken file next to the good one: nothing changes, one line per error
            (folder / "broken.yaml").write_text("name: broken\nbounds: {min: 5, max: 2}\n")
            proc.proc.send_signal(signal.SIGHUP)
            assert note().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert note().startswith("READY=1\nSTATUS=reload failed")
            assert proc.proc.poll() is None, proc.text[-3000:]
            st = _status(port)
            assert list(st["policies"]) == ["ekyc"]
            assert st["loaded"]["last_reload"]["result"] == "failed"
            assert st["loaded"]["loaded_at"] == started_at
            assert any(f"{folder / 'broken.yaml'}:" in e for e in
                       st["loaded"]["last_reload"]["errors"])  # fmt: skip
            assert (
                "reload failed: " in proc.text
                and "nothing changed, 1 policy loaded at" in proc.text
            )
            assert 'nomadscale_reload_total{result="failed"} 1.0' in metrics_text(port)

            # fixed, plus a second policy: added without a restart; two SIGHUPs in a row
            (folder / "broken.yaml").unlink()
            _write(folder, make_policy(name="ekyc-b", target={"job": "ml-b",
                                                              "namespace": "ekyc"}))  # fmt: skip
            proc.proc.send_signal(signal.SIGHUP)
            proc.proc.send_signal(signal.SIGHUP)
            assert note().startswith("RELOADING=1")
            assert note() == "READY=1"
            _wait("the reload", lambda: "ekyc-b" in _status(port)["policies"])
            st = _status(port)
            assert st["loaded"]["last_reload"]["result"] == "ok"
            assert st["policies"]["ekyc-b"]["file"] == str(folder / "ekyc-b.yaml")
            assert "reload: policy ekyc-b (" in proc.text
            assert _session(consul_agent, prefix) == session  # the lock was kept throughout
            time.sleep(0.5)  # a second reload, if any, ran after the first: never at once
            starts = proc.text.count("reload: reading the policies")
            assert 2 <= starts <= 3, proc.text[-3000:]
            assert "settings file and environment are not reloaded" in proc.text

            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(timeout=20) == 0, proc.text[-3000:]
        finally:
            proc.close()
    assert "Traceback" not in proc.text, proc.text[-3000:]
