"""Phase 6D: session memory. Per-session conversation turns and routing decisions, size-bounded, expiring,
safe under concurrent writers. SQLite by default (one file), Redis in production.

A session, as `get` and `append` return it:
    {"id": str, "created": float, "updated": float, "turns": [dict, ...], "decisions": [dict, ...]}
entries oldest first, each exactly as given to `append` (after a JSON round trip).

Design
- Entries are stored one by one as their compact JSON (UTF-8), in one log per session that holds turns
  and decisions in append order; the log position (SQLite: a rowid, Redis: the list index) is the
  store-assigned sequence, so "oldest" is well defined across both lists and an append or a trim costs
  O(entries added or dropped), never a re-encode of the whole session.
- Size: a session's stored size is HEADER_BYTES + len(id as JSON) + sum(len(entry) + 1). That is an upper
  bound on the bytes of the session's compact JSON encoding, and it is what `max_bytes` bounds: after an
  append the oldest entries go until the session fits; new entries that can't fit even alone (checked
  before any I/O) raise SessionError and nothing is written.
- Expiry: `ttl_s` after the last write (reads don't extend it). Redis: PEXPIRE on the session's keys.
  SQLite: an `expires_at` column that reads check; `purge_expired` deletes, and appends do so lazily
  (a bounded batch at most once a minute per store).
- SQLite: WAL (readers never block the writer), synchronous=NORMAL (no fsync per commit; a power cut may
  lose the last commits, a crash of the process loses nothing), every write a BEGIN IMMEDIATE
  read-modify-write. Connections come from a small pool (a thread takes an idle one and gives it back);
  writers, threads or processes, queue at SQLite's lock (busy_timeout). Measured on 2 cores: a Python
  lock in front of it, or one connection behind one lock, was no faster (the GIL is the limit).
- Redis: per session a hash `<prefix>{<id>}:m` (created, updated, bytes) and a list `<prefix>{<id>}:l`
  (one element per entry: `[0,<turn>]` or `[1,<decision>]`), both with the same PEXPIRE. A get is
  MULTI HMGET LRANGE EXEC; an append is MULTI EVALSHA(append script) LRANGE EXEC: atomic, one round trip
  each. The Lua script does the read-modify-write (append, trim to max_bytes, expiry) and nothing else:
  lists are read natively, which costs Redis' single thread ~20x less than reading them in Lua.
  The client is redis-py with hiredis' parser (its connection pool, AUTH/SELECT/TLS from the URL).
- Forks: pools are emptied in a forked child (its parent's sockets and SQLite handles stay the parent's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import sqlite3

    from forge.routing.routing_config import SessionConfig

log = logging.getLogger("forge.routing")

MAX_ID_CHARS = 256
# '{"id":' ',"created":' ',"updated":' ',"turns":[' '],"decisions":[' ']}' is 55 bytes, two float reprs at
# most 48: 128 covers the session's JSON around its id and entries
HEADER_BYTES = 128
_PURGE_EVERY_S = 60.0
_PURGE_BATCH = 500

_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class SessionError(ValueError):
    """Bad input to a session store: the message names the session, the entry and the field or size."""


class RedisError(RuntimeError):
    """An error reply from Redis (e.g. WRONGTYPE when another application uses our key prefix)."""


# ---------------------------------------------------------------------------------------------- validation


def _check_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_ID_CHARS:
        shown = repr(session_id) if not isinstance(session_id, str) else repr(session_id[:80])
        raise SessionError(
            f"session id must be a non-empty str of at most {MAX_ID_CHARS} characters (got {shown}"
            + (f", {len(session_id)} characters)" if isinstance(session_id, str) else ")"))
    try:
        session_id.encode()
    except UnicodeEncodeError as exc:
        raise SessionError(f"session id {session_id!r} is not valid UTF-8: {exc}") from None
    return session_id


def _culprit(entry: dict) -> str:
    """The first top-level field that does not encode, for the error message."""
    for key, value in entry.items():
        if not isinstance(key, str | int | float | bool) and key is not None:
            return f"key {key!r}"
        try:
            _encode_json(value).encode()
        except (TypeError, ValueError, RecursionError):
            return f"field {key!r}"
    return "entry"


def header_bytes(session_id: str) -> int:
    """Stored size of a session with no entries."""
    return HEADER_BYTES + len(_encode_json(session_id).encode())


def encode_entries(session_id: str, turns: Sequence[dict], decisions: Sequence[dict],
                   max_bytes: int) -> list[tuple[int, bytes]]:
    """Validate and encode an append: [(kind 0 = turn | 1 = decision, compact JSON)], turns first.
    Raises SessionError (naming session, list, index, field) before anything is written."""
    _check_id(session_id)
    out: list[tuple[int, bytes]] = []
    largest = (-1, "", 0)  # (bytes, list, index) for the message when the entries can't fit
    for kind, name, entries in ((0, "turns", turns), (1, "decisions", decisions)):
        if isinstance(entries, str | bytes | dict) or not hasattr(entries, "__iter__"):
            hint = ": wrap a single entry in a list" if isinstance(entries, dict) else ""
            raise SessionError(f"session {session_id!r}: {name} must be a sequence of dicts "
                               f"(got {type(entries).__name__}{hint})")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise SessionError(f"session {session_id!r}: {name}[{i}] must be a dict "
                                   f"(got {type(entry).__name__})")
            try:
                data = _encode_json(entry).encode()
            except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
                raise SessionError(f"session {session_id!r}: {name}[{i}] {_culprit(entry)} is not "
                                   f"JSON-serializable: {exc}") from None
            out.append((kind, data))
            if len(data) > largest[0]:
                largest = (len(data), name, i)
    need = header_bytes(session_id) + sum(len(d) + 1 for _, d in out)
    if need > max_bytes:
        n, name, i = largest
        raise SessionError(
            f"session {session_id!r}: the new entries need {need:,} bytes with the session header, more "
            f"than max_bytes={max_bytes:,}; the largest is {name}[{i}] ({n:,} bytes)")
    return out


# ---------------------------------------------------------------------------------------------- the API


class SessionStore(ABC):
    """Per-session conversation state and routing decisions. Thread-safe; one store per process."""

    def __init__(self, *, max_bytes: int, ttl_s: float) -> None:
        if max_bytes < HEADER_BYTES + 2 or ttl_s <= 0:
            raise SessionError(f"max_bytes must be >= {HEADER_BYTES + 2} and ttl_s > 0 "
                               f"(got max_bytes={max_bytes}, ttl_s={ttl_s})")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s

    @abstractmethod
    def get(self, session_id: str) -> dict | None:
        """The session, or None if absent or expired."""

    @abstractmethod
    def append(self, session_id: str, *, turns: Sequence[dict] = (), decisions: Sequence[dict] = ()) -> dict:
        """Atomically add entries (creating the session if absent or expired), refresh its expiry, drop
        the oldest entries while it is over max_bytes; return the session after the write."""

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove a session; True if a live one was there."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Remove expired sessions; how many were removed."""

    @abstractmethod
    def size_bytes(self, session_id: str) -> int:
        """The session's stored size (0 if absent or expired)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _session(session_id: str, created: float, updated: float, turns: list[bytes],
             decisions: list[bytes]) -> dict:
    # one json.loads per list instead of one per entry
    return {"id": session_id, "created": created, "updated": updated,
            "turns": json.loads(b"[" + b",".join(turns) + b"]"),
            "decisions": json.loads(b"[" + b",".join(decisions) + b"]")}


def resolved_url(cfg: SessionConfig) -> str:
    if not cfg.url.startswith("env:"):
        return cfg.url
    name = cfg.url[4:]
    url = os.environ.get(name)
    if not url:
        raise SessionError(f"sessions.url: {cfg.url!r} names the environment variable {name}, which is "
                           "not set")
    return url


def open_session_store(cfg: SessionConfig) -> SessionStore:
    """The store cfg.url names: sqlite:///PATH (sqlite:////abs/path) or redis[s]://[user:pass@]host:port/db,
    or env:NAME, the URL in that environment variable (a Redis password stays out of the config)."""
    url = resolved_url(cfg)
    if "{forge_home}" in url:  # a SessionConfig built outside load_config keeps the placeholder
        from forge.config import forge_home

        url = url.replace("{forge_home}", str(forge_home()))
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:" or path.endswith("/"):
            why = ": an in-memory database can't be shared between connections" if path == ":memory:" else ""
            raise SessionError(f"sessions.url: expected sqlite:///PATH to a file (got {url!r}){why}")
        return SQLiteSessionStore(path, max_bytes=cfg.max_bytes, ttl_s=cfg.ttl_s)
    if url.startswith(("redis://", "rediss://")):
        return RedisSessionStore(url, key_prefix=cfg.key_prefix, max_bytes=cfg.max_bytes, ttl_s=cfg.ttl_s)
    raise SessionError(f"sessions.url: expected sqlite:///PATH or redis://HOST:PORT/DB (got {url!r})")


# ---------------------------------------------------------------------------------------------- pools

_C = TypeVar("_C")
_POOLS: weakref.WeakSet[_Pool] = weakref.WeakSet()
_INHERITED: list[object] = []  # a forked child's copies of its parent's connections: never used, never closed


class _Pool(Generic[_C]):
    """Idle connections in a deque (append/pop are atomic under the GIL): a thread takes one, uses it alone,
    gives it back. A connection that saw an exception is closed, not reused (its state is unknown)."""

    def __init__(self, connect: Callable[[], _C], close: Callable[[_C], None]) -> None:
        self._connect, self._close = connect, close
        self._idle: deque[_C] = deque()
        self.closed = False
        _POOLS.add(self)

    @contextmanager
    def conn(self) -> Iterator[_C]:
        if self.closed:
            raise RuntimeError("session store is closed")
        try:
            c = self._idle.pop()
        except IndexError:
            c = self._connect()
        try:
            yield c
        except BaseException:
            self._close(c)
            raise
        if self.closed:
            self._close(c)
        else:
            self._idle.append(c)

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._close(self._idle.pop())

    def _after_fork(self) -> None:
        # closing the parent's SQLite handles in the child could disturb the parent's locks: keep them
        _INHERITED.extend(self._idle)
        self._idle = deque()


def _reset_pools_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools_in_child)


# ---------------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, expires_at REAL NOT NULL,
    bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions(expires_at);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,  -- the rowid: a new row's exceeds every live one's, so it orders a log
    sid TEXT NOT NULL, kind INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_session ON entries(sid);
PRAGMA user_version = 1;
"""
_SCHEMA_VERSION = 1
_UPSERT = ("INSERT INTO sessions (id, created, updated, expires_at, bytes) VALUES (?, ?, ?, ?, ?) "
           "ON CONFLICT(id) DO UPDATE SET created = excluded.created, updated = excluded.updated, "
           "expires_at = excluded.expires_at, bytes = excluded.bytes")


class SQLiteSessionStore(SessionStore):
    """Sessions in one SQLite file, shared by the threads and processes that open it."""

    def __init__(self, path: str | Path, *, max_bytes: int = 1_000_000, ttl_s: float = 7 * 24 * 3600.0,
                 busy_timeout_s: float = 30.0) -> None:
        super().__init__(max_bytes=max_bytes, ttl_s=ttl_s)
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool: _Pool[sqlite3.Connection] = _Pool(self._connect, lambda c: c.close())
        self._next_purge = time.monotonic() + _PURGE_EVERY_S
        try:
            self._init_schema()
        except BaseException:
            self._pool.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        import sqlite3

        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _init_schema(self) -> None:
        import sqlite3

        with self._pool.conn() as c:
            deadline = time.monotonic() + self.busy_timeout_s
            while True:  # switching to WAL needs an exclusive lock: another process may be setting up
                try:
                    mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            if mode.lower() != "wal":
                raise RuntimeError(f"session store {self.path}: SQLite refused WAL mode (got {mode!r})")
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise RuntimeError(f"session store {self.path}: unknown schema version {version} "
                                   f"(this code knows {_SCHEMA_VERSION})")
        if version == 0:
            with self._write() as w:  # (executescript would COMMIT our BEGIN first)
                for statement in _SCHEMA.split(";"):
                    w.execute(statement)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._pool.conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                if c.in_transaction:  # (SQLite rolls back by itself on some errors)
                    c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def get(self, session_id: str) -> dict | None:
        _check_id(session_id)
        now = time.time()
        with self._pool.conn() as c:
            # one statement = one snapshot: the session row and its entries agree
            rows = c.execute(
                "SELECT s.created, s.updated, s.expires_at, e.kind, e.data FROM sessions s "
                "LEFT JOIN entries e ON e.sid = s.id WHERE s.id = ? ORDER BY e.seq", (session_id,)).fetchall()
        if not rows or rows[0][2] <= now:
            return None
        created, updated = rows[0][0], rows[0][1]
        if rows[0][3] is None:
            return _session(session_id, created, updated, [], [])
        return _session(session_id, created, updated, [r[4] for r in rows if r[3] == 0],
                        [r[4] for r in rows if r[3] == 1])

    def append(self, session_id: str, *, turns: Sequence[dict] = (), decisions: Sequence[dict] = ()) -> dict:
        entries = encode_entries(session_id, turns, decisions, self.max_bytes)
        now = time.time()
        with self._write() as c:
            row = c.execute("SELECT created, expires_at, bytes FROM sessions WHERE id = ?",
                            (session_id,)).fetchone()
            if row is None or row[1] <= now:
                if row is not None:  # expired but not purged yet: start afresh
                    c.execute("DELETE FROM entries WHERE sid = ?", (session_id,))
                created, size = now, header_bytes(session_id)
            else:
                created, size = row[0], row[2]
            if entries:
                c.executemany("INSERT INTO entries (sid, kind, data) VALUES (?, ?, ?)",
                              [(session_id, kind, data) for kind, data in entries])
                size += sum(len(data) + 1 for _, data in entries)
            if size > self.max_bytes:
                size = self._trim(c, session_id, size)
            c.execute(_UPSERT, (session_id, created, now, now + self.ttl_s, size))
            rows = c.execute("SELECT kind, data FROM entries WHERE sid = ? ORDER BY seq",
                             (session_id,)).fetchall()
        self._maybe_purge()
        return _session(session_id, created, now, [r[1] for r in rows if r[0] == 0],
                        [r[1] for r in rows if r[0] == 1])

    def _trim(self, c: sqlite3.Connection, session_id: str, size: int) -> int:
        """Drop the oldest entries until the session fits; the new ones fit alone, so they stay."""
        cut = None
        cur = c.execute("SELECT seq, length(data) FROM entries WHERE sid = ? ORDER BY seq", (session_id,))
        for seq, n in cur:
            size -= n + 1
            cut = seq
            if size <= self.max_bytes:
                break
        cur.close()
        c.execute("DELETE FROM entries WHERE sid = ? AND seq <= ?", (session_id, cut))
        return size

    def delete(self, session_id: str) -> bool:
        _check_id(session_id)
        with self._write() as c:
            row = c.execute("SELECT expires_at FROM sessions WHERE id = ?", (session_id,)).fetchone()
            c.execute("DELETE FROM entries WHERE sid = ?", (session_id,))
            c.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return row is not None and row[0] > time.time()

    def purge_expired(self) -> int:
        total = 0
        while True:  # in batches, so one big purge doesn't hold the write lock for long
            n = self._purge_batch()
            total += n
            if n < _PURGE_BATCH:
                return total

    def _purge_batch(self) -> int:
        with self._write() as c:
            ids = [(r[0],) for r in c.execute("SELECT id FROM sessions WHERE expires_at <= ? LIMIT ?",
                                              (time.time(), _PURGE_BATCH))]
            c.executemany("DELETE FROM entries WHERE sid = ?", ids)
            c.executemany("DELETE FROM sessions WHERE id = ?", ids)
        return len(ids)

    def _maybe_purge(self) -> None:
        import sqlite3

        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + _PURGE_EVERY_S
        try:
            self._purge_batch()
        except sqlite3.Error as exc:  # best effort: the append itself has committed
            log.warning("session store %s: lazy purge of expired sessions failed: %s", self.path, exc)

    def size_bytes(self, session_id: str) -> int:
        _check_id(session_id)
        with self._pool.conn() as c:
            row = c.execute("SELECT bytes, expires_at FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row[0] if row is not None and row[1] > time.time() else 0

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"SQLiteSessionStore({str(self.path)!r})"


# ---------------------------------------------------------------------------------------------- Redis

# A session's log element is `[0,<turn>]` or `[1,<decision>]` (the client joins the elements into one JSON
# array and splits it by kind) and counts len(entry JSON) + 1 bytes, as in SQLite. Lua only mutates: every
# read is a native LRANGE, because handing a list to Lua converts each element (a 1 MB session took Redis'
# one thread ~9 ms in Lua, 0.4 ms natively).
# KEYS: hash, list. ARGV: now, ttl_ms, max_bytes, header_bytes, elements... Returns the session's `created`.
_LUA_APPEND = """
local meta, log, now = KEYS[1], KEYS[2], ARGV[1]
local m = redis.call('HMGET', meta, 'created', 'bytes')
local created, size = m[1], tonumber(m[2])
if not created then
  redis.call('DEL', log)  -- a list without its hash is a leftover: start afresh
  created, size = now, tonumber(ARGV[4])
elseif redis.call('EXISTS', log) == 0 then
  size = tonumber(ARGV[4])  -- no entries yet, or the list alone was evicted (maxmemory)
end
for i = 5, #ARGV, 1000 do  -- unpack is bounded by Lua's C stack
  redis.call('RPUSH', log, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
for i = 5, #ARGV do size = size + #ARGV[i] - 3 end
local max = tonumber(ARGV[3])
while size > max do  -- the new elements fit alone (checked by the client), so they stay
  local e = redis.call('LPOP', log)
  if not e then size = tonumber(ARGV[4]) break end  -- (defensive: 'bytes' disagrees with the list)
  size = size - #e + 3
end
redis.call('HSET', meta, 'created', created, 'updated', now, 'bytes', size)
redis.call('PEXPIRE', meta, ARGV[2])
redis.call('PEXPIRE', log, ARGV[2])  -- (no list if no entries: nothing to expire)
return created
"""
_LUA_APPEND_SHA = hashlib.sha1(_LUA_APPEND.encode()).hexdigest()

Command = tuple[bytes | str | int, ...]


class _RedisClient:
    """redis-py (with hiredis' reply parser; its pool, AUTH/SELECT/TLS from the URL) behind the calls the
    store makes: one command, or a MULTI ... EXEC in one round trip."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from urllib.parse import urlsplit

        try:
            u = urlsplit(url)
            u.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise SessionError(f"sessions.url: bad Redis URL {_mask(url)!r}: {exc}") from None
        db = u.path.strip("/") or "0"
        if u.scheme not in ("redis", "rediss") or not db.isdigit() or u.query or u.fragment:
            raise SessionError(f"sessions.url: expected redis[s]://[user:pass@]HOST[:PORT][/DB] with DB a "
                               f"number (got {_mask(url)!r})")
        import redis

        self.url = _mask(url)
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def execute(self, *commands: Command) -> list[Any]:
        """The commands in one write and one round trip on a pooled connection; error replies come back as
        RedisError values (NOSCRIPT kept in the message). Driving redis-py's Connection directly skips its
        Pipeline bookkeeping: measured ~30% more ops/s on this workload."""
        import redis
        from redis.exceptions import NoScriptError

        pool = self._redis.connection_pool
        try:
            conn = pool.get_connection()  # connects a new one: may fail like a command
        except redis.RedisError as exc:
            raise ConnectionError(f"session store: cannot reach Redis at {self.url}: {exc}") from exc
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:  # this command's error reply; the others are still read
                    replies.append(exc)
        except redis.RedisError as exc:  # connection refused / lost, timeouts: this connection is done
            conn.disconnect()
            raise ConnectionError(f"session store: cannot reach Redis at {self.url}: {exc}") from exc
        finally:
            pool.release(conn)

        def value(r: Any) -> Any:
            if isinstance(r, list):
                return [value(x) for x in r]
            if isinstance(r, redis.ResponseError):  # redis-py drops the code from NOSCRIPT's message
                return RedisError(("NOSCRIPT " if isinstance(r, NoScriptError) else "") + str(r))
            return r

        return [value(r) for r in replies]

    def call(self, *args: bytes | str | int) -> Any:
        reply = self.execute(args)[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def transaction(self, *commands: Command) -> list[Any]:
        """MULTI ... EXEC in one round trip: the commands' replies (errors as RedisError values)."""
        replies = self.execute(("MULTI",), *commands, ("EXEC",))
        for r in replies:  # a command refused when queued, or EXECABORT
            if isinstance(r, RedisError):
                raise r
        return replies[-1]

    def close(self) -> None:
        self._redis.close()


def _mask(url: str) -> str:
    """The URL with its password hidden, for messages."""
    head, sep, tail = url.partition("://")
    if "@" in tail.split("/", 1)[0]:
        creds, _, rest = tail.partition("@")
        user = creds.split(":", 1)[0]
        return f"{head}{sep}{user}:***@{rest}"
    return url


def _raise_errors(session_id: str, replies: list[Any]) -> None:
    for r in replies:
        if isinstance(r, RedisError):
            raise RedisError(f"session {session_id!r}: {r}")


class RedisSessionStore(SessionStore):
    """Sessions in Redis: a hash and a list per session; a get or an append is one MULTI/EXEC round trip."""

    def __init__(self, url: str, *, key_prefix: str = "forge:session:", max_bytes: int = 1_000_000,
                 ttl_s: float = 7 * 24 * 3600.0, timeout_s: float = 10.0) -> None:
        super().__init__(max_bytes=max_bytes, ttl_s=ttl_s)
        self.key_prefix = key_prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._client = _RedisClient(url, timeout_s)
        self._client.call("PING")  # fail here, naming the URL, rather than at the first request

    def _keys(self, session_id: str) -> tuple[bytes, bytes]:
        # the id in braces: a Redis Cluster hash tag (both keys in one slot), and unambiguous key names
        base = f"{self.key_prefix}{{{session_id}}}".encode()
        return base + b":m", base + b":l"

    def get(self, session_id: str) -> dict | None:
        _check_id(session_id)
        hash_key, list_key = self._keys(session_id)
        replies = self._client.transaction(("HMGET", hash_key, "created", "updated"),
                                           ("LRANGE", list_key, 0, -1))
        _raise_errors(session_id, replies)
        (created, updated), elements = replies
        return None if created is None else _from_log(session_id, created, updated, elements)

    def append(self, session_id: str, *, turns: Sequence[dict] = (), decisions: Sequence[dict] = ()) -> dict:
        entries = encode_entries(session_id, turns, decisions, self.max_bytes)
        now = repr(time.time())
        hash_key, list_key = self._keys(session_id)
        args = [now, self._ttl_ms, self.max_bytes, header_bytes(session_id)]
        args += [(b"[0," if kind == 0 else b"[1,") + data + b"]" for kind, data in entries]
        replies = self._client.transaction(("EVALSHA", _LUA_APPEND_SHA, 2, hash_key, list_key, *args),
                                           ("LRANGE", list_key, 0, -1))
        if isinstance(replies[0], RedisError) and str(replies[0]).startswith("NOSCRIPT"):
            # not in the server's script cache (restart, SCRIPT FLUSH); the failed EVALSHA wrote nothing.
            # EVAL runs the script and caches it for the next EVALSHA.
            replies = self._client.transaction(("EVAL", _LUA_APPEND, 2, hash_key, list_key, *args),
                                               ("LRANGE", list_key, 0, -1))
        _raise_errors(session_id, replies)
        return _from_log(session_id, replies[0], now, replies[1])

    def delete(self, session_id: str) -> bool:
        _check_id(session_id)
        return self._client.call("UNLINK", *self._keys(session_id)) > 0

    def purge_expired(self) -> int:
        return 0  # Redis expires keys itself

    def size_bytes(self, session_id: str) -> int:
        _check_id(session_id)
        size = self._client.call("HGET", self._keys(session_id)[0], "bytes")
        return 0 if size is None else int(size)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisSessionStore({self._client.url!r}, key_prefix={self.key_prefix!r})"


def _from_log(session_id: str, created: bytes | str, updated: bytes | str, elements: list[bytes]) -> dict:
    pairs = json.loads(b"[" + b",".join(elements) + b"]")  # one parse for the whole list
    return {"id": session_id, "created": float(created), "updated": float(updated),
            "turns": [e for k, e in pairs if k == 0], "decisions": [e for k, e in pairs if k == 1]}
