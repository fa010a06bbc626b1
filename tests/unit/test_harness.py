"""The evaluation harness: checks drive accuracy, log-probs rank the true answer, batching is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.config import EvalConfig
from forge.data.records import DataError, prompt_messages, reference
from forge.data.suites import generate
from forge.evaluate.harness import RECORD_FIELDS, EvalReport, HFBackend, evaluate, run_eval
from tests.tiny_model import tiny_model

DOMAINS = ("general", "code", "reasoning", "automation")
CFG = EvalConfig(max_new_tokens=48, batch_size=3, code_timeout_s=5.0)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [r for d in DOMAINS for r in generate(d, 2, seed=7, split="dev")]


class ScriptedBackend:
    """A Backend that answers from a script: lets accuracy be checked without any model."""

    def __init__(self, answer_for: dict[str, str]) -> None:
        self.answer_for = answer_for
        self.calls = 0

    def generate(self, prompts: list[str]) -> list[str]:
        self.calls += 1
        return [self.answer_for[p] for p in prompts]

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [-float(len(a)) for a in answers]


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def test_accuracy_comes_from_the_suite_checks(rows: list[dict]) -> None:
    right = ScriptedBackend({_plain_prompt(prompt_messages(r)): reference(r) for r in rows})
    report = run_eval(right, rows, CFG, _plain_prompt)
    summary = report.summary()
    assert summary["acc"] == 1.0 and summary["n"] == len(rows)
    assert all(summary[f"acc.{d}"] == 1.0 for d in DOMAINS)
    assert right.calls == 3  # 8 rows in batches of 3

    wrong = ScriptedBackend({_plain_prompt(prompt_messages(r)): "I do not know." for r in rows})
    summary = run_eval(wrong, rows, CFG, _plain_prompt).summary()
    assert summary["acc"] == 0.0 and all(summary[f"acc.{d}"] == 0.0 for d in DOMAINS)

    # Right on code only: the per-domain split must follow.
    code_only = {_plain_prompt(prompt_messages(r)): (reference(r) if r["domain"] == "code" else "no")
                 for r in rows}
    mixed = ScriptedBackend(code_only)
    summary = run_eval(mixed, rows, CFG, _plain_prompt).summary()
    assert summary["acc.code"] == 1.0 and summary["acc.general"] == 0.0 and summary["acc"] == 0.25
    expected_lp = sum(-len(reference(r)) for r in rows) / len(rows)
    assert summary["logprob"] == pytest.approx(expected_lp)


def test_report_records_jsonl_and_markdown(rows: list[dict], tmp_path: Path) -> None:
    backend = ScriptedBackend({_plain_prompt(prompt_messages(r)): reference(r) for r in rows})
    report = run_eval(backend, rows, CFG, _plain_prompt)
    assert [r["id"] for r in report.records] == [r["id"] for r in rows]
    for rec in report.records:
        assert set(rec) == set(RECORD_FIELDS)
        assert isinstance(rec["correct"], bool) and isinstance(rec["detail"], str)
    path = report.to_jsonl(tmp_path / "eval" / "dev.jsonl")
    back = [json.loads(line) for line in path.read_text().splitlines()]
    assert back == report.records
    table = report.to_markdown()
    assert all(f"| {d} | 2 | 1.000 |" in table for d in DOMAINS)
    assert "| **all** | 8 | 1.000 |" in table
    assert EvalReport().summary() == {"n": 0.0}


def test_empty_rows_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="no rows"):
        run_eval(ScriptedBackend({}), [], CFG, _plain_prompt)


# ------------------------------------------------------------------ a real (tiny) model


@pytest.fixture(scope="module")
def overfit(rows: list[dict]):
    """A 2-layer Llama that memorized four chat rows (one per domain)."""
    import torch

    few = [rows[0], rows[2], rows[4], rows[6]]
    texts = [m["content"] for r in rows for m in r["messages"]]
    model, tok = tiny_model(texts * 5, vocab_size=400)
    chats = [tok.apply_chat_template(r["messages"], tokenize=False) for r in few]
    tok.padding_side = "right"
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert loss.item() < 0.2, f"overfit did not converge (loss {loss.item():.3f})"
    return model, tok, few


def test_true_answer_scores_higher_than_a_shuffled_one(overfit) -> None:
    model, tok, few = overfit
    backend = HFBackend(model, tok, "cpu", max_new_tokens=8, batch_size=4)
    prompts = [backend.prompt(prompt_messages(r)) for r in few]
    true = backend.answer_logprobs(prompts, [reference(r) for r in few])
    shuffled = backend.answer_logprobs(prompts, [reference(r) for r in few[1:] + few[:1]])
    assert all(t > s for t, s in zip(true, shuffled, strict=True)), (true, shuffled)
    assert all(-0.5 < t <= 0.0 for t in true)  # memorized: near-certain tokens
    # Batching (left padding, position ids) must not change a row's score.
    alone = [backend.answer_logprobs([p], [reference(r)])[0] for p, r in zip(prompts, few, strict=True)]
    assert alone == pytest.approx(true, abs=1e-4)


def test_greedy_generation_of_a_memorized_model_is_checked_correct(overfit) -> None:
    model, tok, few = overfit
    cfg = EvalConfig(max_new_tokens=48, batch_size=4)
    report = evaluate(model, tok, few, cfg, "cpu")
    outputs = [r["output"] for r in report.records]
    assert outputs == [reference(r) for r in few]  # decoded new tokens only, no special tokens
    assert report.summary()["acc"] == 1.0
    # Left-padded batch generation equals one-prompt-at-a-time generation.
    backend = HFBackend(model, tok, "cpu", max_new_tokens=48, batch_size=1)
    assert backend.generate([r["prompt"] for r in report.records]) == outputs
    assert tok.padding_side == "right"  # the harness restores the caller's tokenizer settings
