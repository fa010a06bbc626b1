"""12A critique classifier: the examples (labels are the suites' verdicts, realistic wrong answers, splits by
question), the critic (separates held-out correct from wrong answers, save/load round trip, thread-safe
scoring, clear errors on a foreign folder) and the job end to end on the session's tiny run."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from forge.data.records import reference
from forge.data.suites import check_answer
from forge.serve import critique_data as D
from forge.serve.critique import Critic, CriticError, arithmetic_claims, cheap_features, roc_auc
from forge.serve.serve_config import CritiqueConfig

DOMAINS = ["general", "code", "reasoning", "automation", "math", "finance", "creative"]
# measured with ~300 training examples, ~100 test examples on held-out questions, seeds 11-15: test AUC
# 0.82-0.85 (0.5 is chance), mean score of correct answers 2.7-3.2 points above wrong ones. The margins leave
# room for the noise of a ~100-example test split.
MIN_AUC, MIN_GAP = 0.7, 1.5
# the tiny run's 12A settings (what tests/conftest.py's TINY_OVERRIDES should hold)
TINY_CRITIQUE = {"train_examples": 400, "model_answers": 16, "epochs": 15, "hidden_dim": 64}


def rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def data() -> tuple[list[dict], list[dict]]:
    cfg = CritiqueConfig(train_examples=200, domains=DOMAINS, seed=7)
    rows = D.question_rows(cfg, cfg.train_examples)
    return rows, D.build_examples(rows, cfg.seed, 5.0)


# ---- the examples ----------------------------------------------------------------------------------------

def test_every_label_is_the_suites_verdict(data) -> None:
    rows, examples = data
    by_id = rows_by_id(rows)
    for ex in examples:
        assert ex["correct"] == check_answer(by_id[ex["row_id"]], ex["answer"]).correct, ex
    sources = Counter((ex["source"], ex["correct"]) for ex in examples)
    assert sources[("reference", True)] == len(rows) and not sources[("reference", False)]
    assert sources[("rewrite", True)] > 0 and sources[("perturbed", False)] > 0
    # perturbations are meant to be wrong and mostly are; the few that still pass are labelled correct
    perturbed = [ex for ex in examples if ex["source"] == "perturbed"]
    assert sum(not ex["correct"] for ex in perturbed) >= 0.8 * len(perturbed)
    for kind in ("numeric", "exact", "python_tests", "tool_call", "rubric"):
        assert {ex["correct"] for ex in examples if ex["kind"] == kind} == {True, False}, kind


def test_wrong_answers_are_realistic_per_check_kind(data) -> None:
    _, examples = data
    variants = {(ex["kind"], ex["variant"]) for ex in examples if not ex["correct"]}
    for expected in [("numeric", "off_by_little"), ("numeric", "slipped_step"),
                     ("python_tests", "syntax_error"), ("python_tests", "wrong_operator"),
                     ("tool_call", "wrong_value"), ("tool_call", "missing_arg")]:
        assert expected in variants, expected
    broken = [ex for ex in examples if ex["variant"] == "syntax_error"]
    assert all("syntax error" in ex["detail"] for ex in broken)


def test_splits_share_no_question_and_are_deterministic(data) -> None:
    rows, examples = data
    splits = D.by_split(examples)
    questions = {s: {ex["question"] for ex in exs} for s, exs in splits.items()}
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    assert D.build_examples(rows[:30], 7, 5.0) == D.build_examples(rows[:30], 7, 5.0)
    moved = [q for q in questions["train"] if D.split_of("general", q, 8) != D.split_of("general", q, 7)]
    assert moved  # the seed salts the split


def test_model_answers_are_checked_like_the_rest(data) -> None:
    rows, _ = data
    picked = D.model_rows(rows, 7)
    assert len({rows[i]["domain"] for i in picked}) == 7  # round-robin over the domains
    answers = {i: reference(rows[i]) if k % 2 else "I do not know." for k, i in enumerate(picked)}
    examples = D.build_examples([rows[i] for i in picked], 7, 5.0,
                                {k: answers[i] for k, i in enumerate(picked)})
    model = [ex for ex in examples if ex["source"] == "model"]
    assert len(model) == 7 and [ex["correct"] for ex in model] == [bool(k % 2) for k in range(7)]


def test_cheap_features_read_arithmetic_code_and_tool_calls() -> None:
    assert arithmetic_claims("8 * 2 = 16. 16 + 1 = 17. Answer: 17") == [(True, 16.0), (True, 17.0)]
    assert [ok for ok, _ in arithmetic_claims("8 * 2 = 16. 16 + 1 = 18. Answer: 18")] == [True, False]
    assert arithmetic_claims("31500 * 0.095 / 12 = 249.38")[0][0]  # rounded to the decimals shown
    assert arithmetic_claims("x = 5. Answer: 5") == []
    names = ("code_compiles", "json_values_in_question", "claim_false")
    from forge.serve.critique import CHEAP_FEATURES

    def feats(q: str, a: str) -> dict[str, float]:
        return {n: float(v) for n, v in zip(CHEAP_FEATURES, cheap_features(q, a), strict=True) if n in names}

    assert feats("f", "def f(x):\n    return x")["code_compiles"] == 1.0
    assert feats("f", "def f(x:\n    return x")["code_compiles"] == 0.0
    q = "Tools: get_weather(city, unit). Request: weather in Paris in celsius?"
    assert feats(q, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}')[
        "json_values_in_question"] == 1.0
    assert feats(q, '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}')[
        "json_values_in_question"] == 0.5


# ---- the critic ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained() -> tuple[Critic, dict[str, list[dict]]]:
    from forge.compress.calibration import temperature_grid
    from forge.compress.calibration_config import CalibrationConfig
    from forge.routing.features import MiniLMFeatures
    from forge.serve.critique import MAX_SEQ_LEN, TrainSettings, feature_matrix, train_critic

    cfg = CritiqueConfig(train_examples=500, seed=11)
    splits = D.by_split(D.build_examples(D.question_rows(cfg, cfg.train_examples), cfg.seed, 5.0))
    extractor = MiniLMFeatures(MAX_SEQ_LEN)
    X = {s: feature_matrix(extractor, [(e["question"], e["answer"]) for e in exs])
         for s, exs in splits.items()}
    y = {s: np.array([e["correct"] for e in exs], np.float32) for s, exs in splits.items()}
    critic, _ = train_critic(X["train"], y["train"], X["val"], y["val"],
                             TrainSettings(64, 20, 1e-3, cfg.seed), temperature_grid(CalibrationConfig()),
                             extractor.spec(), extractor)
    return critic, splits


def test_critic_separates_held_out_correct_from_wrong(trained) -> None:
    critic, splits = trained
    test = splits["test"]
    assert len(splits["train"]) >= 250 and len(test) >= 60
    scores = np.array(critic.score_batch([(e["question"], e["answer"]) for e in test]))
    assert ((scores >= 0) & (scores <= 10)).all()
    labels = np.array([e["correct"] for e in test])
    assert roc_auc(scores, labels) >= MIN_AUC
    assert scores[labels].mean() > scores[~labels].mean() + MIN_GAP
    assert 0.25 <= critic.temperature <= 8.0


def test_save_load_round_trip_and_thread_safe_scoring(trained, tmp_path: Path) -> None:
    critic, splits = trained
    pairs = [(e["question"], e["answer"]) for e in splits["test"][:24]]
    critic.save(tmp_path / "critic")
    meta = json.loads((tmp_path / "critic" / "critic.json").read_text())
    assert meta["format"] == "forge-critic/v1" and meta["dims"]["input"] == critic.input_dim
    assert (tmp_path / "critic" / "critic.safetensors").stat().st_size < 10 * 1024 * 1024
    loaded = Critic.load(tmp_path / "critic", extractor=critic.extractor())
    assert loaded.score_batch(pairs) == critic.score_batch(pairs)
    alone = Critic.load(tmp_path / "critic")  # opens its own extractor from the spec in critic.json
    single = [alone.score(q, a) for q, a in pairs]
    assert single == [critic.score(q, a) for q, a in pairs]

    results: dict[int, list[float]] = {}

    def worker(k: int) -> None:
        results[k] = [alone.score(q, a) for q, a in pairs]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == single for k in range(4))


def test_a_foreign_or_corrupt_folder_is_a_clear_error(trained, tmp_path: Path) -> None:
    critic, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CriticError, match=f"{empty} is not a critic folder"):
        Critic.load(empty)
    router = tmp_path / "router"
    router.mkdir()
    (router / "critic.json").write_text(json.dumps({"format": "forge-router/v1"}))
    with pytest.raises(CriticError, match="format 'forge-router/v1', expected 'forge-critic/v1'"):
        Critic.load(router)
    (router / "critic.json").write_text("{not json")
    with pytest.raises(CriticError, match="not JSON"):
        Critic.load(router)
    broken = critic.save(tmp_path / "broken")
    (broken / "critic.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CriticError, match="unreadable or incomplete weights"):
        Critic.load(broken)
    (broken / "critic.safetensors").unlink()
    with pytest.raises(CriticError, match="critic.safetensors is missing"):
        Critic.load(broken)


# ---- the job ---------------------------------------------------------------------------------------------

def test_job_end_to_end_on_the_tiny_run(in_tiny_run) -> None:
    from forge.runner import make_store, run_phase

    cfg = in_tiny_run.config({"serving": {"critique": TINY_CRITIQUE}})
    manifest = run_phase("12A", cfg, in_tiny_run.run_id, track=False)
    assert {"critic/critic.json", "critic/critic.safetensors", "critique_report.json", "critique_scores.png",
            "examples_train.jsonl", "examples_val.jsonl", "examples_test.jsonl"} <= set(manifest.files)
    assert set(manifest.info["quality"]) == {"critic_auc", "critic_accuracy"}
    out = make_store(cfg).materialize(manifest)
    report = json.loads((out / "critique_report.json").read_text())
    assert report["base_answers"]["n"] > 0  # the tiny GGUF answered some questions itself
    assert report["examples"]["per_source"]["model"] == report["base_answers"]["n"]
    assert set(report["examples"]["per_domain"]) == set(CritiqueConfig().domains)
    test = report["metrics"]["test"]
    assert test["auc"] > 0.5 and 0 <= test["ece_after"] <= 1 and report["size"]["head_bytes"] < 10 * 1024 ** 2
    assert manifest.info["timing"]["latency_ms"]["p50"] > 0 and "latency_ms" not in report  # info only
    assert sum(report["score_histogram_test"]["correct"]) > 0
    critic = Critic.load(out / "critic")
    ex = json.loads((out / "examples_test.jsonl").read_text().splitlines()[0])
    assert 0.0 <= critic.score(ex["question"], ex["answer"]) <= 10.0
