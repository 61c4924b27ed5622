"""In-memory Consul look-alike for ``nomadscale simulate`` and tests without Consul.

``MemoryKV`` follows Consul's KV rules: one store-wide index that grows on every write,
``ModifyIndex`` per key, ``cas=0`` = only if absent, ``cas=N`` = only if the key exists with
ModifyIndex N, a CAS delete of a missing key succeeds. It also has Consul's sessions (TTL,
lock delay, behaviour "release") and ``acquire``/``release`` on keys.

``MemoryLock`` is the leader lock over a shared ``MemoryKV``: several instances behave like
competing processes. Time comes from the injected ``Clock``; a session whose TTL passes
without renewal is invalidated exactly at the TTL (Consul may wait up to 2 x TTL).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from nomadscale.core.clock import Clock, SystemClock
from nomadscale.core.errors import ExternalPermanentError, InputError, UsageError
from nomadscale.core.ports import KVEntry
from nomadscale.integrations.consul import LockHolder

SYSTEM = "memkv"


@dataclass
class _Entry:
    value: bytes
    modify_index: int
    lock_index: int = 0
    session: str | None = None


@dataclass
class _Session:
    ttl_s: float
    lock_delay_s: float
    expires: float  # monotonic


def _check_key(key: str) -> str:
    k = key.lstrip("/")
    if not k:
        raise InputError("kv key must not be empty")
    return k


class MemoryKV:
    """``KVPort`` in memory with Consul's CAS and session semantics. Thread-safe."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._mu = threading.Lock()
        self._index = 1
        self._data: dict[str, _Entry] = {}
        self._sessions: dict[str, _Session] = {}
        self._delay_until: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"MemoryKV({len(self._data)} keys)"

    def _next(self) -> int:
        self._index += 1
        return self._index

    def _expire(self) -> None:
        now = self.clock.monotonic()
        for sid in [s for s, sess in self._sessions.items() if sess.expires <= now]:
            self._invalidate(sid)

    def _invalidate(self, sid: str) -> None:
        sess = self._sessions.pop(sid, None)
        if sess is None:
            return
        now = self.clock.monotonic()
        for key, entry in self._data.items():
            if entry.session == sid:
                entry.session = None
                entry.modify_index = self._next()
                if sess.lock_delay_s > 0:
                    self._delay_until[key] = now + sess.lock_delay_s

    # --- KVPort ---------------------------------------------------------------------------

    def get(self, key: str) -> KVEntry | None:
        k = _check_key(key)
        with self._mu:
            self._expire()
            e = self._data.get(k)
            return None if e is None else KVEntry(key=k, value=e.value, modify_index=e.modify_index)

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        k = _check_key(key)
        with self._mu:
            self._expire()
            e = self._data.get(k)
            if cas is not None and (
                (cas == 0 and e is not None) or (cas != 0 and (e is None or e.modify_index != cas))
            ):
                return False
            if e is None:
                self._data[k] = _Entry(value=bytes(value), modify_index=self._next())
            else:
                e.value = bytes(value)
                e.modify_index = self._next()
            return True

    def delete(self, key: str, *, cas: int | None = None) -> bool:
        k = _check_key(key)
        with self._mu:
            self._expire()
            e = self._data.get(k)
            if e is None:
                return True
            if cas is not None and e.modify_index != cas:
                return False
            del self._data[k]
            self._next()
            return True

    def list(self, prefix: str) -> list[KVEntry]:
        p = prefix.lstrip("/")
        with self._mu:
            self._expire()
            return [
                KVEntry(key=k, value=e.value, modify_index=e.modify_index)
                for k, e in sorted(self._data.items())
                if k.startswith(p)
            ]

    # --- sessions and locks (Consul's /v1/session + ?acquire/?release) -------------------

    def session_create(self, *, ttl_s: float, lock_delay_s: float) -> str:
        sid = str(uuid.uuid4())
        with self._mu:
            self._expire()
            self._sessions[sid] = _Session(ttl_s, lock_delay_s, self.clock.monotonic() + ttl_s)
        return sid

    def session_renew(self, sid: str) -> bool:
        """False when the session is unknown (expired or destroyed)."""
        with self._mu:
            self._expire()
            sess = self._sessions.get(sid)
            if sess is None:
                return False
            sess.expires = self.clock.monotonic() + sess.ttl_s
            return True

    def session_destroy(self, sid: str) -> None:
        with self._mu:
            self._invalidate(sid)

    def session_of(self, key: str) -> str | None:
        k = _check_key(key)
        with self._mu:
            self._expire()
            e = self._data.get(k)
            return None if e is None else e.session

    def acquire(self, key: str, value: bytes, *, session: str) -> bool:
        k = _check_key(key)
        with self._mu:
            self._expire()
            if session not in self._sessions:
                raise ExternalPermanentError(
                    f"kv acquire {k!r}: invalid session {session}", system=SYSTEM, status=500
                )
            e = self._data.get(k)
            if e is not None and e.session is not None and e.session != session:
                return False
            if (e is None or e.session is None) and self._delay_until.get(
                k, 0.0
            ) > self.clock.monotonic():
                return False
            if e is None:
                e = self._data[k] = _Entry(value=b"", modify_index=0)
            if e.session != session:
                e.lock_index += 1
                e.session = session
            e.value = bytes(value)
            e.modify_index = self._next()
            return True

    def release(self, key: str, value: bytes, *, session: str) -> bool:
        k = _check_key(key)
        with self._mu:
            self._expire()
            e = self._data.get(k)
            if e is None or e.session != session:
                return False
            e.session = None
            e.value = bytes(value)
            e.modify_index = self._next()
            return True


class MemoryLock:
    """``LockPort`` over a shared ``MemoryKV``, with ConsulLock's behaviour. Thread-safe."""

    def __init__(
        self,
        *,
        kv: MemoryKV,
        key: str,
        ttl_s: float = 15.0,
        lock_delay_s: float = 15.0,
        holder: LockHolder | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise UsageError(f"lock ttl {ttl_s:g}s: must be positive")
        if lock_delay_s < 0:
            raise UsageError(f"lock delay {lock_delay_s:g}s: must not be negative")
        self.kv = kv
        self.key = _check_key(key)
        self.ttl_s = ttl_s
        self.lock_delay_s = lock_delay_s
        self.holder = holder or LockHolder.me(kv.clock.now())
        self._session: str | None = None
        self._mu = threading.RLock()

    def __repr__(self) -> str:
        return f"MemoryLock(key={self.key!r})"

    @property
    def session_id(self) -> str | None:
        return self._session

    def acquire(self) -> bool:
        with self._mu:
            if self._session is not None and not self.kv.session_renew(self._session):
                self._session = None
            if self._session is None:
                self._session = self.kv.session_create(
                    ttl_s=self.ttl_s, lock_delay_s=self.lock_delay_s
                )
            return self.kv.acquire(self.key, self.holder.to_json(), session=self._session)

    def held(self) -> bool:
        with self._mu:
            return self._session is not None and self.kv.session_of(self.key) == self._session

    def release(self) -> None:
        with self._mu:
            if self._session is None:
                return
            self.kv.release(self.key, self.holder.to_json(), session=self._session)
            self.kv.session_destroy(self._session)
            self._session = None

    def leader(self) -> LockHolder | None:
        sid = self.kv.session_of(self.key)
        if sid is None:
            return None
        entry = self.kv.get(self.key)
        return LockHolder.from_json(entry.value if entry else b"", session=sid)
