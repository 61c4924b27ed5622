"""GceMigPool when Compute Engine misbehaves: rate limits and server errors (with the
``Retry-After`` forms RFC 9110 allows), zone operations that end in error or never finish.
Real HTTP: the twin's Compute endpoint behind the chaos suite's loopback fault proxy; the
waits run on a FakeClock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from google.auth.credentials import AnonymousCredentials

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ExternalPermanentError, ExternalTemporaryError
from nomadscale.integrations.gce import GceMigPool, retry_after_s
from nomadscale.sim.cluster import Cluster
from nomadscale.sim.compute import ComputeServer, ComputeSim
from tests.chaos.helpers import GceFaults

MIG_A = "/zones/zone-a/instanceGroupManagers/mig-a"
Gce = tuple[ComputeSim, GceFaults, GceMigPool, FakeClock]


@pytest.fixture
def gce() -> Iterator[Gce]:
    clock = FakeClock(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))
    cluster = Cluster.build(nodes=4, zones=("zone-a", "zone-b"), node_pool="gpu", clock=clock)
    sim = ComputeSim(cluster, project="proj")
    sim.add_mig(name="mig-a", zone="zone-a", node_pool="gpu")
    with ComputeServer(sim) as server, GceFaults(server.base_url) as faults:
        pool = GceMigPool(project="proj", credentials=AnonymousCredentials(),
                          base_url=faults.base_url, clock=clock, poll_s=2,
                          operation_timeout_s=60)  # fmt: skip
        yield sim, faults, pool, clock


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    assert retry_after_s("7", now=now) == 7.0
    assert retry_after_s("Mon, 05 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert retry_after_s("Mon, 05 Jan 2026 11:00:00 GMT", now=now) == 0.0  # past: at once
    assert retry_after_s("soon", now=now) == 5.0 and retry_after_s(None, now=now) == 5.0


def test_a_429_with_a_date_is_waited_out_then_the_read_succeeds(gce: Gce) -> None:
    _sim, faults, pool, clock = gce
    faults.fail(f"^GET .*{MIG_A}$", 429, times=2,
                headers={"Retry-After": "Mon, 05 Jan 2026 12:00:20 GMT"})  # fmt: skip
    t0 = clock.monotonic()
    assert pool.size("mig-a", zone="zone-a") == 2
    assert 20.0 <= clock.monotonic() - t0 <= 21.0  # the first wait; the second date had passed


def test_server_errors_are_retried_a_bounded_number_of_times(gce: Gce) -> None:
    _sim, faults, pool, _clock = gce
    faults.fail(f"^GET .*{MIG_A}$", 503, times=None)
    with pytest.raises(ExternalTemporaryError, match="gce: get zone-a/mig-a: HTTP 503"):
        pool.size("mig-a", zone="zone-a")
    assert len([s for s in faults.seen if s.startswith("GET")]) == 3


def test_a_delete_answered_503_is_not_repeated_blindly(gce: Gce) -> None:
    sim, faults, pool, _clock = gce
    name = sorted(sim.migs[("zone-a", "mig-a")].instances)[0]
    faults.fail(f"^POST .*{MIG_A}/deleteInstances$", 503, times=None)
    with pytest.raises(ExternalTemporaryError, match="HTTP 503"):
        pool.delete_instances("mig-a", [name], zone="zone-a")
    assert len([s for s in faults.seen if s.endswith("deleteInstances")]) == 1
    faults.clear()
    faults.fail(f"^POST .*{MIG_A}/deleteInstances$", 429, times=1)  # not processed: retried
    pool.delete_instances("mig-a", [name], zone="zone-a")
    assert name not in sim.migs[("zone-a", "mig-a")].instances


def test_operations_that_fail_or_never_finish_are_one_line_errors(gce: Gce) -> None:
    _sim, faults, pool, clock = gce
    faults.operation(f"^POST .*{MIG_A}/resize$", ends="error", forward=False)
    with pytest.raises(ExternalPermanentError, match=r"^gce: resize zone-a/mig-a to 3: "
                       r"simulated operation error$"):  # fmt: skip
        pool.resize("mig-a", 3, zone="zone-a")
    faults.operation(f"^POST .*{MIG_A}/resize$", ends="never")
    t0 = clock.monotonic()
    with pytest.raises(ExternalTemporaryError, match="not done after 60s"):
        pool.resize("mig-a", 3, zone="zone-a")
    assert 60.0 <= clock.monotonic() - t0 <= 64.0
