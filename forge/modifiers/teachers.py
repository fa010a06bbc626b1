"""The teacher client: one OpenAI-compatible chat endpoint over HTTP (httpx), the same path for hosted APIs
and the loopback servers of local teachers.

- Auth: `Authorization: Bearer <key>` with the key read from the env var the config names. The key lives in
  a `Secret` (repr '***'), is never logged, and is scrubbed from any server text put into an exception.
- Retries: 429, 408/409/425 and 5xx, timeouts and connection errors are retried with exponential backoff and
  full jitter; Retry-After (or OpenAI's retry-after-ms) is honoured, capped at backoff_max_s. 401/403 raise
  TeacherAuthError (a config problem: every item would fail the same way); other 4xx fail the item.
- Pacing: a client-side limiter spaces request starts 60/max_rpm seconds apart across threads.
- Cost: usage tokens x price per 1K. A CostTracker shared by a run's clients reserves each call's worst case
  (prompt bytes + max_tokens) before it is sent, so spending never passes the cap; once a call is refused the
  tracker stays `reached` and the caller stops, reporting the items it did not send.
- Cache: ResponseCache keeps each reply in the artifact store under sha256(model + endpoint identity +
  messages + sampling params); a hit costs 0, so a retried task never pays twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from forge.modifiers.teacher_config import TeacherConfig, TeacherConfigError

if TYPE_CHECKING:

    from forge.artifacts import ArtifactStore

log = logging.getLogger("forge.teachers")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
MESSAGE_OVERHEAD_TOKENS = 8  # chat-template tokens around one message (role, separators): an upper bound
SNIPPET_CHARS = 300

Messages = Sequence[Mapping[str, str]]


class TeacherError(RuntimeError):
    """A teacher call that did not produce an answer. Messages never contain the API key."""


class TeacherUnavailable(TeacherError):
    """Retries exhausted on 429/5xx/timeouts/connection errors: the cascade escalates the item."""


class TeacherRequestError(TeacherError):
    """The endpoint refused the request (4xx but auth) or sent an unreadable reply: the item escalates."""


class TeacherAuthError(TeacherError):
    """401/403: the key is missing or wrong; every item would fail, so the run stops here."""


class CostCapReached(TeacherError):
    """Sending this call could pass the run's cost cap; the call was not sent."""


class Secret:
    """A string that does not show itself in reprs, f-strings or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def resolve_key(cfg: TeacherConfig, env: Mapping[str, str] | None = None) -> Secret | None:
    """The teacher's key from the env var its config names; None when it needs none."""
    var = cfg.key_env
    if var is None:
        return None
    value = (os.environ if env is None else env).get(var, "")
    if not value:
        via = f" (the operator exports Airflow connection {cfg.conn_id!r} there)" if cfg.conn_id else ""
        raise TeacherConfigError(f"teacher {cfg.name!r}: environment variable {var} is empty or unset{via}; "
                                 f"it must hold the API key for {cfg.base_url}")
    return Secret(value)


# ---- cost ---------------------------------------------------------------------------------------------

def token_cost(cfg: TeacherConfig, prompt_tokens: int, completion_tokens: int) -> float:
    return prompt_tokens / 1000 * cfg.price_in_per_1k + completion_tokens / 1000 * cfg.price_out_per_1k


def prompt_token_bound(messages: Messages) -> int:
    """An upper bound on prompt tokens: byte-level BPE spends at least one byte per token."""
    return sum(len(str(m.get("content", "")).encode()) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def worst_case_cost(cfg: TeacherConfig, messages: Messages) -> float:
    return token_cost(cfg, prompt_token_bound(messages), cfg.max_tokens)


class CostTracker:
    """A run's spending across its teachers, with an optional cap (thread-safe).

    reserve() before a call holds its worst case; settle() replaces that with the real cost. A reservation
    that does not fit raises CostCapReached and makes the tracker `reached` for good: paid calls stop cleanly
    (free ones still go). `spent_usd` may start from what earlier tasks of the run already spent.
    """

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0) -> None:
        if cap_usd is not None and cap_usd < 0:
            raise ValueError(f"cost cap must be >= 0 (got {cap_usd})")
        self.cap_usd = cap_usd
        self.spent_usd = float(spent_usd)
        self.reserved_usd = 0.0
        self.reached = False
        self.by_teacher: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def remaining_usd(self) -> float | None:
        return None if self.cap_usd is None else max(0.0, self.cap_usd - self.spent_usd)

    def reserve(self, teacher: str, worst_usd: float) -> float:
        with self._lock:
            if worst_usd <= 0:
                return 0.0
            committed = self.spent_usd + self.reserved_usd
            fits = self.cap_usd is None or committed + worst_usd <= self.cap_usd + 1e-12
            if self.reached or not fits:
                self.reached = True
                raise CostCapReached(
                    f"cost cap ${self.cap_usd:.4f} reached: spent ${self.spent_usd:.4f}, "
                    f"${self.reserved_usd:.4f} in flight, a call to {teacher!r} could cost up to "
                    f"${worst_usd:.4f}")
            self.reserved_usd += worst_usd
            return worst_usd

    def settle(self, teacher: str, reserved_usd: float, actual_usd: float) -> None:
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
            self.spent_usd += actual_usd
            self.by_teacher[teacher] = self.by_teacher.get(teacher, 0.0) + actual_usd

    def release(self, reserved_usd: float) -> None:
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)

    def summary(self) -> dict[str, Any]:
        return {"cap_usd": self.cap_usd, "spent_usd": self.spent_usd, "reached": self.reached,
                "by_teacher": dict(self.by_teacher)}


# ---- response cache ------------------------------------------------------------------------------------

class ResponseCache:
    """Teacher replies in the artifact store: teacher-cache/<k[:2]>/<k>.json, written atomically (the store
    writes a temp file and renames it locally; an S3 PUT is atomic). Shared by all runs of a store."""

    def __init__(self, store: ArtifactStore, prefix: str = "teacher-cache") -> None:
        self.store = store
        self.prefix = prefix

    @staticmethod
    def key(fingerprint: Mapping[str, Any]) -> str:
        from forge.artifacts import digest_json

        return digest_json(fingerprint)

    def uri(self, key: str) -> str:
        return self.store.uri(self.prefix, key[:2], f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        text = self.store.read_text(self.uri(key))
        if text is None:
            return None
        try:
            entry = json.loads(text)
            if entry.get("key") != key or not isinstance(entry.get("reply"), dict):
                raise ValueError("key mismatch")
            return entry["reply"]
        except ValueError:
            log.warning("teacher cache entry %s is unreadable; treating it as a miss", self.uri(key))
            return None

    def put(self, key: str, reply: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
        entry = {"key": key, "fingerprint": dict(fingerprint), "reply": dict(reply),
                 "written_at": time.time()}
        self.store.write_text(self.uri(key), json.dumps(entry, sort_keys=True))


# ---- pacing -------------------------------------------------------------------------------------------

class RateLimiter:
    """Spaces request starts 60/max_rpm seconds apart (no bursts), across threads."""

    def __init__(self, max_rpm: int | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / max_rpm if max_rpm else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for this request's slot; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return wait


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from retry-after-ms (OpenAI) or Retry-After (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


# ---- the client ---------------------------------------------------------------------------------------

@dataclass
class TeacherReply:
    teacher: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float  # 0 for a cache hit
    cached: bool
    attempts: int  # HTTP attempts (0 for a cache hit)
    seconds: float
    confidence: float | None  # exp(mean token logprob) when the endpoint returned logprobs
    finish_reason: str | None
    usage_estimated: bool = False  # the endpoint sent no usage; tokens estimated as bytes/4


@dataclass
class ClientStats:
    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    http_errors: dict[int, int] = field(default_factory=dict)
    backoff_s: float = 0.0
    throttle_s: float = 0.0  # waited for the rate limiter
    waits: list[float] = field(default_factory=list)  # each backoff wait, in order
    cache_hits: int = 0
    prompt_tokens: int = 0  # billed (cache hits excluded)
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("waits")
        d["http_errors"] = {str(k): v for k, v in self.http_errors.items()}
        return d


class TeacherClient:
    """POST {base_url}/chat/completions for one teacher. Thread-safe; close() (or `with`) frees the pool."""

    def __init__(self, cfg: TeacherConfig, cost: CostTracker | None = None,
                 cache: ResponseCache | None = None, env: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        import httpx

        self.cfg = cfg
        self.url = cfg.require_endpoint() + "/chat/completions"
        self._key = resolve_key(cfg, env)
        self.cost = cost
        # a reference solver's answers are free and always current: nothing worth caching
        self.cache = cache if cfg.kind != "reference" else None
        self.stats = ClientStats()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._limiter = RateLimiter(cfg.max_rpm, sleep=sleep)
        self._lock = threading.Lock()
        # loopback servers never go through a proxy from the environment
        self._http = httpx.Client(timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
                                  trust_env=not is_loopback(self.url))

    def __repr__(self) -> str:
        return f"TeacherClient({self.cfg.name!r}, model={self.cfg.model!r}, url={self.url!r})"

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- request shape ------------------------------------------------------------------------------
    def messages_for(self, messages: Messages) -> list[dict[str, str]]:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if self.cfg.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return msgs

    def body(self, messages: list[dict[str, str]], sample: int = 0) -> dict[str, Any]:
        cfg = self.cfg
        body: dict[str, Any] = {**cfg.extra_body, "model": cfg.model, "messages": messages,
                                cfg.max_tokens_param: cfg.max_tokens}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.logprobs:  # llama.cpp's server returns logprobs only when top_logprobs is >= 1 too
            body["logprobs"], body["top_logprobs"] = True, 1
        if sample:  # distinct samples of one prompt (temperature > 0) get distinct seeds and cache entries
            body["seed"] = sample
        return body

    def fingerprint(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """What a reply depends on. A local teacher's loopback URL changes every run, so it is keyed on its
        kind and model alias (which names the weights) instead."""
        endpoint = f"{self.cfg.kind}:{self.cfg.model}" if self.cfg.is_local else self.cfg.base_url
        return {"endpoint": endpoint, "body": dict(body)}

    # ---- the call ------------------------------------------------------------------------------------
    def chat(self, messages: Messages, sample: int = 0) -> TeacherReply:
        """One answer to `messages`: from the cache if it holds one, else over HTTP within the cost cap."""
        started = time.perf_counter()
        msgs = self.messages_for(messages)
        body = self.body(msgs, sample)
        fp = self.fingerprint(body)
        key = ResponseCache.key(fp) if self.cache else ""
        if self.cache:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                return TeacherReply(teacher=self.cfg.name, text=hit["text"],
                                    prompt_tokens=hit["prompt_tokens"],
                                    completion_tokens=hit["completion_tokens"], cost_usd=0.0, cached=True,
                                    attempts=0, seconds=time.perf_counter() - started,
                                    confidence=hit.get("confidence"), finish_reason=hit.get("finish_reason"),
                                    usage_estimated=hit.get("usage_estimated", False))
        held = self.cost.reserve(self.cfg.name, worst_case_cost(self.cfg, msgs)) if self.cost else 0.0
        try:
            data, attempts = self._post(body)
            reply = self._parse(data, msgs, attempts, started)
        except BaseException:
            if self.cost:
                self.cost.release(held)
            raise
        if self.cost:
            self.cost.settle(self.cfg.name, held, reply.cost_usd)
        with self._lock:
            self.stats.prompt_tokens += reply.prompt_tokens
            self.stats.completion_tokens += reply.completion_tokens
            self.stats.cost_usd += reply.cost_usd
        if self.cache:
            kept = {"text": reply.text, "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens, "confidence": reply.confidence,
                    "finish_reason": reply.finish_reason, "usage_estimated": reply.usage_estimated,
                    "teacher": self.cfg.name}
            try:
                self.cache.put(key, kept, fp)
            except Exception as exc:  # the answer is paid for and returned; only a later retry loses it
                log.warning("teacher %r: could not write the response cache (%s: %s)", self.cfg.name,
                            type(exc).__name__, exc)
        return reply

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        return headers

    def _scrub(self, text: str) -> str:
        """Server text for an error message: the key (if a server echoes it) replaced, cut short."""
        if self._key and self._key.reveal():
            text = text.replace(self._key.reveal(), "***")
        text = re.sub(r"\s+", " ", text).strip()
        return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."

    def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        import httpx

        cfg, where = self.cfg, f"teacher {self.cfg.name!r} ({self.cfg.model} at {self.url})"
        last = ""
        for attempt in range(cfg.max_retries + 1):
            waited = self._limiter.acquire()
            retry_after: float | None = None
            with self._lock:
                self.stats.requests += 1
                self.stats.throttle_s += waited
            try:
                resp = self._http.post(self.url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {cfg.timeout_s:g}s"
                with self._lock:
                    self.stats.timeouts += 1
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__}: {self._scrub(str(exc))})"
                with self._lock:
                    self.stats.connection_errors += 1
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        return resp.json(), attempt + 1
                    except ValueError:
                        raise TeacherRequestError(f"{where}: HTTP 200 with a body that is not JSON: "
                                                  f"{self._scrub(resp.text)!r}") from None
                with self._lock:
                    self.stats.http_errors[status] = self.stats.http_errors.get(status, 0) + 1
                detail = self._scrub(resp.text)
                if status in AUTH_STATUS:
                    via = f"env var {cfg.key_env}" if cfg.key_env else "no key configured"
                    raise TeacherAuthError(f"{where}: HTTP {status}, the API key was refused ({via}): "
                                           f"{detail}")
                if status not in RETRYABLE_STATUS:
                    raise TeacherRequestError(f"{where}: HTTP {status}: {detail}")
                last = f"HTTP {status}: {detail}"
                retry_after = parse_retry_after(resp.headers)
            if attempt == cfg.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            delay = min(delay, cfg.backoff_max_s)
            with self._lock:
                self.stats.retries += 1
                self.stats.backoff_s += delay
                self.stats.waits.append(delay)
            log.warning("%s: %s; retry %d/%d in %.2fs", where, last, attempt + 1, cfg.max_retries, delay)
            self._sleep(delay)
        raise TeacherUnavailable(f"{where}: gave up after {cfg.max_retries + 1} attempts; last: {last}")

    def _backoff(self, retry: int) -> float:
        """Full jitter: uniform in [0, base * 2**retry] (capped by the caller)."""
        return self._rng.uniform(0, self.cfg.backoff_base_s * 2 ** retry)

    def _parse(self, data: dict[str, Any], msgs: list[dict[str, str]], attempts: int,
               started: float) -> TeacherReply:
        where = f"teacher {self.cfg.name!r} ({self.cfg.model} at {self.url})"
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""  # null content (e.g. all tokens spent reasoning)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherRequestError(f"{where}: reply has no choices[0].message: "
                                      f"{self._scrub(json.dumps(data)[:SNIPPET_CHARS])!r}") from None
        usage = data.get("usage") or {}
        estimated = not ("prompt_tokens" in usage and "completion_tokens" in usage)
        if estimated:  # rare (some self-hosted servers): estimate rather than price the call at 0
            prompt_tokens = -(-prompt_token_bound(msgs) // 4)
            completion_tokens = -(-len(text.encode()) // 4)
        else:
            prompt_tokens, completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        return TeacherReply(teacher=self.cfg.name, text=str(text), prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            cost_usd=token_cost(self.cfg, prompt_tokens, completion_tokens), cached=False,
                            attempts=attempts, seconds=time.perf_counter() - started,
                            confidence=confidence_of(choice), finish_reason=choice.get("finish_reason"),
                            usage_estimated=estimated)


def is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def confidence_of(choice: Mapping[str, Any]) -> float | None:
    """exp(mean token logprob) of an OpenAI chat choice's logprobs.content, or None without logprobs."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    values = [t["logprob"] for t in content or []
              if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)]
    if not values:
        return None
    return math.exp(sum(values) / len(values))
