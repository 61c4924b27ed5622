"""The maintenance watcher against a loopback metadata server (hanging GET + ETag) and a
loopback nomadscale report endpoint (the real starlette routes would do; a plain recorder here
keeps the watcher's own contract in view)."""

import threading
from collections.abc import Iterator
from datetime import datetime

import pytest

from nomadscale.config.settings import Secret
from nomadscale.core.clock import FakeClock
from nomadscale.healing.watcher import MaintenanceWatcher
from nomadscale.integrations.gce_metadata import MetadataClient
from tests.harness.gce_metadata_server import MetadataServer
from tests.healing.sinks import ReportSink


@pytest.fixture()
def md() -> Iterator[MetadataServer]:
    s = MetadataServer(hang_s=2.0).start()
    yield s
    s.stop()


def test_notice_after_503_is_reported(md: MetadataServer) -> None:
    sink = ReportSink("tok", fail_first=1)
    clock = FakeClock()
    w = MaintenanceWatcher(
        metadata=MetadataClient(base_url=md.url, hang_timeout_s=5),
        report_url=sink.url,
        token=Secret("tok"),
        node="gpu-zone-a-0000",
        clock=clock,
    )
    md.fail_next(503, 2)  # the metadata server is briefly unavailable
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    with md.cond:  # the watcher got through the 503s and is hanging on the current ETag
        assert md.cond.wait_for(
            lambda: (
                sum(1 for r in md.requests if r["query"].get("last_etag") not in (None, "0")) >= 1
            ),
            timeout=5,
        )
    md.set_event("TERMINATE_ON_HOST_MAINTENANCE")
    assert sink.got.wait(5)
    w.stop()
    md.set_event("NONE")  # wake the hanging GET so the thread ends
    t.join(5)
    w.close()
    sink.stop()
    (report,) = sink.reports
    assert report["node"] == "gpu-zone-a-0000"
    assert report["event"] == "TERMINATE_ON_HOST_MAINTENANCE"
    assert (datetime.fromisoformat(report["deadline"]) - clock.now()).total_seconds() <= 3600
    assert all(r["flavor"] == "Google" for r in md.requests)
    assert all(r["query"].get("wait_for_change") == "true" for r in md.requests)
    # backoff on the injected clock: two metadata 503s, one report 503
    assert clock.sleeps[:3] == [1.0, 2.0, 1.0]


def test_connection_errors_back_off() -> None:
    clock = FakeClock()
    w = MaintenanceWatcher(
        metadata=MetadataClient(base_url="http://127.0.0.1:9/computeMetadata/v1"),
        report_url="http://127.0.0.1:9/maintenance/report",
        token=Secret("tok"),
        node="n1",
        clock=clock,
        backoff_max_s=8,
    )
    w.run(max_polls=6)
    w.close()
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert w.reports == []
