"""1C distillation: the critique a teacher is asked for and how its reply is read and verified (no servers),
the reference solver's critique mode, 1B's failures as items, SFT rows and preference pairs from the cascade's
answers, SFT + DPO adapters stacked into one, and the job end to end on the tiny run (real local teachers,
Axolotl SFT then DPO, 1A merged before/after on the suites, the ledger row)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forge.data.records import DataError, reference, write_jsonl
from forge.data.suites import check_answer, generate
from forge.modifiers.cascade import CascadeResult, ItemResult, TierStats
from forge.modifiers.local_teachers import reference_responder
from forge.train.distillation import (
    CRITIQUE_REQUEST,
    AdapterError,
    build_data,
    critique_items,
    critique_messages,
    critique_sample,
    failure_items,
    format_critique,
    item_prompt,
    make_verify,
    parse_critique,
    split_critique,
    stack_adapters,
)
from tests.axolotl_env import needs_axolotl

ROWS = generate("general", 4, 7, "train") + generate("reasoning", 2, 7, "train")
WRONG = "definitely not it"


def row_item(row: dict[str, Any], kind: str, student: str) -> dict[str, Any]:
    return {**row, "id": f"{kind}:{row['id']}", "row_id": row["id"], "kind": kind, "student": student,
            "student_correct": check_answer(row, student).correct}


# ---------------------------------------------------------------- the critique format


@pytest.mark.parametrize(("reply", "verdict", "final"), [
    ("Verdict: incorrect\nCritique: wrong order\nFinal answer:\nred blue", False, "red blue"),
    ("**Verdict:** Correct.\n**Critique:** fine\n**Final answer:** red blue", True, "red blue"),
    ("Let me check.\n\nVerdict: correct\nCritique: ok\nFinal answer: 42\n", True, "42"),
    # the format's own words before the reply, and an answer that mentions "Final answer" itself
    ("Final answer: 3\nVerdict: incorrect\nCritique: off by one\nFinal answer:\nx = 'Final answer: 4'\n4",
     False, "x = 'Final answer: 4'\n4"),
    ("Verdict: incorrect\nCritique: x\nFinal answer:\n```python\ndef f(a):\n    return a\n```",
     False, "```python\ndef f(a):\n    return a\n```"),
    ("The answer is red blue.", None, None),  # no format at all
    ("Verdict: wrong-ish\nFinal answer:   \n", None, None),  # no known verdict word, empty answer
])
def test_critique_replies_are_parsed(reply: str, verdict: bool | None, final: str | None) -> None:
    crit = parse_critique(reply)
    assert (crit.verdict, crit.final_answer) == (verdict, final)


def test_a_critique_conversation_round_trips_and_nothing_else_is_one() -> None:
    row = ROWS[0]
    msgs = critique_messages(row, WRONG)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[-1]["content"] == CRITIQUE_REQUEST
    question, student = split_critique(msgs)
    assert question == row["messages"][:-1] and student == WRONG
    assert split_critique(row["messages"][:-1]) is None  # a plain question
    assert split_critique([*msgs[:-1], {"role": "user", "content": "Thanks!"}]) is None
    # the item's prompt: the question for a failure, the conversation for a critique
    assert item_prompt(row_item(row, "failure", WRONG)) == row["messages"][:-1]
    assert item_prompt(row_item(row, "critique", WRONG)) == msgs
    reply = format_critique(False, "bad", reference(row))
    assert parse_critique(reply).final_answer == reference(row)


def test_a_critique_is_verified_whole_against_the_suite_check() -> None:
    verify = make_verify(5.0)
    row = ROWS[0]
    wrong, right = row_item(row, "critique", WRONG), row_item(row, "critique", reference(row))
    good = format_critique(False, "x", reference(row))
    assert verify(wrong, good).correct
    assert verify(right, format_critique(True, "x", reference(row))).correct
    # a right final answer does not save a verdict the checker contradicts
    res = verify(right, good)
    assert not res.correct and "contradicts" in res.detail
    assert not verify(wrong, format_critique(False, "x", WRONG)).correct  # wrong final answer
    assert "no 'Verdict" in verify(wrong, f"Final answer:\n{reference(row)}").detail
    assert "no 'Final answer" in verify(wrong, "Verdict: incorrect\nCritique: x").detail
    # a failure item is a plain question: the reply is the answer
    assert verify(row_item(row, "failure", WRONG), reference(row)).correct
    assert not verify(row_item(row, "failure", WRONG), WRONG).correct


def test_the_reference_solver_critiques_known_prompts_with_the_checkers_verdict() -> None:
    respond = reference_responder(ROWS, "reference")

    def ask(messages: list[dict[str, str]]) -> tuple[int, str]:
        out = respond({"model": "reference", "messages": messages}, {})
        text = out.body["choices"][0]["message"]["content"] if out.status == 200 else ""
        return out.status, text

    for row in ROWS:
        for student, correct in ((WRONG, False), (reference(row), True)):
            status, text = ask(critique_messages(row, student))
            crit = parse_critique(text)
            assert status == 200 and crit.verdict is correct and crit.final_answer == reference(row)
    assert ask(ROWS[0]["messages"][:-1]) == (200, reference(ROWS[0]))  # plain prompts as before
    unknown = {**ROWS[0], "messages": [{"role": "user", "content": "Reverse the words: a b c d e f"},
                                       {"role": "assistant", "content": "f e d c b a"}]}
    assert ask(critique_messages(unknown, WRONG))[0] == 422
    off = reference_responder(ROWS, "reference", critiques=False)
    assert off({"model": "reference", "messages": critique_messages(ROWS[0], WRONG)}, {}).status == 422


# ---------------------------------------------------------------- items and training data


def test_failures_come_hardest_first_with_the_students_answer(tmp_path: Path) -> None:
    heldout = ROWS
    records = [{"id": r["id"], "domain": r["domain"], "output": WRONG if i % 3 else reference(r),
                "correct": not i % 3, "logprob": -float(i)} for i, r in enumerate(heldout)]
    write_jsonl(tmp_path / "records.jsonl", records)
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": [
        {"id": 7, "member_ids": [r["id"] for r in heldout[1:3]]}]}))
    items = failure_items(tmp_path, heldout, limit=3)
    failed = [r for r in records if not r["correct"]]
    assert [i["row_id"] for i in items] == [r["id"] for r in sorted(failed, key=lambda r: r["logprob"])][:3]
    assert all(i["kind"] == "failure" and i["student"] == WRONG and not i["student_correct"] for i in items)
    assert {i["row_id"]: i["cluster"] for i in items}.get(heldout[2]["id"]) == 7
    with pytest.raises(DataError, match="have no row in prep_data's heldout.jsonl"):
        failure_items(tmp_path, heldout[:2], limit=3)
    # the critique sample is stable for a seed and differs across seeds
    assert critique_sample(ROWS, 3, 1) == critique_sample(list(reversed(ROWS)), 3, 1)
    assert [r["id"] for r in critique_sample(ROWS, 6, 1)] != [r["id"] for r in critique_sample(ROWS, 6, 2)]


def test_verified_answers_become_sft_rows_and_wrong_students_pairs() -> None:
    r0, r1, r2 = ROWS[:3]
    failure = row_item(r0, "failure", WRONG)
    twin = {**row_item(r0, "critique", WRONG), "id": "critique:twin"}  # the same prompt again
    student = {r1["id"]: {"output": reference(r1), "correct": True},
               r2["id"]: {"output": "", "correct": False}}
    items = [failure, twin, *critique_items([r1, r2], student)]
    answers = {failure["id"]: reference(r0), twin["id"]: format_critique(False, "x", reference(r0)),
               f"critique:{r1['id']}": format_critique(True, "x", reference(r1)),
               f"critique:{r2['id']}": format_critique(False, "x", reference(r2))}
    result = CascadeResult([ItemResult(i, "accepted", a, 1, "t") for i, a in answers.items()],
                           [TierStats(1, "t", "m")], {})
    data = build_data(items, result)
    # one SFT row per prompt, each answer the verified one; pairs only where the student was wrong and said
    # something (r1's student was right, r2's said nothing)
    assert [r["id"] for r in data.sft] == [f"1c-failure-{r0['id']}", f"1c-critique-{r1['id']}",
                                           f"1c-critique-{r2['id']}"]
    assert all(check_answer(r, reference(r)).correct for r in data.sft)
    assert [(p["chosen"], p["rejected"]) for p in data.pairs] == [(reference(r0), WRONG)]
    assert data.counts["sft.duplicates"] == 1 and data.counts["critique.accepted"] == 3
    failed = CascadeResult([ItemResult(i, "failed") for i in answers], [TierStats(1, "t", "m")], {})
    assert build_data(items, failed).sft == []


# ---------------------------------------------------------------- SFT + DPO in one adapter


def test_stacked_adapter_equals_the_dpo_adapter_on_the_sft_merged_model(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tests.tiny_model import tiny_model

    texts = [m["content"] for r in ROWS for m in r["messages"]]
    base, _ = tiny_model(texts, vocab_size=300, num_hidden_layers=1, max_position_embeddings=64)
    base.save_pretrained(tmp_path / "base")
    ids = torch.tensor([[5, 9, 17, 33, 60, 3]])

    def fresh():
        return type(base).from_pretrained(tmp_path / "base").eval()

    torch.manual_seed(0)
    sft = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    sft_merged = sft.merge_and_unload()
    # DPO's adapter: other modules, another rank, rsLoRA scaling
    dpo = get_peft_model(sft_merged, LoraConfig(r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                target_modules=["q_proj", "o_proj", "up_proj"]))
    dpo.save_pretrained(tmp_path / "dpo")
    with torch.no_grad():
        want = dpo(input_ids=ids).logits
        plain = fresh()(input_ids=ids).logits
    stack_adapters(tmp_path / "sft", tmp_path / "dpo", tmp_path / "stacked", base="forge:1A")
    cfg = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (6, 6, "forge:1A")
    with torch.no_grad():
        got = PeftModel.from_pretrained(fresh(), str(tmp_path / "stacked")).eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapters do something
    assert torch.allclose(got, want, atol=1e-4)

    dora = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**dora, "use_dora": True}))
    (tmp_path / "dora" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "dpo" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="use_dora"):
        stack_adapters(tmp_path / "sft", tmp_path / "dora", tmp_path / "bad", base="forge:1A")


# ---------------------------------------------------------------- the job


@needs_axolotl
def test_distillation_job_end_to_end(in_tiny_run) -> None:
    import torch
    from peft import PeftModel

    from forge.ledger import read_rows
    from forge.modeling import load_model, load_tokenizer
    from forge.runner import make_store, run_phase

    cfg = in_tiny_run.config()
    manifest = run_phase("1C", cfg, in_tiny_run.run_id, track=False)
    store = make_store(cfg)
    out = store.materialize(manifest)
    assert {"sft.jsonl", "preference.jsonl", "cascade.json", "eval.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(manifest.files)

    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "preference.jsonl").read_text().splitlines()]
    assert len(sft) >= cfg.distill.min_rows
    assert len({json.dumps(r["messages"][:-1]) for r in sft}) == len(sft)  # deduplicated by prompt
    for row in sft:  # every SFT answer passes its row's check
        assert check_answer(row, reference(row)).correct, row["id"]
    assert pairs and {p["source"].split(":")[1] for p in pairs} <= {"failure", "critique"}
    for pair in pairs:  # chosen passes, rejected (the student's) fails
        as_row = {**pair, "messages": [*pair["messages"], {"role": "assistant", "content": pair["chosen"]}]}
        assert check_answer(as_row, pair["chosen"]).correct
        assert not check_answer(as_row, pair["rejected"]).correct, pair["id"]

    cascade = json.loads((out / "cascade.json").read_text())
    tiers = cascade["tiers"]
    assert [t["teacher"] for t in tiers] == ["compressed", "recovered", "reference"]
    kinds = cascade["kinds"]
    n_failures = store.run_manifest(in_tiny_run.run_id, "1B").info["n_failures"]
    assert kinds["failure"]["items"] == min(cfg.distill.failures, n_failures)
    assert kinds["critique"]["items"] == cfg.distill.critiques
    assert sum(t["accepted"] for t in tiers) == sum(k["accepted"] for k in kinds.values())
    assert tiers[0]["sent"] == kinds["failure"]["items"] + kinds["critique"]["items"]

    row = [r for r in read_rows(store, in_tiny_run.run_id) if r["phase"] == "1C"][-1]
    q = row["quality"]
    for key in ("acc", "acc_before", "delta_acc", "logprob", "logprob_before", "delta_logprob"):
        assert key in q
    assert q["delta_acc"] == pytest.approx(q["acc"] - q["acc_before"])
    assert (q["sft_rows"], q["pairs"]) == (len(sft), len(pairs))
    assert q["tier3.accepted"] == tiers[2]["accepted"]
    assert manifest.info["preference"] == "dpo"
    assert manifest.metrics["dpo_steps"] == cfg.distill.axolotl.max_steps

    # the committed adapter applies to 1A's merged model and changes it
    merged = store.materialize(store.run_manifest(in_tiny_run.run_id, "1A")) / "merged"
    tok = load_tokenizer(merged)
    ids = tok(sft[0]["messages"][0]["content"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model = load_model(merged, "cpu", dtype=torch.float32)
        before = model(input_ids=ids).logits
        after = PeftModel.from_pretrained(model, str(out / "adapter"))(input_ids=ids).logits
    assert (after - before).abs().max().item() > 1e-3
