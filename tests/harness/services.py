"""Real Consul and Prometheus processes for the tests (a pytest plugin, see tests/conftest.py).

Binaries are found through ``NOMADSCALE_CONSUL_BIN`` / ``NOMADSCALE_PROMETHEUS_BIN`` /
``NOMADSCALE_PROMTOOL_BIN``, else the cache folder filled by ``scripts/install-services.sh``
(``${NOMADSCALE_CACHE:-~/.cache/nomadscale}``), else ``PATH``. A missing binary FAILS the test.

Fixtures:

* ``consul_agent`` (session): a single-server Consul with a data dir (state survives
  ``restart()``), every port on 127.0.0.1, ``session_ttl_min = 1s`` so TTL expiry can be tested.
* ``consul_agent_acl`` (session): the same with ACLs on (default deny); ``.token`` is the master
  token.
* ``consul_prefix`` (function): a unique KV prefix (``test/<uuid>/``), deleted afterwards.
* ``prometheus_factory`` (function): ``start(series, *, lookback_s=30) -> PrometheusServer``
  loads ``promdata.Series`` with ``promtool tsdb create-blocks-from openmetrics`` and serves them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.promdata import Series, openmetrics_text

INSTALL_HINT = "run `bash scripts/install-services.sh` (as root) to install it"
START_TIMEOUT_S = 30.0


def _cache_dir() -> Path:
    return Path(os.environ.get("NOMADSCALE_CACHE", str(Path.home() / ".cache" / "nomadscale")))


def find_binary(name: str, *, env: str, cached: str) -> str:
    """Path of ``name``; ``pytest.fail`` with the install hint when it is nowhere."""
    explicit = os.environ.get(env)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        pytest.fail(f"{env}={explicit} is not an executable file; unset it or {INSTALL_HINT}")
    candidate = _cache_dir() / cached
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found (${env}, {candidate}, PATH); {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_text(port: int) -> str:
    """The /metrics page a nomadscale process serves on ``port`` ("" while it does not)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _http_get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 1.0) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def _http_put(url: str, body: bytes, *, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers or {})
    with urllib.request.urlopen(req, timeout=2.0) as resp:
        return str(resp.read().decode())


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)  # a suspended process cannot handle SIGTERM
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Consul -----------------------------------------------------------------------------


@dataclass
class ConsulAgent:
    """A running Consul server on loopback. Process control is for chaos tests."""

    binary: str
    workdir: Path
    acl_token: str | None = None
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.ports = {
            "http": self.http_port,
            "dns": free_port(),
            "serf_lan": free_port(),
            "serf_wan": free_port(),
            "server": free_port(),
            "grpc": -1,
            "https": -1,
        }
        ports = ", ".join(f"{k} = {v}" for k, v in self.ports.items())
        config = [
            'session_ttl_min = "1s"',
            "performance { raft_multiplier = 1 }",
            f"ports {{ {ports} }}",
            "disable_update_check = true",
        ]
        if self.acl_token:
            config.append(
                'acl { enabled = true  default_policy = "deny"  down_policy = "extend-cache"  '
                f'tokens {{ master = "{self.acl_token}"  agent = "{self.acl_token}" }} }}'
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "agent.hcl").write_text("\n".join(config) + "\n")

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str | None:
        return self.acl_token

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    def start(self) -> None:
        cmd = [
            self.binary,
            "agent",
            "-server",
            "-bootstrap-expect=1",
            f"-data-dir={self.workdir / 'data'}",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            "-advertise=127.0.0.1",
            f"-node=nomadscale-test-{self.http_port}",
            f"-config-file={self.workdir / 'agent.hcl'}",
            "-log-level=info",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for a leader and a successful KV write."""
        headers = {"X-Consul-Token": self.acl_token} if self.acl_token else {}
        deadline = time.monotonic() + timeout_s
        last = "not started"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(
                    f"consul exited with {self.proc.returncode}:\n{_log_tail(self.log_path)}"
                )
            try:
                leader = _http_get(f"{self.addr}/v1/status/leader").strip().strip('"')
                if leader:
                    _http_put(f"{self.addr}/v1/kv/_harness/ready", b"1", headers=headers)
                    return
                last = "no leader yet"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        pytest.fail(f"consul not ready after {timeout_s}s ({last}):\n{_log_tail(self.log_path)}")

    def _wait_state(self, stopped: bool) -> None:
        """Wait until every thread of the agent is (or is no longer) stopped, per /proc."""
        assert self.proc is not None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            states = []
            for stat in Path(f"/proc/{self.proc.pid}/task").glob("*/stat"):
                with contextlib.suppress(OSError):
                    states.append(stat.read_text().rsplit(")", 1)[1].split()[0] in "Tt")
            if states and all(s == stopped for s in states):
                return
            time.sleep(0.01)

    def suspend(self) -> None:
        """SIGSTOP: the agent stops answering (connections hang until the client timeout).
        Returns once the process is really stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._wait_state(stopped=True)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._wait_state(stopped=False)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown; ``restart()`` brings it back with the same ports/data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self) -> None:
        """Stop (gracefully if running) and start again on the same ports; waits for a leader."""
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _start_consul(tmp_path_factory: pytest.TempPathFactory, *, acl: bool) -> Iterator[ConsulAgent]:
    binary = find_binary("consul", env="NOMADSCALE_CONSUL_BIN", cached="consul/usr/bin/consul")
    agent = ConsulAgent(
        binary=binary,
        workdir=tmp_path_factory.mktemp("consul-acl" if acl else "consul"),
        acl_token=str(uuid.uuid4()) if acl else None,
    )
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    yield from _start_consul(tmp_path_factory, acl=False)


@pytest.fixture(scope="session")
def consul_agent_acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    yield from _start_consul(tmp_path_factory, acl=True)


@pytest.fixture
def consul_prefix(consul_agent: ConsulAgent) -> Iterator[str]:
    """A unique KV prefix ending in ``/``; everything under it is deleted after the test."""
    prefix = f"test/{uuid.uuid4().hex}/"
    yield prefix
    if not consul_agent.running():
        consul_agent.restart()
    req = urllib.request.Request(f"{consul_agent.addr}/v1/kv/{prefix}?recurse", method="DELETE")
    with contextlib.suppress(OSError):
        urllib.request.urlopen(req, timeout=2.0).close()


# --- Prometheus -------------------------------------------------------------------------


@dataclass
class PrometheusServer:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _stop(self.proc)


def start_prometheus(
    series: Sequence[Series], *, workdir: Path, lookback_s: float = 30.0
) -> PrometheusServer:
    """Load ``series`` into a fresh TSDB and serve it on a free loopback port."""
    promtool = find_binary(
        "promtool", env="NOMADSCALE_PROMTOOL_BIN", cached="prometheus/usr/bin/promtool"
    )
    prometheus = find_binary(
        "prometheus", env="NOMADSCALE_PROMETHEUS_BIN", cached="prometheus/usr/bin/prometheus"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir()
    if series:
        om = workdir / "series.om"
        om.write_text(openmetrics_text(series))
        # a few large blocks: promtool's default of 2 h made five weeks 420 blocks, and
        # Prometheus took ~45 s to open them before it was ready
        done = subprocess.run(
            [
                promtool,
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                "--max-block-duration=1000h",
                str(om),
                str(data),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"promtool create-blocks-from failed:\n{done.stderr or done.stdout}")
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  evaluation_interval: 1h\nscrape_configs: []\n")
    port = free_port()
    log_path = workdir / "prometheus.log"
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=100y",
        f"--query.lookback-delta={int(lookback_s * 1000)}ms",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", data_dir=data, proc=proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            _http_get(f"{server.url}/-/ready")
            return server
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    server.stop()
    pytest.fail(f"prometheus not ready after {START_TIMEOUT_S}s:\n{_log_tail(log_path)}")


@pytest.fixture
def prometheus_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrometheusServer]]:
    """``start(series, *, lookback_s=30.0) -> PrometheusServer``; all stopped at teardown."""
    started: list[PrometheusServer] = []

    def start(series: Sequence[Series], *, lookback_s: float = 30.0) -> PrometheusServer:
        server = start_prometheus(
            series, workdir=tmp_path_factory.mktemp("prometheus"), lookback_s=lookback_s
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
