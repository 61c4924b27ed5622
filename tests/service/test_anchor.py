"""Every process forecasts alike: the service's kept forecasters (whenever each process
started), ``plan`` (a fresh cycle) and ``forecast`` make one forecast for the same ``now`` and
data, because every forecast starts at an origin anchored to a grid they share. And the
settings that reach a Prometheus behind TLS and a bearer-token proxy (real Prometheus)."""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner

from nomadscale.cli.main import _register, cli
from nomadscale.config.settings import Settings, load_settings
from nomadscale.core.errors import ConfigError
from nomadscale.core.ports import DemandSeries
from nomadscale.service.forecasts import LiveForecaster
from nomadscale.service.runtime import demand_for
from tests.integrations.test_walk_prometheus import PASSWORD, secure_prometheus  # noqa: F401
from tests.security.certs import make_pki
from tests.service.helpers import make_policy

STEP = 600.0
ORIGIN = datetime(2026, 1, 5, 0, 3, 17, tzinfo=UTC)  # the source's grid is not slot-aligned


class Recording:
    """A demand source over a fixed daily wave with noise and gaps, counting the steps read."""

    def __init__(self, days: int) -> None:
        rng = np.random.default_rng(11)
        n = int(days * 86400 / STEP)
        t = np.arange(n) * STEP / 86400
        v = (900 + 500 * np.sin(2 * np.pi * t)) * rng.lognormal(0, 0.1, n)
        v[rng.random(n) < 0.02] = np.nan
        self.values = v
        self.reads: list[int] = []

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        last = int((end - ORIGIN).total_seconds() // step_s)
        first = max(0, last - int(lookback_s // step_s))
        self.reads.append(last - first)
        start = ORIGIN + timedelta(seconds=first * step_s)
        return DemandSeries(start=start, step_s=step_s, values=self.values[first:last].copy())


def test_forecasters_started_at_any_time_and_plan_forecast_alike() -> None:
    """A leader warm since day 2 and a standby started on day 3.4 (each feeding only the new
    steps, re-warming when their shared origin moves), and at every slot a fresh forecaster
    as ``plan`` builds and ``forecast_at`` as ``forecast`` runs: one forecast. An "apply now"
    between two slots too, and it leaves the kept forecasters as they were."""
    policy = make_policy(demand={"source": "prometheus", "query": "q", "step": "10m",
                                 "lookback": "12h"})  # fmt: skip
    src = Recording(days=7)
    first = ORIGIN + timedelta(days=2, seconds=43)
    leader, standby = LiveForecaster(policy), LiveForecaster(policy)
    modes: dict[str, int] = {}
    for i in range(4 * 72):  # four days of 20-minute slots
        now = first + timedelta(minutes=20 * i)
        fc, how = leader.forecast(src, now=now)
        reads = src.reads[-1]
        modes[how.mode] = modes.get(how.mode, 0) + 1
        assert how.mode == "warm" or reads == 2, (i, how)  # after the warm start: new steps
        fresh, _ = LiveForecaster(policy).forecast(src, now=now)  # what plan's cycle does
        assert fc == fresh, (i, how)
        if i >= 100:
            assert standby.forecast(src, now=now)[0] == fc, i
    # the origin moves every 12 h: re-warms from the kept steps, never another warm start
    assert modes == {"warm": 1, "incremental": 4 * 72 - 1 - 8, "rewarm": 8}, modes  # 4 d / 12 h

    from nomadscale.service.forecasts import forecast_at  # what `nomadscale forecast` runs

    kick = first + timedelta(minutes=20 * (4 * 72 - 1) + 10)  # half a slot later
    fc, how = leader.forecast(src, now=kick)
    assert how.mode == "one-off"
    assert fc == forecast_at(policy, src, now=kick)[0] == LiveForecaster(policy).forecast(
        src, now=kick)[0]  # fmt: skip
    now = kick + timedelta(minutes=10)  # the next slot: the kept forecaster goes on
    fc, how = leader.forecast(src, now=now)
    assert how.mode in ("incremental", "rewarm") and src.reads[-1] == 2
    want, history, _ = forecast_at(policy, src, now=now)
    assert fc == want == standby.forecast(src, now=now)[0]
    assert 12 * 3600 <= len(history.values) * STEP <= 24 * 3600 + 1200  # one to two lookbacks
    assert history.end == how.history_end


class Level:
    """Steady demand since long before the test: any forecast of it is exactly the level."""

    def history(self, *, end: datetime, lookback_s: float, step_s: float) -> DemandSeries:
        n = int(lookback_s // step_s)
        return DemandSeries(start=end - timedelta(seconds=n * step_s), step_s=step_s,
                            values=np.full(n, 550.0))  # fmt: skip


def test_a_lookback_shorter_than_the_calibration_never_falls_back_after_a_rewarm() -> None:
    """``lookback: 6h`` at 20-minute cycles is shorter than the 6 h 40 min the forecaster
    calibrates on: the shared origin's period is the longer of the two, so the re-warm every
    period still has a calibrated model (before: the recent peak +21% for two cycles every
    6 h, on steady demand, and the fleet went up and back down)."""
    policy = make_policy()  # 1-minute steps, 6 h lookback
    live, src = LiveForecaster(policy), Level()
    first = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    modes: dict[str, int] = {}
    for i in range(2 * 72):  # two days of slots
        fc, how = live.forecast(src, now=first + timedelta(minutes=20 * i))
        modes[how.mode] = modes.get(how.mode, 0) + 1
        assert fc.model == "regress" and fc.upper == pytest.approx(550.0), (i, how.mode, fc)
        assert how.history_steps >= 400, (i, how)
    assert modes["rewarm"] >= 6 and modes["warm"] == 1, modes  # it did re-warm, every 6 h 40


# --- Prometheus behind TLS, with a CA file and a bearer token -------------------------------


class _BearerProxy(BaseHTTPRequestHandler):
    """An auth proxy in front of Prometheus (Prometheus itself checks no bearer tokens):
    ``server.token`` is required, then the query goes on to ``server.upstream``."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv: Any = self.server
        srv.seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            self._send(401, b'{"status":"error","errorType":"auth","error":"bad token"}')
            return
        up = requests.post(f"{srv.upstream}{self.path}", data=body, auth=("ops", PASSWORD),
                           verify=srv.upstream_ca, timeout=10,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        self._send(up.status_code, up.content)

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def bearer_proxy(
    secure_prometheus: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[str, Path, Any]]:
    """An HTTPS auth proxy (its own CA) in front of the TLS Prometheus: (URL, CA, server)."""
    url, ca = secure_prometheus
    (tmp_path / "proxy").mkdir()
    pki = make_pki(tmp_path / "proxy")
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _BearerProxy)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.token, server.upstream, server.upstream_ca, server.seen = "tok-7f3a", url, str(ca), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", pki.ca, server
    finally:
        server.shutdown()
        server.server_close()


def _forecast(tmp_path: Path, env: dict[str, str]) -> Any:
    policy = make_policy(demand={"source": "prometheus", "query": "demand", "step": "1m",
                                 "lookback": "1h"})  # fmt: skip
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(policy.to_yaml_dict()))
    (tmp_path / "settings.yaml").write_text("{}\n")
    _register()
    clean = {k: None for k in os.environ if k.startswith(("NOMAD", "CONSUL", "PROMETHEUS"))}
    return CliRunner().invoke(cli, ["forecast", "ekyc"], env={
        **clean, "NOMADSCALE_CONFIG": str(tmp_path / "settings.yaml"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"), **env,
    })  # fmt: skip


@pytest.mark.prometheus
def test_prometheus_cacert_and_bearer_token_settings_reach_prometheus(
    bearer_proxy: tuple[str, Path, Any], tmp_path: Path
) -> None:
    """There was no setting for a Prometheus CA file or bearer token: ``forecast`` and the
    service could not read a Prometheus behind TLS with a private CA or a token proxy. The
    token (from a file) is sent, never printed, and shown as ``<set>`` in the settings log."""
    url, ca, proxy = bearer_proxy
    token_file = tmp_path / "prom-token"
    token_file.write_text("tok-7f3a\n")
    env = {"PROMETHEUS_URL": url, "PROMETHEUS_CACERT": str(ca),
           "NOMADSCALE_PROMETHEUS_TOKEN_FILE": str(token_file)}  # fmt: skip
    res = _forecast(tmp_path, env)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ekyc: next ") and "tok-7f3a" not in res.output
    assert proxy.seen and set(proxy.seen) == {"Bearer tok-7f3a"}
    settings = load_settings(env)
    assert settings.describe()["prometheus_token"] == "<set>"
    assert "tok-7f3a" not in repr(settings) + json.dumps(settings.describe())

    # a wrong token: one line naming the failure, the token in no message
    token_file.write_text("tok-wrong\n")
    res = _forecast(tmp_path, env)
    assert res.exit_code == 1, res.output
    [line] = res.output.strip().splitlines()
    assert "bad token" in line and "tok-wrong" not in line, line  # the proxy's 401
    # without the CA file the proxy's certificate is not trusted
    res = _forecast(tmp_path, {**env, "PROMETHEUS_CACERT": ""})
    assert res.exit_code == 1 and "TLS error" in res.output, res.output


def test_prometheus_settings_mistakes_are_one_line_naming_the_setting(tmp_path: Path) -> None:
    policy = make_policy()
    (tmp_path / "settings.yaml").write_text("{}\n")
    bad = [
        (Settings(prometheus_url="https://p:9090", prometheus_cacert=str(tmp_path / "no.pem")),
         f"PROMETHEUS_CACERT: {tmp_path / 'no.pem'}: no such file"),
        (load_settings({"PROMETHEUS_URL": "https://ops:pw-51c9@p:9090",
                        "NOMADSCALE_PROMETHEUS_TOKEN": "tok-51c9"},
                       config_file=str(tmp_path / "settings.yaml")),
         "NOMADSCALE_PROMETHEUS_TOKEN: set while PROMETHEUS_URL carries user:password"),
        (Settings(prometheus_url="p:9090"), "PROMETHEUS_URL: prometheus url 'p:9090': use"),
    ]  # fmt: skip
    for settings, want in bad:
        with pytest.raises(ConfigError) as info:
            demand_for(settings)(policy)
        assert str(info.value).startswith(want), str(info.value)
        assert "51c9" not in str(info.value)  # neither the password nor the token
