"""6B escalation detector: the pair generator (deterministic, balanced, held-out test phrasings, re-asks
built from the previous message), the shipped student (save/load round trip, single vs batch scoring, bad
inputs, bad directories) and the job on a tiny config through a minimal JobContext (files, report,
quality keys, and a student that really learned: clearly above chance on held-out phrasings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from forge.data.records import DataError, write_jsonl
from forge.data.suites import generate
from forge.routing import escalation_data as D
from forge.routing.routing_config import DetectorConfig

DOMAINS = ("general", "code", "reasoning", "automation")
QUALITY_KEYS = {"teacher_acc", "student_acc", "agreement", "teacher_mb", "student_mb", "teacher_p99_ms",
                "student_p99_ms", "student_p50_ms", "n_test"}
# small enough for ~20 s on 2 cores, big enough to learn (measured: student test 0.86-0.89, val 0.92)
TINY = {"train_pairs": 300, "val_pairs": 50, "test_pairs": 100, "teacher_epochs": 3, "teacher_batch_size": 16,
        "teacher_lr": 3e-4, "student_epochs": 10, "latency_pairs": 20}


def suite_prompts(per_domain: int = 60, split: str = "train") -> list[str]:
    return [r["messages"][0]["content"] for d in DOMAINS for r in generate(d, per_domain, 1234, split)]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return suite_prompts()


# ---- the generator -------------------------------------------------------------------------------

def test_pairs_are_deterministic_and_seeded(prompts: list[str]) -> None:
    a = D.make_pairs(300, 5, "train", prompts)
    assert a == D.make_pairs(300, 5, "train", prompts)
    assert a != D.make_pairs(300, 6, "train", prompts)
    assert [r["id"] for r in a] == [f"esc-train-{i:05d}" for i in range(300)]


@pytest.mark.parametrize("n", [0, 1, 101, 600])
def test_pairs_are_balanced(prompts: list[str], n: int) -> None:
    rows = D.make_pairs(n, 1, "val", prompts)
    assert len(rows) == n
    assert sum(r["label"] for r in rows) == n // 2


def test_every_kind_occurs_with_its_label(prompts: list[str]) -> None:
    rows = D.make_pairs(900, 2, "train", prompts)
    assert {r["kind"] for r in rows} == set(D.KINDS)
    for r in rows:
        assert r["label"] == (1 if r["kind"] in D.POSITIVE_KINDS else 0), r
        assert r["message"].strip() and r["previous"] in prompts
    assert len({(r["previous"], r["message"]) for r in rows}) == len(rows)


def test_test_phrasings_are_disjoint_from_training(prompts: list[str]) -> None:
    for kind in D.TEMPLATES:
        train = {t for _, t in D.templates(kind, "train")}
        assert train == {t for _, t in D.templates(kind, "val")}
        test = {t for _, t in D.templates(kind, "test")}
        assert test and train and not (test & train), kind
    for items in (D.OPENERS, D.CLOSERS, D.ERRORS, D.ACTIONS, D.POLITE, D.SYNONYMS):
        assert not set(D.split_items(items, "test")) & set(D.split_items(items, "train"))
    used = {s: {r["template"] for r in D.make_pairs(1500, 3, s, prompts)} - {f"{k}:bare" for k in D.KINDS}
            for s in ("train", "test")}
    assert used["test"] and not used["test"] & used["train"]


def test_rephrasings_reask_the_previous_message(prompts: list[str]) -> None:
    rows = [r for r in D.make_pairs(1500, 4, "test", prompts) if r["kind"] == "rephrase"]
    assert len(rows) > 100
    for r in rows:
        prev, msg = r["previous"], r["message"]
        assert D.words(msg) != D.words(prev), r  # reworded, not repeated
        assert set(D.content_words(msg)) & set(D.content_words(prev)), r
        # a re-ask keeps the previous message's numbers: a changed number would be another question
        assert set(re.findall(r"\d+", msg)) <= set(re.findall(r"\d+", prev)), r


def test_new_questions_ask_something_else(prompts: list[str]) -> None:
    rows = [r for r in D.make_pairs(1500, 4, "train", prompts)
            if r["kind"] == "new_question" and r["template"] == "new_question:bare"]
    assert len(rows) > 50
    for r in rows:
        assert r["message"] in prompts and D.signature(r["message"]) != D.signature(r["previous"]), r
    # many share the previous prompt's template (same first words, other numbers / names): hard negatives
    hard = [r for r in rows if D.PromptPool.group(r["message"]) == D.PromptPool.group(r["previous"])]
    assert len(hard) > len(rows) // 4


def test_generator_rejects_bad_arguments(prompts: list[str]) -> None:
    with pytest.raises(ValueError, match="split"):
        D.make_pairs(10, 1, "dev", prompts)
    with pytest.raises(ValueError, match="n must be"):
        D.make_pairs(-1, 1, "train", prompts)
    with pytest.raises(ValueError, match="previous"):
        D.make_pairs(10, 1, "train", ["only one prompt", "only one prompt", " "])


# ---- the shipped student -------------------------------------------------------------------------

def random_detector(threshold: float = 0.5):
    import torch

    from forge.routing import escalation as E

    torch.manual_seed(0)
    vocab = list(range(1996, 2496))
    module = E.build_student(len(vocab) + 2, 16, 12)
    return E.EscalationDetector(module, vocab, max_len=32, threshold=threshold, embed_dim=16, hidden=12,
                                metrics={"student_acc_test": 0.5})


PAIRS = [("What is 12 + 30?", "that's wrong"), ("Sort the words: owl fox", "thanks!"),
         ("Write a Python function add(a, b) that returns the sum of a and b.",
          "I mean, create a python function add(a, b) which returns the total of a and b")]


def test_student_round_trip_keeps_scores(tmp_path: Path) -> None:
    from forge.routing.escalation import CONFIG, FORMAT, WEIGHTS, EscalationDetector

    det = random_detector(threshold=0.42)
    det.save(tmp_path / "detector")
    assert {p.name for p in (tmp_path / "detector").iterdir()} == {CONFIG, WEIGHTS}
    spec = json.loads((tmp_path / "detector" / CONFIG).read_text())
    assert spec["format"] == FORMAT and spec["threshold"] == 0.42
    assert spec["metrics"] == {"student_acc_test": 0.5}
    loaded = EscalationDetector.load(tmp_path / "detector")
    assert [loaded.score(p, m) for p, m in PAIRS] == [det.score(p, m) for p, m in PAIRS]
    assert loaded.size_bytes == det.size_bytes == 4 * det.n_params
    assert loaded.is_dissatisfied(*PAIRS[0]) == (loaded.score(*PAIRS[0]) >= 0.42)


def test_single_and_batch_scores_agree() -> None:
    det = random_detector()
    single = [det.score(p, m) for p, m in PAIRS]
    assert det.score_batch(PAIRS) == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in single)


def test_bad_pairs_name_the_field() -> None:
    det = random_detector()
    with pytest.raises(ValueError, match="message is empty"):
        det.score("What is 2 + 2?", "   ")
    with pytest.raises(ValueError, match="previous is empty"):
        det.is_dissatisfied("", "try again")
    with pytest.raises(ValueError, match="message must be a string"):
        det.score_batch([("What is 2 + 2?", None)])


def test_bad_detector_dirs_are_refused(tmp_path: Path) -> None:
    from forge.routing.escalation import CONFIG, EscalationDetector

    with pytest.raises(FileNotFoundError, match="detector.json"):
        EscalationDetector.load(tmp_path / "nothing")
    d = random_detector().save(tmp_path / "detector")
    spec = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**spec, "format": "forge-router/v1"}))
    with pytest.raises(ValueError, match="format is 'forge-router/v1'"):
        EscalationDetector.load(d)
    (d / CONFIG).write_text(json.dumps({**spec, "dims": {**spec["dims"], "hidden": 13}}))
    with pytest.raises(ValueError, match="does not match the dims"):
        EscalationDetector.load(d)


def test_importing_the_modules_stays_cheap() -> None:
    code = ("import sys, forge.routing.escalation, forge.routing.escalation_trainer, "
            "forge.routing.escalation_data, forge.routing.minilm; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# ---- the job -------------------------------------------------------------------------------------

def fake_ctx(root: Path, cfg: DetectorConfig) -> SimpleNamespace:
    prep, out = root / "prep_data", root / "out"
    prep.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logged: list[str] = []
    return SimpleNamespace(config=SimpleNamespace(routing=SimpleNamespace(detector=cfg)),
                           input_dir=lambda phase: prep, out_dir=out, work_dir=root / "scratch", mlflow=None,
                           log_metrics=lambda metrics, step=None: None,
                           log_artifact=lambda path, artifact_path=None: logged.append(Path(path).name),
                           logged=logged)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimpleNamespace, object]:
    from forge.routing.escalation_trainer import run

    root = tmp_path_factory.mktemp("esc")
    ctx = fake_ctx(root, DetectorConfig(**TINY))
    rows = [r for d in DOMAINS for r in generate(d, 60, 1234, "train")]
    write_jsonl(root / "prep_data" / "train.jsonl", rows)
    return ctx, run(ctx)


def test_job_writes_the_detector_pairs_and_report(job) -> None:
    ctx, result = job
    out: Path = ctx.out_dir
    assert {p.name for p in out.iterdir()} == {"detector", "pairs_train.jsonl", "pairs_val.jsonl",
                                               "pairs_test.jsonl", "detector_report.json",
                                               "detector_accuracy.png"}
    assert sorted(ctx.logged) == ["detector_accuracy.png", "detector_report.json"]
    pairs = {s: [json.loads(x) for x in (out / f"pairs_{s}.jsonl").read_text().splitlines()]
             for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in pairs.items()} == {"train": 300, "val": 50, "test": 100}
    prev = {s: {r["previous"] for r in v} for s, v in pairs.items()}
    assert not prev["test"] & prev["train"] and not prev["val"] & prev["train"]  # prompts split too
    report = json.loads((out / "detector_report.json").read_text())
    for model in ("teacher", "student"):
        sec = report[model]
        assert set(sec["accuracy"]) == {"train", "val", "test"}
        assert set(sec["per_kind"]["test"]) == set(D.KINDS)
        assert sum(sec["confusion"]["test"].values()) == 100
        assert sec["latency_ms"]["p99"] >= sec["latency_ms"]["p50"] > 0
    assert report["student"]["bytes"] < report["teacher"]["bytes"] / 10
    # no absolute paths anywhere; timings only in the report
    for path in out.rglob("*"):
        if path.suffix in (".json", ".jsonl"):
            assert str(out) not in path.read_text() and "/tmp" not in path.read_text(), path
    assert "latency" not in (out / "detector" / "detector.json").read_text()


def test_job_result_and_learning(job) -> None:
    from forge.routing.escalation import EscalationDetector

    ctx, result = job
    assert set(result.quality) == QUALITY_KEYS and all(isinstance(v, float) for v in result.quality.values())
    assert QUALITY_KEYS <= set(result.metrics)
    assert result.register == "detector" and result.register_model == "forge-escalation-detector"
    assert result.info["detector_dir"] == "detector" and result.info["threshold"] == 0.5
    assert "94%" in result.notes
    # the distilled student learned: clearly above chance on phrasings and prompts it never saw
    assert result.metrics["student_acc_val"] >= 0.85
    assert result.quality["student_acc"] >= 0.75
    assert result.quality["agreement"] >= 0.65
    det = EscalationDetector.load(ctx.out_dir / "detector")
    assert det.score("What is 12 + 30?", "that's wrong, try again") > det.score("What is 12 + 30?", "thanks!")
    assert result.quality["student_mb"] == pytest.approx(det.size_bytes / 1e6)


def test_job_needs_enough_prompts(tmp_path: Path) -> None:
    from forge.routing.escalation_trainer import run, split_pool

    ctx = fake_ctx(tmp_path, DetectorConfig(**TINY))
    with pytest.raises(DataError, match="train.jsonl"):
        run(ctx)
    with pytest.raises(DataError, match="need >= 2 each"):
        split_pool(["What is 1 + 1?", "What is 2 + 2?", "Sort the words: a b"], "train.jsonl")
