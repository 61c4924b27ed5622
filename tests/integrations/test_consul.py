"""ConsulKV / ConsulLock against a real Consul, and MemoryKV / MemoryLock with the same tests."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import consul
import pytest

from nomadscale.core.clock import FakeClock
from nomadscale.core.errors import (
    ConfigError,
    ExternalPermanentError,
    ExternalTemporaryError,
    InputError,
    UsageError,
)
from nomadscale.core.ports import KVPort
from nomadscale.integrations.consul import (
    ConsulKV,
    ConsulLock,
    LockHolder,
    update_json,
    validate_timing,
)
from nomadscale.integrations.memkv import MemoryKV, MemoryLock
from tests.harness.services import ConsulAgent, find_binary, free_port

pytestmark = pytest.mark.consul


@dataclass
class Backend:
    """One store (real Consul or MemoryKV) seen through the ports, plus its knobs."""

    name: str
    kv: KVPort
    prefix: str
    make_lock: Callable[..., Any]  # (key, ttl_s, lock_delay_s) -> lock
    destroy_session: Callable[[str], None]
    wait: Callable[[float], None]  # let (real or fake) time pass


@pytest.fixture(params=["consul", "memory"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "consul":
        agent: ConsulAgent = request.getfixturevalue("consul_agent")
        prefix: str = request.getfixturevalue("consul_prefix")
        raw = consul.Consul(host="127.0.0.1", port=agent.http_port)

        def make_consul_lock(key: str, ttl_s: float = 10.0, lock_delay_s: float = 0.0) -> Any:
            return ConsulLock(
                addr=agent.addr, key=key, ttl_s=ttl_s, lock_delay_s=lock_delay_s, timeout=5.0
            )

        yield Backend(
            "consul",
            ConsulKV(addr=agent.addr, timeout=5.0),
            prefix,
            make_consul_lock,
            lambda sid: raw.session.destroy(sid),
            time.sleep,
        )
    else:
        clock = FakeClock()
        mem = MemoryKV(clock=clock)

        def make_memory_lock(key: str, ttl_s: float = 10.0, lock_delay_s: float = 0.0) -> Any:
            return MemoryLock(kv=mem, key=key, ttl_s=ttl_s, lock_delay_s=lock_delay_s)

        yield Backend(
            "memory",
            mem,
            f"test/{uuid.uuid4().hex}/",
            make_memory_lock,
            mem.session_destroy,
            clock.advance,
        )


# --- KV -------------------------------------------------------------------------------------


def test_cas_put_a_stale_writer_loses(backend: Backend) -> None:
    kv, key = backend.kv, backend.prefix + "doc"
    assert kv.get(key) is None
    assert kv.put(key, b"one", cas=0) is True
    assert kv.put(key, b"two", cas=0) is False  # cas=0: only when absent
    first = kv.get(key)
    assert first is not None and first.value == b"one"
    assert kv.put(key, b"two", cas=first.modify_index) is True
    assert kv.put(key, b"stale", cas=first.modify_index) is False  # index moved on
    second = kv.get(key)
    assert second is not None and second.value == b"two"
    assert second.modify_index > first.modify_index
    assert kv.put(backend.prefix + "nope", b"x", cas=second.modify_index) is False  # absent key


def test_cas_delete_and_empty_values(backend: Backend) -> None:
    kv, key = backend.kv, backend.prefix + "gone"
    assert kv.put(key, b"") is True
    entry = kv.get(key)
    assert entry is not None and entry.value == b""
    assert kv.delete(key, cas=entry.modify_index + 1000) is False
    assert kv.get(key) is not None
    assert kv.delete(key, cas=entry.modify_index) is True
    assert kv.get(key) is None
    assert kv.delete(key, cas=entry.modify_index) is True  # Consul: nothing left to delete


def test_list_returns_the_prefix_sorted(backend: Backend) -> None:
    kv, p = backend.kv, backend.prefix
    for name in ("b", "a", "c/d"):
        kv.put(p + "dir/" + name, name.encode())
    kv.put(p + "other", b"x")
    got = kv.list(p + "dir/")
    assert [(e.key, e.value) for e in got] == [
        (p + "dir/a", b"a"),
        (p + "dir/b", b"b"),
        (p + "dir/c/d", b"c/d"),
    ]
    assert kv.list(p + "missing/") == []


def test_empty_key_is_refused_in_one_line(backend: Backend) -> None:
    with pytest.raises(InputError, match="must not be empty"):
        backend.kv.get("/")


def test_update_json_loses_no_concurrent_update(backend: Backend) -> None:
    key = backend.prefix + "overrides"
    writers, each = 6, 8
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(each):
                tag = f"{w}-{i}"

                def bump(old: dict[str, Any] | None, tag: str = tag) -> dict[str, Any]:
                    old = old or {}
                    return {"n": old.get("n", 0) + 1, "seen": [*old.get("seen", []), tag]}

                update_json(backend.kv, key, bump, retries=200)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entry = backend.kv.get(key)
    assert entry is not None
    doc = json.loads(entry.value)
    assert doc["n"] == writers * each
    assert sorted(doc["seen"]) == sorted(f"{w}-{i}" for w in range(writers) for i in range(each))


def test_update_json_refuses_a_non_json_value(backend: Backend) -> None:
    key = backend.prefix + "garbage"
    backend.kv.put(key, b"\x00not json")
    with pytest.raises(InputError, match="not hold a JSON document"):
        update_json(backend.kv, key, lambda old: old)


# --- leader lock -----------------------------------------------------------------------------


def test_exactly_one_holder_and_release_hands_over(backend: Backend) -> None:
    key = backend.prefix + "leader"
    a = backend.make_lock(key, lock_delay_s=5.0)
    b = backend.make_lock(key, lock_delay_s=5.0)
    assert a.acquire() is True
    assert b.acquire() is False
    assert a.acquire() is True  # keeping it is fine
    assert (a.held(), b.held()) == (True, False)
    leader = a.leader()
    assert leader is not None and leader.session == a.session_id
    assert (leader.host, leader.pid) == (a.holder.host, a.holder.pid)
    a.release()
    assert a.held() is False
    assert a.leader() is None
    assert b.acquire() is True  # an explicit release has no lock delay
    assert (a.held(), b.held()) == (False, True)
    b.release()


def test_invalidated_session_loses_the_lock_and_lock_delay_applies(backend: Backend) -> None:
    key = backend.prefix + "leader"
    a = backend.make_lock(key, lock_delay_s=1.0)
    b = backend.make_lock(key, lock_delay_s=1.0)
    assert a.acquire() is True
    backend.destroy_session(a.session_id)  # e.g. Consul invalidated it (node failure)
    assert a.held() is False  # the fencing check sees it at once
    assert b.acquire() is False  # lock delay: nobody takes it for 1s
    backend.wait(1.3)
    assert b.acquire() is True
    assert a.acquire() is False  # a gets a new session but b holds the key
    assert (a.held(), b.held()) == (False, True)
    b.release()


def test_expired_session_lets_another_take_over(backend: Backend) -> None:
    key = backend.prefix + "leader"
    a = backend.make_lock(key, ttl_s=1.0, lock_delay_s=0.0)
    b = backend.make_lock(key, ttl_s=10.0, lock_delay_s=0.0)
    assert a.acquire() is True
    deadline = time.monotonic() + 6.0
    while a.held() and time.monotonic() < deadline:  # Consul expires between TTL and 2xTTL
        backend.wait(0.25)
    assert a.held() is False
    assert b.acquire() is True
    assert a.acquire() is False
    b.release()
    assert a.acquire() is True  # a's fresh session takes the free key
    a.release()


def test_lock_is_thread_safe_one_winner(backend: Backend) -> None:
    key = backend.prefix + "race"
    locks = [backend.make_lock(key) for _ in range(6)]
    results: list[bool] = []
    barrier = threading.Barrier(len(locks))

    def go(lock: Any) -> None:
        barrier.wait()
        results.append(lock.acquire())

    threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert sum(lk.held() for lk in locks) == 1
    for lk in locks:
        lk.release()


# --- Consul specifics: errors, ACLs, timing ----------------------------------------------------


def test_consul_unreachable_is_a_temporary_error() -> None:
    kv = ConsulKV(addr=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(ExternalTemporaryError) as info:
        kv.get("anything")
    assert info.value.system == "consul"
    assert "unreachable" in str(info.value)


def test_consul_suspended_times_out_as_temporary(
    consul_agent: ConsulAgent, consul_prefix: str
) -> None:
    kv = ConsulKV(addr=consul_agent.addr, timeout=0.5)
    kv.put(consul_prefix + "k", b"v")
    consul_agent.suspend()
    try:
        with pytest.raises(ExternalTemporaryError) as info:
            kv.get(consul_prefix + "k")
        assert info.value.system == "consul"
    finally:
        consul_agent.resume()
    entry = kv.get(consul_prefix + "k")
    assert entry is not None and entry.value == b"v"


def test_consul_killed_is_temporary_and_restart_keeps_the_data(
    consul_agent: ConsulAgent, consul_prefix: str
) -> None:
    kv = ConsulKV(addr=consul_agent.addr, timeout=1.0)
    kv.put(consul_prefix + "kept", b"yes")
    consul_agent.kill()
    with pytest.raises(ExternalTemporaryError, match="unreachable") as info:
        kv.get(consul_prefix + "kept")
    assert info.value.system == "consul" and info.value.retry_after > 0
    consul_agent.restart()  # same ports, same data dir
    entry = kv.get(consul_prefix + "kept")
    assert entry is not None and entry.value == b"yes"


def test_acl_denied_is_permanent_and_the_token_never_shows(
    consul_agent_acl: ConsulAgent,
) -> None:
    token = consul_agent_acl.token
    assert token
    anonymous = ConsulKV(addr=consul_agent_acl.addr, timeout=5.0)
    with pytest.raises(ExternalPermanentError) as info:
        anonymous.put("acl/test", b"x")
    assert info.value.status == 403 and "permission denied" in str(info.value)
    kv = ConsulKV(addr=consul_agent_acl.addr, token=token, timeout=5.0)
    assert kv.put("acl/test", b"x") is True
    lock = ConsulLock(addr=consul_agent_acl.addr, token=token, key="acl/leader", lock_delay_s=0)
    assert lock.acquire() and lock.held()
    lock.release()
    assert token not in repr(kv) and token not in repr(lock)


def test_bad_addresses_are_one_line_usage_errors() -> None:
    with pytest.raises(UsageError, match="use http://host:port"):
        ConsulKV(addr="ftp://x:1")
    with pytest.raises(UsageError, match="port is not a number"):
        ConsulKV(addr="http://x:abc")
    with pytest.raises(UsageError, match="no such file"):
        ConsulKV(addr="https://x:8501", cacert="/nonexistent/ca.pem")


def test_validate_timing_lists_every_problem() -> None:
    validate_timing(ttl_s=15, renew_every_s=5, timeout_s=3)
    with pytest.raises(ConfigError) as info:
        validate_timing(ttl_s=15, renew_every_s=10, timeout_s=5, cycle_s=1200)
    text = str(info.value)
    assert "at most half the ttl" in text
    assert "exceeds the ttl" in text
    assert "cycle 1200s" in text
    assert len(info.value.errors) == 3
    with pytest.raises(ConfigError, match="between 10s and 86400s"):
        validate_timing(ttl_s=5, renew_every_s=1, timeout_s=1)


def test_lock_holder_identity_roundtrip() -> None:
    me = LockHolder.me()
    back = LockHolder.from_json(me.to_json(), session="s1")
    assert (back.host, back.pid, back.started_at, back.session) == (
        me.host,
        me.pid,
        me.started_at,
        "s1",
    )
    assert LockHolder.from_json(b"not json", session="s2").host == "?"


def test_missing_binary_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMADSCALE_CONSUL_BIN", "/nonexistent/consul")
    with pytest.raises(pytest.fail.Exception, match=r"install-services\.sh"):
        find_binary("consul", env="NOMADSCALE_CONSUL_BIN", cached="consul/usr/bin/consul")
