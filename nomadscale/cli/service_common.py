"""Shared by the service commands: settings, policies by name or file, and Consul KV."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nomadscale.config.policy import Policy, load_policies, load_policy
from nomadscale.config.settings import Settings, load_settings
from nomadscale.core.errors import UsageError
from nomadscale.core.ports import KVPort

if TYPE_CHECKING:
    from nomadscale.integrations.consul import LockHolder


def get_settings() -> Settings:
    return load_settings()


def policies_for(settings: Settings, files: tuple[str, ...] = ()) -> list[Policy]:
    if files:
        return [load_policy(f) for f in files]
    return load_policies([settings.policies])


def find_policy(settings: Settings, name_or_file: str) -> Policy:
    if name_or_file.endswith((".yaml", ".yml")) and Path(name_or_file).is_file():
        return load_policy(name_or_file)
    found = {p.name: p for p in policies_for(settings)}
    if name_or_file not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UsageError(f"policy {name_or_file!r}: not found in {settings.policies} ({known})")
    return found[name_or_file]


def consul_kv(settings: Settings) -> KVPort:
    if not settings.consul_addr:
        raise UsageError("CONSUL_HTTP_ADDR: not set (manual control state lives in Consul KV)")
    from nomadscale.integrations.consul import ConsulKV

    token = settings.consul_token.reveal() if settings.consul_token else None
    return ConsulKV(addr=settings.consul_addr, token=token, cacert=settings.consul_cacert)


def lock_holder(settings: Settings) -> LockHolder | None:
    """Who holds the leader lock now: None when no session holds the key (a released or
    expired lock keeps its last holder's name as the key's value)."""
    if not settings.consul_addr:
        raise UsageError("CONSUL_HTTP_ADDR: not set (the leader lock lives in Consul)")
    from nomadscale.integrations.consul import ConsulLock
    from nomadscale.service.runtime import lock_key

    token = settings.consul_token.reveal() if settings.consul_token else None
    lock = ConsulLock(addr=settings.consul_addr, key=lock_key(settings), token=token,
                      cacert=settings.consul_cacert)  # fmt: skip
    return lock.leader()
