"""1B failure analysis: clustering, labels, hardest examples and edge cases on synthetic records;
one run of the real phase (harness included) on a tiny model built here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from forge.config import FailureAnalysisConfig
from forge.data.failure_analysis import analyze_failures, render_report, write_outputs
from forge.data.records import DataError, read_jsonl

TOPICS = {
    "code": ("Write a Python function {n}_list that sorts the list and returns the reversed string of "
             "the array", "def {n}_list(xs): return sorted(xs)"),
    "reasoning": ("A train travels {n} miles in hours; how many miles per hour is its speed, the "
                  "distance divided by time?", "The speed is {n} miles per hour"),
    "automation": ("Schedule a cron job that runs the nightly backup script at {n} and emails the "
                   "admin the log", '{{"tool": "cron", "at": "{n}"}}'),
}


def _synthetic(n_per_topic: int = 6, n_correct: int = 4) -> tuple[list[dict], list[dict]]:
    """Eval records (failures in three obvious topics + a few correct ones) and their rows."""
    rng = random.Random(7)
    records, rows = [], []
    for domain, (prompt, output) in TOPICS.items():
        for i in range(n_per_topic + n_correct):
            rid = f"{domain}-{i}"
            n = rng.randint(10, 99)
            q = prompt.format(n=n)
            rows.append({"id": rid, "domain": domain, "source": "test",
                         "check": {"kind": "exact", "answer": "x"},
                         "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]})
            records.append({"id": rid, "domain": domain, "prompt": f"<|user|>\n{q}<|end|>\n<|assistant|>\n",
                            "reference": "x", "output": output.format(n=n), "correct": i >= n_per_topic,
                            "detail": "", "logprob": -rng.uniform(0.5, 5.0)})
    return records, rows


def _cfg(embedder: str, n_clusters: int = 3, hardest_k: int = 5) -> FailureAnalysisConfig:
    return FailureAnalysisConfig(n_clusters=n_clusters, embedder=embedder, hardest_k=hardest_k, top_terms=5)


@pytest.mark.parametrize("embedder", ["tfidf", "minilm"])
def test_clusters_recover_obvious_topics(embedder: str) -> None:
    records, rows = _synthetic()
    analysis = analyze_failures(records, rows, _cfg(embedder), seed=1234)
    assert len(analysis.failures) == 18
    assert len(analysis.clusters) == 3
    assert analysis.embeddings is not None and analysis.embeddings.shape[0] == 18
    # every cluster is one topic, all of it
    assert sorted(c.majority_domain for c in analysis.clusters) == sorted(TOPICS)
    for c in analysis.clusters:
        assert c.size == 6 and c.domain_mix == {c.majority_domain: 1.0}
        assert all(m.startswith(c.majority_domain) for m in c.member_ids)
        assert len(c.example_prompts) == 2 and c.example_ids == c.member_ids[:2]
    terms = {c.majority_domain: c.top_terms for c in analysis.clusters}
    assert len(terms["code"]) == 5
    assert {"python", "function", "list", "sorted", "def"} & set(terms["code"])
    assert {"train", "miles", "speed", "hour", "hours"} & set(terms["reasoning"])
    assert {"cron", "backup", "schedule", "nightly", "admin"} & set(terms["automation"])
    assert not set(terms["code"]) & set(terms["reasoning"])


def test_hardest_are_lowest_logprob_failures_as_rows() -> None:
    records, rows = _synthetic()
    analysis = analyze_failures(records, rows, _cfg("tfidf", hardest_k=5), seed=0)
    failed = sorted((r for r in records if not r["correct"]), key=lambda r: r["logprob"])
    assert [h["id"] for h in analysis.hardest] == [r["id"] for r in failed[:5]]
    by_id = {r["id"]: r for r in rows}
    assert all(h == by_id[h["id"]] for h in analysis.hardest)  # original rows, records schema
    assert all("messages" in h and "check" in h for h in analysis.hardest)


def test_outputs_are_written(tmp_path: Path) -> None:
    records, rows = _synthetic()
    analysis = analyze_failures(records, rows, _cfg("tfidf"), seed=0)
    summary = {"acc": 12 / 30, "acc.code": 0.4, "n": 30.0}
    paths = write_outputs(analysis, records, summary, "tfidf", tmp_path)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert len(read_jsonl(paths["hardest"])) == 5
    assert len(paths["records"].read_text().splitlines()) == len(records)
    clusters = json.loads(paths["clusters"].read_text())
    assert clusters["n_failures"] == 18 and sum(c["size"] for c in clusters["clusters"]) == 18
    report = paths["report"].read_text()
    assert report.count("## Cluster") == 3 and "0.400" in report
    assert "Write a Python function" in report and "cron" in report


def test_zero_failures(tmp_path: Path) -> None:
    records, rows = _synthetic(n_per_topic=0)
    analysis = analyze_failures(records, rows, _cfg("minilm"), seed=0)
    assert analysis.failures == [] and analysis.clusters == [] and analysis.hardest == []
    paths = write_outputs(analysis, records, {"acc": 1.0, "n": 12.0}, "minilm", tmp_path)
    assert "plot" not in paths and not (tmp_path / "failure_clusters.png").exists()
    assert paths["hardest"].read_text() == ""
    assert json.loads(paths["clusters"].read_text())["clusters"] == []
    assert "No failures" in paths["report"].read_text()


def test_fewer_failures_than_clusters() -> None:
    records, rows = _synthetic(n_per_topic=1)  # 3 failures, 8 clusters asked
    analysis = analyze_failures(records, rows, _cfg("tfidf", n_clusters=8), seed=0)
    assert len(analysis.clusters) == 3 and sorted(c.size for c in analysis.clusters) == [1, 1, 1]

    one = [r if r["id"] == "code-0" else {**r, "correct": True} for r in records]
    analysis = analyze_failures(one, rows, _cfg("tfidf", n_clusters=8), seed=0)
    assert len(analysis.clusters) == 1 and analysis.clusters[0].size == 1
    assert "## Cluster" in render_report(analysis, {"acc": 0.9, "n": 12.0}, "tfidf")


def test_identical_failures_collapse_to_one_cluster() -> None:
    records, rows = _synthetic(n_per_topic=4)
    same = [{**r, "domain": "code"} for r in rows]
    for r in same:
        r["messages"] = [{"role": "user", "content": "the same question"},
                         {"role": "assistant", "content": "x"}]
    recs = [{**r, "output": "the same answer"} for r in records]
    analysis = analyze_failures(recs, same, _cfg("tfidf", n_clusters=3), seed=0)
    assert len(analysis.clusters) == 1 and analysis.clusters[0].size == 12


def test_record_without_row_is_an_error() -> None:
    records, rows = _synthetic()
    with pytest.raises(DataError, match="code-0"):
        analyze_failures(records, [r for r in rows if r["id"] != "code-0"], _cfg("tfidf"), seed=0)


# ---- the phase through the runner, with the real harness ---------------------------------------------


def test_phase_1b_runs_on_a_tiny_merged_model(forge_home: Path, tmp_path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from forge.artifacts import Manifest
    from forge.config import load_config
    from forge.data.records import iter_text, write_jsonl
    from forge.data.suites import generate
    from forge.runner import make_store, run_phase

    run_id = "test_1b"
    domains = ("general", "code", "reasoning", "automation")
    heldout = [r for d in domains for r in generate(d, 4, 3, "heldout")]
    data_dir, merged = tmp_path / "prep_data", tmp_path / "1A" / "merged"
    write_jsonl(data_dir / "heldout.jsonl", heldout)

    special = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(iter_text(heldout)), trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok.save_pretrained(merged)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(merged)

    cfg = load_config(overrides={"failure_analysis": {"n_clusters": 3, "embedder": "tfidf", "hardest_k": 4},
                                 "eval": {"max_new_tokens": 8, "batch_size": 8}})
    store = make_store(cfg)
    for phase, folder in (("prep_data", data_dir), ("1A", tmp_path / "1A")):
        store.commit(folder, store.run_dir(run_id, phase),
                     Manifest(phase=phase, cache_key=f"test-{phase}", base_uri="", run_id=run_id))
    manifest = run_phase("1B", cfg, run_id, track=False)
    out = store.materialize(manifest)
    q = manifest.info["quality"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 16
    n_fail = sum(not r["correct"] for r in records)
    assert q["failures"] == n_fail and q["heldout_acc"] == pytest.approx(1 - n_fail / 16)
    assert {"acc.general", "acc.code", "acc.reasoning", "acc.automation"} <= set(q)
    assert n_fail > 0  # an untrained model gets these wrong
    assert q["clusters"] == min(3, n_fail)
    hardest = read_jsonl(out / "hardest.jsonl")
    assert 0 < len(hardest) <= 4 and all(h in heldout for h in hardest)
    assert (out / "failure_report.md").read_text().startswith("# 1B failure analysis")
