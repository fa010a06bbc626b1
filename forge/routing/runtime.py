"""The routing stack per request: session memory (6D) + escalation detector (6B) + router (6A) + threshold /
A/B arm (6C), logging each decision as feedback for 13A. Serving calls `route()` before generating and
`record_answer()` after; 6D's replay drives it the same way.

route(session_id, message):
  1. the session (memory): its last user question and the last routing decision, if any
  2. escalation: the detector scores (previous question, this message); at or above its threshold the user is
     unhappy with the last answer, and that question is routed again, away from the option that answered it
     (from the base to the best modifier whatever the threshold; from a modifier to the best other option)
  3. otherwise this message is the question: the best modifier if its calibrated probability reaches the
     session's arm threshold, else the base
  4. the user turn and the decision are appended to the session (bounded, expiring); the decision, and the
     escalation of the previous request, are logged as feedback
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from forge.routing.router import decide
from forge.routing.thresholds import ab_arm

if TYPE_CHECKING:
    from forge.config import PipelineConfig
    from forge.routing.bundle import RoutingPolicy
    from forge.routing.escalation import EscalationDetector
    from forge.routing.features import FeatureExtractor
    from forge.routing.feedback import FeedbackWriter
    from forge.routing.sessions import SessionStore


@dataclass
class Decision:
    request_id: str
    session_id: str
    query: str  # what was routed: this message, or on escalation the question it complains about
    option: str
    confidence: float  # calibrated probability of the chosen option
    threshold: float
    arm: str
    escalated: bool
    escalation_score: float | None
    escalation_of: str | None  # the request whose answer the user rejected
    probs: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0

    def feedback_event(self, ts: float) -> dict[str, Any]:
        return {"kind": "decision", "ts": ts, "session_id": self.session_id, "request_id": self.request_id,
                "query": self.query, "option": self.option, "confidence": self.confidence,
                "threshold": self.threshold, "arm": self.arm, "escalated": self.escalated}


class RoutingRuntime:
    def __init__(self, policy: RoutingPolicy, extractor: FeatureExtractor, sessions: SessionStore,
                 detector: EscalationDetector | None = None, feedback: FeedbackWriter | None = None) -> None:
        self.policy, self.extractor, self.sessions = policy, extractor, sessions
        self.detector, self.feedback = detector, feedback
        self.classes = policy.router.classes

    @classmethod
    def from_registry(cls, cfg: PipelineConfig, alias: str = "champion",
                      feedback: FeedbackWriter | None = None) -> RoutingRuntime:
        """The champion policy and detector from the MLflow registry, the session store from config."""
        from forge.routing.bundle import load_policy, materialize_source, registered
        from forge.routing.escalation import EscalationDetector
        from forge.routing.sessions import open_session_store
        from forge.runner import make_store

        store = make_store(cfg)
        rc = cfg.routing
        found = load_policy(store, cfg.tracking, rc.router.registered_model, alias)
        if found is None:
            raise LookupError(f"no {rc.router.registered_model}@{alias} in the MLflow registry "
                              f"({cfg.tracking.tracking_uri}): run forge_pipeline through 6C first")
        policy = found[1]
        det = registered(cfg.tracking, rc.detector.registered_model, alias)
        detector = EscalationDetector.load(materialize_source(store, det.source)) if det else None
        return cls(policy, policy.extractor(store), open_session_store(rc.sessions), detector, feedback)

    # ---- one request -------------------------------------------------------------------------------
    def probs(self, query: str) -> np.ndarray:
        return self.policy.router.probs(self.extractor.embed([query]))[0]

    def arm(self, session_id: str) -> dict[str, Any]:
        return dict(ab_arm(session_id, self.policy.arms))

    def route(self, session_id: str, message: str, request_id: str | None = None,
              prefer_modifier: bool = False) -> Decision:
        """prefer_modifier (serving's accurate mode): the best modifier answers a new question whatever the
        threshold; the decision logged (and kept in the session) is the option that really answers."""
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        session = self.sessions.get(session_id) or {"turns": [], "decisions": []}
        questions = [t for t in session["turns"] if t.get("role") == "user" and not t.get("escalation")]
        last = session["decisions"][-1] if session["decisions"] else None
        arm = self.arm(session_id)
        score = None
        if self.detector is not None and questions:
            score = self.detector.score(questions[-1]["content"], message)
        escalated = bool(score is not None and last is not None and score >= self.detector.threshold)
        if escalated:
            query = last["query"]
            p = self.probs(query)
            barred = self.classes.index(last["option"]) if last["option"] in self.classes else -1
            if barred == 0:  # from the base: the best modifier, threshold or not
                choice = 1 + int(np.argmax(p[1:]))
            else:  # from a modifier: the best other option
                masked = p.copy()
                if barred > 0:
                    masked[barred] = -1.0
                choice = int(np.argmax(masked))
        else:
            query = message
            p = self.probs(query)
            if prefer_modifier and len(self.classes) > 1:
                choice = 1 + int(np.argmax(p[1:]))
            else:
                choice = int(decide(p[None, :], float(arm["threshold"]))[0])
        decision = Decision(request_id, session_id, query, self.classes[choice], float(p[choice]),
                            float(arm["threshold"]), str(arm["name"]), escalated, score,
                            last["request_id"] if escalated else None,
                            {c: float(v) for c, v in zip(self.classes, p, strict=True)})
        now = time.time()
        turn = {"role": "user", "content": message, "ts": now, "request_id": request_id,
                "escalation": escalated}
        record = {k: v for k, v in asdict(decision).items() if k not in ("probs", "latency_ms")}
        self.sessions.append(session_id, turns=[turn], decisions=[{**record, "ts": now}])
        decision.latency_ms = (time.perf_counter() - started) * 1000
        if self.feedback is not None:
            self.feedback.log(decision.feedback_event(now))
            if escalated:
                self.feedback.log({"kind": "escalation", "ts": now, "session_id": session_id,
                                   "request_id": last["request_id"], "message": message, "score": score})
        return decision

    def record_answer(self, session_id: str, request_id: str, text: str) -> None:
        """The assistant's answer joins the session (the next turn's context)."""
        self.sessions.append(session_id, turns=[{"role": "assistant", "content": text, "ts": time.time(),
                                                 "request_id": request_id}])

    def rate(self, session_id: str, request_id: str, rating: int, comment: str | None = None) -> None:
        """Thumbs up (+1) / down (-1) on an answer, as feedback for 13A."""
        if self.feedback is None:
            raise RuntimeError("rate(): this runtime has no feedback writer")
        self.feedback.log({"kind": "rating", "ts": time.time(), "session_id": session_id,
                           "request_id": request_id, "rating": rating, "comment": comment})

    def close(self) -> None:
        if self.feedback is not None:
            self.feedback.flush()
        self.extractor.close()
        self.sessions.close()
