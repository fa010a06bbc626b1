"""The teacher cascade: tier 1 answers every item; only what fails verification (or answers with low
confidence) goes to tier 2, then tier 3. Each tier sends its items from a small thread pool.

An item is a row in the records schema (forge.data.records): `id`, `messages` (prompt + reference answer),
`check` for suite rows. Its prompt is everything but the reference (`prompt_messages`); `verify(item, answer)`
defaults to the suites' `check_answer`.

Outcomes per attempt: accepted, rejected (verification failed), low_confidence (escalated; kept as a
fallback if verified), error (retries exhausted, timeout, refused request: escalated), unsent (the cost cap
stopped the run before this item was sent). Once the cap is reached the cascade stops: no tier sends again,
and every item still waiting is reported unsent with the tier it was waiting for, so a later run (with the
response cache) picks up exactly there.

Tiers may also run as separate tasks (the modifiers' subphases B, C, D): call run_cascade with one tier and
final=False for all but the top one; items it did not accept come back with status "escalate" (their
attempts, low-confidence answers included, kept) for the next task to send on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from forge.data.records import prompt_messages
from forge.modifiers.teacher_config import CascadeConfig, TeacherConfig
from forge.modifiers.teachers import (
    CostCapReached,
    CostTracker,
    ResponseCache,
    TeacherClient,
    TeacherReply,
    TeacherRequestError,
    TeacherUnavailable,
)

log = logging.getLogger("forge.teachers")

Item = Mapping[str, Any]
Verify = Callable[[Item, str], Any]  # -> bool, or an object with .correct (and .detail), e.g. CheckResult


@dataclass
class Tier:
    teacher: TeacherConfig  # with its base_url set (a local teacher's once its server runs)
    concurrency: int = 4
    min_confidence: float | None = None


def tiers_from_config(cascade: CascadeConfig, domain: str,
                      started: Mapping[str, TeacherConfig] | None = None) -> list[Tier]:
    """A domain's tiers; `started` maps a local teacher's name to it pointed at its running server."""
    started = started or {}
    return [Tier(started.get(teacher.name, teacher), tier.concurrency, tier.min_confidence)
            for tier, teacher in cascade.tiers_for(domain)]


def suite_verify(item: Item, answer: str) -> Any:
    """The suites' checker (exact, numeric, python tests in the sandbox, tool-call schema + arguments)."""
    from forge.data.suites import check_answer

    return check_answer(dict(item), answer)


@dataclass
class Attempt:
    tier: int  # 1-based
    teacher: str
    outcome: str  # accepted | rejected | low_confidence | error | unsent
    answer: str | None = None
    verified: bool | None = None
    confidence: float | None = None
    detail: str = ""
    cached: bool = False
    cost_usd: float = 0.0
    http_attempts: int = 0


@dataclass
class ItemResult:
    id: str
    status: str = "failed"  # accepted | failed | unsent | escalate (final=False: for the next tier's task)
    answer: str | None = None
    tier: int | None = None  # the tier whose answer was accepted
    teacher: str | None = None
    verified: bool | None = None
    confidence: float | None = None
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class TierStats:
    tier: int
    teacher: str
    model: str
    sent: int = 0  # items handed to this tier (cache hits included)
    accepted: int = 0
    rejected: int = 0
    low_confidence: int = 0
    fallback_accepted: int = 0  # low-confidence answers kept because no higher tier did better
    errors: int = 0
    unsent: int = 0  # waiting for this tier when the cost cap stopped the run
    cached: int = 0
    http_attempts: int = 0
    retries: int = 0
    timeouts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


@dataclass
class CascadeResult:
    items: list[ItemResult]
    tiers: list[TierStats]
    cost: dict[str, Any]
    stopped: str | None = None  # why the cascade stopped early (the cost cap's message)

    @property
    def accepted(self) -> list[ItemResult]:
        return [r for r in self.items if r.status == "accepted"]

    @property
    def unsent(self) -> list[str]:
        return [r.id for r in self.items if r.status == "unsent"]

    @property
    def cost_usd(self) -> float:
        return sum(t.cost_usd for t in self.tiers)

    def quality(self) -> dict[str, float | int]:
        """Flat numbers for the quality ledger: totals, then per tier (tier<i>.<stat>)."""
        n = len(self.items)
        q: dict[str, float | int] = {
            "items": n, "accepted": len(self.accepted),
            "failed": sum(r.status == "failed" for r in self.items),
            "unsent": len(self.unsent), "accept_rate": len(self.accepted) / n if n else 0.0,
            "cost_usd": self.cost_usd, "cache_hits": sum(t.cached for t in self.tiers)}
        for t in self.tiers:
            for stat in ("sent", "accepted", "rejected", "low_confidence", "fallback_accepted", "errors",
                         "unsent", "cached", "prompt_tokens", "completion_tokens", "cost_usd", "seconds"):
                q[f"tier{t.tier}.{stat}"] = getattr(t, stat)
        return q

    def notes(self) -> str:
        """One human line: what each tier handled and cost."""
        parts = [f"t{t.tier} {t.teacher}: {t.accepted}/{t.sent} ok, ${t.cost_usd:.4f}"
                 + (f", {t.cached} cached" if t.cached else "") for t in self.tiers]
        tail = f"; stopped: {len(self.unsent)} unsent (cost cap)" if self.stopped else ""
        return f"{len(self.accepted)}/{len(self.items)} items accepted; " + "; ".join(parts) + tail

    def to_dict(self) -> dict[str, Any]:
        return {"items": [asdict(r) for r in self.items], "tiers": [asdict(t) for t in self.tiers],
                "cost": self.cost, "stopped": self.stopped}


def _verdict(result: Any) -> tuple[bool, str]:
    if isinstance(result, bool):
        return result, ""
    return bool(result.correct), str(getattr(result, "detail", ""))


class _TierRun:
    """One tier over its pending items (threads); the outcome of each item lands in its ItemResult."""

    def __init__(self, index: int, tier: Tier, last: bool, client: TeacherClient, verify: Verify | None,
                 prompt: Callable[[Item], Any], stop: threading.Event) -> None:
        self.index, self.tier, self.last, self.client = index, tier, last, client
        self.verify, self.prompt, self.stop = verify, prompt, stop
        self.stopped: str | None = None
        self.seconds = 0.0
        self._lock = threading.Lock()

    def attempt(self, item: Item) -> Attempt:
        name = self.tier.teacher.name
        if self.stop.is_set():
            return Attempt(self.index, name, "unsent", detail="cost cap reached")
        try:
            reply: TeacherReply = self.client.chat(self.prompt(item))
        except CostCapReached as exc:
            with self._lock:
                self.stopped = self.stopped or str(exc)
            self.stop.set()
            return Attempt(self.index, name, "unsent", detail=str(exc))
        except (TeacherUnavailable, TeacherRequestError) as exc:
            return Attempt(self.index, name, "error", detail=str(exc))
        verified: bool | None
        if self.verify is None:
            verified, detail = None, "not verifiable"
        else:
            verified, detail = _verdict(self.verify(item, reply.text))
        threshold = self.tier.min_confidence
        low = threshold is not None and reply.confidence is not None and reply.confidence < threshold
        if verified is False:
            outcome = "rejected"
        elif low and not self.last:
            outcome = "low_confidence"
            detail = f"confidence {reply.confidence:.3f} < {threshold:g}; {detail}"
        else:
            outcome = "accepted"
        return Attempt(self.index, name, outcome, answer=reply.text, verified=verified,
                       confidence=reply.confidence, detail=detail, cached=reply.cached,
                       cost_usd=reply.cost_usd, http_attempts=reply.attempts)


def run_cascade(items: Sequence[Item], tiers: Sequence[Tier], verify: Verify | None = suite_verify,
                cost: CostTracker | None = None, cache: ResponseCache | None = None, *,
                prompt: Callable[[Item], Any] = prompt_messages,
                env: Mapping[str, str] | None = None, final: bool = True) -> CascadeResult:
    """Send items through the tiers in order; see the module docstring. verify=None accepts any answer
    whose confidence is high enough. final=False: the last tier given is not the cascade's top (see the
    module docstring). Raises TeacherConfigError (a key's env var unset) before sending
    anything, and TeacherAuthError (a refused key) once the tier's threads have ended."""
    if not tiers:
        raise ValueError("run_cascade needs at least one tier")
    ids = [str(item["id"]) for item in items]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"item ids must be unique; repeated: {dupes[:5]}")
    cost = cost or CostTracker(None)
    results = {i: ItemResult(id=i) for i in ids}
    fallback: dict[str, Attempt] = {}  # verified answers escalated only for low confidence
    stats: list[TierStats] = []
    stop = threading.Event()
    stopped: str | None = None
    pending = list(items)
    with contextlib.ExitStack() as open_clients:
        # every client first: a missing key fails the run before any tier has spent money
        clients = [open_clients.enter_context(TeacherClient(t.teacher, cost=cost, cache=cache, env=env))
                   for t in tiers]
        for index, (tier, client) in enumerate(zip(tiers, clients, strict=True), 1):
            ts = TierStats(index, tier.teacher.name, tier.teacher.model)
            stats.append(ts)
            if not pending:
                continue
            if stop.is_set():  # the cap stopped an earlier tier: these items wait here, unsent
                for item in pending:
                    results[str(item["id"])].attempts.append(
                        Attempt(index, tier.teacher.name, "unsent", detail="cost cap reached"))
                ts.unsent = len(pending)
                continue
            run = _TierRun(index, tier, final and index == len(tiers), client, verify, prompt, stop)
            attempts = _send_all(run, pending, tier.concurrency, stop)
            _tier_totals(ts, client, run.seconds)
            stopped = stopped or run.stopped
            pending = _record(ts, pending, attempts, results, fallback)
            log.info("tier %d %s: %d sent, %d accepted, %d rejected, %d low confidence, %d errors, "
                     "%d unsent, %d cached, $%.4f", index, ts.teacher, ts.sent, ts.accepted, ts.rejected,
                     ts.low_confidence, ts.errors, ts.unsent, ts.cached, ts.cost_usd)
    for res in results.values():
        if res.status == "accepted":
            continue
        if final and res.id in fallback:  # no higher tier did (or could, under the cap) better
            att = fallback[res.id]
            res.status, res.answer, res.tier, res.teacher = "accepted", att.answer, att.tier, att.teacher
            res.verified, res.confidence = att.verified, att.confidence
            stats[att.tier - 1].fallback_accepted += 1
        elif res.attempts and res.attempts[-1].outcome == "unsent":
            res.status = "unsent"
        elif not final:
            res.status = "escalate"
    return CascadeResult(items=[results[i] for i in ids], tiers=stats, cost=cost.summary(), stopped=stopped)


def _send_all(run: _TierRun, pending: list[Item], concurrency: int, stop: threading.Event) -> list[Attempt]:
    """One attempt per pending item from `concurrency` threads, in the items' order. An exception (a refused
    key, a bug in verify) stops the other threads and is raised once they have ended."""
    started = time.perf_counter()
    errors: list[BaseException] = []
    attempts: list[Attempt] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"tier{run.index}") as pool:
        for fut in [pool.submit(run.attempt, item) for item in pending]:
            try:
                attempts.append(fut.result())
            except BaseException as exc:
                stop.set()
                errors.append(exc)
    run.seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return attempts


def _tier_totals(ts: TierStats, client: TeacherClient, seconds: float) -> None:
    cs = client.stats
    ts.seconds = seconds
    ts.http_attempts, ts.retries, ts.timeouts = cs.requests, cs.retries, cs.timeouts
    ts.prompt_tokens, ts.completion_tokens, ts.cost_usd = cs.prompt_tokens, cs.completion_tokens, cs.cost_usd


def _record(ts: TierStats, pending: list[Item], attempts: list[Attempt], results: dict[str, ItemResult],
            fallback: dict[str, Attempt]) -> list[Item]:
    """Count a tier's attempts into its stats and the items' results; returns the items that escalate."""
    escalate = []
    for item, att in zip(pending, attempts, strict=True):
        res = results[str(item["id"])]
        res.attempts.append(att)
        if att.outcome == "unsent":
            ts.unsent += 1
            continue
        ts.sent += 1
        ts.cached += att.cached
        if att.outcome == "accepted":
            ts.accepted += 1
            res.status, res.answer, res.tier, res.teacher = "accepted", att.answer, att.tier, att.teacher
            res.verified, res.confidence = att.verified, att.confidence
            continue
        if att.outcome == "rejected":
            ts.rejected += 1
        elif att.outcome == "low_confidence":
            ts.low_confidence += 1
            fallback[res.id] = att
        else:
            ts.errors += 1
        escalate.append(item)
    return escalate
