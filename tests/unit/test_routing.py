"""The router (6A), thresholds (6C), serving feedback (13A's input) and the runner's job-side skips and
content-keyed phases: behaviour on small synthetic inputs (no LLM involved)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from forge.routing.router import (
    Examples,
    Router,
    RouterError,
    TrainSettings,
    decide,
    fit_temperature,
    softmax,
    train_router,
)
from forge.routing.router_data import label_queries
from forge.routing.thresholds import ab_arm, choose, replay, threshold_for_share

SETTINGS = TrainSettings(hidden_dim=32, dropout=0.0, epochs=60, batch_size=32, learning_rate=5e-3,
                         weight_decay=0.0, seed=0)
GRID = np.geomspace(0.25, 8.0, 41)


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three separable clusters in 8 dimensions: class k around 3 * e_k."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = rng.normal(0, 0.6, (n, 8)).astype(np.float32)
    X[np.arange(n), y] += 3.0
    return X, y


def trained() -> Router:
    X, y = blobs(240, 0)
    Xv, yv = blobs(60, 1)
    router, _, _ = train_router(Examples.positives(X, y), Xv, yv, ["base", "code", "math"], {"kind": "test"},
                                SETTINGS, GRID)
    return router


def test_router_learns_separable_options_and_round_trips(tmp_path: Path) -> None:
    router = trained()
    Xt, yt = blobs(90, 2)
    assert (router.probs(Xt).argmax(1) == yt).mean() > 0.95
    again = Router.load(router.save(tmp_path / "r"))
    np.testing.assert_allclose(again.probs(Xt), router.probs(Xt), rtol=1e-6)
    assert again.classes == ["base", "code", "math"] and again.temperature == router.temperature


def test_router_refuses_bad_classes_and_foreign_folders(tmp_path: Path) -> None:
    router = trained()
    with pytest.raises(RouterError, match="must start with 'base'"):
        Router(["code", "base"], {}, router.mean, router.std, router.net)
    with pytest.raises(RouterError, match="no router.json"):
        Router.load(tmp_path)
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    (tmp_path / "r" / "router.json").write_text(json.dumps({**meta, "format": "other/v9"}))
    with pytest.raises(RouterError, match="format 'other/v9'"):
        Router.load(tmp_path / "r")


def test_negative_feedback_pushes_an_option_down() -> None:
    """'code was wrong here' (target -1) lowers p(code) on those queries, warm-started from the router."""
    router = trained()
    Xc, _ = blobs(90, 3)
    code_rows = Xc[np.arange(90) % 3 == 1]
    before = router.probs(code_rows)[:, 1].mean()
    negatives = Examples(code_rows, np.ones(len(code_rows), np.int64), -np.ones(len(code_rows), np.int64),
                         np.ones(len(code_rows), np.float32))
    Xv, yv = blobs(30, 4)
    again, _, _ = train_router(negatives, Xv[:0], yv[:0], router.classes, {"kind": "test"},
                               TrainSettings(**{**SETTINGS.__dict__, "epochs": 20}), GRID, init=router)
    assert again.probs(code_rows)[:, 1].mean() < before - 0.3


def test_temperature_fit_cools_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 500)
    logits = rng.normal(0, 1, (500, 3))
    logits[np.arange(500), labels] += 1.0
    hot = logits * 6  # same ranking, far too sure of itself
    t, nll = fit_temperature(hot, labels, GRID)
    assert t > 3 and nll.min() < nll[np.argmin(np.abs(GRID - 1.0))]


def test_decision_rule_threshold_and_share() -> None:
    probs = softmax(np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.5, 2.5], [1.0, 1.1, 0.0]]))
    assert list(decide(probs, 0.0)) == [1, 1, 2, 1]  # threshold 0: always the best modifier
    assert list(decide(probs, 1.0)) == [0, 0, 0, 0]  # threshold 1: never
    assert list(decide(probs, 0.6)) == [0, 1, 2, 0]
    t = threshold_for_share(probs, 0.5)
    assert (decide(probs, t) != 0).mean() == 0.5


def test_replay_measures_each_threshold_and_choose_states_its_tiebreak() -> None:
    probs = softmax(np.array([[0.0, 3.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]))
    correct = np.array([[False, True], [True, False], [True, False], [False, True]])
    logprob = np.where(correct, -0.1, -2.0)
    latency = np.array([[10.0, 30.0]] * 4)
    points = replay(probs, correct, logprob, [0.0, 0.8, 1.0], latency)
    by_t = {p["threshold"]: p for p in points}
    assert by_t[0.0]["share"] == 1.0 and by_t[0.0]["acc"] == 0.5  # threshold 0: every query to a modifier
    assert by_t[1.0]["share"] == 0.0 and by_t[1.0]["acc"] == 0.5 and by_t[1.0]["latency_ms_mean"] == 10.0
    assert by_t[0.8] == {**by_t[0.8], "acc": 1.0, "share": 0.5, "latency_ms_mean": 20.0}
    assert choose(points, 0.02)["threshold"] == 0.8
    # equal objective: the higher threshold (fewer modifier calls) wins
    same = [{"threshold": 0.5, "acc": 0.6, "share": 0.5}, {"threshold": 0.7, "acc": 0.6, "share": 0.5}]
    assert choose(same, 0.0)["threshold"] == 0.7


def test_ab_arms_are_stable_per_session_and_follow_the_weights() -> None:
    arms = [{"name": "control", "threshold": 0.8, "weight": 3.0}, {"name": "t75", "threshold": 0.75,
                                                                   "weight": 1.0}]
    assert all(ab_arm("session-42", arms) == ab_arm("session-42", arms) for _ in range(3))
    share = np.mean([ab_arm(f"s{i}", arms)["name"] == "t75" for i in range(4000)])
    assert 0.22 < share < 0.28


def test_labels_come_from_what_answered_not_from_the_domain() -> None:
    options = ["base", "code", "math"]
    correct = np.array([[True, True, False], [False, True, True], [False, False, False],
                        [False, False, True]])
    logprob = np.array([[-1.0, -0.1, -3.0], [-1.0, -0.9, -0.2], [-2.0, -0.5, -1.0], [-0.1, -0.2, -3.0]])
    labels, reasons = label_queries(options, correct, logprob)
    assert [options[i] for i in labels] == ["base", "math", "code", "math"]
    assert reasons == ["base correct", "modifiers correct: best log-prob", "none correct: best log-prob",
                       "modifier correct"]


# ---- feedback ------------------------------------------------------------------------------------

def _rating(sid: str, rid: str, ts: float, rating: object) -> dict:
    return {"kind": "rating", "ts": ts, "session_id": sid, "request_id": rid, "rating": rating}


def _decision(sid: str, rid: str, ts: float, option: str = "code") -> dict:
    return {"kind": "decision", "ts": ts, "session_id": sid, "request_id": rid, "query": f"q {rid}",
            "option": option, "confidence": 0.9, "threshold": 0.8, "arm": "chosen", "escalated": False}


def test_feedback_round_trip_counts_and_skips_every_kind_of_bad_row(tmp_path: Path) -> None:
    from forge.artifacts import ArtifactStore
    from forge.routing.feedback import FeedbackWriter, labelled_examples, read_interval

    store = ArtifactStore(f"file://{tmp_path}/store")
    root = store.uri("feedback")
    start = datetime(2026, 11, 15, tzinfo=UTC)
    t0 = start.timestamp() + 3600
    with FeedbackWriter(store, root) as w:
        w.log(_decision("s1", "r1", t0))
        w.log({"kind": "rating", "ts": t0 + 1, "session_id": "s1", "request_id": "r1", "rating": "down"})
        w.log({"kind": "rating", "ts": t0 + 2, "session_id": "s1", "request_id": "r1", "rating": "up"})
        w.log(_decision("s2", "r2", "2026-11-16T10:00:00+00:00", option="base"))
        w.log({"kind": "escalation", "ts": t0 + 86400, "session_id": "s2", "request_id": "r2",
               "message": "wrong", "score": 0.97})
        w.log(_decision("s3", "r3", t0 + 3 * 86400))  # nobody reacted: no label
        w.log(_decision("s4", "r4", (start + timedelta(days=8)).timestamp()))
    with pytest.raises(ValueError, match="confidence: expected"):
        FeedbackWriter(store, root).log({**_decision("s", "r", t0), "confidence": "high"})
    bad_lines = ['{"kind": "decision"', json.dumps({**_decision("s5", "r5", t0), "query": None}),
                 json.dumps({**_decision("s6", "r6", t0), "escalated": "yes"}),
                 json.dumps({"kind": "like", "ts": t0}),
                 json.dumps({**_decision("s7", "r7", t0), "ts": "2026-11-16 10:00"}),
                 json.dumps(_rating("ghost", "r1", t0, 1)), json.dumps(_rating("s1", "r9", t0, 1)),
                 json.dumps(_rating("s1", "r1", t0, 5)),
                 "[1, 2]"]
    store.write_text(f"{root}/dt=2026-11-17/handwritten.jsonl", "\n".join(bad_lines) + "\n")

    batch = read_interval(store, root, start, start + timedelta(days=7))
    report = batch.report()
    assert report["valid"] == 6  # the next week's decision sits in a partition this week never opens
    assert "s4" not in {e["session_id"] for e in batch.events}
    assert report["bad_by_reason"] == {"not_json": 1, "missing_field": 1, "wrong_type": 2, "unknown_kind": 1,
                                       "unknown_session": 1, "unknown_request": 1, "bad_value": 2}
    assert {e["where"].split(":")[0] for e in report["bad_examples"]} == {"dt=2026-11-17/handwritten.jsonl"}
    examples, counts = labelled_examples(batch.events, ["base", "code"])
    by_rid = {e["request_id"]: e for e in examples}
    assert by_rid["r1"]["target"] == 1 and by_rid["r1"]["source"] == "rating"  # the last rating counts
    assert by_rid["r2"]["target"] == -1 and by_rid["r2"]["source"] == "escalation"
    assert counts["unlabelled"] == 1 and "r3" not in by_rid


def test_runner_records_a_job_side_skip_and_keys_live_phases_by_content(
        forge_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forge.phases
    from forge.config import load_config
    from forge.ledger import read_rows
    from forge.runner import make_store, run_phase
    from tests.fake_jobs import FAKE_PHASES

    live = forge.phases.Phase("live", "live_reader", "fake", "Live", "tests.fake_jobs:live_read", (), (),
                              live_inputs=True)
    after = forge.phases.Phase("after", "after_live", "fake", "After", "tests.fake_jobs:after_live",
                               ("live",), ())
    monkeypatch.setattr(forge.phases, "BY_ID", {p.id: p for p in (*FAKE_PHASES, live, after)})
    cfg = load_config(profile="demo")
    store = make_store(cfg)
    (forge_home / "live.txt").write_text("")
    skipped = run_phase("live", cfg, "r1", track=False)
    assert skipped.status == "skipped" and "nothing to read" in skipped.skip_reason
    (forge_home / "live.txt").write_text("week 1")
    first = run_phase("live", cfg, "r2", track=False)
    run_phase("after", cfg, "r2", track=False)
    again = run_phase("live", cfg, "r3", track=False)  # same content: linked, downstream a cache hit
    assert again.cache_key == first.cache_key and again.run_id == "r2"
    assert run_phase("after", cfg, "r3", track=False).run_id == "r2"
    assert {r["phase"]: r for r in read_rows(store, "r3")}["live"]["notes"].startswith("same content as")
    (forge_home / "live.txt").write_text("week 2")
    changed = run_phase("live", cfg, "r4", track=False)
    assert changed.cache_key != first.cache_key and changed.run_id == "r4"


# ---- the routing runtime (what serving calls per request) ------------------------------------------

class KeywordFeatures:
    """A feature extractor for tests: a query's vector says which keyword it holds (the router's input)."""

    kind, dim = "keywords", 8

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            out[i, 1 if "code" in t else 2 if "math" in t else 0] = 3.0
        return out

    def close(self) -> None:
        pass


class KeywordDetector:
    """An escalation detector for tests: unhappy when the follow-up says "wrong"."""

    threshold = 0.5

    def score(self, previous: str, message: str) -> float:
        return 0.95 if "wrong" in message else 0.05


def test_runtime_routes_escalates_remembers_and_logs_feedback(tmp_path: Path) -> None:
    from forge.artifacts import ArtifactStore
    from forge.routing.bundle import RoutingPolicy
    from forge.routing.feedback import FeedbackWriter, labelled_examples, read_interval
    from forge.routing.runtime import RoutingRuntime
    from forge.routing.sessions import SQLiteSessionStore

    router = trained()
    arms = [{"name": "strict", "threshold": 0.99, "weight": 1.0}, {"name": "loose", "threshold": 0.0,
                                                                   "weight": 1.0}]
    policy = RoutingPolicy(tmp_path, router, {"chosen": {"threshold": 0.8}, "arms": arms}, {})
    store = ArtifactStore(f"file://{tmp_path}/store")
    writer = FeedbackWriter(store, store.uri("feedback"))
    started = datetime.now(UTC)
    runtime = RoutingRuntime(policy, KeywordFeatures(), SQLiteSessionStore(tmp_path / "s.db"),
                             KeywordDetector(), writer)
    try:
        sid = next(s for s in (f"s{i}" for i in range(100)) if runtime.arm(s)["name"] == "loose")
        first = runtime.route(sid, "please write code for a parser", request_id="r1")
        assert (first.option, first.arm, first.threshold, first.escalated) == ("code", "loose", 0.0, False)
        runtime.record_answer(sid, "r1", "def parse(): ...")
        thanks = runtime.route(sid, "thanks, that works")
        assert not thanks.escalated
        again = runtime.route(sid, "that's wrong", request_id="r3")
        # unhappy with the last answer: that question again ("thanks" was the last routed one), elsewhere
        assert again.escalated and again.escalation_of == thanks.request_id and again.query == thanks.query
        assert again.option != thanks.option
        session = runtime.sessions.get(sid)
        assert [d["option"] for d in session["decisions"]] == [first.option, thanks.option, again.option]
        assert [t["role"] for t in session["turns"]] == ["user", "assistant", "user", "user"]
        assert session["turns"][-1]["escalation"] is True
        runtime.rate(sid, "r1", 1)
        # a session of the other arm keeps its arm on every request
        other = next(s for s in (f"t{i}" for i in range(100)) if runtime.arm(s)["name"] == "strict")
        assert {runtime.route(other, q).arm for q in ("math please", "more math")} == {"strict"}
    finally:
        runtime.close()
    batch = read_interval(store, store.uri("feedback"), started - timedelta(minutes=1),
                          datetime.now(UTC) + timedelta(minutes=1))
    assert batch.report()["bad"] == 0 and batch.report()["valid_by_kind"] == {"decision": 5, "escalation": 1,
                                                                               "rating": 1}
    examples, _ = labelled_examples(batch.events, router.classes)
    targets = {e["request_id"]: e["target"] for e in examples}
    assert targets == {"r1": 1, thanks.request_id: -1}
