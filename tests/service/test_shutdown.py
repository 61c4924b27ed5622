"""SIGTERM always stops ``nomadscale run`` promptly: exit 0 and the leader lock released,
whatever the process is doing when the signal lands (starting, just serving HTTP while the
scheduler starts, leading, in a cycle blocked on a slow Prometheus). A shutdown that hangs
anyway is ended by a deadline, or at once by a second signal, with a line saying so.

The signal handler must never block: it once logged, and a SIGTERM landing while the main
thread was formatting a log line (it holds the log redaction lock, not reentrant) deadlocked
the process for good; no later signal could run either."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nomadscale.config.settings import Settings
from nomadscale.core.clock import SystemClock
from nomadscale.integrations.consul import ConsulKV, ConsulLock
from nomadscale.integrations.nomad import NomadClient
from nomadscale.service.cycle import Ports
from nomadscale.service.loop import Service
from tests.harness.services import ConsulAgent, free_port, metrics_text
from tests.harness.twin import TwinFactory
from tests.service.helpers import constant, make_policy, run_process_env

pytestmark = [pytest.mark.consul, pytest.mark.slow]

STOP_S = 10.0  # generous: a normal stop takes well under a second
HOLD_S = 3.0  # how long the slow Prometheus holds each request


class Proc:
    """A child process whose stderr is collected line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
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

    def wait_for(self, what: str, ok: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            assert self.proc.poll() is None, f"exited before {what}: {self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {what}: {self.text[-3000:]}"
            time.sleep(0.01)

    def term(self, *, within_s: float) -> int:
        """SIGTERM; the exit status, which must come within ``within_s``."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"ignored SIGTERM for {within_s:g}s: {self.text[-3000:]}"
            ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class SlowPrometheus:
    """Holds every request ``hold_s``, then answers 503: a cycle blocked in an HTTP call."""

    def __init__(self, hold_s: float) -> None:
        self.in_flight = 0
        self.served = 0
        mu = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with mu:
                    outer.in_flight += 1
                time.sleep(hold_s)
                body = b'{"status":"error","errorType":"unavailable","error":"slow"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with mu:
                    outer.in_flight -= 1
                    outer.served += 1

            do_GET = do_POST

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_prometheus() -> Iterator[SlowPrometheus]:
    srv = SlowPrometheus(HOLD_S)
    yield srv
    srv.close()


def _lock_session(consul: ConsulAgent, prefix: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{consul.addr}/v1/kv/{prefix}/leader", timeout=2) as r:
            return json.loads(r.read())[0].get("Session")
    except urllib.error.HTTPError as e:
        if e.code == 404:  # never taken
            return None
        raise


def test_a_stop_signal_landing_while_a_log_line_is_formatted_is_handled() -> None:
    """The old handler logged: with the redaction lock held here (as while a log line was
    formatted, before ``redact`` stopped locking) it deadlocked on it every time."""
    code = """if True:
        import logging, os, signal, time
        from nomadscale.core import logs
        from nomadscale.service.runtime import StopSignals
        logs.setup_logging(level="INFO")
        signals = StopSignals(deadline_s=30).install()
        with logs._LOCK:  # a lock the interrupted thread may hold
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs in here, in this thread
        assert signals.wait(5)
        logging.getLogger("t").info("received %s: stopping", signals.name)
    """
    p = Proc([sys.executable, "-c", code])
    try:
        assert p.proc.wait(timeout=STOP_S) == 0, p.text
    except subprocess.TimeoutExpired:
        raise AssertionError(f"deadlocked: {p.text[-2000:]}") from None
    finally:
        p.close()
    assert "received SIGTERM: stopping" in p.text


@pytest.mark.parametrize("moment", ["starting", "serving", "leading", "mid-cycle"])
def test_sigterm_at_any_moment_exits_0_promptly_and_releases_the_lock(
    moment: str,
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    slow_prometheus: SlowPrometheus,
    tmp_path: Path,
) -> None:
    prefix = consul_prefix.rstrip("/")
    port = free_port()
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=port, healing=True)  # fmt: skip
    env["PROMETHEUS_URL"] = slow_prometheus.url
    p = Proc([sys.executable, "-m", "nomadscale", "run"], env)
    within = STOP_S
    try:
        if moment == "starting":  # handlers are installed before anything is logged
            p.wait_for("a log line", lambda: bool(p.lines))
        elif moment == "serving":  # the scheduler may still be starting (and logging)
            p.wait_for("/metrics", lambda: bool(metrics_text(port)))
        elif moment == "leading":
            p.wait_for("leadership", lambda: "nomadscale_is_leader 1.0" in metrics_text(port))
        else:  # the start-up warm-up fails slowly, then the takeover cycle's demand query
            p.wait_for("the warm-up", lambda: "forecaster warm-up failed" in p.text)
            p.wait_for("the cycle's query", lambda: slow_prometheus.in_flight > 0)
            within += HOLD_S  # the cycle ends at its next safe point: after the query
        assert p.term(within_s=within) == 0, p.text[-3000:]
    finally:
        p.close()
    assert "received SIGTERM: stopping" in p.text, p.text[-3000:]
    assert "service stopped" in p.text, p.text[-3000:]
    assert "did not finish" not in p.text, p.text[-3000:]
    assert _lock_session(consul_agent, prefix) is None  # released (or never taken)


class _Seen(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged (in the logging thread)."""

    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_stop_as_the_leadership_is_taken_never_deadlocks_the_scheduler(
    consul_agent: ConsulAgent, consul_prefix: str, twin_factory: TwinFactory
) -> None:
    """The lock tick that takes the leadership schedules the takeover cycle. With stop()
    landing then, that add_job waited for APScheduler's job store lock, held by
    ``shutdown(wait=True)`` while it waited for that very tick: stop() gave up after its
    timeout and the interpreter then waited for the tick's thread for ever. (Nor may the
    scheduler's thread die with JobLookupError removing that run-once job as shutdown()
    begins: pytest reports it.) Each round stops the service the moment it logs the
    leadership, from another thread, as SIGTERM does."""
    twin = twin_factory(nodes=4, clock=SystemClock())
    loop_log = logging.getLogger("nomadscale.service.loop")
    level, switch = loop_log.level, sys.getswitchinterval()
    loop_log.setLevel(logging.INFO)
    sys.setswitchinterval(1e-5)  # threads interleave far more often: the race shows
    try:
        _stop_as_leadership_is_taken(consul_agent, consul_prefix, twin.address, loop_log)
    finally:
        loop_log.setLevel(level)
        sys.setswitchinterval(switch)


def _stop_as_leadership_is_taken(
    consul_agent: ConsulAgent, consul_prefix: str, nomad_addr: str, loop_log: logging.Logger
) -> None:
    for i in range(30):
        prefix = f"{consul_prefix}r{i}"
        lock = ConsulLock(addr=consul_agent.addr, key=f"{prefix}/leader", ttl_s=15.0,
                          lock_delay_s=0)  # fmt: skip
        ports = Ports(nomad=NomadClient(address=nomad_addr, clock=SystemClock()),
                      kv=ConsulKV(addr=consul_agent.addr), lock=lock,
                      demand_for=lambda _p: constant(100.0))  # fmt: skip
        svc = Service(settings=Settings(kv_prefix=prefix, lock_ttl_s=15.0),
                      policies=[make_policy()], ports=ports, clock=SystemClock(),
                      renew_s=1.0, check=False)  # fmt: skip
        taken = threading.Event()
        seen = _Seen("leadership acquired", taken)
        loop_log.addHandler(seen)
        took = 0.0
        try:
            svc.start()
            assert taken.wait(10), f"round {i}: never the leader"
            t0 = time.monotonic()
            svc.stop(timeout_s=5.0)
            took = time.monotonic() - t0
        finally:
            loop_log.removeHandler(seen)
            if not svc.stop_event.is_set():
                svc.stop(timeout_s=5.0)
        assert took < 3.0, f"round {i}: stop() took {took:.1f}s (the scheduler deadlocked)"
        assert _lock_session(consul_agent, prefix) is None, f"round {i}: lock not released"


_HUNG_SHUTDOWN = """if True:
    import sys, threading
    from nomadscale.cli.service_common import get_settings, policies_for
    from nomadscale.core.logs import setup_logging
    from nomadscale.service.runtime import StopSignals, run_service
    signals = StopSignals(deadline_s=float(sys.argv[1])).install()
    settings = get_settings()
    setup_logging(level="INFO")
    # a shutdown task that never returns: the deadline or a second signal must end it
    run_service(settings, policies_for(settings), serve_http=False, signals=signals,
                on_stop=[threading.Event().wait])
"""


@pytest.mark.parametrize("ending", ["deadline", "second-signal"])
def test_a_hung_shutdown_is_ended_by_the_deadline_or_a_second_signal(
    ending: str,
    consul_agent: ConsulAgent,
    consul_prefix: str,
    twin_factory: TwinFactory,
    tmp_path: Path,
) -> None:
    prefix = consul_prefix.rstrip("/")
    twin = twin_factory(nodes=4, clock=SystemClock())
    env = run_process_env(consul_addr=consul_agent.addr, prefix=prefix, twin=twin,
                          tmp_path=tmp_path, port=free_port())  # fmt: skip
    deadline = "2" if ending == "deadline" else "60"
    p = Proc([sys.executable, "-c", _HUNG_SHUTDOWN, deadline], env)
    try:
        p.wait_for("leadership", lambda: _lock_session(consul_agent, prefix) is not None)
        if ending == "deadline":
            status = p.term(within_s=2 + STOP_S)
            assert "shutdown did not finish within 2s of the stop request" in p.text, p.text
        else:
            p.proc.send_signal(signal.SIGTERM)
            p.wait_for("the stop", lambda: "service stopped" in p.text)
            status = p.term(within_s=STOP_S)
            assert "second SIGTERM while stopping: exiting now" in p.text, p.text
    finally:
        p.close()
    assert status == 1, p.text[-3000:]
    assert "service stopped" in p.text  # the lock is released before the hung task
    assert _lock_session(consul_agent, prefix) is None
