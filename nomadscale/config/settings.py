"""Process settings.

Read from the ecosystem's own environment variables first (so an operator's shell just
works), then from ``/etc/nomadscale/nomadscale.yaml`` (or ``NOMADSCALE_CONFIG``) for anything
the environment does not set. Tokens are ``Secret`` values: never printed, logged or shown in
``repr``; ``*_TOKEN_FILE`` variables read a token from a file instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from nomadscale.config.yamlpos import YamlSyntaxError, load_yaml
from nomadscale.core.errors import ConfigError
from nomadscale.core.files import read_small_text
from nomadscale.core.logs import register_secret

DEFAULT_CONFIG = "/etc/nomadscale/nomadscale.yaml"
MAX_SETTINGS_BYTES = 256 * 1024
MAX_TOKEN_BYTES = 64 * 1024


class Secret:
    """A string that does not show itself. Use ``reveal()`` at the one place it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        # masked in every log line from now on, should it reach one (in a client library's
        # exception text, say): the redaction filter is the second line of defence
        register_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


# settings holding a URL, which may carry ``user:password@`` (a Prometheus behind basic auth)
URL_FIELDS = (
    "nomad_addr",
    "consul_addr",
    "prometheus_url",
    "gce_api_url",
    "pagerduty_api_url",
    "pagerduty_events_url",
)


def url_password(url: str | None) -> str | None:
    """The password of a ``scheme://user:password@host`` URL, if it has one."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password if url and "@" in url else None
    except ValueError:
        return None


def reveal(secret: Secret | None) -> str | None:
    return secret.reveal() if secret is not None else None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{name}: not a boolean: {value!r} (use true or false)")


@dataclass(frozen=True)
class Settings:
    """Effective settings. ``describe()`` gives a loggable view without secrets."""

    nomad_addr: str = "http://127.0.0.1:4646"
    nomad_token: Secret | None = None
    nomad_namespace: str | None = None
    nomad_region: str | None = None
    nomad_cacert: str | None = None
    nomad_client_cert: str | None = None
    nomad_client_key: str | None = None
    nomad_skip_verify: bool = False
    consul_addr: str | None = None  # None: use the in-memory KV/lock (simulate only)
    consul_token: Secret | None = None
    consul_cacert: str | None = None
    prometheus_url: str | None = None
    prometheus_cacert: str | None = None
    prometheus_token: Secret | None = None
    policies: str = "/etc/nomadscale/policies"
    runbooks: str = "/etc/nomadscale/runbooks"
    kv_prefix: str = "nomadscale"
    http_host: str = "127.0.0.1"
    http_port: int = 9464
    log_json: bool = False
    log_level: str = "INFO"
    lock_ttl_s: float = 30.0
    pagerduty_api_key: Secret | None = field(default=None)
    pagerduty_from: str | None = None
    pagerduty_api_url: str | None = None  # REST API (notes); None: https://api.pagerduty.com
    pagerduty_events_url: str | None = None  # Events API v2; None: events.pagerduty.com
    webhook_secrets: tuple[Secret, ...] = ()
    report_token: Secret | None = None
    gce_api_url: str = "https://compute.googleapis.com/compute/v1"
    config_file: str | None = None

    def describe(self) -> dict[str, Any]:
        """Every setting, with secrets shown only as set/unset."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Secret):
                out[f.name] = "<set>"
            elif isinstance(v, tuple) and v and isinstance(v[0], Secret):
                out[f.name] = f"<{len(v)} set>"
            elif f.name in URL_FIELDS and (pw := url_password(v)):
                out[f.name] = str(v).replace(f":{pw}@", ":***@", 1)
            else:
                out[f.name] = v
        return out

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# env var naming a file that holds a secret -> field
_SECRET_FILES: dict[str, str] = {
    "NOMAD_TOKEN_FILE": "nomad_token",
    "CONSUL_HTTP_TOKEN_FILE": "consul_token",
    "NOMADSCALE_PD_API_KEY_FILE": "pagerduty_api_key",
    "NOMADSCALE_REPORT_TOKEN_FILE": "report_token",
    "NOMADSCALE_PROMETHEUS_TOKEN_FILE": "prometheus_token",
}

# env var -> (field, kind)
_ENV: dict[str, tuple[str, str]] = {
    "NOMAD_ADDR": ("nomad_addr", "str"),
    "NOMAD_TOKEN": ("nomad_token", "secret"),
    "NOMAD_NAMESPACE": ("nomad_namespace", "str"),
    "NOMAD_REGION": ("nomad_region", "str"),
    "NOMAD_CACERT": ("nomad_cacert", "str"),
    "NOMAD_CLIENT_CERT": ("nomad_client_cert", "str"),
    "NOMAD_CLIENT_KEY": ("nomad_client_key", "str"),
    "NOMAD_SKIP_VERIFY": ("nomad_skip_verify", "bool"),
    "CONSUL_HTTP_ADDR": ("consul_addr", "str"),
    "CONSUL_HTTP_TOKEN": ("consul_token", "secret"),
    "CONSUL_CACERT": ("consul_cacert", "str"),
    "PROMETHEUS_URL": ("prometheus_url", "str"),
    "PROMETHEUS_CACERT": ("prometheus_cacert", "str"),
    "NOMADSCALE_PROMETHEUS_TOKEN": ("prometheus_token", "secret"),
    "NOMADSCALE_POLICIES": ("policies", "str"),
    "NOMADSCALE_RUNBOOKS": ("runbooks", "str"),
    "NOMADSCALE_KV_PREFIX": ("kv_prefix", "str"),
    "NOMADSCALE_HTTP_HOST": ("http_host", "str"),
    "NOMADSCALE_HTTP_PORT": ("http_port", "int"),
    "NOMADSCALE_LOG_JSON": ("log_json", "bool"),
    "NOMADSCALE_LOG_LEVEL": ("log_level", "str"),
    "NOMADSCALE_LOCK_TTL": ("lock_ttl_s", "duration"),
    "NOMADSCALE_PD_API_KEY": ("pagerduty_api_key", "secret"),
    "NOMADSCALE_PD_FROM": ("pagerduty_from", "str"),
    "NOMADSCALE_PD_API_URL": ("pagerduty_api_url", "str"),
    "NOMADSCALE_PD_EVENTS_URL": ("pagerduty_events_url", "str"),
    "NOMADSCALE_WEBHOOK_SECRETS": ("webhook_secrets", "secrets"),
    "NOMADSCALE_REPORT_TOKEN": ("report_token", "secret"),
    "NOMADSCALE_GCE_API_URL": ("gce_api_url", "str"),
}
_FILE_KEYS = {fld: kind for fld, kind in _ENV.values()}


def _convert(name: str, kind: str, raw: Any) -> Any:
    from nomadscale.core.durations import parse_duration

    if kind == "str":
        return str(raw)
    if kind == "secret":
        return Secret(str(raw).strip()) if str(raw).strip() else None
    if kind == "secrets":
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(Secret(str(s).strip()) for s in items if str(s).strip())
    if kind == "bool":
        return _bool(name, raw)
    if kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: not a whole number: {raw!r}") from None
    if kind == "duration":
        try:
            return parse_duration(raw).total_seconds()
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
    raise AssertionError(kind)


def _read_secret_file(name: str, path: str) -> str:
    try:
        return read_small_text(path, limit=MAX_TOKEN_BYTES).strip()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: token file {path} is not UTF-8 text") from None
    except ValueError as e:
        raise ConfigError(f"{name}: token file {path}: {e}") from None


def load_settings(
    env: Mapping[str, str] | None = None, *, config_file: str | None = None
) -> Settings:
    """Settings from the config file (if any), then the environment on top."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get("NOMADSCALE_CONFIG")
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    if os.path.exists(path):
        try:
            doc = load_yaml(read_small_text(path, limit=MAX_SETTINGS_BYTES)).data or {}
        except YamlSyntaxError as e:
            where = f"{path}:{e.line}" if e.line else path
            raise ConfigError(f"{where}: not valid YAML: {e.message}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: top level must be a mapping of setting: value")
        for key, raw in doc.items():
            if key not in _FILE_KEYS:
                name = key if isinstance(key, str) and key.isidentifier() else repr(key)[:60]
                raise ConfigError(f"{path}: {name}: unknown setting")
            values[key] = _convert(f"{path}: {key}", _FILE_KEYS[key], raw)
        values["config_file"] = path
    elif explicit:
        raise ConfigError(f"{path}: settings file not found")
    from_env: set[str] = set()
    for var, (fld, kind) in _ENV.items():
        if var in env:
            values[fld] = _convert(var, kind, env[var])
            from_env.add(fld)
    # the environment wins over the settings file, its *_FILE variables too; the variable
    # itself wins over its *_FILE
    for var, fld in _SECRET_FILES.items():
        if var in env and fld not in from_env:
            values[fld] = Secret(_read_secret_file(var, env[var]))
    for fld in URL_FIELDS:
        # client libraries repeat their URL in error texts: mask its password in any log line
        pw = url_password(values.get(fld))
        if pw:
            from urllib.parse import unquote

            register_secret(pw)
            register_secret(unquote(pw))
    return Settings(**values)
