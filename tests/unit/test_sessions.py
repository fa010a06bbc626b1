"""6D session memory on SQLite: the contract every store keeps (the check_* helpers, which the Redis
integration tests run too), plus SQLite's own expiry purge, schema and fork handling."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from forge.routing.routing_config import SessionConfig
from forge.routing.session_bench import benchmark_store
from forge.routing.sessions import (
    HEADER_BYTES,
    RedisSessionStore,
    SessionError,
    SessionStore,
    SQLiteSessionStore,
    open_session_store,
)

StoreFactory = Callable[..., SessionStore]  # keyword overrides: max_bytes, ttl_s


def compact_size(session: dict) -> int:
    return len(json.dumps(session, separators=(",", ":"), ensure_ascii=False).encode())


# ------------------------------------------------------------------------------- the contract (both stores)


def check_roundtrip(store: SessionStore) -> None:
    assert store.get("s1") is None and store.size_bytes("s1") == 0
    t0 = time.time()
    first = store.append("s1", turns=[{"role": "user", "content": "héllo ✓", "ts": 1.5}],
                         decisions=[{"request_id": "r1", "option": "code", "confidence": 0.91}])
    assert first["id"] == "s1" and t0 - 1 <= first["created"] == first["updated"] <= time.time() + 1
    assert first["turns"] == [{"role": "user", "content": "héllo ✓", "ts": 1.5}]
    assert first["decisions"] == [{"request_id": "r1", "option": "code", "confidence": 0.91}]
    assert store.get("s1") == first
    time.sleep(0.01)
    second = store.append("s1", turns=[{"role": "assistant", "content": "hi", "extra": {"n": [1, None]}}])
    assert second["created"] == first["created"] < second["updated"]
    assert [t["role"] for t in second["turns"]] == ["user", "assistant"]
    assert second["turns"][1]["extra"] == {"n": [1, None]} and len(second["decisions"]) == 1
    assert store.get("s1") == second
    # decisions alone, and an append of nothing (creates / refreshes the session)
    assert len(store.append("s1", decisions=[{"option": "base"}])["decisions"]) == 2
    empty = store.append("s2")
    assert empty["turns"] == empty["decisions"] == [] and store.get("s2") == empty
    # the stored size bounds the session's compact JSON
    assert compact_size(store.get("s1")) <= store.size_bytes("s1")
    assert store.size_bytes("s2") >= compact_size(empty) and store.size_bytes("s2") <= HEADER_BYTES + 10
    # sessions are independent; delete says whether one was there
    assert store.get("s2")["turns"] == [] and len(store.get("s1")["turns"]) == 2
    assert store.delete("s1") is True and store.delete("s1") is False
    assert store.get("s1") is None and store.size_bytes("s1") == 0 and store.get("s2") is not None


def check_size_bound(store: SessionStore) -> None:
    """max_bytes=4096: many appends keep the session under it; the oldest entries of both lists go first."""
    n, sent = 0, {}
    for i in range(150):
        turns = [{"n": (n := n + 1), "content": "t" * (20 + i % 50)}]
        decisions = [{"n": (n := n + 1), "option": "base"}] if i % 3 == 0 else []
        sent.update((e["n"], e) for e in turns + decisions)
        session = store.append("big", turns=turns, decisions=decisions)
        size = store.size_bytes("big")
        assert compact_size(session) <= size <= store.max_bytes
    kept = sorted(e["n"] for e in session["turns"] + session["decisions"])
    assert kept == list(range(n - len(kept) + 1, n + 1))  # exactly the newest, oldest went first
    assert len(kept) < 100 and session["turns"][-1]["n"] == n
    assert session["decisions"] and all(d["n"] > kept[0] for d in session["decisions"])
    assert store.get("big") == session
    # no more was dropped than needed: the next-oldest entry would not have fitted
    assert size + len(json.dumps(sent[kept[0] - 1], separators=(",", ":"))) + 1 > store.max_bytes


def check_bad_input(store: SessionStore) -> None:
    before = store.append("keep", turns=[{"role": "user", "content": "x"}])
    size = store.size_bytes("keep")
    cases = [
        ("", {"turns": [{}]}, "non-empty str"),
        (42, {"turns": [{}]}, "non-empty str"),
        ("x" * 257, {"turns": [{}]}, "at most 256"),
        ("keep", {"turns": [{"ok": 1}, "not a dict"]}, "'keep': turns[1] must be a dict (got str)"),
        ("keep", {"turns": {"role": "user"}}, "wrap a single entry in a list"),
        ("keep", {"decisions": [{"ok": 1}, {"option": "a", "when": {1, 2}}]},
         "'keep': decisions[1] field 'when' is not JSON-serializable"),
        ("keep", {"decisions": [{"confidence": float("nan")}]}, "decisions[0] field 'confidence'"),
        ("keep", {"turns": [{"content": "ok"}], "decisions": [{"blob": "x" * store.max_bytes}]},
         "more than max_bytes"),
        ("fresh", {"turns": [{"content": "x" * (store.max_bytes // 2)}] * 2}, "the largest is turns[0]"),
    ]
    for session_id, kwargs, message in cases:
        with pytest.raises(SessionError, match=None) as err:
            store.append(session_id, **kwargs)
        assert message in str(err.value), (message, str(err.value))
    # nothing was written: the good entries beside a bad one neither
    assert store.get("keep")["turns"] == before["turns"] and store.get("keep")["decisions"] == []
    assert store.size_bytes("keep") == size and store.get("fresh") is None
    for op in (store.get, store.delete, store.size_bytes):
        with pytest.raises(SessionError, match="non-empty str"):
            op("")


def check_expiry(make: StoreFactory) -> None:
    with make(ttl_s=0.6) as store:
        first = store.append("e1", turns=[{"n": 1}])
        store.append("e2", turns=[{"n": 1}])
        time.sleep(0.4)
        store.append("e1", turns=[{"n": 2}])  # a write refreshes e1's expiry; reads don't
        assert store.get("e2") is not None
        time.sleep(0.35)  # e2 is 0.75 s past its last write, e1 0.35 s
        assert store.get("e2") is None and store.size_bytes("e2") == 0 and store.delete("e2") is False
        assert [t["n"] for t in store.get("e1")["turns"]] == [1, 2]
        time.sleep(0.7)
        assert store.get("e1") is None
        again = store.append("e1", turns=[{"n": 3}])  # an expired session starts afresh
        assert again["turns"] == [{"n": 3}] and again["created"] > first["created"]


def _append_many(store: SessionStore, session_id: str, worker: int, n: int) -> None:
    for i in range(n):
        store.append(session_id, turns=[{"w": worker, "i": i, "content": "m" * 40}],
                     decisions=[{"w": worker, "i": i, "option": "base"}])


def check_concurrent_threads(store: SessionStore, threads: int = 8, n: int = 50) -> None:
    start, errors = threading.Barrier(threads), []

    def run(worker: int) -> None:
        try:
            start.wait()
            _append_many(store, "hot", worker, n)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    check_all_appends(store.get("hot"), threads, n)


def check_all_appends(session: dict, workers: int, n: int) -> None:
    turns, decisions = session["turns"], session["decisions"]
    assert len(turns) == len(decisions) == workers * n  # no append lost
    for w in range(workers):  # each writer's appends in its order
        assert [t["i"] for t in turns if t["w"] == w] == list(range(n))
    # a turn and a decision of one append are stored together: both lists in the same append order
    assert [(t["w"], t["i"]) for t in turns] == [(d["w"], d["i"]) for d in decisions]


def _process_worker(make: StoreFactory, session_id: str, worker: int, n: int, start: object) -> None:
    with make() as store:
        start.wait()  # type: ignore[attr-defined]
        _append_many(store, session_id, worker, n)


def check_concurrent_processes(make: StoreFactory, processes: int = 3, n: int = 40) -> None:
    """Processes each open their own store (spawned: nothing shared but the backend)."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(processes, timeout=120)
    procs = [ctx.Process(target=_process_worker, args=(make, "hot-mp", w, n, start))
             for w in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * processes
    with make() as store:
        check_all_appends(store.get("hot-mp"), processes, n)


def check_benchmark(make: StoreFactory) -> None:
    for processes in (False, True):
        result = benchmark_store(make, 0.3, 2, processes, sessions=20)
        assert set(result) == {"ops", "seconds", "ops_per_s", "p50_ms", "p99_ms"}
        assert result["ops"] > 10 and result["ops_per_s"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]


# ------------------------------------------------------------------------------- SQLite


@pytest.fixture
def make(tmp_path: Path) -> StoreFactory:
    return functools.partial(SQLiteSessionStore, tmp_path / "sessions.db")


def test_roundtrip(make: StoreFactory) -> None:
    with make() as store:
        check_roundtrip(store)
    with make() as store:  # on disk: a new store sees it
        assert store.get("s2") is not None and store.get("s1") is None


def test_size_bound_drops_oldest_first(make: StoreFactory) -> None:
    with make(max_bytes=4096) as store:
        check_size_bound(store)


def test_bad_input_names_what_and_writes_nothing(make: StoreFactory) -> None:
    with make(max_bytes=4096) as store:
        check_bad_input(store)


def test_expiry(make: StoreFactory) -> None:
    check_expiry(make)


def test_purge_expired(make: StoreFactory, tmp_path: Path) -> None:
    with make(ttl_s=0.3) as store:
        store.append("old1", turns=[{"n": 1}] * 3)
        store.append("old2", decisions=[{"n": 1}])
        time.sleep(0.4)
        store.append("new", turns=[{"n": 1}])
        assert store.purge_expired() == 2 and store.purge_expired() == 0
        assert store.get("new") is not None
        store.append("old3", turns=[{"n": 1}])
        time.sleep(0.4)
        store._next_purge = 0.0  # appends purge lazily (at most once a minute)
        store.append("new2", turns=[{"n": 1}])
    db = sqlite3.connect(tmp_path / "sessions.db")
    assert {r[0] for r in db.execute("SELECT id FROM sessions")} == {"new2"}
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1
    db.close()


def test_concurrent_threads_lose_nothing(make: StoreFactory) -> None:
    with make() as store:
        check_concurrent_threads(store)


def test_concurrent_processes_lose_nothing(make: StoreFactory) -> None:
    check_concurrent_processes(make)


def _child_appends(store: SessionStore) -> None:
    store.append("forked", turns=[{"who": "child"}])


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_child_reconnects(make: StoreFactory) -> None:
    """A child forked after the parent used the store opens its own connections (never the parent's)."""
    with make() as store:
        store.append("forked", turns=[{"who": "parent"}])
        child = mp.get_context("fork").Process(target=_child_appends, args=(store,))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        store.append("forked", turns=[{"who": "parent again"}])
        assert [t["who"] for t in store.get("forked")["turns"]] == ["parent", "child", "parent again"]


def test_wal_and_schema(make: StoreFactory, tmp_path: Path) -> None:
    make().close()
    db = sqlite3.connect(tmp_path / "sessions.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="unknown schema version 7"):
        make()


def test_closed_store_says_so(make: StoreFactory) -> None:
    store = make()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get("s")


def test_benchmark(make: StoreFactory) -> None:
    check_benchmark(make)
    with make() as store:  # the benchmark removes its sessions
        assert store.purge_expired() == 0
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
    db.close()


# ------------------------------------------------------------------------------- open_session_store and URLs


def test_open_session_store_sqlite(forge_home: Path) -> None:
    with open_session_store(SessionConfig()) as store:  # default: {forge_home}/sessions.db
        assert isinstance(store, SQLiteSessionStore) and store.path == forge_home / "sessions.db"
        assert store.max_bytes == 1_000_000 and store.ttl_s == 7 * 24 * 3600
    path = forge_home / "sub" / "s.db"
    with open_session_store(SessionConfig(url=f"sqlite:///{path}", max_bytes=2048, ttl_s=0.5)) as store:
        assert store.path == path and store.max_bytes == 2048 and store.ttl_s == 0.5
        store.append("a", turns=[{"x": 1}])
    assert path.exists()


@pytest.mark.parametrize("url, message", [
    ("sqlite:///", "expected sqlite:///PATH to a file"),
    ("sqlite:///:memory:", "in-memory"),
    ("redis://127.0.0.1:notaport/0", "bad Redis URL"),
    ("redis://127.0.0.1:6379/zero", "with DB a number"),
    ("redis://127.0.0.1:6379/0?ssl=1", "with DB a number"),
    ("postgresql://localhost/x", "expected sqlite:///PATH or redis://HOST:PORT/DB"),
])
def test_bad_url_is_clear(url: str, message: str) -> None:
    cfg = SessionConfig.model_construct(**{**SessionConfig().model_dump(), "url": url})  # past the validator
    with pytest.raises(SessionError, match=message):
        open_session_store(cfg)


def test_config_rejects_unknown_scheme_and_credentials() -> None:
    with pytest.raises(ValueError, match="url: expected sqlite:///PATH, redis://"):
        SessionConfig(url="mysql://x")
    with pytest.raises(ValueError, match="credentials in the config"):
        SessionConfig(url="redis://:hunter2@cache:6379/0")


def test_url_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SessionConfig(url="env:FORGE_TEST_SESSIONS_URL")
    with pytest.raises(SessionError, match="FORGE_TEST_SESSIONS_URL, which is not set"):
        open_session_store(cfg)
    monkeypatch.setenv("FORGE_TEST_SESSIONS_URL", f"sqlite:///{tmp_path}/from-env.db")
    with open_session_store(cfg) as store:
        store.append("s", turns=[{"role": "user", "content": "hi"}])
    assert (tmp_path / "from-env.db").is_file()


def test_unreachable_redis_names_the_url() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"cannot reach Redis at redis://u:\*\*\*@127.0.0.1:{port}/3"):
        RedisSessionStore(f"redis://u:secret@127.0.0.1:{port}/3", timeout_s=2)


def test_store_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="max_bytes must be"):
        SQLiteSessionStore(tmp_path / "x.db", max_bytes=10)
    assert os.listdir(tmp_path) == []
