"""NomadClient error translation and retries against the twin's fault injection (real HTTP)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from nomadscale.config.settings import Secret, Settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import (
    ConfigError,
    ExternalPermanentError,
    ExternalTemporaryError,
    NotFoundError,
)
from nomadscale.integrations.nomad import NomadClient
from tests.contract.env import Target, service_job, settle, twin_target, unique

TOKEN = "s3cr3t-4cl-t0ken-0123456789"


@pytest.fixture
def target() -> Iterator[Target]:
    with twin_target(nodes=4) as t:
        yield t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(target: Target, clock: FakeClock) -> Iterator[NomadClient]:
    c = NomadClient(address=target.address, clock=clock, timeout=2.0, max_retries=3)
    yield c
    c.close()


def _faults(target: Target) -> object:
    assert target.cluster is not None
    return target.cluster.faults


def test_get_retried_through_500s_then_succeeds(
    client: NomadClient, target: Target, clock: FakeClock
) -> None:
    target.cluster.faults.fail("^GET /v1/nodes$", status=500, times=2)  # type: ignore[union-attr]
    nodes = client.list_nodes()
    assert len(nodes) == 4
    assert len(clock.sleeps) == 2  # backoff went through the injected clock
    assert 0.25 <= clock.sleeps[0] <= 0.5 < clock.sleeps[1] <= 1.0  # exponential + jitter


def test_get_gives_up_after_max_retries(
    client: NomadClient, target: Target, clock: FakeClock
) -> None:
    target.cluster.faults.fail("^GET /v1/nodes$", status=503)  # type: ignore[union-attr]
    with pytest.raises(ExternalTemporaryError) as err:
        client.list_nodes()
    assert err.value.status == 503
    assert err.value.system == "nomad"
    assert len(clock.sleeps) == 2  # 3 attempts
    assert "simulated failure" in str(err.value)


def test_post_scale_500_is_not_retried(
    client: NomadClient, target: Target, clock: FakeClock
) -> None:
    jid = unique("ml")
    client.register_job(service_job(jid))
    settle(client, target, jid)
    cluster = target.cluster
    assert cluster is not None
    cluster.faults.fail("^POST /v1/job/.*/scale$", status=500, times=1)
    with pytest.raises(ExternalTemporaryError) as err:
        client.scale(jid, "ml-worker-a", 2, message="up")
    assert err.value.status == 500
    assert clock.sleeps == []
    assert sum("/scale" in h for h in cluster.faults.hits) == 1
    assert client.get_job(jid).groups["ml-worker-a"] == 1  # nothing happened
    client.scale(jid, "ml-worker-a", 2, message="up")  # the fault was one-shot
    assert client.get_job(jid).groups["ml-worker-a"] == 2


def test_dropped_connection_on_get_is_retried(
    client: NomadClient, target: Target, clock: FakeClock
) -> None:
    target.cluster.faults.drop("^GET /v1/node/", times=1)  # type: ignore[union-attr]
    node_id = client.list_nodes()[0].id
    assert client.node(node_id).id == node_id
    assert len(clock.sleeps) == 1


def test_dropped_connection_on_post_is_temporary(client: NomadClient, target: Target) -> None:
    node_id = client.list_nodes()[0].id
    target.cluster.faults.drop("^POST /v1/node/.*/drain", times=1)  # type: ignore[union-attr]
    with pytest.raises(ExternalTemporaryError) as err:
        client.drain(node_id, deadline_s=60)
    assert err.value.status is None
    assert "connection failed" in str(err.value)


def test_latency_beyond_timeout_is_a_temporary_timeout(target: Target) -> None:
    client = NomadClient(address=target.address, clock=FakeClock(), timeout=0.3, max_retries=1)
    target.cluster.faults.latency("^GET /v1/status/leader", 1.0)  # type: ignore[union-attr]
    with pytest.raises(ExternalTemporaryError) as err:
        client.leader()
    assert "timed out" in str(err.value)
    client.close()


def test_no_leader_is_temporary(client: NomadClient, target: Target) -> None:
    target.cluster.faults.no_leader(True)  # type: ignore[union-attr]
    with pytest.raises(ExternalTemporaryError) as err:
        client.leader()
    assert "No cluster leader" in str(err.value)
    target.cluster.faults.no_leader(False)  # type: ignore[union-attr]
    assert client.leader()


def test_connection_refused_is_temporary(clock: FakeClock) -> None:
    client = NomadClient(address="http://127.0.0.1:9", clock=clock, timeout=1.0)
    with pytest.raises(ExternalTemporaryError):
        client.list_nodes()
    assert len(clock.sleeps) == 2


def test_known_500_texts_are_permanent(client: NomadClient, target: Target) -> None:
    node = client.list_nodes()[0]
    target.cluster.faults.fail(  # type: ignore[union-attr]
        "^GET /v1/node/", status=500, message="node not found", times=5
    )
    with pytest.raises(NotFoundError):
        client.node(node.id)
    assert sum("GET /v1/node/" in h for h in target.cluster.faults.hits) == 1  # type: ignore[union-attr]


def test_wrong_token_is_403_and_never_leaks() -> None:
    with twin_target(nodes=2, acl_token="the-right-management-token") as t:
        ok = NomadClient(address=t.address, token="the-right-management-token", clock=FakeClock())
        assert len(ok.list_nodes()) == 2
        bad = NomadClient(address=t.address, token=TOKEN, clock=FakeClock())
        with pytest.raises(ExternalPermanentError) as err:
            bad.list_nodes()
        assert err.value.status == 403
        assert TOKEN not in str(err.value)
        assert TOKEN not in repr(err.value)
        assert TOKEN not in repr(bad)
        assert "token=***" in repr(bad)
        ok.close()
        bad.close()


def test_token_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    with twin_target(nodes=2, acl_token=TOKEN) as t:
        t.cluster.faults.fail("^GET /v1/nodes$", status=500, times=1)  # type: ignore[union-attr]
        c = NomadClient(address=t.address, token=TOKEN, clock=FakeClock())
        with caplog.at_level(logging.DEBUG):
            c.list_nodes()
        assert caplog.records  # the retry was logged
        assert TOKEN not in caplog.text
        c.close()


def test_from_settings_reveals_the_secret() -> None:
    with twin_target(nodes=2, acl_token=TOKEN) as t:
        settings = Settings(nomad_addr=t.address, nomad_token=Secret(TOKEN))
        c = NomadClient.from_settings(settings, clock=FakeClock())
        assert len(c.list_nodes()) == 2
        assert TOKEN not in repr(c)
        c.close()


def test_half_a_client_certificate_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        NomadClient(address="https://nomad:4646", client_cert="/tmp/c.pem")
    assert "client_key" in str(err.value)
