"""PrometheusClient / PrometheusDemandSource against a real Prometheus loaded with traces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from nomadscale.core.errors import ExternalPermanentError, ExternalTemporaryError, UsageError
from nomadscale.integrations.prometheus import PrometheusClient, PrometheusDemandSource
from tests.harness.promdata import TRACES, Series, read_trace, series_from_trace
from tests.harness.services import PrometheusServer, free_port, start_prometheus

pytestmark = pytest.mark.prometheus

KIMI = TRACES / "llm_kimi_mooncake_conversation_1min.csv"
ELB = TRACES / "web_aws_elb_requests_5min_head.csv"
ELB_ROWS = slice(0, 1200)  # 2014-04-10..14, holds 3 of the trace's gaps


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = start_prometheus(
        [
            series_from_trace(KIMI, "demand_rpm", labels={"policy": "kimi"}),
            series_from_trace(ELB, "demand_rpm", labels={"policy": "elb"}, rows=ELB_ROWS),
        ],
        workdir=tmp_path_factory.mktemp("prom"),
    )
    yield server
    server.stop()


def test_range_query_returns_the_1min_trace_exactly(prom: PrometheusServer) -> None:
    trace = read_trace(KIMI)
    client = PrometheusClient(url=prom.url)
    got = client.query_range(
        'demand_rpm{policy="kimi"}',
        start=_dt(trace.timestamps[0]),
        end=_dt(trace.timestamps[-1]),
        step_s=60,
    )
    assert got.start == datetime(2000, 1, 1, tzinfo=UTC)
    assert got.step_s == 60
    assert len(got.values) == 58
    np.testing.assert_array_equal(got.values, trace.requests)  # 1-min step: rpm == count


def test_range_query_keeps_gaps_as_nan_across_chunks(prom: PrometheusServer) -> None:
    trace = read_trace(ELB, rows=ELB_ROWS)
    expected = trace.grid()
    gaps = [
        _dt(trace.timestamps[0] + i * 300).isoformat() for i in np.flatnonzero(np.isnan(expected))
    ]
    assert gaps == [
        "2014-04-10T11:34:00+00:00",
        "2014-04-13T03:44:00+00:00",
        "2014-04-14T00:04:00+00:00",
    ]
    client = PrometheusClient(url=prom.url, max_points=250)  # forces 5 requests
    got = client.query_range(
        'demand_rpm{policy="elb"}',
        start=_dt(trace.timestamps[0]),
        end=_dt(trace.timestamps[-1]),
        step_s=300,
    )
    assert len(got.values) == len(expected) == 1203
    np.testing.assert_array_equal(got.values, expected)  # NaN where NaN, exact elsewhere
    assert got.end == _dt(trace.timestamps[-1] + 300)


def test_demand_source_history_ends_at_end(prom: PrometheusServer) -> None:
    trace = read_trace(KIMI)
    source = PrometheusDemandSource(
        client=PrometheusClient(url=prom.url), query='demand_rpm{policy="kimi"}', stamp="start"
    )
    end = datetime(2000, 1, 1, 0, 58, tzinfo=UTC)  # the last step [00:57, 00:58) has ended
    hist = source.history(end=end, lookback_s=20 * 60, step_s=60)
    assert hist.start == datetime(2000, 1, 1, 0, 38, tzinfo=UTC)
    assert hist.end == end
    np.testing.assert_array_equal(hist.values, trace.requests[-20:])
    # "end" stamping (rate-style queries): the sample at T describes the step before T
    shifted = PrometheusDemandSource(
        client=PrometheusClient(url=prom.url), query='demand_rpm{policy="kimi"}'
    ).history(end=end - timedelta(minutes=1), lookback_s=5 * 60, step_s=60)
    np.testing.assert_array_equal(shifted.values, trace.requests[-5:])


def test_instant_query_scalar_vector_and_empty(prom: PrometheusServer) -> None:
    trace = read_trace(KIMI)
    client = PrometheusClient(url=prom.url)
    at = _dt(trace.timestamps[10])
    assert client.query('demand_rpm{policy="kimi"}', at=at) == trace.requests[10]
    assert client.query("1 + 1") == 2.0
    assert client.query('demand_rpm{policy="nobody"}', at=at) is None
    with pytest.raises(ExternalPermanentError, match="returned 2 series"):
        client.query("demand_rpm or vector(1)", at=at)


def test_bad_query_is_permanent_with_prometheus_text(prom: PrometheusServer) -> None:
    client = PrometheusClient(url=prom.url)
    with pytest.raises(ExternalPermanentError) as info:
        client.query("sum(demand_rpm")
    assert info.value.status == 400
    assert info.value.system == "prometheus"
    assert "bad_data" in str(info.value) and "parse error" in str(info.value)
    assert "\n" not in str(info.value)


def test_prometheus_unreachable_is_temporary() -> None:
    client = PrometheusClient(url=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(ExternalTemporaryError, match="unreachable") as info:
        client.query("up")
    assert info.value.system == "prometheus"


def test_credentials_never_show_and_bad_arguments_are_usage_errors() -> None:
    client = PrometheusClient(url="http://127.0.0.1:9", bearer_token="s3cret-token")
    assert "s3cret" not in repr(client)
    with pytest.raises(UsageError, match="use http://host:port"):
        PrometheusClient(url="127.0.0.1:9090")
    with pytest.raises(UsageError, match="not both"):
        PrometheusClient(url="http://x", bearer_token="a", basic_auth=("u", "p"))


def test_factory_serves_ad_hoc_series(
    prometheus_factory: Callable[..., PrometheusServer],
) -> None:
    t0 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
    series = Series("sli_ratio", {"slo": "p99"}, [t0, t0 + 60, t0 + 180], [0.5, 0.25, 1.0])
    server = prometheus_factory([series])
    got = PrometheusClient(url=server.url).query_range(
        "sli_ratio", start=_dt(t0), end=_dt(t0 + 180), step_s=60
    )
    np.testing.assert_array_equal(got.values, [0.5, 0.25, np.nan, 1.0])
