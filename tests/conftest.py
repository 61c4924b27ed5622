"""Shared pytest setup. Fixtures live in tests/harness/ modules, loaded as plugins here."""

import pytest

pytest_plugins = [
    "tests.harness.services",  # real Consul and Prometheus processes
    "tests.harness.twin",  # the Nomad twin over real HTTP
]


@pytest.fixture(autouse=True)
def _no_real_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never talk to whatever cluster the developer's shell points at."""
    for var in (
        "NOMAD_ADDR",
        "NOMAD_TOKEN",
        "NOMAD_NAMESPACE",
        "NOMAD_REGION",
        "NOMAD_CACERT",
        "NOMAD_CLIENT_CERT",
        "NOMAD_CLIENT_KEY",
        "NOMAD_SKIP_VERIFY",
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_CACERT",
        "PROMETHEUS_URL",
    ):
        monkeypatch.delenv(var, raising=False)
