"""Consul KV and the leader lock (py-consul), plus store-independent KV helpers.

* ``ConsulKV``: ``core.ports.KVPort`` over ``/v1/kv`` with check-and-set.
* ``ConsulLock``: ``core.ports.LockPort`` the Patroni way: one TTL session, the lock key taken
  with ``?acquire=<session>``, value = JSON identity of the holder. ``acquire()`` renews the
  session (recreating it when Consul invalidated it) and takes or keeps the key; ``held()`` is
  the fencing check (reads the key now and compares its Session with ours).
* ``update_json(kv, key, fn, retries=...)``: a read-modify-CAS-write loop over any KVPort.
* ``validate_timing(...)``: refuse lock timings where a renewal cannot land inside the TTL.

Errors: connection/timeout/5xx/429 -> ExternalTemporaryError(system="consul"); 401/403 ->
ExternalPermanentError; 400 -> ExternalPermanentError; TLS verification -> permanent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import consul
import requests
from consul.callback import CB

from nomadscale.core.errors import (
    ConfigError,
    ConflictError,
    ExternalPermanentError,
    ExternalTemporaryError,
    InputError,
    NotFoundError,
    UsageError,
)
from nomadscale.core.ports import KVEntry, KVPort

log = logging.getLogger(__name__)
SYSTEM = "consul"
T = TypeVar("T")


def _parse_addr(addr: str) -> tuple[str, str, int]:
    text = addr.strip()
    if "//" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"consul address {addr!r}: use http://host:port or https://host:port")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8500)
    except ValueError:
        raise UsageError(f"consul address {addr!r}: the port is not a number") from None
    return parts.scheme, parts.hostname, port


def _status_of(text: str) -> int | None:
    m = re.match(r"\s*(\d{3})\b", text)
    return int(m.group(1)) if m else None


def _short(text: str, limit: int = 200) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


class _ConsulBase:
    """Client construction and error translation shared by ConsulKV and ConsulLock."""

    def __init__(
        self,
        *,
        addr: str,
        token: str | None = None,
        cacert: str | None = None,
        verify: bool = True,
        timeout: float = 5.0,
    ) -> None:
        scheme, host, port = _parse_addr(addr)
        if cacert is not None and not os.path.isfile(cacert):
            raise UsageError(f"consul cacert {cacert!r}: no such file")
        self.addr = f"{scheme}://{host}:{port}"
        self.timeout = float(timeout)
        tls_verify: bool | str = cacert if (verify and cacert) else verify
        self._client = consul.Consul(
            host=host,
            port=port,
            scheme=scheme,
            verify=tls_verify,
            connections_timeout=self.timeout,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override the argument; the caller decides here.
        self._client.token = token

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}(addr={self.addr!r})"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except requests.exceptions.SSLError as exc:
            raise ExternalPermanentError(
                f"consul {what}: TLS error talking to {self.addr} ({_short(str(exc), 120)})",
                system=SYSTEM,
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            timed_out = isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc)
            kind = "timed out" if timed_out else "unreachable"
            raise ExternalTemporaryError(
                f"consul {what}: {self.addr} {kind}", system=SYSTEM, retry_after=2.0
            ) from None
        except consul.ACLPermissionDenied as exc:
            raise ExternalPermanentError(
                f"consul {what}: permission denied (check the token's ACL policy): "
                f"{_short(str(exc))}",
                system=SYSTEM,
                status=403,
            ) from None
        except consul.ACLDisabled as exc:
            raise ExternalPermanentError(
                f"consul {what}: unauthorized: {_short(str(exc))}", system=SYSTEM, status=401
            ) from None
        except consul.NotFound as exc:
            raise NotFoundError(
                f"consul {what}: not found: {_short(str(exc))}", system=SYSTEM, status=404
            ) from None
        except consul.ConsulException as exc:
            text = str(exc)
            status = _status_of(text)
            if status is not None and 400 <= status < 500 and status != 429:
                raise ExternalPermanentError(
                    f"consul {what}: {_short(text)}", system=SYSTEM, status=status
                ) from None
            raise ExternalTemporaryError(
                f"consul {what}: {_short(text)}", system=SYSTEM, status=status, retry_after=2.0
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ExternalTemporaryError(
                f"consul {what}: {_short(str(exc))}", system=SYSTEM
            ) from None


def _check_key(key: str) -> str:
    k = key.lstrip("/")
    if not k:
        raise InputError("consul key must not be empty")
    return k


class ConsulKV(_ConsulBase):
    """``KVPort`` over Consul's KV store. Values are bytes; ``modify_index`` is ModifyIndex."""

    def get(self, key: str) -> KVEntry | None:
        k = _check_key(key)
        _, data = self._call(f"kv get {k!r}", lambda: self._client.kv.get(k))
        if data is None:
            return None
        return KVEntry(
            key=data["Key"], value=data.get("Value") or b"", modify_index=data["ModifyIndex"]
        )

    def get_raw(self, key: str) -> dict[str, Any] | None:
        """The full Consul entry (with ``Session`` when locked); values stay bytes."""
        k = _check_key(key)
        _, data = self._call(f"kv get {k!r}", lambda: self._client.kv.get(k))
        return data

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        k = _check_key(key)
        return bool(self._call(f"kv put {k!r}", lambda: self._client.kv.put(k, value, cas=cas)))

    def delete(self, key: str, *, cas: int | None = None) -> bool:
        k = _check_key(key)
        return bool(self._call(f"kv delete {k!r}", lambda: self._client.kv.delete(k, cas=cas)))

    def list(self, prefix: str) -> list[KVEntry]:
        p = prefix.lstrip("/")
        _, data = self._call(f"kv list {p!r}", lambda: self._client.kv.get(p, recurse=True))
        return [
            KVEntry(key=d["Key"], value=d.get("Value") or b"", modify_index=d["ModifyIndex"])
            for d in (data or [])
        ]


# --- JSON documents with CAS -------------------------------------------------------------


def update_json(
    kv: KVPort,
    key: str,
    fn: Callable[[Any], Any],
    *,
    retries: int = 20,
    default: Any = None,
) -> Any:
    """Read the JSON document at ``key`` (``default`` when absent), write ``fn(old)`` back with
    check-and-set, retrying on a lost race. ``fn`` must be pure (it may run several times) and
    must not mutate ``old``. Returns the value written. ConflictError after ``retries`` losses;
    InputError when the stored value is not JSON."""
    for _ in range(max(1, retries)):
        entry = kv.get(key)
        if entry is None or entry.value == b"":
            old, index = default, (0 if entry is None else entry.modify_index)
        else:
            try:
                old = json.loads(entry.value)
            except (ValueError, UnicodeDecodeError):
                raise InputError(f"kv {key!r} does not hold a JSON document") from None
            index = entry.modify_index
        new = fn(old)
        data = json.dumps(new, sort_keys=True, separators=(",", ":")).encode()
        if kv.put(key, data, cas=index):
            return new
        log.debug("update_json %s: lost the CAS race at index %s, retrying", key, index)
    raise ConflictError(
        f"kv {key!r}: gave up after {retries} concurrent-update conflicts", system="kv"
    )


# --- leader lock -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds (or wants) the leader lock; stored as the lock key's JSON value."""

    host: str
    pid: int
    started_at: str  # ISO-8601 UTC
    session: str = ""  # the holder's session id (filled in when read back)

    @staticmethod
    def me(started_at: datetime | None = None) -> LockHolder:
        when = (started_at or datetime.now(UTC)).astimezone(UTC).isoformat()
        return LockHolder(host=socket.gethostname(), pid=os.getpid(), started_at=when)

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("session")
        return json.dumps(d, sort_keys=True).encode()

    @staticmethod
    def from_json(value: bytes, *, session: str = "") -> LockHolder:
        try:
            d = json.loads(value or b"{}")
            return LockHolder(
                host=str(d.get("host", "?")),
                pid=int(d.get("pid", 0)),
                started_at=str(d.get("started_at", "")),
                session=session,
            )
        except (ValueError, TypeError, AttributeError):
            return LockHolder(host="?", pid=0, started_at="", session=session)

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} (since {self.started_at})"


def validate_timing(
    *,
    ttl_s: float,
    renew_every_s: float,
    timeout_s: float = 5.0,
    cycle_s: float | None = None,
    min_ttl_s: float = 10.0,
) -> None:
    """Raise ConfigError (listing every problem) when the lock timing cannot keep the lock.

    Rules (Patroni's): ``min_ttl_s <= ttl_s <= 86400``; ``renew_every_s + 2 * timeout_s <=
    ttl_s`` so a renewal that starts late and hits one timeout still lands inside the TTL;
    ``renew_every_s <= ttl_s / 2``. With ``cycle_s`` (when renewal is only done by the cycle
    itself) the cycle must obey the same rule as ``renew_every_s``."""
    errors: list[str] = []
    if not min_ttl_s <= ttl_s <= 86400:
        errors.append(f"lock ttl {ttl_s:g}s: must be between {min_ttl_s:g}s and 86400s")
    if renew_every_s <= 0:
        errors.append("lock renew interval must be positive")
    if timeout_s <= 0:
        errors.append("consul timeout must be positive")
    if renew_every_s > ttl_s / 2:
        errors.append(
            f"lock renew every {renew_every_s:g}s: must be at most half the ttl ({ttl_s / 2:g}s)"
        )
    if renew_every_s + 2 * timeout_s > ttl_s:
        errors.append(
            f"lock renew every {renew_every_s:g}s + 2 x timeout {timeout_s:g}s exceeds the ttl "
            f"{ttl_s:g}s: the session could expire while a renewal is retried"
        )
    if cycle_s is not None and cycle_s + 2 * timeout_s > ttl_s:
        errors.append(
            f"cycle {cycle_s:g}s + 2 x timeout {timeout_s:g}s exceeds the lock ttl {ttl_s:g}s: "
            "renew the lock from a separate thread"
        )
    if errors:
        raise ConfigError("; ".join(errors), errors=errors)


class ConsulLock(_ConsulBase):
    """``LockPort``: the leader lock at ``key`` held through a Consul TTL session. Thread-safe."""

    def __init__(
        self,
        *,
        addr: str,
        key: str,
        token: str | None = None,
        cacert: str | None = None,
        verify: bool = True,
        timeout: float = 5.0,
        ttl_s: float = 15.0,
        lock_delay_s: float = 15.0,
        holder: LockHolder | None = None,
        session_name: str = "nomadscale-leader",
    ) -> None:
        super().__init__(addr=addr, token=token, cacert=cacert, verify=verify, timeout=timeout)
        if ttl_s < 1 or ttl_s > 86400:
            raise UsageError(f"lock ttl {ttl_s:g}s: must be between 1s and 86400s")
        if lock_delay_s < 0 or lock_delay_s > 60:
            raise UsageError(f"lock delay {lock_delay_s:g}s: must be between 0s and 60s")
        self.key = _check_key(key)
        self.ttl_s = ttl_s
        self.lock_delay_s = lock_delay_s
        self.holder = holder or LockHolder.me()
        self.session_name = session_name
        self._session: str | None = None
        self._mu = threading.RLock()

    def __repr__(self) -> str:
        return f"ConsulLock(addr={self.addr!r}, key={self.key!r})"

    @property
    def session_id(self) -> str | None:
        return self._session

    def _create_session(self) -> str:
        body = json.dumps(
            {
                "Name": self.session_name,
                "TTL": f"{self.ttl_s:g}s",
                "LockDelay": f"{self.lock_delay_s:g}s",
                "Behavior": "release",
            }
        )
        headers = self._client.prepare_headers(None)
        sid = self._call(
            "session create",
            lambda: self._client.http.put(
                CB.json(is_id=True), "/v1/session/create", headers=headers, data=body
            ),
        )
        log.info("consul lock %s: created session %s", self.key, sid)
        return str(sid)

    def _renew(self, sid: str) -> bool:
        """Renew; False when Consul no longer knows the session (expired or destroyed)."""
        try:
            self._call("session renew", lambda: self._client.session.renew(sid))
            return True
        except NotFoundError:
            return False

    def acquire(self) -> bool:
        with self._mu:
            if self._session is not None and not self._renew(self._session):
                log.warning(
                    "consul lock %s: session %s is gone, creating a new one",
                    self.key,
                    self._session,
                )
                self._session = None
            if self._session is None:
                self._session = self._create_session()
            sid = self._session
            ok = bool(
                self._call(
                    f"lock acquire {self.key!r}",
                    lambda: self._client.kv.put(self.key, self.holder.to_json(), acquire=sid),
                )
            )
            log.debug("consul lock %s: acquire -> %s", self.key, ok)
            return ok

    def held(self) -> bool:
        with self._mu:
            sid = self._session
            if sid is None:
                return False
            _, data = self._call(
                f"lock check {self.key!r}",
                lambda: self._client.kv.get(self.key, consistency="consistent"),
            )
            return bool(data) and data.get("Session") == sid

    def release(self) -> None:
        """Give the key up (no lock delay for the next holder) and destroy the session.

        Consul refuses the release when the session does not hold the key: it had expired or
        been invalidated (the lock was already lost, maybe taken by another process since:
        logged as a warning), or it never held it (a standby)."""
        with self._mu:
            sid = self._session
            if sid is None:
                return
            released = bool(
                self._call(
                    f"lock release {self.key!r}",
                    lambda: self._client.kv.put(self.key, self.holder.to_json(), release=sid),
                )
            )
            gone = False
            if not released:
                _, info = self._call("session info", lambda: self._client.session.info(sid))
                gone = info is None
            self._call("session destroy", lambda: self._client.session.destroy(sid))
            self._session = None
        if released:
            log.info("consul lock %s: released", self.key)
        elif gone:
            log.warning("consul lock %s: already lost: session %s had expired or been "
                        "invalidated before the release", self.key, sid)  # fmt: skip
        else:
            log.info("consul lock %s: not held by this process; session %s destroyed",
                     self.key, sid)  # fmt: skip

    def leader(self) -> LockHolder | None:
        """The current holder, or None when the lock is free."""
        _, data = self._call(f"lock leader {self.key!r}", lambda: self._client.kv.get(self.key))
        if not data or not data.get("Session"):
            return None
        return LockHolder.from_json(data.get("Value") or b"", session=str(data["Session"]))


__all__ = [
    "ConsulKV",
    "ConsulLock",
    "LockHolder",
    "update_json",
    "validate_timing",
]
