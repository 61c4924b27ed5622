"""A standby's wait on the leader lock key: a Consul blocking query.

A standby tries the lock on every renewal tick; with a blocking query on the lock key it
also tries the moment the key changes, so it takes over as soon as Consul frees the key
(the dead leader's session is invalidated 2 x TTL after its last renewal, then the lock
delay) instead of up to one tick later.
"""

from __future__ import annotations

import logging
from typing import Protocol

import consul
import requests

from nomadscale.core.errors import ExternalTemporaryError

log = logging.getLogger(__name__)


class LockWatch(Protocol):
    def wait(self, index: int, *, timeout_s: float) -> tuple[int, bool]:
        """Block until the lock key changes past ``index`` (or ``timeout_s``); return the new
        index and whether the lock is free (no session holds the key)."""
        ...


class ConsulKeyWatch:
    """``LockWatch`` over Consul's blocking queries (``GET /v1/kv/<key>?index=&wait=``)."""

    def __init__(
        self, *, addr: str, key: str, token: str | None = None, cacert: str | None = None
    ) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(addr if "://" in addr else f"http://{addr}")
        self.key = key.lstrip("/")
        self.addr = f"{u.scheme}://{u.hostname}:{u.port or 8500}"
        self._client = consul.Consul(
            host=u.hostname or "127.0.0.1",
            port=u.port or 8500,
            scheme=u.scheme or "http",
            verify=cacert if cacert else True,
            connections_timeout=15.0,
        )
        self._client.token = token

    def __repr__(self) -> str:
        return f"ConsulKeyWatch(addr={self.addr!r}, key={self.key!r})"

    def wait(self, index: int, *, timeout_s: float) -> tuple[int, bool]:
        wait = f"{min(10, max(1, round(timeout_s)))}s"  # under the 15 s HTTP timeout
        try:
            new, data = self._client.kv.get(self.key, index=index or None, wait=wait)
        except (requests.exceptions.RequestException, consul.ConsulException) as e:
            raise ExternalTemporaryError(
                f"consul lock watch {self.key!r}: {type(e).__name__}", system="consul"
            ) from None
        new_index = int(new or 0)
        if new_index < index:  # Consul's index went back (snapshot restore): start over
            new_index = 0
        return new_index, not data or not data.get("Session")
