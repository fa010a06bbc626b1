"""The task suites: deterministic generation, disjoint splits, short regular tasks, and checkers
that accept every reference answer and reject wrong ones."""

from __future__ import annotations

import json
import re

import pytest

from forge.data.records import DataError, reference, validate_row
from forge.data.suites import SUITES, CheckResult, check_answer, generate
from forge.data.suites.checks import extract_code, extract_json_object, extract_number

DOMAINS = sorted(SUITES)
N_CHECKED = {"general": 300, "reasoning": 300, "automation": 300, "code": 150}  # code spawns processes


def _row(check: dict, answer: str = "ref", row_id: str = "t-0") -> dict:
    return {"id": row_id, "domain": "general", "source": "test", "check": check,
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("domain", DOMAINS)
def test_generate_is_deterministic_and_seed_dependent(domain: str) -> None:
    a = generate(domain, 50, seed=7, split="train")
    assert a == generate(domain, 50, seed=7, split="train")
    assert [r["messages"] for r in a] != [r["messages"] for r in generate(domain, 50, seed=8, split="train")]
    assert [r["id"] for r in a[:2]] == [f"{domain}-train-00000", f"{domain}-train-00001"]
    assert len({r["id"] for r in a}) == 50


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_never_share_a_prompt(domain: str) -> None:
    prompts = {split: {r["messages"][0]["content"] for r in generate(domain, 150, 3, split)}
               for split in ("train", "dev", "heldout", "calib", "pretrain")}
    for eval_split in ("dev", "heldout", "calib"):
        for other in prompts:
            if other != eval_split:
                assert not prompts[eval_split] & prompts[other], (eval_split, other)
    # train and pretrain come from separate random streams even though they share buckets
    assert prompts["train"] != prompts["pretrain"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_rows_are_valid_short_and_unique_within_a_split(domain: str) -> None:
    rows = generate(domain, 200, 11, "train")
    for row in rows:
        validate_row(row, row["id"])
        assert row["domain"] == domain and row["check"]["kind"] and row["task"]
        assert len(row["messages"][0]["content"].split()) <= 40, row["messages"][0]["content"]
        # ~40 tokens: crude proxy, word pieces split on punctuation
        assert len(re.findall(r"\w+|[^\w\s]", reference(row))) <= 45, reference(row)
        json.dumps(row)  # rows must be JSON-serialisable
    assert len({r["messages"][0]["content"] for r in rows}) == len(rows)
    assert len({r["task"] for r in rows}) >= 5  # many templates, not one


@pytest.mark.parametrize("domain", DOMAINS)
def test_references_pass_and_other_rows_answers_fail(domain: str) -> None:
    rows = generate(domain, N_CHECKED.get(domain, 300), 5, "heldout")
    for i, row in enumerate(rows):
        ok = check_answer(row, reference(row))
        assert ok.correct, (row["id"], reference(row), ok.detail)
        # another template's row: within one creative template an answer can rightly satisfy two prompts
        others = [r for r in rows[i + 1:] + rows[:i] if r.get("task") != row.get("task")] or rows[i + 1:i + 2]
        other = others[0] if others else row
        if reference(other) != reference(row) and other["check"] != row["check"]:
            wrong = check_answer(row, reference(other))
            assert not wrong.correct, (row["id"], reference(other), wrong.detail)


def test_numeric_off_by_one_fails_and_formats_are_tolerated() -> None:
    for row in generate("reasoning", 100, 2, "dev"):
        answer = row["check"]["answer"]
        off_by_one = reference(row).replace(f"Answer: {answer}", f"Answer: {answer + 1}")
        assert not check_answer(row, off_by_one).correct
        assert check_answer(row, f"so the answer is {answer}").correct
        assert check_answer(row, f"Answer:  {answer}.0 apples").correct


def test_code_near_misses_fail() -> None:
    rows = generate("code", 120, 4, "train")
    mutated = 0
    for row in rows:
        ref = reference(row)
        assert not check_answer(row, re.sub(r"return .*", "return None", ref)).correct
        swaps = (("+", "-"), ("*", "+"), (">", ">="), ("<", "<="), ("max(", "min("), ("% 2 == 0", "% 2 == 1"))
        for a, b in swaps:
            if a in ref:
                result = check_answer(row, ref.replace(a, b, 1))
                assert not result.correct, (ref, a, b)
                mutated += 1
                break
    assert mutated > 40


def test_tool_call_wrong_argument_name_and_schema() -> None:
    row = next(r for r in generate("automation", 50, 1, "train") if r["check"]["name"] == "set_timer")
    minutes = row["check"]["arguments"]["minutes"]
    good = json.dumps({"name": "set_timer", "arguments": {"minutes": minutes}})
    assert check_answer(row, f"Sure! ```json\n{good}\n```").correct
    assert check_answer(row, f'{{"arguments": {{"minutes": {minutes}.0}}, "name": "set_timer"}}').correct
    wrong_value = check_answer(row, json.dumps({"name": "set_timer", "arguments": {"minutes": minutes + 1}}))
    assert not wrong_value.correct and "wrong arguments ['minutes']" in wrong_value.detail
    wrong_tool = check_answer(row, json.dumps({"name": "search_web", "arguments": {"query": "x"}}))
    assert not wrong_tool.correct and "wrong tool" in wrong_tool.detail
    bad_type = check_answer(row, json.dumps({"name": "set_timer", "arguments": {"minutes": "five"}}))
    assert not bad_type.correct and "schema violation at arguments/minutes" in bad_type.detail
    extra = check_answer(row, json.dumps({"name": "set_timer", "arguments": {"minutes": minutes, "x": 1}}))
    assert not extra.correct and "schema violation" in extra.detail
    assert check_answer(row, "I cannot do that").detail == "no JSON object in the output"
    assert not check_answer(row, '{"name": "set_timer", "arguments": ').correct


def test_python_tests_reports_syntax_error_exception_timeout_and_failed_test() -> None:
    row = _row({"kind": "python_tests", "tests": ["assert f(2) == 4", "assert f(3) == 9"]})
    assert check_answer(row, "def f(x):\n    return x * x").correct
    assert check_answer(row, "Here you go:\n```python\ndef f(x):\n    return x ** 2\n```\nDone.").correct

    failed = check_answer(row, "def f(x):\n    return x + x")
    assert not failed.correct and failed.detail == "test failed: assert f(3) == 9 (got 6)"
    syntax = check_answer(row, "def f(x) return x")
    assert not syntax.correct and syntax.detail.startswith("syntax error: line 1")
    raised = check_answer(row, "def f(x):\n    return x / 0")
    assert not raised.correct and "ZeroDivisionError" in raised.detail
    at_import = check_answer(row, "import numpy_not_here\ndef f(x):\n    return x * x")
    assert not at_import.correct and "ModuleNotFoundError" in at_import.detail
    looping = check_answer(row, "def f(x):\n    while True:\n        pass", timeout_s=1.0)
    assert not looping.correct and looping.detail.startswith("timeout")
    exits = check_answer(row, "import sys\nsys.exit(0)")
    assert not exits.correct and "SystemExit" in exits.detail
    hog = check_answer(row, "big = bytearray(4 << 30)\ndef f(x):\n    return x * x")
    assert not hog.correct and "MemoryError" in hog.detail
    fake_pass = "print('@@FORGE_RESULT@@{\"correct\": true, \"detail\": \"x\"}')\ndef f(x):\n    return 0"
    noisy = check_answer(row, fake_pass)
    assert not noisy.correct


def test_python_tests_run_isolated_in_a_temp_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORGE_SECRET_TEST", "s3cret")
    row = _row({"kind": "python_tests", "tests": ["assert probe() == (False, False)"]})
    code = (f"import os\ndef probe():\n    return (os.getcwd() == {str(tmp_path)!r}, "
            "'FORGE_SECRET_TEST' in os.environ)")
    result = check_answer(row, code)
    assert result.correct, result.detail
    check_answer(row, "open('leak.txt', 'w').write('x')\ndef probe():\n    return (False, False)")
    assert not (tmp_path / "leak.txt").exists()


def test_exact_and_reference_normalize_whitespace_and_case_option() -> None:
    row = _row({"kind": "exact", "answer": "Red  Blue"})
    assert check_answer(row, " Red Blue\n").correct
    assert not check_answer(row, "red blue").correct
    insensitive = _row({"kind": "exact", "answer": "Red Blue", "case_insensitive": True})
    assert check_answer(insensitive, "red BLUE").correct
    ref = _row({"kind": "reference"}, answer="The  cat sat.")
    assert check_answer(ref, "The cat sat.\n").correct
    assert not check_answer(ref, "The cat sat") .correct
    assert isinstance(check_answer(ref, "x"), CheckResult)


def test_extractors() -> None:
    assert extract_number("3 + 4 = 7. 7 - 2 = 5. Answer: 5") == 5
    assert extract_number("Answer: 1,250 dollars, not 3") == 1250
    assert extract_number("it is -2.5 or so") == -2.5
    assert extract_number("no digits") is None
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 2") == "x = 2"
    assert extract_json_object('bad {oops} then {"a": {"b": 1}} end') == {"a": {"b": 1}}


def test_bad_check_specs_and_domains_are_clear_errors() -> None:
    with pytest.raises(DataError, match="row 't-0'.*check.kind.*'nope'"):
        check_answer(_row({"kind": "nope"}), "x")
    with pytest.raises(DataError, match="needs field 'check.tests'"):
        check_answer(_row({"kind": "python_tests"}), "x")
    with pytest.raises(DataError, match="check.answer' is not a number"):
        check_answer(_row({"kind": "numeric", "answer": "many"}), "x")
    with pytest.raises(ValueError, match="unknown suite domain 'poetry'"):
        generate("poetry", 3, 1, "train")
