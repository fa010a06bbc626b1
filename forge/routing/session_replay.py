"""6D: session memory, exercised end to end before serving relies on it.

Multi-turn conversations replayed through the whole routing stack (forge.routing.runtime: session store +
6B's detector + 6C's policy), several sessions at once, against the configured store (SQLite file or Redis;
the replay uses its own file / key prefix and removes its sessions afterwards):

  turn 1  a question of 6A's test split; 6A's table says whether the routed option answers it
  turn 2  the user's follow-up: a complaint or a re-ask (6B's held-out phrasings) when that answer was wrong,
          thanks / a follow-on / a clarification / a new question when it was right; a detected escalation
          routes the question again, away from the option that failed, and the table says if that fixed it
  turns 3-4  the same with the next question

Then it checks what the store must guarantee: every decision reads back as it was made (context
persistence), no session exceeds routing.sessions.max_bytes (and a session pushed past it keeps its newest
entries), an expired session is gone, and the feedback the runtime logged reads back valid. Counts and rates
go to sessions_report.json; timings (route() p50/p99, store ops/s) to metrics only.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from forge.routing.timing import summary
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.routing")

REPORT = "sessions_report.json"
# what a user says to a wrong answer / to a right one
FIX_KINDS = {"wrong": 1.0, "retry": 1.0, "complaint": 1.0, "rephrase": 1.0}
OK_KINDS = {"thanks": 1.0, "follow_on": 1.0, "clarify": 1.0, "new_question": 1.0}


def replay_store_config(cfg: Any, work_dir: Path, run_key: str, ttl_s: float | None = None) -> Any:
    """The configured backend, kept apart from serving's sessions: its own SQLite file, or its own Redis
    key prefix."""
    from forge.routing.sessions import resolved_url

    sc = cfg.routing.sessions
    sc = sc.model_copy(update={"url": resolved_url(sc)})
    if sc.url.startswith("sqlite:///"):
        url = f"sqlite:///{work_dir / 'replay_sessions.db'}"
        return sc.model_copy(update={"url": url, **({"ttl_s": ttl_s} if ttl_s else {})})
    return sc.model_copy(update={"key_prefix": f"{sc.key_prefix}replay:{run_key}:",
                                 **({"ttl_s": ttl_s} if ttl_s else {})})


class Conversation:
    """One replayed session: two questions, each followed by the user's reaction to its answer."""

    def __init__(self, index: int, questions: list[int]) -> None:
        self.index, self.questions = index, questions
        self.session_id = f"replay-{index:04d}"
        self.events: list[dict[str, Any]] = []


def run_conversation(conv: Conversation, runtime: Any, table: Any, pool: Any, seed: int) -> None:
    from forge.routing.escalation_data import make_message

    rng = random.Random(f"{seed}|{conv.index}")
    col = {o: j for j, o in enumerate(table.options)}
    for n, qi in enumerate(conv.questions):
        question = table.queries[qi]
        first = runtime.route(conv.session_id, question, request_id=f"{conv.session_id}-q{n}")
        right = bool(table.correct[qi, col[first.option]])
        runtime.record_answer(conv.session_id, first.request_id, f"(answer of {first.option})")
        kinds = OK_KINDS if right else FIX_KINDS
        kind = rng.choices(list(kinds), weights=list(kinds.values()), k=1)[0]
        message, _ = make_message(kind, question, pool, rng, "test")
        follow = runtime.route(conv.session_id, message, request_id=f"{conv.session_id}-f{n}")
        fixed = bool(follow.escalated and table.correct[qi, col[follow.option]])
        conv.events.append({"question": table.ids[qi], "first": first.option, "first_right": right,
                            "kind": kind, "dissatisfied": not right, "escalated": follow.escalated,
                            "second": follow.option if follow.escalated else None, "fixed": fixed,
                            "latency_ms": [first.latency_ms, follow.latency_ms],
                            "decisions": [first.option, follow.option]})


def check_bound(store_cfg: Any) -> dict[str, Any]:
    """A session pushed far past max_bytes stays within it and keeps its newest entry."""
    from forge.routing.sessions import open_session_store

    size = max(512, store_cfg.max_bytes // 64)  # ~200 appends overflow any bound three times over
    turn = {"role": "user", "content": "x" * size}
    with open_session_store(store_cfg) as store:
        sid = "replay-bound"
        for i in range(3 * store_cfg.max_bytes // size + 8):
            store.append(sid, turns=[{**turn, "i": i}])
        session, size = store.get(sid), store.size_bytes(sid)
        store.delete(sid)
    return {"max_bytes": store_cfg.max_bytes, "size_bytes": size, "within": size <= store_cfg.max_bytes,
            "kept_turns": len(session["turns"]), "newest_kept": session["turns"][-1]["i"] == i}


def check_expiry(store_cfg: Any) -> dict[str, Any]:
    from forge.routing.sessions import open_session_store

    short = store_cfg.model_copy(update={"ttl_s": 0.3})
    with open_session_store(short) as store:
        store.append("replay-expiry", turns=[{"role": "user", "content": "hello"}])
        present = store.get("replay-expiry") is not None
        time.sleep(0.5)
        gone = store.get("replay-expiry") is None
        store.delete("replay-expiry")
    return {"ttl_s": 0.3, "present_before": present, "gone_after": gone}


def run(ctx: JobContext) -> JobResult:
    from forge.artifacts import ArtifactStore
    from forge.data.records import read_jsonl
    from forge.routing.bundle import RoutingPolicy
    from forge.routing.escalation import EscalationDetector
    from forge.routing.escalation_data import PromptPool
    from forge.routing.feedback import FeedbackWriter, read_interval
    from forge.routing.runtime import RoutingRuntime
    from forge.routing.sessions import open_session_store
    from forge.routing.threshold_optimization import load_table

    cfg = ctx.config
    sc = cfg.routing.sessions
    table = load_table(ctx.input_dir("6A"))
    policy = RoutingPolicy.load(ctx.input_dir("6C"))
    detector = EscalationDetector.load(ctx.input_dir("6B") / ctx.input_info("6B")["detector_dir"])
    test = [i for i, s in enumerate(table.splits) if s == "test"]
    convs = [Conversation(i, [test[(2 * i) % len(test)], test[(2 * i + 1) % len(test)]])
             for i in range(sc.replay_sessions)]
    dev = read_jsonl(ctx.input_dir("prep_data") / "dev.jsonl")
    pool = PromptPool([table.queries[i] for i in test] + [r["messages"][0]["content"] for r in dev])
    store_cfg = replay_store_config(cfg, ctx.work_dir, ctx.cache_key[:12])
    feedback_root = Path(tempfile.mkdtemp(dir=ctx.work_dir))
    feedback_store = ArtifactStore(f"file://{feedback_root}")
    writer = FeedbackWriter(feedback_store, feedback_store.uri("feedback"))
    store = open_session_store(store_cfg)
    runtime = RoutingRuntime(policy, policy.extractor(ctx.store), store, detector, writer)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    try:
        seed = cfg.routing.router.seed
        with ThreadPoolExecutor(sc.replay_threads) as workers:
            list(workers.map(lambda c: run_conversation(c, runtime, table, pool, seed), convs))
        seconds = time.perf_counter() - started
        # context persistence: each session reads back the decisions it made, in order
        mismatched, sizes = [], []
        for c in convs:
            session = store.get(c.session_id)
            made = [o for e in c.events for o in e["decisions"]]
            stored = [d["option"] for d in (session or {}).get("decisions", [])]
            if stored != made:
                mismatched.append(c.session_id)
            sizes.append(store.size_bytes(c.session_id))
        for c in convs:
            store.delete(c.session_id)
    finally:
        runtime.close()
    # store operations: route() = a get + an append (4 per session), record_answer() = an append (2)
    ops = 10 * len(convs)
    batch = read_interval(feedback_store, feedback_store.uri("feedback"), started_at - timedelta(minutes=1),
                          datetime.now(UTC) + timedelta(minutes=1))
    bound, expiry = check_bound(store_cfg), check_expiry(store_cfg)

    events = [e for c in convs for e in c.events]
    y = np.array([e["dissatisfied"] for e in events])
    pred = np.array([e["escalated"] for e in events])
    wrong_first = [e for e in events if not e["first_right"]]
    route_ms = summary(np.array([t for e in events for t in e["latency_ms"]]))
    report = {
        "store": "redis" if store_cfg.url.startswith("redis") else "sqlite", "sessions": len(convs),
        "requests": int(2 * len(events)), "threads": sc.replay_threads,
        "first_answer_acc": float(np.mean([e["first_right"] for e in events])),
        "followups": dict(Counter(e["kind"] for e in events)),
        "escalation": {"true": int(y.sum()), "detected": int(pred.sum()), "tp": int((y & pred).sum()),
                       "fp": int((~y & pred).sum()), "fn": int((y & ~pred).sum())},
        "fixed_by_escalation": int(sum(e["fixed"] for e in wrong_first)), "wrong_first": len(wrong_first),
        "persistence": {"sessions_checked": len(convs), "mismatched": mismatched},
        "max_session_bytes": int(max(sizes)), "bound": bound, "expiry": expiry,
        "feedback": {k: v for k, v in batch.report().items() if k != "bad_examples"},
    }
    (ctx.out_dir / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(ctx.out_dir / REPORT)
    problems = [msg for ok, msg in (
        (not mismatched, f"{len(mismatched)} sessions read back other decisions than were made"),
        (bound["within"] and bound["newest_kept"], f"the size bound failed: {bound}"),
        (expiry["present_before"] and expiry["gone_after"], f"expiry failed: {expiry}"),
        (batch.report()["bad"] == 0, f"the runtime logged bad feedback: {batch.report()['bad_by_reason']}"),
        (max(sizes) <= sc.max_bytes, f"a session holds {max(sizes)} bytes > max_bytes {sc.max_bytes}"),
    ) if not ok]
    if problems:
        raise RuntimeError("6D: session memory failed its checks: " + "; ".join(problems))

    esc = report["escalation"]
    recall = esc["tp"] / max(esc["true"], 1)
    precision = esc["tp"] / max(esc["detected"], 1)
    quality = {"sessions": float(len(convs)), "requests": float(report["requests"]),
               "escalation_recall": recall, "escalation_precision": precision,
               "fixed_by_escalation": float(report["fixed_by_escalation"]),
               "max_session_kb": max(sizes) / 1024, "persistence_ok": 1.0,
               "route_p50_ms": route_ms["p50"], "route_p99_ms": route_ms["p99"]}
    metrics = {**quality, "store_ops_per_s": ops / seconds, "replay_seconds": seconds,
               "feedback_events": float(report["feedback"]["valid"])}
    notes = (f"{len(convs)} sessions x 4 requests on {report['store']} ({sc.replay_threads} threads): every "
             f"decision read back, max session {max(sizes) / 1024:.1f} KB (bound "
             f"{sc.max_bytes / 1024:.0f} KB held under overflow), expiry ok; escalations {esc['detected']} "
             f"detected of {esc['true']} "
             f"dissatisfied follow-ups (recall {recall:.2f}, precision {precision:.2f}), "
             f"{report['fixed_by_escalation']}/{len(wrong_first)} wrong answers fixed by re-routing; route() "
             f"p50 {quality['route_p50_ms']:.1f} ms, p99 {quality['route_p99_ms']:.1f} ms")
    return JobResult(metrics={k: float(v) for k, v in metrics.items()}, quality=quality, notes=notes,
                     info={"report": REPORT, "store": report["store"]})
