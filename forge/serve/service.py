"""One chat request end to end: mode (10A) -> routing (6A-6D) -> generation on the engine -> self-consistency
(11A) and self-critique (12B) when asked -> metrics, session memory and feedback. The REST API (8B), the
Gradio chat (8C) and the phase jobs (10A, 11A, 12B) all call this; none of them talks to the engine directly.

Modes:
  fast      the base (GGUF + recovery adapter); the router is not consulted
  accurate  the router's best modifier for the question (an escalation still re-routes)
  auto      the router decides: a modifier only when its calibrated probability reaches the session's
            threshold (6C's A/B arm), else the base
A request may also pin an option (model "<release>:<option>"), which bypasses the router.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from forge.data.records import stable_int
from forge.serve.engine import Completion, GenParams, Usage
from forge.serve.release import BASE
from forge.serve.self_consistency import answer_kind, majority

if TYPE_CHECKING:
    from forge.routing.feedback import FeedbackWriter
    from forge.routing.runtime import RoutingRuntime
    from forge.serve.engine import Engine
    from forge.serve.few_shot import FewShot
    from forge.serve.metrics import ServingMetrics
    from forge.serve.serve_config import ServingConfig

log = logging.getLogger("forge.serve")

CRITIQUE_FEEDBACK = (
    "A reviewer scored your previous answer {score:.1f} out of 10, which suggests it may be wrong. "
    "Work through the question again carefully and give a corrected final answer."
)


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    mode: str = "auto"
    session_id: str | None = None
    option: str | None = None  # pinned option (no routing)
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    self_consistency: int = 1  # >1: sample this many paths and vote (accurate/auto modes)
    critique: bool = False  # 12B: critique the answer, regenerate below the threshold
    few_shot: bool | None = None  # 7B: demonstrations before the question (None: the server's default)
    ignore_eos: bool = False  # benchmarks: exactly max_tokens
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    def params(self, **changes: Any) -> GenParams:
        base = dict(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )
        return GenParams(**{**base, **changes})


@dataclass
class RouteInfo:
    mode: str
    option: str
    reason: str
    confidence: float | None = None
    threshold: float | None = None
    arm: str | None = None
    escalated: bool = False
    escalation_score: float | None = None
    probs: dict[str, float] = field(default_factory=dict)
    router_ms: float = 0.0
    turn: int = 1  # the user turn of this session this request is

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class ChatResult:
    text: str
    route: RouteInfo
    usage: Usage
    session_id: str
    request_id: str
    extras: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0

    def forge_field(self) -> dict[str, Any]:
        """The `forge` object of an API response: how the request was routed and served."""
        return {
            "request_id": self.request_id,
            "session_id": self.session_id,
            "mode": self.route.mode,
            "routing": self.route.as_dict(),
            "latency_ms": round(self.latency_ms, 2),
            "time_to_first_token_ms": round(self.usage.first_token_ms, 2),
            "adapter_switch_ms": round(self.usage.switch_ms, 3),
            **self.extras,
        }


def session_of(req: ChatRequest) -> str:
    """The request's session, or one derived from its first user message (OpenAI clients resend the whole
    conversation, so every turn of one conversation derives the same id)."""
    if req.session_id:
        return req.session_id
    first = next((m["content"] for m in req.messages if m.get("role") == "user"), "")
    return f"conv-{stable_int('session|' + first):016x}"


class ChatService:
    def __init__(
        self,
        engine: Engine,
        cfg: ServingConfig,
        routing: RoutingRuntime | None = None,
        critic: Any = None,
        metrics: ServingMetrics | None = None,
        suites: dict[str, str] | None = None,
        feedback: FeedbackWriter | None = None,
        few_shot: FewShot | None = None,
        few_shot_default: bool = False,
    ) -> None:
        from forge.serve.metrics import ServingMetrics

        self.engine, self.cfg, self.routing, self.critic = engine, cfg, routing, critic
        self.few_shot, self.few_shot_default = few_shot, few_shot_default
        self.feedback = feedback or (routing.feedback if routing is not None else None)
        self.metrics = metrics or ServingMetrics()
        self.metrics.queue_depth.set_function(engine.queue_depth)  # read at scrape time, never stale
        # option -> the task suite whose answers it gives (self-consistency's answer extraction)
        self.suites = {o: (suites or {}).get(o, "general" if o == BASE else o) for o in engine.options}

    @property
    def options(self) -> list[str]:
        return self.engine.options

    # ---- routing --------------------------------------------------------------------------------------
    def route(self, req: ChatRequest, session_id: str) -> RouteInfo:
        if req.option is not None:
            if req.option not in self.options:
                raise ValueError(f"unknown option {req.option!r}; this release serves {self.options}")
            self._remember(session_id, req)
            return RouteInfo("pinned", req.option, f"the request pinned option {req.option!r}")
        if req.mode == "fast":
            self._remember(session_id, req)
            return RouteInfo("fast", BASE, "fast mode: the base alone, no routing")
        if self.routing is None:
            self._remember(session_id, req)
            return RouteInfo(req.mode, BASE, "this release has no router: the base answers every request")
        d = self.routing.route(session_id, req.question, req.request_id,
                               prefer_modifier=req.mode == "accurate")
        self.metrics.router_latency.observe(d.latency_ms / 1000)
        turns = self.routing.sessions.get(session_id) or {"turns": []}
        turn = sum(1 for t in turns["turns"] if t.get("role") == "user")
        info = RouteInfo(
            req.mode,
            d.option,
            "",
            d.confidence,
            d.threshold,
            d.arm,
            d.escalated,
            d.escalation_score,
            d.probs,
            d.latency_ms,
            turn,
        )
        if d.escalated:
            info.reason = f"escalation (score {d.escalation_score:.2f}): re-routed away from the last answer"
            self.metrics.escalations.inc()
        elif req.mode == "accurate":
            info.reason = (f"accurate mode: the router's best modifier (p={d.confidence:.2f})"
                           if d.option != BASE
                           else "accurate mode, but the router has no modifier: the base")
        elif d.option == BASE:
            info.reason = f"auto: no modifier reached the threshold {d.threshold:.2f}"
        else:
            info.reason = f"router: {d.option} with p={d.confidence:.2f} >= threshold {d.threshold:.2f}"
        if info.option not in self.options:  # a policy routing to an option this release lacks
            info.reason += f"; {info.option!r} is not in this release: the base"
            info.option = BASE
        return info

    def _remember(self, session_id: str, req: ChatRequest) -> None:
        """Unrouted requests join the session too (a later routed turn sees the conversation)."""
        if self.routing is not None:
            self.routing.sessions.append(
                session_id,
                turns=[
                    {"role": "user", "content": req.question, "ts": time.time(), "request_id": req.request_id}
                ],
            )

    # ---- generation -----------------------------------------------------------------------------------
    def stream(self, req: ChatRequest) -> Iterator[dict[str, Any]]:
        """Events: {"type": "route", ...} first, then {"type": "delta", "text"}..., then {"type": "done",
        "result": ChatResult}. With self-consistency or critique the answer is decided before it streams."""
        started = time.perf_counter()
        session_id = session_of(req)
        self.metrics.in_flight.inc()
        status = "error"
        route: RouteInfo | None = None
        try:
            route = self.route(req, session_id)
            self.metrics.routing.labels(route.mode, route.option).inc()
            yield {"type": "route", "route": route, "session_id": session_id, "request_id": req.request_id}
            extras: dict[str, Any] = {}
            ids = self.engine.prompt_ids(self._with_demonstrations(req, route, extras), req.max_tokens)
            if req.self_consistency > 1 or req.critique:
                completion = self._decided(req, route, ids, extras)
                yield {"type": "delta", "text": completion.text}
            else:
                stream = self.engine.submit(route.option, ids, req.params())
                parts = []
                try:
                    for piece in stream:
                        parts.append(piece)
                        yield {"type": "delta", "text": piece}
                finally:
                    stream.cancel()  # the consumer left early: the worker stops at its next token
                assert stream.usage is not None
                completion = Completion("".join(parts), stream.usage)
            result = ChatResult(
                completion.text,
                route,
                completion.usage,
                session_id,
                req.request_id,
                extras,
                (time.perf_counter() - started) * 1000,
            )
            if self.routing is not None:
                self.routing.record_answer(session_id, req.request_id, completion.text)
            self._observe(result)
            status = "ok"
            yield {"type": "done", "result": result}
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(
                route.mode if route else req.mode, route.option if route else "none", status
            ).inc()

    def _with_demonstrations(self, req: ChatRequest, route: RouteInfo, extras: dict[str, Any]
                             ) -> list[dict[str, str]]:
        """7B: the request's messages, with retrieved demonstrations when asked for (or by default)."""
        wanted = self.few_shot_default if req.few_shot is None else req.few_shot
        if not wanted:
            return req.messages
        if self.few_shot is None:
            if req.few_shot:
                raise ValueError("few_shot: this release has no few-shot templates (7B did not run)")
            return req.messages
        # a routed modifier's own domain when the set has one, else the nearest examples of any domain
        domain = route.option if route.option in self.few_shot.domains else None
        messages, demos = self.few_shot.demonstrate(req.messages, domain)
        extras["few_shot"] = {"version": self.few_shot.version, "demonstrations": len(demos),
                              "domains": sorted({d.domain for d in demos})}
        return messages

    def complete(self, req: ChatRequest) -> ChatResult:
        for event in self.stream(req):
            if event["type"] == "done":
                return event["result"]
        raise RuntimeError("the stream ended without a result")

    def _sample(self, option: str, ids: list[int], params: list[GenParams]) -> list[Completion]:
        """Several generations of one prompt, queued together (idle workers take them in parallel)."""
        streams = [self.engine.submit(option, ids, p) for p in params]
        return [s.text() for s in streams]

    def _decided(
        self, req: ChatRequest, route: RouteInfo, ids: list[int], extras: dict[str, Any]
    ) -> Completion:
        if req.self_consistency > 1:
            completion = self._self_consistent(req, route.option, ids, extras)
        else:
            completion = self._sample(route.option, ids, [req.params()])[0]
        if req.critique:
            completion = self._critiqued(req, route.option, completion, extras)
        return completion

    def _self_consistent(
        self, req: ChatRequest, option: str, ids: list[int], extras: dict[str, Any]
    ) -> Completion:
        sc = self.cfg.self_consistency
        seed = req.seed if req.seed is not None else stable_int(req.request_id) % (2**31)
        params = [
            req.params(temperature=sc.temperature, top_p=sc.top_p, seed=seed + i)
            for i in range(req.self_consistency)
        ]
        samples = self._sample(option, ids, params)
        kind = answer_kind(self.suites.get(option, "general"))
        vote = majority([s.text for s in samples], kind)
        self.metrics.self_consistency_agreement.observe(vote.agreement)
        chosen = samples[vote.index]
        usage = Usage(
            chosen.usage.prompt_tokens,
            sum(s.usage.completion_tokens for s in samples),
            chosen.usage.finish_reason,
            min(s.usage.queue_ms for s in samples),
            max(s.usage.switch_ms for s in samples),
            min(s.usage.first_token_ms for s in samples),
            max(s.usage.total_ms for s in samples),
            chosen.usage.worker,
        )
        extras["self_consistency"] = {
            "samples": len(samples),
            "answer_kind": kind,
            "answer": vote.answer,
            "agreement": round(vote.agreement, 3),
            "votes": vote.counts,
        }
        return Completion(chosen.text, usage)

    def _critiqued(
        self, req: ChatRequest, option: str, first: Completion, extras: dict[str, Any]
    ) -> Completion:
        if self.critic is None:
            extras["critique"] = {"skipped": "this release has no critic (12A)"}
            return first
        cc = self.cfg.critique
        best, best_score = first, float(self.critic.score(req.question, first.text))
        self.metrics.critique_scores.observe(best_score)
        rounds = []
        for r in range(cc.max_rounds):
            if best_score >= cc.threshold:
                break
            messages = [
                *req.messages,
                {"role": "assistant", "content": best.text},
                {"role": "user", "content": CRITIQUE_FEEDBACK.format(score=best_score)},
            ]
            ids = self.engine.prompt_ids(messages, req.max_tokens)
            seed = (req.seed or 0) + 1000 + r
            again = self._sample(option, ids, [req.params(temperature=cc.regenerate_temperature, seed=seed)])[
                0
            ]
            score = float(self.critic.score(req.question, again.text))
            self.metrics.regenerations.inc()
            rounds.append({"score": round(score, 2), "kept": score >= best_score})
            if score >= best_score:
                best, best_score = again, score
        extras["critique"] = {
            "first_score": round(float(self.critic.score(req.question, first.text)), 2)
            if rounds
            else round(best_score, 2),
            "final_score": round(best_score, 2),
            "threshold": cc.threshold,
            "regenerations": rounds,
        }
        return best

    def _observe(self, result: ChatResult) -> None:
        m, u, mode = self.metrics, result.usage, result.route.mode
        m.latency.labels(mode).observe(result.latency_ms / 1000)
        if u.completion_tokens:
            m.ttft.labels(mode).observe(u.first_token_ms / 1000)
        if u.tokens_per_s:
            m.tokens_per_s.labels(mode).observe(u.tokens_per_s)
        if u.switch_ms:
            m.adapter_switch.observe(u.switch_ms / 1000)
        m.tokens.labels("prompt").inc(u.prompt_tokens)
        m.tokens.labels("completion").inc(u.completion_tokens)
        log.info(
            "chat %s",
            result.request_id,
            extra={
                "fields": {
                    "request_id": result.request_id,
                    "session_id": result.session_id,
                    "mode": mode,
                    "option": result.route.option,
                    "escalated": result.route.escalated,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "latency_ms": round(result.latency_ms, 1),
                    "ttft_ms": round(u.first_token_ms, 1),
                    "finish_reason": u.finish_reason,
                }
            },
        )

    # ---- feedback -------------------------------------------------------------------------------------
    def rate(self, session_id: str, request_id: str, rating: int, comment: str | None = None) -> list[str]:
        """Thumbs up (+1) / down (-1), written to the feedback store 13A reads (flushed now: ratings are rare
        and must survive a restart)."""
        if rating not in (1, -1):
            raise ValueError(f"rating must be +1 or -1 (got {rating!r})")
        if self.feedback is None:
            raise RuntimeError("this server has no feedback store")
        self.feedback.log(
            {
                "kind": "rating",
                "ts": time.time(),
                "session_id": session_id,
                "request_id": request_id,
                "rating": rating,
                "comment": comment,
            }
        )
        written = self.feedback.flush()
        self.metrics.feedback.labels("up" if rating > 0 else "down").inc()
        return written  # the part files it went into

    def close(self) -> None:
        if self.routing is not None:
            self.routing.close()
        elif self.feedback is not None:
            self.feedback.flush()
        self.engine.close()
