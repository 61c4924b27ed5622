"""TLS to Nomad: the twin served over HTTPS with a test CA; NomadClient trusts the right CA,
refuses a wrong one with a clear error, honours NOMAD_SKIP_VERIFY, and presents its client
certificate when the server demands one (mutual TLS, as Nomad's verify_https_client)."""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from urllib3.exceptions import InsecureRequestWarning

from nomadscale.config.settings import load_settings
from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import ExternalError
from nomadscale.integrations.nomad import NomadClient
from nomadscale.sim import Cluster, TwinServer
from tests.security.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_ctx(pki: Pki, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    return ctx


def _twin(pki: Pki, *, require_client: bool) -> Iterator[TwinServer]:
    cluster = Cluster.build(nodes=2, clock=FakeClock())
    server = TwinServer(cluster, ssl_context=_server_ctx(pki, require_client=require_client))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def https_twin(pki: Pki) -> Iterator[TwinServer]:
    yield from _twin(pki, require_client=False)


@pytest.fixture(scope="module")
def mtls_twin(pki: Pki) -> Iterator[TwinServer]:
    yield from _twin(pki, require_client=True)


def _client(address: str, **kw: object) -> NomadClient:
    return NomadClient(address=address, clock=FakeClock(), max_retries=1, timeout=5, **kw)  # type: ignore[arg-type]


def test_twin_serves_https(https_twin: TwinServer) -> None:
    assert https_twin.address.startswith("https://127.0.0.1:")


def test_right_ca_works(https_twin: TwinServer, pki: Pki) -> None:
    with _client(https_twin.address, cacert=str(pki.ca)) as c:
        assert len(c.list_nodes()) == 2


def test_wrong_ca_is_refused(https_twin: TwinServer, pki: Pki) -> None:
    with (
        _client(https_twin.address, cacert=str(pki.other_ca)) as c,
        pytest.raises(ExternalError) as info,
    ):
        c.list_nodes()
    assert "\n" not in str(info.value)
    assert https_twin.address in str(info.value)


def test_system_trust_store_does_not_trust_the_test_ca(https_twin: TwinServer) -> None:
    with _client(https_twin.address) as c, pytest.raises(ExternalError):
        c.list_nodes()


def test_wrong_ca_error_says_tls_and_is_permanent(https_twin: TwinServer, pki: Pki) -> None:
    clock, token = FakeClock(), "0b1c2d3e-tls-test-token"
    client = NomadClient(
        address=https_twin.address, clock=clock, max_retries=4, timeout=5,
        cacert=str(pki.other_ca), token=token,
    )  # fmt: skip
    with (
        client as c,
        pytest.raises(ExternalError) as info,
    ):
        c.list_nodes()
    text = str(info.value)
    assert "certificate" in text.lower() or "tls" in text.lower()
    assert "\n" not in text and token not in text
    assert info.value.permanent and info.value.system == "nomad"
    assert clock.sleeps == []  # a wrong CA does not fix itself: not retried


def test_skip_verify_from_env_is_honoured(
    https_twin: TwinServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        "NOMAD_ADDR": https_twin.address,
        "NOMAD_SKIP_VERIFY": "true",
        "NOMADSCALE_CONFIG": str(tmp_path / "none.yaml"),
    }
    (tmp_path / "none.yaml").write_text("{}\n")
    settings = load_settings(env)
    assert settings.nomad_skip_verify is True
    # urllib3 warns on every unverified request; the operator asked for it (see report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRequestWarning)
        with NomadClient.from_settings(settings, clock=FakeClock()) as c:
            assert len(c.list_nodes()) == 2


def test_cacert_from_env_is_used(https_twin: TwinServer, pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "none.yaml").write_text("{}\n")
    env = {
        "NOMAD_ADDR": https_twin.address,
        "NOMAD_CACERT": str(pki.ca),
        "NOMADSCALE_CONFIG": str(tmp_path / "none.yaml"),
    }
    with NomadClient.from_settings(load_settings(env), clock=FakeClock()) as c:
        assert len(c.list_nodes()) == 2


def test_client_cert_required_by_server(mtls_twin: TwinServer, pki: Pki) -> None:
    with _client(mtls_twin.address, cacert=str(pki.ca)) as c, pytest.raises(ExternalError) as info:
        c.list_nodes()
    assert "\n" not in str(info.value)
    with _client(
        mtls_twin.address,
        cacert=str(pki.ca),
        client_cert=str(pki.client_cert),
        client_key=str(pki.client_key),
    ) as c:
        assert len(c.list_nodes()) == 2
