"""An SRE's imperfect Prometheus, walked with hand-made OpenMetrics histories loaded into a
real Prometheus (``promtool tsdb create-blocks-from openmetrics``): per-instance counters
with a restart, an instance that appears mid-history, scrape gaps, NaN/Inf/negative samples,
five weeks at a 1-minute step against the 11,000-points limit, a slow or failing server, bad
PromQL, basic auth over TLS. What the cycle then does is in tests/service/test_walk_history.py.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from nomadscale.core.errors import (
    ConfigError,
    ExternalPermanentError,
    ExternalTemporaryError,
)
from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource
from nomadscale.stages.decide import forecast_config_from
from nomadscale.stages.forecast import forecast
from tests.harness.promdata import Series, openmetrics_text
from tests.harness.services import PrometheusServer, find_binary, free_port
from tests.security.certs import make_pki
from tests.service.helpers import make_policy

pytestmark = pytest.mark.prometheus

T0 = datetime(2026, 1, 5, tzinfo=UTC)
WHERE = "policies/ekyc.yaml: demand.query"


def _counter(
    instance: str, *, start_s: float, end_s: float, per_s: float, reset_at_s: float | None = None
) -> Series:
    """A request counter scraped every 15 s; it restarts from 0 at ``reset_at_s``."""
    ts = np.arange(T0.timestamp() + start_s, T0.timestamp() + end_s, 15.0)
    counts = np.cumsum(np.full(len(ts), per_s * 15.0))
    if reset_at_s is not None:
        cut = int(np.searchsorted(ts, T0.timestamp() + reset_at_s))
        counts[cut:] -= counts[cut - 1] + per_s * 15.0  # the new process starts at 0
    return Series("req_total", {"instance": instance}, ts, counts)


def _source(server: PrometheusServer, query: str, **kw: Any) -> PrometheusDemandSource:
    client = PrometheusClient(url=server.url, timeout=kw.pop("timeout", 10.0))
    return PrometheusDemandSource(client=client, query=query, where=WHERE, **kw)


def _requests_served(url: str, handler: str) -> float:
    """Prometheus' own count of the requests its ``handler`` answered."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    key = f'prometheus_http_requests_total{{code="200",handler="{handler}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


# --- counters: a restart, a new instance, scrape gaps, several series ------------------------


def test_summed_counters_through_a_restart_a_new_instance_and_an_outage(
    prometheus_factory: Callable[..., PrometheusServer],
) -> None:
    """``sum(rate(...)) * 60``: a process restart is no spike and no dip, an instance that
    appears mid-history adds its share from then on, an hour when nothing was scraped is a
    gap (NaN, never 0 rpm) and the data after it is read again."""
    outage = (4 * 3600.0, 5 * 3600.0)  # Prometheus scraped nothing for an hour

    def both_sides(s: Series) -> Series:
        keep = [not (outage[0] <= t - T0.timestamp() < outage[1]) for t in s.timestamps]
        return Series(s.name, s.labels, np.asarray(s.timestamps)[keep], np.asarray(s.values)[keep])

    series = [
        both_sides(_counter("a", start_s=0, end_s=7 * 3600, per_s=1.0, reset_at_s=5400)),
        both_sides(_counter("b", start_s=0, end_s=7 * 3600, per_s=2.0)),
        both_sides(_counter("c", start_s=2 * 3600, end_s=7 * 3600, per_s=0.5)),
    ]
    server = prometheus_factory(series, lookback_s=300)  # Prometheus' default lookback
    src = _source(server, "sum(rate(req_total[5m])) * 60")
    hist = src.history(end=T0 + timedelta(hours=7), lookback_s=7 * 3600, step_s=60)
    assert hist.start == T0 and len(hist.values) == 420
    v = hist.values

    def minutes(a: int, b: int) -> np.ndarray:
        return v[a:b]

    # a (60 rpm) restarted at 1h30: rate() takes the reset in its stride
    np.testing.assert_allclose(minutes(70, 115), 180.0, rtol=0.02)
    # c (30 rpm) appeared at 2h: its share from five minutes later on
    np.testing.assert_allclose(minutes(130, 235), 210.0, rtol=0.02)
    # the outage: no data, not zero demand; afterwards 210 rpm again
    assert np.isnan(minutes(246, 300)).all()
    assert not (v[~np.isnan(v)] == 0).any()
    np.testing.assert_allclose(minutes(306, 420), 210.0, rtol=0.02)


def test_per_instance_series_are_one_line_naming_the_policy_field(
    prometheus_factory: Callable[..., PrometheusServer],
) -> None:
    """Several series for the demand query (per-instance counters not summed) are refused:
    which instance would be the fleet's demand? The operator gets the policy file and field
    and the fix, not a client error."""
    server = prometheus_factory(
        [
            _counter("a", start_s=0, end_s=3600, per_s=1.0),
            _counter("b", start_s=1800, end_s=3600, per_s=2.0),
        ]
    )
    src = _source(server, "rate(req_total[5m]) * 60")
    with pytest.raises(ConfigError) as info:
        src.history(end=T0 + timedelta(hours=1), lookback_s=3600, step_s=60)
    text = str(info.value)
    assert text.startswith(f"{WHERE}: ") and "\n" not in text
    assert "returned 2 series" in text and "sum(...)" in text


# --- samples Prometheus should not have ------------------------------------------------------


def test_nan_inf_and_negative_samples_are_gaps_and_the_forecast_still_runs(
    prometheus_factory: Callable[..., PrometheusServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A +Inf sample (a division by zero in the query) used to reach the forecast, whose
    input check refused the whole history: every cycle failed until the sample left the
    lookback (five weeks). NaN, +-Inf and negative samples are now gaps, logged once per
    read with the first one's time."""
    ts = T0.timestamp() + 60.0 * np.arange(240)
    values = np.full(240, 100.0)
    values[[30, 40, 41, 50]] = [np.nan, np.inf, -np.inf, -5.0]
    server = prometheus_factory([Series("demand", {}, ts, values)])
    src = _source(server, "demand", stamp="start")
    end = T0 + timedelta(hours=4)
    with caplog.at_level(logging.WARNING, logger="nomadscale.integrations.prometheus"):
        hist = src.history(end=end, lookback_s=4 * 3600, step_s=60)
    assert np.isnan(hist.values[[30, 40, 41, 50]]).all()
    assert np.count_nonzero(np.isnan(hist.values)) == 4
    assert (hist.values[~np.isnan(hist.values)] == 100.0).all()
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{WHERE}: 3 samples are infinite or negative")
    assert (T0 + timedelta(minutes=40)).isoformat() in warning
    fc = forecast(hist, now=end, config=forecast_config_from(make_policy()))
    assert fc.data_ok and 100.0 <= fc.peak <= 110.0


# --- five weeks at one minute ----------------------------------------------------------------


def test_five_weeks_at_one_minute_in_chunks_on_the_step_grid(tmp_path: Path) -> None:
    """50,400 points, more than the 11,000 Prometheus gives per series and query: read in
    chunks with no step twice and none missing at the chunk edges (each step's value is its
    index), and on the step grid wherever ``end`` falls in its minute (a scheduler firing a
    few ms after the slot used to shift every step by those ms)."""
    n = 35 * 24 * 60
    ts = T0.timestamp() + 60.0 * np.arange(n + 1)
    proc, port = _serve(
        tmp_path, config="scrape_configs: []\n", args=["--query.lookback-delta=30s"],
        series=[Series("step_index", {}, ts, np.arange(n + 1, dtype=float))],
        ready=_ready("http://{}/-/ready"),
    )  # fmt: skip
    try:
        _read_five_weeks(f"http://127.0.0.1:{port}", n, ts)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _read_five_weeks(url: str, n: int, ts: np.ndarray) -> None:
    src = PrometheusDemandSource(client=PrometheusClient(url=url), query="step_index",
                                 stamp="start", where=WHERE)  # fmt: skip
    end = T0 + timedelta(days=35)
    before = _requests_served(url, "/api/v1/query_range")
    hist = src.history(end=end, lookback_s=35 * 86400, step_s=60)
    assert _requests_served(url, "/api/v1/query_range") - before == 6  # 10,000 a request
    assert hist.start == T0 and hist.end == end
    np.testing.assert_array_equal(hist.values, np.arange(n, dtype=float))
    for late in (0.004, 29.9, 59.999):
        again = src.history(end=end + timedelta(seconds=late), lookback_s=35 * 86400, step_s=60)
        assert again.start == T0 and again.end == end, late
        np.testing.assert_array_equal(again.values, hist.values)
    # one request for all of it is what Prometheus refuses
    resp = requests.get(
        f"{url}/api/v1/query_range",
        params={"query": "step_index", "start": ts[0], "end": ts[-1], "step": 60},
        timeout=10,
    )
    assert resp.status_code == 400 and "11,000 points" in resp.json()["error"]


# --- answers that are not a range query's ---------------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    """A loopback stand-in for a proxy in front of Prometheus (no real Prometheus answers a
    range query with a vector, a string or a 503), or for a scrape target:
    ``server.answers`` is the queue, then 503s."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        queue = self.server.answers  # type: ignore[attr-defined]
        status, headers, body = queue.pop(0) if queue else (503, {}, "no answer queued")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST  # Prometheus scrapes with GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.answers = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _ok(result_type: str, result: Any) -> tuple[int, dict[str, str], Any]:
    return 200, {}, {"status": "success", "data": {"resultType": result_type, "result": result}}


def test_a_result_that_is_not_a_matrix_is_one_line_not_missing_data(
    stand_in: ThreadingHTTPServer,
) -> None:
    """A vector used to read as "no data" (the cycle then held, silently, forever) and a
    string result raised AttributeError (a traceback)."""
    t = (T0 + timedelta(hours=1)).timestamp()
    stand_in.answers.extend(  # type: ignore[attr-defined]
        [
            _ok("vector", [{"metric": {}, "value": [t, "5"]}]),
            _ok("string", [t, "five"]),
            _ok("matrix", [{"metric": {}, "values": [[t, "five"]]}]),
            (200, {}, "<html>sign in</html>"),
        ]
    )
    client = PrometheusClient(url=f"http://127.0.0.1:{stand_in.server_address[1]}")
    src = PrometheusDemandSource(client=client, query="demand", where=WHERE)
    for expect in ("returned a vector", "returned a string", "not [time, value]"):
        with pytest.raises(ConfigError) as info:
            src.history(end=T0 + timedelta(hours=1), lookback_s=3600, step_s=60)
        assert str(info.value).startswith(f"{WHERE}: prometheus query 'demand' "), expect
        assert expect in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ExternalPermanentError, match="did not answer as the Prometheus HTTP API"):
        src.history(end=T0 + timedelta(hours=1), lookback_s=3600, step_s=60)


def test_an_sli_answer_that_is_not_a_number_is_one_line(stand_in: ThreadingHTTPServer) -> None:
    """The rollout's SLI gate reads instant queries: a string result that is not a number,
    or a vector sample without a value, raised ValueError/KeyError (a traceback that ended
    the rollout's process) instead of the permanent error the gate reports."""
    t = T0.timestamp()
    stand_in.answers.extend(  # type: ignore[attr-defined]
        [_ok("string", [t, "n/a"]), _ok("vector", [{"metric": {}}]), _ok("scalar", [t, "0.25"])]
    )
    client = PrometheusClient(url=f"http://127.0.0.1:{stand_in.server_address[1]}")
    for what in ("string", "vector"):
        with pytest.raises(ExternalPermanentError) as info:
            client.query("errors_ratio", at=T0)
        text = str(info.value)
        assert text.startswith(f"prometheus query 'errors_ratio' returned a {what} that is not")
    assert client.query("errors_ratio", at=T0) == 0.25


def test_bad_promql_in_the_policy_names_the_file_and_field(
    prometheus_factory: Callable[..., PrometheusServer],
) -> None:
    server = prometheus_factory([])
    src = _source(server, "sum(rate(ekyc_inference_requests_total[5m])")
    with pytest.raises(ConfigError) as info:
        src.history(end=T0, lookback_s=3600, step_s=60)
    text = str(info.value)
    assert text.startswith(f"{WHERE}: prometheus query_range 'sum(rate(") and "\n" not in text
    assert "bad_data" in text and "parse error" in text


# --- slow, failing -----------------------------------------------------------------------------


def test_a_stalled_prometheus_is_a_timeout_and_a_503_says_when_to_retry(
    prometheus_factory: Callable[..., PrometheusServer], stand_in: ThreadingHTTPServer
) -> None:
    ts = T0.timestamp() + 60.0 * np.arange(60)
    server = prometheus_factory([Series("demand", {}, ts, np.full(60, 7.0))])
    src = _source(server, "demand", stamp="start", timeout=1.0)
    end = T0 + timedelta(hours=1)
    server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        with pytest.raises(ExternalTemporaryError, match=r"timed out after 1s") as info:
            src.history(end=end, lookback_s=3600, step_s=60)
        assert time.monotonic() - started < 5 and info.value.system == "prometheus"
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert (src.history(end=end, lookback_s=3600, step_s=60).values == 7.0).all()

    body = {"status": "error", "errorType": "unavailable", "error": "too many queries"}
    stand_in.answers.append((503, {"Retry-After": "30"}, body))  # type: ignore[attr-defined]
    client = PrometheusClient(url=f"http://127.0.0.1:{stand_in.server_address[1]}")
    with pytest.raises(ExternalTemporaryError, match="HTTP 503 unavailable: too many") as tmp:
        PrometheusDemandSource(client=client, query="demand").history(
            end=end, lookback_s=3600, step_s=60
        )
    assert tmp.value.retry_after == 30.0


# --- basic auth over TLS -------------------------------------------------------------------

# bcrypt of "walk-pass" (Prometheus' web config takes bcrypt hashes only)
_HASH = "$2b$05$abcdefghijklmnopqrstuuNOhOCF6GbJwbM4OwiXsxO82YoUyZ0ZW"
PASSWORD = "walk-pass"


def _serve(
    workdir: Path,
    *,
    config: str,
    args: list[str],
    series: list[Series] | None = None,
    ready: Callable[[str], bool],
) -> tuple[subprocess.Popen[bytes], int]:
    """A real Prometheus with its own config and flags (the harness' has neither TLS nor
    scrapes, and loads five weeks as 420 two-hour blocks: 45 s); ``ready(host:port)`` tells
    when it answers."""
    data = workdir / "data"
    data.mkdir()
    if series:
        (workdir / "s.om").write_text(openmetrics_text(series))
        promtool = find_binary(
            "promtool", env="NOMADSCALE_PROMTOOL_BIN", cached="prometheus/usr/bin/promtool"
        )
        subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=1000h",
             str(workdir / "s.om"), str(data)], check=True, capture_output=True,
        )  # fmt: skip
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    binary = find_binary(
        "prometheus", env="NOMADSCALE_PROMETHEUS_BIN", cached="prometheus/usr/bin/prometheus"
    )
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
             "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn", *args],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if ready(f"127.0.0.1:{port}"):
                return proc, port
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"prometheus not ready: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        time.sleep(0.05)


def _ready(url: str, **kw: Any) -> Callable[[str], bool]:
    return lambda hostport: requests.get(url.format(hostport), timeout=1, **kw).status_code == 200


@pytest.mark.slow  # Prometheus' target discovery takes 5 s to start scraping
def test_stale_markers_of_a_target_that_went_away_are_gaps_at_once(
    tmp_path: Path, stand_in: ThreadingHTTPServer
) -> None:
    """A real scrape: when the target stops answering Prometheus writes stale markers, and
    the history has gaps from there, not the last value held for the 5-minute lookback."""
    port = stand_in.server_address[1]
    config = (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n"
        f"scrape_configs:\n  - job_name: ex\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    stand_in.answers.extend(  # type: ignore[attr-defined]
        [(200, {"Content-Type": "text/plain"}, "# TYPE demand gauge\ndemand 42\n")] * 2
    )
    proc, prom_port = _serve(tmp_path, config=config, args=[],
                             ready=_ready("http://{}/-/ready"))  # fmt: skip
    try:
        client = PrometheusClient(url=f"http://127.0.0.1:{prom_port}", timeout=2)
        deadline = time.monotonic() + 20
        while stand_in.answers and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.1)  # two scrapes answered; the next ones fail (no answer queued)
        assert client.query("demand") == 42.0
        while client.query("demand") is not None and time.monotonic() < deadline:
            time.sleep(0.1)  # the stale marker of the failed scrape
        time.sleep(2.0)  # two more failed scrapes: the history's last steps are after it
        end = datetime.now(UTC)
        src = PrometheusDemandSource(client=client, query="demand", stamp="start")
        hist = src.history(end=end, lookback_s=15, step_s=1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    v = hist.values
    assert (v[~np.isnan(v)] == 42.0).all() and np.count_nonzero(v == 42.0) >= 2, v
    assert np.isnan(v[-1]), v  # long before the 5-minute lookback would end a held value


@pytest.fixture
def secure_prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real Prometheus serving HTTPS with basic auth; yields (https URL, CA file)."""
    pki = make_pki(tmp_path)
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n"
        f"  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"basic_auth_users:\n  ops: {_HASH}\n"
    )
    proc, port = _serve(
        tmp_path,
        config="scrape_configs: []\n",
        args=[f"--web.config.file={tmp_path / 'web.yml'}", "--query.lookback-delta=30s"],
        series=[Series("demand", {}, [T0.timestamp(), T0.timestamp() + 60], [3.0, 4.0])],
        ready=_ready("https://{}/-/ready", auth=("ops", PASSWORD), verify=str(pki.ca)),
    )
    try:
        yield f"https://127.0.0.1:{port}", pki.ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_basic_auth_over_tls_works_and_the_password_is_never_shown(
    secure_prometheus: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PROMETHEUS_URL=https://user:password@host`` is how the credential is given. Every
    error text repeated the URL with its password: ``nomadscale forecast`` printed it, and
    any caller outside the service's log filter (a rollout's SLI gate) logged it. And on a
    host whose environment sets REQUESTS_CA_BUNDLE (Debian's, a corporate image) the client's
    own CA file was ignored: requests lets the variable override a Session's ``verify``."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    url, ca = secure_prometheus
    host = url.removeprefix("https://")
    end = T0 + timedelta(minutes=2)
    caplog.set_level(logging.DEBUG)
    client = PrometheusClient(url=f"https://ops:{PASSWORD}@{host}", verify=str(ca))
    got = PrometheusDemandSource(client=client, query="demand", stamp="start").history(
        end=end, lookback_s=120, step_s=60
    )
    np.testing.assert_array_equal(got.values, [3.0, 4.0])

    failures: list[str] = [repr(client)]
    for make, kind in (
        (lambda: PrometheusClient(url=f"https://ops:wrong-{PASSWORD}@{host}", verify=str(ca)),
         ExternalPermanentError),  # 401
        (lambda: PrometheusClient(url=f"https://ops:{PASSWORD}@{host}"), ExternalPermanentError),
        (lambda: PrometheusClient(url=f"https://ops:{PASSWORD}@127.0.0.1:{free_port()}",
                                  timeout=1.0), ExternalTemporaryError),
    ):  # fmt: skip
        with pytest.raises(kind) as info:
            make().query_range("demand", start=T0, end=end, step_s=60)
        failures.append(str(info.value))
    unauthorized, untrusted, unreachable = failures[1:]
    assert "HTTP 401" in unauthorized and "check the credentials in PROMETHEUS_URL" in unauthorized
    assert "TLS error" in untrusted and f"https://{host}" in untrusted
    assert "unreachable" in unreachable and "https://127.0.0.1:" in unreachable
    for text in [*failures, *(r.getMessage() for r in caplog.records)]:
        assert PASSWORD not in text, text
