"""Modifier subphases A (collect), B/C/D (teacher tiers) and E (verify, filter, dedup, split) on the shared
tiny run: real suites, the 1A model's real failures, the local demo teachers behind their HTTP servers (the
Q5_K_M GGUF, the same with its recovery LoRA, the reference solvers), the response cache and the ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forge.data.records import DataError, read_jsonl
from forge.data.suites import check_answer
from forge.ledger import read_rows
from forge.modifiers.cascade import Attempt, CascadeResult, ItemResult, TierStats, suite_verify
from forge.modifiers.collect import as_prompt, belongs, gather, prompt_key
from forge.modifiers.curate import answer_problem, curate, split_val
from forge.modifiers.generation import carry_forward
from forge.modifiers.local_teachers import ChatResponse, chat_server, error_body
from forge.modifiers.teacher_config import TeacherConfigError
from forge.runner import make_store, run_phase
from tests.conftest import UPSTREAM_PHASES, TinyRun

DOMAIN = "code"
STEPS = ("3A", "3B", "3C", "3D", "3E")


def files(manifest: Any, cfg: Any) -> Path:
    return make_store(cfg).materialize(manifest)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cascade(tiny_run: TinyRun) -> Iterator[dict[str, Any]]:
    """3A-3E of the code modifier, once for this module, on the shared tiny run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny_run.home))
        cfg = tiny_run.config()
        out = {"cfg": cfg, "run": tiny_run}
        for phase in STEPS:
            out[phase] = run_phase(phase, cfg, tiny_run.run_id, track=False)
        yield out


# ---- A: collect --------------------------------------------------------------------------------

def test_collect_takes_suite_prompts_and_1b_failures_and_keeps_them_off_dev_and_heldout(cascade, in_tiny_run
                                                                                         ) -> None:
    cfg, m = cascade["cfg"], cascade["3A"]
    out = files(m, cfg)
    prompts, dev, heldout = (read_jsonl(out / f) for f in ("prompts.jsonl", "dev.jsonl", "heldout.jsonl"))
    sizes = cfg.modifiers.sizes
    assert (len(dev), len(heldout)) == (sizes.dev, sizes.heldout)
    assert all(r["domain"] == DOMAIN and r["check"] for r in [*prompts, *dev, *heldout])
    ids = [r["id"] for r in prompts]
    assert len(set(ids)) == len(ids)
    keys = [prompt_key(r) for r in prompts]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {prompt_key(r) for r in [*dev, *heldout]}

    by_kind = {k: [r for r in prompts if r["id"].startswith(k + ".")] for k in ("suite", "user", "1b")}
    assert sum(len(v) for v in by_kind.values()) == len(prompts)
    assert {k: len(v) for k, v in by_kind.items()} == m.info["counts"]
    assert len(by_kind["suite"]) == sizes.prompts and not by_kind["user"]  # the tiny run has no user data
    assert all(r["source"] == "suite:code" for r in by_kind["suite"])

    # the 1B failures of the code domain: every one is collected unless its prompt is in dev/heldout
    fa = files(make_store(cfg).run_manifest(in_tiny_run.run_id, "1B"), cfg)
    prep = files(make_store(cfg).run_manifest(in_tiny_run.run_id, "prep_data"), cfg)
    held = {r["id"]: r for r in read_jsonl(prep / "heldout.jsonl")}
    failed = [held[r["id"]] for r in jsonl(fa / "records.jsonl")
              if not r["correct"] and r["domain"] == DOMAIN]
    eval_keys = {prompt_key(r) for r in [*dev, *heldout]}
    expected = {"1b." + r["id"] for r in failed if prompt_key(r) not in eval_keys}
    assert expected and {r["id"] for r in by_kind["1b"]} == expected
    assert m.info["quality"]["dropped_eval_overlap"] == len(failed) - len(expected)
    clusters = json.loads((fa / "clusters.json").read_text())["clusters"]
    cluster_of = {i: c["id"] for c in clusters for i in c["member_ids"]}
    for row in by_kind["1b"]:
        assert row["source"] == "1B:suite:code"
        assert row["cluster"].split(":")[0] == str(cluster_of[row["id"][3:]])
        assert check_answer(row, row["messages"][-1]["content"]).correct  # the reference came along


def test_gather_prefixes_sources_drops_duplicates_and_eval_prompts() -> None:
    def row(i: str, prompt: str, domain: str = "code", source: str = "upload") -> dict[str, Any]:
        return {"id": i, "domain": domain, "source": source, "check": {"kind": "reference"},
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}]}

    user = [r for r in (row("a", "Sort a list"), row("b", "sort   a LIST"), row("c", "Held out task"),
                        row("d", "Other domain", domain="automation"), row("e", "New task"))
            if belongs(r, "code", "code")]
    assert [r["id"] for r in user] == ["a", "b", "c", "e"]
    kept, counts, dropped = gather([("user", as_prompt(r, "code", "user")) for r in user],
                                   excluded={prompt_key(row("h", "held  out TASK"))})
    assert [r["id"] for r in kept] == ["user.a", "user.e"]
    assert counts["user"] == 2 and dropped == {"duplicate": 1, "eval_overlap": 1}
    with pytest.raises(DataError, match="share the id 'user.a'"):
        gather([("user", as_prompt(row("a", "one"), "code", "user")),
                ("user", as_prompt(row("a", "two"), "code", "user"))], excluded=set())


# ---- B, C, D, E end to end ---------------------------------------------------------------------------

def test_the_tiers_cascade_and_curate_adds_up(cascade, in_tiny_run) -> None:
    cfg = cascade["cfg"]
    prompts = read_jsonl(files(cascade["3A"], cfg) / "prompts.jsonl")
    steps = ((1, "3B"), (2, "3C"), (3, "3D"))
    tiers = {i: jsonl(files(cascade[p], cfg) / f"tier{i}.jsonl") for i, p in steps}
    stats = {i: json.loads((files(cascade[p], cfg) / f"tier{i}.json").read_text()) for i, p in steps}
    # tier 1 answers every prompt; each later tier gets exactly what the one below escalated
    assert [r["id"] for r in tiers[1]] == [p["id"] for p in prompts]
    for i in (2, 3):
        assert [r["id"] for r in tiers[i]] == [r["id"] for r in tiers[i - 1] if r["status"] == "escalate"]
        assert all(len(r["attempts"]) == i and [a["tier"] for a in r["attempts"]] == list(range(1, i + 1))
                   for r in tiers[i])
    teachers = [s["teacher"] for s in stats.values()]
    assert teachers == ["compressed", "recovered", "reference"]
    assert tiers[3], "the tiny model's answers should leave work for the reference solver"
    # the reference solver accepts everything the local model failed; its answers pass the checks
    assert all(r["status"] == "accepted" and r["tier"] == 3 and r["teacher"] == "reference" for r in tiers[3])
    for i in (1, 2):
        assert {r["status"] for r in tiers[i]} <= {"accepted", "escalate"}
        assert stats[i]["status"]["escalate"] + stats[i]["status"]["accepted"] == len(tiers[i])
    text = json.dumps(tiers) + json.dumps(stats)
    assert "127.0.0.1:" not in text.replace("127.0.0.1:<port>", "") and '"seconds"' not in text

    # the ledger records what each tier handled and what it cost
    rows = {r["phase"]: r for r in read_rows(make_store(cfg), in_tiny_run.run_id)}
    for i, phase in ((1, "3B"), (2, "3C"), (3, "3D")):
        q = rows[phase]["quality"]
        assert q["sent"] == len(tiers[i]) == stats[i]["stats"]["sent"]
        assert q["accepted"] == sum(r["status"] == "accepted" for r in tiers[i])
        assert q["cost_usd"] == 0 and f"tier {i} {teachers[i - 1]}:" in rows[phase]["notes"]
    e = rows["3E"]["quality"]
    assert e["items"] == len(prompts) and e["accepted"] == len(prompts) and e["failed"] == e["unsent"] == 0
    assert [e[f"tier{i}.sent"] for i in (1, 2, 3)] == [len(tiers[i]) for i in (1, 2, 3)]
    assert sum(e[f"tier{i}.accepted"] for i in (1, 2, 3)) == e["accepted"]
    assert e["accepted"] == e["filtered"] + e["reverify_failed"] + e["duplicates"] + e["train"] + e["val"]

    out = files(cascade["3E"], cfg)
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    rejected = jsonl(out / "rejected.jsonl")
    assert (len(train), len(val)) == (e["train"], e["val"]) and val and train
    assert len(rejected) == e["filtered"] + e["reverify_failed"] + e["duplicates"]
    answers = {r["id"]: r for t in tiers.values() for r in t if r["status"] == "accepted"}
    for row in train + val:
        assert row["messages"][-1]["content"] == answers[row["id"]]["answer"]
        assert (row["teacher"], row["tier"]) == (answers[row["id"]]["teacher"], answers[row["id"]]["tier"])
        assert check_answer(row, row["messages"][-1]["content"]).correct
    summary = json.loads((out / "cascade.json").read_text())
    assert [(t["teacher"], t["sent"]) for t in summary["tiers"]] == [(teachers[i - 1], len(tiers[i]))
                                                                      for i in (1, 2, 3)]
    assert summary["totals"]["train"] == len(train) and summary["totals"]["cost_usd"] == 0


def test_too_few_rows_left_is_a_clear_error(cascade, in_tiny_run) -> None:
    cfg = in_tiny_run.config({"modifiers": {"min_train_rows": 500}})
    with pytest.raises(DataError, match=r"modifier 'code' \(3E\): only \d+ training rows remain, fewer than "
                                        r"modifiers.min_train_rows 500: \d+ prompts, \d+ accepted"):
        run_phase("3E", cfg, in_tiny_run.run_id, track=False)


def test_a_rerun_of_tier_1_in_a_fresh_run_comes_from_the_response_cache(cascade, in_tiny_run) -> None:
    cfg = cascade["cfg"]
    fresh = "tiny-modifier-rerun"
    for phase in (*UPSTREAM_PHASES, "3A"):  # the same store: every upstream phase is a cache hit
        run_phase(phase, cfg, fresh, track=False)
    forced = in_tiny_run.config({"cache": {"force": ["3B"]}})
    again = run_phase("3B", forced, fresh, track=False)
    assert again.cache_key == cascade["3B"].cache_key and again.run_id == fresh  # ran, not linked
    q = again.info["quality"]
    assert q["sent"] == q["cached"] == q["items"] > 0 and again.metrics["http_attempts"] == 0
    first = jsonl(files(cascade["3B"], cfg) / "tier1.jsonl")
    second = jsonl(files(again, cfg) / "tier1.jsonl")
    assert [(r["id"], r["status"], r["answer"]) for r in second] == [(r["id"], r["status"], r["answer"])
                                                                      for r in first]
    assert all(a["cached"] for r in second for a in r["attempts"])


def test_a_missing_key_fails_tier_1_before_anything_is_sent(cascade, in_tiny_run,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def answer(body: dict[str, Any], headers: Any) -> ChatResponse:
        calls.append(body)
        return ChatResponse(500, error_body("should not be reached"))

    monkeypatch.delenv("FORGE_TEST_MODIFIER_KEY", raising=False)
    with chat_server(answer, ("m",)) as ep:
        cfg = in_tiny_run.config({
            "modifiers": {"enabled": ["code"]},
            "teachers": {"teachers": {"paid": {"model": "m", "base_url": ep.base_url,
                                               "api_key_env": "FORGE_TEST_MODIFIER_KEY"},
                                      "reference": {"kind": "reference", "model": "reference"}},
                         "domains": {"code": ["paid", "reference"], "general": ["reference"]}}})
        with pytest.raises(TeacherConfigError, match="FORGE_TEST_MODIFIER_KEY is empty or unset"):
            run_phase("3B", cfg, in_tiny_run.run_id, track=False)
    assert calls == []


def test_the_top_tier_falls_back_on_an_earlier_verified_low_confidence_answer() -> None:
    low = Attempt(1, "t1", "low_confidence", answer="Answer: 4", verified=True, confidence=0.2)
    earlier = {"a": {"attempts": [vars(low)]}, "b": {"attempts": [vars(Attempt(1, "t1", "rejected", "5"))]}}
    mine = Attempt(2, "t2", "rejected", answer="Answer: 9", verified=False)

    def result() -> CascadeResult:
        items = [ItemResult("a", "failed", attempts=[mine]), ItemResult("b", "failed", attempts=[mine])]
        return CascadeResult(items, [TierStats(2, "t2", "m")], {})

    top = result()
    assert carry_forward(top, earlier, final=True) == 1
    a, b = top.items
    assert (a.status, a.answer, a.tier, a.teacher, a.confidence) == ("accepted", "Answer: 4", 1, "t1", 0.2)
    assert [x.tier for x in a.attempts] == [1, 2] and b.status == "failed" and len(b.attempts) == 2
    middle = result()  # below the top tier the item escalates instead
    assert carry_forward(middle, earlier, final=False) == 0 and middle.items[0].status == "failed"


# ---- E on crafted tier files ----------------------------------------------------------------------------

def _prompt(i: int, question: str, answer: float) -> dict[str, Any]:
    return {"id": f"suite.p{i}", "domain": "reasoning", "source": "suite:reasoning", "task": "sum",
            "check": {"kind": "numeric", "answer": answer},
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"Answer: {answer}"}]}


def _res(i: int, status: str, answer: str | None = None, tier: int = 1) -> dict[str, Any]:
    outcome = {"accepted": "accepted", "unsent": "unsent"}.get(status, "rejected")
    ok = status == "accepted"
    return {"id": f"suite.p{i}", "status": status, "answer": answer if ok else None,
            "tier": tier if ok else None, "teacher": f"t{tier}" if ok else None,
            "verified": True, "confidence": None,
            "attempts": [{"tier": tier, "teacher": f"t{tier}", "outcome": outcome, "answer": answer,
                          "detail": "expected 3, got 4" if outcome == "rejected" else ""}]}


def test_curate_filters_reverifies_dedups_and_splits_crafted_results() -> None:
    prompts = [_prompt(i, f"What is {i} plus {i}?", 2 * i) for i in range(12)]
    prompts += [_prompt(12, "what is 1   PLUS 1?", 2),  # the same prompt as p1, normalized
                _prompt(13, "What is 2 plus 2?", 4)]  # exactly p2
    tier1 = [_res(i, "accepted", f"Answer: {2 * i}") for i in range(6)]
    tier1[3] = _res(3, "accepted", "   ")  # empty
    tier1[4] = _res(4, "accepted", "I'm sorry, but I can't help with that.")  # refusal
    tier1[5] = _res(5, "accepted", "Answer: 10" + " and so on" * 20)  # too long
    tier1 += [_res(6, "accepted", "Answer: 13"),  # wrong: fails re-verification
              _res(7, "escalate"), _res(8, "escalate"), _res(9, "unsent"),
              _res(10, "accepted", "Answer: 20"), _res(11, "accepted", "Answer: 22"),
              _res(12, "accepted", "The answer is 2"), _res(13, "accepted", "Answer: 4")]
    tier2 = [_res(7, "accepted", "Answer: 14", tier=2), _res(8, "failed", tier=2)]
    cur = curate(prompts, {1: tier1, 2: tier2}, suite_verify, max_answer_chars=64, val_fraction=0.2)
    c = cur.counts
    assert c == {"items": 14, "accepted": 12, "failed": 1, "unsent": 1, "filtered": 3, "reverify_failed": 1,
                 "duplicates": 2, "train": c["train"], "val": c["val"]}
    kept = sorted(r["id"] for r in cur.train + cur.val)
    assert kept == [f"suite.p{i}" for i in (0, 1, 10, 11, 2, 7)]
    assert c["train"] + c["val"] == 6 and c["val"] >= 1
    reasons = {r["id"]: (r["stage"], r["reason"]) for r in cur.rejected}
    assert reasons["suite.p3"] == ("filter", "empty answer") and reasons["suite.p4"] == ("filter", "refusal")
    assert reasons["suite.p5"][0] == "filter" and "over max_answer_chars 64" in reasons["suite.p5"][1]
    assert reasons["suite.p6"][0] == "verify" and "expected 12, got 13" in reasons["suite.p6"][1]
    assert reasons["suite.p8"][0] == "cascade" and "rejected at tier 2" in reasons["suite.p8"][1]
    assert reasons["suite.p9"] == ("cascade", "not sent: the cost cap stopped the cascade")
    assert reasons["suite.p12"] == ("dedup", "same prompt (normalized) as suite.p1")
    assert reasons["suite.p13"] == ("dedup", "identical prompt and answer as suite.p2")
    p7 = next(r for r in cur.train + cur.val if r["id"] == "suite.p7")
    assert (p7["tier"], p7["teacher"], p7["messages"][-1]["content"]) == (2, "t2", "Answer: 14")
    assert p7["messages"][0] == prompts[7]["messages"][0] and p7["check"] == prompts[7]["check"]
    again = curate(prompts, {1: tier1, 2: tier2}, suite_verify, max_answer_chars=64, val_fraction=0.2)
    assert [r["id"] for r in again.val] == [r["id"] for r in cur.val]  # the split is stable


def test_split_val_and_answer_problems() -> None:
    rows = [{"id": f"r{i}"} for i in range(200)]
    train, val = split_val(rows, 0.1)
    assert 8 <= len(val) <= 35 and len(train) + len(val) == 200
    assert split_val(rows[:2], 0.1)[1] and split_val(rows[:2], 0.1)[0]  # at least one of each from 2 rows
    assert split_val(rows[:1], 0.1) == (rows[:1], []) and split_val(rows, 0.0) == (rows, [])
    assert answer_problem("def f():\n    return 'sorry'", 100) is None
    assert answer_problem("As an AI language model, I cannot do that.", 100) == "refusal"
    assert answer_problem("x" * 101, 100) == "answer has 101 chars, over max_answer_chars 100"
