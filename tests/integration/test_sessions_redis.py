"""6D session memory on the real Redis (loopback, as in docker-compose): the same contract as SQLite
(tests/unit/test_sessions.py's check_* helpers) plus Redis' own key layout, native expiry, DB selection,
script-cache recovery and error replies. Every test writes under its own key prefix and removes it."""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import forge.routing.sessions as sessions
from forge.routing.routing_config import SessionConfig
from forge.routing.sessions import RedisError, RedisSessionStore, SQLiteSessionStore, open_session_store
from tests.unit.test_sessions import (
    StoreFactory,
    check_bad_input,
    check_benchmark,
    check_concurrent_processes,
    check_concurrent_threads,
    check_expiry,
    check_roundtrip,
    check_size_bound,
)

pytestmark = pytest.mark.services

REDIS = "redis://127.0.0.1:6379"


def _keys(store: RedisSessionStore, pattern: str) -> list[bytes]:
    found, cursor = [], b"0"
    while True:
        cursor, batch = store._client.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        found += batch
        if int(cursor) == 0:  # redis-py parses the cursor to an int
            return found


@pytest.fixture
def prefix() -> Iterator[str]:
    try:
        admin = {db: RedisSessionStore(f"{REDIS}/{db}", timeout_s=3) for db in (0, 1)}
    except ConnectionError as exc:  # .ci/run starts Redis: there it must be up; a laptop may not have it
        if os.environ.get("CI"):
            pytest.fail(f"Redis not reachable on 127.0.0.1:6379 in CI: {exc}")
        pytest.skip(f"Redis not reachable on 127.0.0.1:6379: {exc}")
    prefix = f"forge-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    for store in admin.values():
        keys = _keys(store, prefix + "*")
        if keys:
            store._client.call("UNLINK", *keys)
        store.close()


@pytest.fixture
def make(prefix: str) -> StoreFactory:
    return functools.partial(RedisSessionStore, f"{REDIS}/0", key_prefix=prefix)


def test_roundtrip(make: StoreFactory) -> None:
    with make() as store:
        check_roundtrip(store)


def test_open_session_store_redis(prefix: str) -> None:
    cfg = SessionConfig(url=f"{REDIS}/0", key_prefix=prefix, max_bytes=5000, ttl_s=30)
    with open_session_store(cfg) as store:
        assert isinstance(store, RedisSessionStore) and store.max_bytes == 5000 and store.ttl_s == 30
        store.append("a", turns=[{"x": 1}])
        meta, log = f"{prefix}{{a}}:m", f"{prefix}{{a}}:l"  # the id in braces: a Cluster hash tag
        assert sorted(_keys(store, prefix + "*")) == [log.encode(), meta.encode()]
        created, updated, size = store._client.call("HMGET", meta, "created", "updated", "bytes")
        assert float(created) == float(updated) and int(size) == store.size_bytes("a")
        assert 29_000 < store._client.call("PTTL", log) <= 30_000


def test_size_bound_drops_oldest_first(make: StoreFactory, tmp_path: Path) -> None:
    with make(max_bytes=4096) as store:
        check_size_bound(store)
    # the same appends give the same session and the same stored size on both backends
    with make(max_bytes=4096) as redis_store, SQLiteSessionStore(tmp_path / "s.db", max_bytes=4096) as lite:
        for i in range(60):
            args = {"turns": [{"i": i, "c": "é" * (i % 40)}], "decisions": [{"i": i}] if i % 4 else []}
            a, b = redis_store.append("same", **args), lite.append("same", **args)
            assert (a["turns"], a["decisions"]) == (b["turns"], b["decisions"])
            assert redis_store.size_bytes("same") == lite.size_bytes("same")


def test_bad_input_names_what_and_writes_nothing(make: StoreFactory, prefix: str) -> None:
    with make(max_bytes=4096) as store:
        check_bad_input(store)
        assert sorted(_keys(store, prefix + "*")) == [f"{prefix}{{keep}}:l".encode(),
                                                      f"{prefix}{{keep}}:m".encode()]


def test_expiry_is_native(make: StoreFactory, prefix: str) -> None:
    check_expiry(make)
    with make(ttl_s=0.3) as store:
        store.append("short", turns=[{"n": 1}])
        for key in (f"{prefix}{{short}}:m", f"{prefix}{{short}}:l"):
            assert 0 < store._client.call("PTTL", key) <= 300
        time.sleep(0.4)
        assert store._client.call("EXISTS", f"{prefix}{{short}}:m", f"{prefix}{{short}}:l") == 0
        assert store.get("short") is None and store.purge_expired() == 0


def test_concurrent_threads_lose_nothing(make: StoreFactory) -> None:
    with make() as store:
        check_concurrent_threads(store)


def test_concurrent_processes_lose_nothing(make: StoreFactory) -> None:
    check_concurrent_processes(make)


def test_db_number_in_url(prefix: str) -> None:
    with RedisSessionStore(f"{REDIS}/1", key_prefix=prefix) as db1, \
            RedisSessionStore(f"{REDIS}/0", key_prefix=prefix) as db0:
        db1.append("where", turns=[{"db": 1}])
        assert db0.get("where") is None and db1.get("where")["turns"] == [{"db": 1}]
        assert len(_keys(db1, prefix + "*")) == 2 and _keys(db0, prefix + "*") == []


def test_script_cache_miss_recovers(make: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a Redis restart (empty script cache) the append's EVALSHA fails with NOSCRIPT: nothing is
    written by it and the store runs the script with EVAL instead. Simulated with an unknown SHA."""
    with make() as store:
        store.append("ns", turns=[{"n": 1}])
        monkeypatch.setattr(sessions, "_LUA_APPEND_SHA", "0" * 40)
        assert [t["n"] for t in store.append("ns", turns=[{"n": 2}])["turns"]] == [1, 2]
        assert [t["n"] for t in store.get("ns")["turns"]] == [1, 2]


def test_large_batch_in_one_append(make: StoreFactory) -> None:
    with make() as store:  # more elements than Lua's unpack takes at once
        session = store.append("batch", turns=[{"i": i} for i in range(2500)], decisions=[{"d": 1}])
        assert [t["i"] for t in session["turns"]] == list(range(2500)) and session["decisions"] == [{"d": 1}]


def test_half_evicted_session_recovers(make: StoreFactory, prefix: str) -> None:
    """maxmemory may evict one of a session's two keys: the next append starts from what is left."""
    with make() as store:
        store.append("ev", turns=[{"n": i, "c": "x" * 100} for i in range(20)])
        store._client.call("UNLINK", f"{prefix}{{ev}}:l")  # the list alone: the hash still counts its bytes
        session = store.append("ev", turns=[{"n": 20}])
        assert session["turns"] == [{"n": 20}] and store.get("ev") == session
        assert store.size_bytes("ev") == sessions.header_bytes("ev") + len('{"n":20}') + 1
        store._client.call("UNLINK", f"{prefix}{{ev}}:m")  # the hash alone: the session is gone
        assert store.get("ev") is None
        assert store.append("ev", decisions=[{"d": 1}])["turns"] == []


def test_error_reply_names_the_session(make: StoreFactory, prefix: str) -> None:
    with make() as store:
        store._client.call("SET", f"{prefix}{{clash}}:m", "another application's value")
        with pytest.raises(RedisError, match="session 'clash': WRONGTYPE"):
            store.append("clash", turns=[{"n": 1}])
        with pytest.raises(RedisError, match="session 'clash': WRONGTYPE"):
            store.get("clash")
        assert store.get("fine") is None  # the connection is still usable
        assert store._client.call("GET", f"{prefix}{{clash}}:m") == b"another application's value"


def test_benchmark(make: StoreFactory, prefix: str) -> None:
    check_benchmark(make)
    with make() as store:  # the benchmark removes its sessions
        assert _keys(store, prefix + "*") == []
