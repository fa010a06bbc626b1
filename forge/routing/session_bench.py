"""Session store throughput: a mixed load (half get, half append of one ~200-byte turn) over many sessions,
from N concurrent clients: threads sharing one store, or processes each opening their own.

Each session gets one turn before the clock starts, so every get finds a session; sessions then grow by
the appends of the run (at 10,000 ops/s for 5 s over 1,000 sessions: ~25 turns, ~6 KB each). The
benchmark's sessions carry a random tag in their ids and are deleted afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
import traceback
import uuid
from array import array
from collections.abc import Callable
from typing import Any

from forge.routing.sessions import SessionStore

StoreFactory = Callable[[], SessionStore]


def benchmark_store(store_factory: StoreFactory, seconds: float, clients: int, processes: bool, *,
                    sessions: int = 1000, turn_bytes: int = 200, seed: int = 0) -> dict:
    """Run the mixed load for `seconds` on `clients` concurrent clients. With processes=True each client is
    a process that calls store_factory() itself (forked where the platform can, else spawned: then
    store_factory must pickle, e.g. functools.partial(open_session_store, cfg)).

    Returns {"ops", "seconds", "ops_per_s", "p50_ms", "p99_ms"}: ops of all clients together, over the
    longest client's wall time; latencies of single operations, gets and appends together.
    """
    if clients < 1 or seconds <= 0 or sessions < 1:
        raise ValueError(f"need clients >= 1, seconds > 0, sessions >= 1 "
                         f"(got {clients}, {seconds}, {sessions})")
    tag = uuid.uuid4().hex[:8]
    ids = [f"bench:{tag}:{i}" for i in range(sessions)]
    filler = max(0, turn_bytes - len('{"role":"user","content":"","ts":1700000000.0}'))
    turn = {"role": "user", "content": "x" * filler, "ts": 1700000000.0}
    with store_factory() as store:
        for sid in ids:
            store.append(sid, turns=[turn])
    try:
        args = [(ids, turn, seconds, seed * 1000 + i) for i in range(clients)]
        results = _in_processes(store_factory, args) if processes else _in_threads(store_factory, args)
    finally:
        with store_factory() as store:
            for sid in ids:
                store.delete(sid)
    ops = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    return {"ops": ops, "seconds": round(elapsed, 3), "ops_per_s": round(ops / elapsed, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3)}


def _client(store: SessionStore, ids: list[str], turn: dict, seconds: float, seed: int,
            start: Any) -> tuple[int, float, array]:
    rng = random.Random(seed)
    n, lat = len(ids), array("d")
    start.wait()  # every client starts the clock together
    t0 = time.perf_counter()
    deadline, i = t0 + seconds, 0
    while True:
        sid = ids[rng.randrange(n)]
        a = time.perf_counter()
        if i & 1:
            store.get(sid)
        else:
            store.append(sid, turns=[turn])
        b = time.perf_counter()
        lat.append(b - a)
        i += 1
        if b >= deadline:
            return i, b - t0, lat


def _in_threads(store_factory: StoreFactory, args: list[tuple]) -> list[tuple[int, float, array]]:
    results: list[Any] = [None] * len(args)
    start = threading.Barrier(len(args))

    def run(k: int, store: SessionStore) -> None:
        try:
            results[k] = _client(store, *args[k], start)
        except BaseException as exc:  # reported by the caller
            results[k] = exc
            start.abort()

    with store_factory() as store:  # one store shared, as a serving process shares it
        threads = [threading.Thread(target=run, args=(k, store), daemon=True) for k in range(len(args))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise RuntimeError(f"session benchmark: a client thread failed: {r!r}") from r
    return results


def _process_main(store_factory: StoreFactory, arg: tuple, start: Any, out: Any) -> None:
    try:
        with store_factory() as store:
            ops, elapsed, lat = _client(store, *arg, start)
        out.put((ops, elapsed, lat.tobytes()))
    except BaseException:
        start.abort()
        out.put(traceback.format_exc())


def _in_processes(store_factory: StoreFactory, args: list[tuple]) -> list[tuple[int, float, array]]:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    start, out = ctx.Barrier(len(args), timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(store_factory, a, start, out), daemon=True)
             for a in args]
    for p in procs:
        p.start()
    results, errors = [], []
    for _ in procs:  # read before join: a child can't exit while its result sits in the pipe
        r = out.get(timeout=args[0][2] + 300)
        if isinstance(r, str):
            errors.append(r)
        else:
            lat = array("d")
            lat.frombytes(r[2])
            results.append((r[0], r[1], lat))
    for p in procs:
        p.join(timeout=60)
    if errors:
        raise RuntimeError("session benchmark: a client process failed:\n" + errors[0])
    return results
