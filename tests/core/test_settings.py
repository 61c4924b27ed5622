"""Settings come from the operator's usual environment variables, then the config file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nomadscale.config.settings import Secret, load_settings
from nomadscale.core.errors import ConfigError
from nomadscale.core.logs import redact, register_secret, setup_logging


def test_ecosystem_variables_are_read(tmp_path: Path) -> None:
    env = {
        "NOMAD_ADDR": "https://nomad.example:4646",
        "NOMAD_TOKEN": "nomad-secret-token-1",
        "NOMAD_NAMESPACE": "ekyc",
        "NOMAD_REGION": "asia",
        "NOMAD_CACERT": "/etc/ca.pem",
        "NOMAD_CLIENT_CERT": "/etc/cli.pem",
        "NOMAD_CLIENT_KEY": "/etc/cli-key.pem",
        "NOMAD_SKIP_VERIFY": "true",
        "CONSUL_HTTP_ADDR": "http://127.0.0.1:8500",
        "CONSUL_HTTP_TOKEN": "consul-secret-token-2",
        "CONSUL_CACERT": "/etc/consul-ca.pem",
        "PROMETHEUS_URL": "http://prom:9090",
        "NOMADSCALE_CONFIG": str(tmp_path / "absent.yaml"),
    }
    with pytest.raises(ConfigError, match=r"absent\.yaml: settings file not found"):
        load_settings(env)
    del env["NOMADSCALE_CONFIG"]
    s = load_settings(env, config_file=None)
    assert s.nomad_addr == "https://nomad.example:4646"
    assert s.nomad_namespace == "ekyc" and s.nomad_region == "asia"
    assert s.nomad_cacert == "/etc/ca.pem" and s.nomad_client_key == "/etc/cli-key.pem"
    assert s.nomad_skip_verify is True
    assert s.nomad_token is not None and s.nomad_token.reveal() == "nomad-secret-token-1"
    assert s.consul_token is not None and s.consul_token.reveal() == "consul-secret-token-2"
    assert s.prometheus_url == "http://prom:9090"


def test_tokens_never_show_in_repr_str_or_describe() -> None:
    s = load_settings({"NOMAD_TOKEN": "tok-AAAA-1111", "CONSUL_HTTP_TOKEN": "tok-BBBB-2222"})
    for text in (repr(s), str(s), str(s.describe())):
        assert "tok-AAAA-1111" not in text and "tok-BBBB-2222" not in text
    assert s.describe()["nomad_token"] == "<set>"
    assert repr(Secret("x")) == "Secret('***')"


def test_config_file_then_env_on_top(tmp_path: Path) -> None:
    cfg = tmp_path / "nomadscale.yaml"
    cfg.write_text("nomad_addr: http://from-file:4646\nprometheus_url: http://p:9090\n")
    s = load_settings({"NOMAD_ADDR": "http://from-env:4646"}, config_file=str(cfg))
    assert s.nomad_addr == "http://from-env:4646"
    assert s.prometheus_url == "http://p:9090"
    assert s.config_file == str(cfg)


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("file-token-XYZ\n")
    s = load_settings({"NOMAD_TOKEN_FILE": str(f)})
    assert s.nomad_token is not None and s.nomad_token.reveal() == "file-token-XYZ"
    with pytest.raises(ConfigError, match="NOMAD_TOKEN_FILE: cannot read token file"):
        load_settings({"NOMAD_TOKEN_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NOMAD_SKIP_VERIFY": "maybe"}, "NOMAD_SKIP_VERIFY: not a boolean: 'maybe'"),
        ({"NOMADSCALE_HTTP_PORT": "http"}, "NOMADSCALE_HTTP_PORT: not a whole number"),
        ({"NOMADSCALE_LOCK_TTL": "soon"}, "NOMADSCALE_LOCK_TTL: not a duration"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("nomad_adr: http://x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: nomad_adr: unknown setting"):
        load_settings({}, config_file=str(cfg))
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings({}, config_file=str(cfg))


def test_registered_secrets_are_masked_in_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    register_secret("very-secret-value-42")
    assert redact("token=very-secret-value-42 end") == "token=*** end"
    setup_logging(level="INFO", json_logs=True)
    logging.getLogger("nomadscale.test").warning("client said %s", "bad very-secret-value-42")
    err = capsys.readouterr().err
    assert "very-secret-value-42" not in err and "bad ***" in err
