"""The post-MVP suites (math, hard_math, science, finance, creative) and the rubric check: deterministic
rows, disjoint splits, references that are right (recomputed here from the prompt, independently of the
generator) and pass their checks, wrong answers that fail, each rubric constraint, malformed rubric checks
rejected, and a config that enables every post-MVP domain."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from forge.config import load_config
from forge.data.records import DataError, reference, validate_row
from forge.data.suites import SUITES, check_answer, generate, validate_check
from forge.data.suites.checks import RUBRIC_CONSTRAINTS, check_rubric, rubric_score

POST_MVP = ("math", "hard_math", "science", "finance", "creative")
NUMERIC = ("math", "hard_math", "science", "finance")
SPLITS = ("train", "dev", "heldout", "calib", "pretrain")


def prompt_of(row: dict) -> str:
    return row["messages"][0]["content"]


@pytest.mark.parametrize("domain", POST_MVP)
def test_rows_are_deterministic_per_seed(domain: str) -> None:
    rows = generate(domain, 80, seed=3, split="train")
    assert rows == generate(domain, 80, seed=3, split="train")
    assert [prompt_of(r) for r in rows] != [prompt_of(r) for r in generate(domain, 80, seed=4, split="train")]


def test_rows_are_the_same_in_every_process() -> None:
    """No draw may depend on set or hash order (PYTHONHASHSEED differs between processes)."""
    code = ("import hashlib, json; from forge.data.suites import generate; "
            f"print(hashlib.sha256(json.dumps([generate(d, 100, 7, 'train') for d in {POST_MVP!r}]).encode())"
            ".hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.parametrize("domain", POST_MVP)
def test_splits_are_disjoint(domain: str) -> None:
    prompts = {split: {prompt_of(r) for r in generate(domain, 120, 9, split)} for split in SPLITS}
    for held in ("dev", "heldout", "calib"):
        for other in SPLITS:
            if other != held:
                assert not prompts[held] & prompts[other], (held, other)


@pytest.mark.parametrize("domain", POST_MVP)
def test_rows_are_valid_small_and_varied(domain: str) -> None:
    rows = generate(domain, 200, 11, "train")
    for row in rows:
        validate_row(row, row["id"])
        validate_check(row["check"], row["id"])
        assert len(prompt_of(row).split()) <= 40, prompt_of(row)
        assert len(re.findall(r"\w+|[^\w\s]", reference(row))) <= 45, reference(row)
    assert len({prompt_of(r) for r in rows}) == len(rows)
    assert len({r["task"] for r in rows}) >= 5
    assert {r["check"]["kind"] for r in rows} == ({"rubric"} if domain == "creative" else {"numeric"})


@pytest.mark.parametrize("domain", POST_MVP)
def test_references_pass_and_other_rows_answers_fail(domain: str) -> None:
    rows = generate(domain, 300, 5, "heldout")
    failed = 0
    for i, row in enumerate(rows):
        result = check_answer(row, reference(row))
        assert result.correct, (row["id"], reference(row), result.detail)
        # creative: another template's answer; within a template a text may rightly answer two prompts
        # ("Simply fresh pizza." is a slogan for pizza with "fresh" in at most 6 words, and in at most 8)
        later = rows[i + 1:] + rows[:i]
        other = next(r for r in later if domain != "creative" or r["task"] != row["task"])
        if reference(other) != reference(row) and other["check"] != row["check"]:
            assert not check_answer(row, reference(other)).correct, (prompt_of(row), reference(other))
            failed += 1
    assert failed > 250


# ---- numeric domains: one answer format, and the answer is right -----------------------------------------

@pytest.mark.parametrize("domain", NUMERIC)
def test_numeric_references_end_with_the_answer_and_near_misses_fail(domain: str) -> None:
    for row in generate(domain, 150, 2, "dev"):
        ref, expected = reference(row), row["check"]["answer"]
        match = re.search(r"Answer: (-?\d+(?:\.\d+)?)$", ref)
        assert match and float(match.group(1)) == pytest.approx(expected), ref
        step = 0.01 if domain in ("finance", "science") and not float(expected).is_integer() else 1
        off = f"{ref[:match.start(1)]}{float(expected) + step:.2f}"
        assert not check_answer(row, off).correct, off
        assert check_answer(row, f"The result is {match.group(1)}").correct
    if domain == "finance":
        rows = generate(domain, 50, 1, "dev")
        assert all(re.search(r"Round to (cents|2 decimals)\.$", prompt_of(r)) for r in rows)
        assert all(re.search(r"Answer: -?\d+\.\d\d$", reference(r)) for r in rows)
    if domain in ("finance", "science"):
        assert all(r["check"]["tolerance"] == 0.005 for r in generate(domain, 50, 1, "dev"))


N = r"(-?\d+(?:\.\d+)?)"
# Independent solutions: (pattern over the prompt, what the answer must be), per domain.
SOLVERS: dict[str, list[tuple[str, Callable[..., float]]]] = {
    "math": [
        (rf"What is {N} \+ {N}\?", lambda a, b: a + b),
        (rf"What is {N} - {N}\?", lambda a, b: a - b),
        (rf"What is {N} \* {N}\?", lambda a, b: a * b),
        (rf"What is {N} divided by {N}, as a whole number", lambda a, b: a // b),
        (rf"remainder when {N} is divided by {N}", lambda a, b: a % b),
        (rf"What is {N}% of {N}\?", lambda p, b: p * b / 100),
        (rf"Write {N}/{N} as a decimal", lambda n, d: n / d),
    ],
    "hard_math": [
        (rf"Solve for x: {N}x ([+-]) {N} = {N}\.", lambda a, s, b, c: (c - (b if s == "+" else -b)) / a),
        (rf"What is {N}\^{N} mod {N}\?", lambda b, e, m: pow(int(b), int(e), int(m))),
        (rf"What is \({N} \* {N}\) mod {N}\?", lambda a, b, m: (a * b) % m),
        (rf"greatest common divisor of {N} and {N}", lambda a, b: math.gcd(int(a), int(b))),
        (rf"least common multiple of {N} and {N}", lambda a, b: math.lcm(int(a), int(b))),
        (rf"sum {N} \+ {N} \+ {N} \+ \.\.\. \+ {N}\?",
         lambda a, b, _, z: sum(range(int(a), int(z) + 1, int(b - a)))),
        (rf"choose {N} of {N}", lambda k, n: math.comb(int(n), int(k))),
    ],
    "science": [
        (rf"travels {N} km in {N} hours", lambda d, t: d / t),
        (rf"mass of {N} g and a volume of {N} cm", lambda m, v: m / v),
        (rf"current of {N} A flows through a {N} ohm", lambda i, r: i * r),
        (rf"{N} ohm resistor has {N} V across", lambda r, v: v / r),
        (rf"A {N} kg cart accelerates at {N} m/s", lambda m, a: m * a),
        (rf"force of {N} N acts on a {N} kg", lambda f, m: f / m),
        (rf"Convert {N} degrees Celsius", lambda c: c * 9 / 5 + 32),
        (rf"Convert {N} degrees Fahrenheit", lambda f: (f - 32) * 5 / 9),
        (rf"Convert {N} km to m\.", lambda x: x * 1000),
        (rf"Convert {N} m to cm\.", lambda x: x * 100),
        (rf"Convert {N} g to kg\.", lambda x: x / 1000),
        (rf"Convert {N} minutes to hours\.", lambda x: x / 60),
        (rf"Convert {N} km/h to m/s\.", lambda x: x / 3.6),
    ],
    "finance": [
        (rf"\${N} earns {N}% simple interest per year\. .* in {N} years", lambda p, r, t: p * r / 100 * t),
        (rf"\${N} is invested at {N}% .* after {N} years", lambda p, r, t: p * (1 + r / 100) ** t),
        (rf"from \${N} to \${N}\. What is the percent change", lambda a, b: (b - a) / a * 100),
        (rf"revenue is \${N} and its costs are \${N}", lambda r, c: (r - c) / r * 100),
        (rf"loan of \${N} has an annual interest rate of {N}%", lambda p, r: p * r / 100 / 12),
        (rf"invest \${N} and get back \${N}", lambda a, b: (b - a) / a * 100),
    ],
}


@pytest.mark.parametrize("domain", NUMERIC)
def test_numeric_answers_are_right(domain: str) -> None:
    solved: set[str] = set()
    for row in generate(domain, 300, 21, "train"):
        for pattern, solve in SOLVERS[domain]:
            match = re.search(pattern, prompt_of(row))
            if match:
                args = [g if g in ("+", "-") else float(g) for g in match.groups()]
                # finance rounds to cents: allow the half cent the rounding may move
                assert row["check"]["answer"] == pytest.approx(solve(*args), abs=0.0051), prompt_of(row)
                solved.add(pattern)
                break
        else:
            pytest.fail(f"no independent solver for {prompt_of(row)!r}")
    assert len(solved) >= len(SOLVERS[domain]) - 1  # (nearly) every prompt shape was drawn and checked


# ---- creative: rubric rows -------------------------------------------------------------------------------

def _break(row: dict) -> str:
    """The reference changed so that one of the task's demands is no longer met."""
    ref, constraints = reference(row), row["check"]["constraints"]
    task = row["task"]
    if task == "acrostic":
        return "\n".join(reversed(ref.splitlines()))
    if task == "rhyme_list":
        return "\n".join([*ref.splitlines()[:-1], "table"])
    if task == "title":
        return ref.lower()
    if task == "lipogram":
        return ref[:-1] + f" {constraints['exclude_letters'][0]}."
    first = constraints["include_words"][0]  # sentence_with_words, slogan
    return re.sub(rf"\b{first}\b", "thing", ref, flags=re.IGNORECASE)


def test_creative_rows_carry_a_rubric_and_break_when_a_demand_is_missed() -> None:
    rows = generate("creative", 150, 4, "dev")
    tasks = {"acrostic", "sentence_with_words", "slogan", "rhyme_list", "lipogram", "title"}
    assert {r["task"] for r in rows} >= tasks
    for row in rows:
        check = row["check"]
        assert set(check) == {"kind", "rubric", "constraints"} and len(check["rubric"]) > 30
        assert len(check["constraints"]) <= 3  # one missed demand scores <= 6.7: below the default pass mark
        assert rubric_score(check, reference(row)) == 10.0
        broken = _break(row)
        result = check_answer(row, broken)
        assert not result.correct, (prompt_of(row), broken)
        assert 0 <= rubric_score(check, broken) < 10
        assert rubric_score(check, "") == 0.0


def _rubric_row(**constraints: object) -> dict:
    check = {"kind": "rubric", "rubric": "Follow the prompt.", "constraints": constraints}
    return {"id": "r-0", "domain": "creative", "check": check,
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ref"}]}


CONSTRAINT_CASES = [  # (name, value, an output that meets it, one that does not)
    ("include_words", ["cat", "red hat"], "A cat in a Red  hat.", "A cat in a red cap."),
    ("exclude_letters", ["e"], "A cat naps.", "A cat sleeps."),
    ("max_words", 3, "One two three.", "One two three four."),
    ("exact_words", 2, "Lost Dragon", "The Lost Dragon"),
    ("max_sentences", 1, "It rains. ", "It rains. It pours!"),
    ("lines", 2, "a\n\nb\n", "a\nb\nc"),
    ("line_initials", "SUN", "Soft\n- under\nNight", "Soft\nNight\nUnder"),
    ("max_words_per_line", 2, "one two\nthree", "one two three\nfour"),
    ("line_suffix", "ing", "sing\nA ring", "sing\nrang"),
    ("distinct_lines", True, "sing\nring", "sing\nSing"),
    ("title_case", True, "The Brave Fox", "The brave Fox"),
]


def test_every_constraint_kind_is_covered() -> None:
    assert {name for name, *_ in CONSTRAINT_CASES} == set(RUBRIC_CONSTRAINTS)


@pytest.mark.parametrize(("name", "value", "good", "bad"), CONSTRAINT_CASES,
                         ids=[c[0] for c in CONSTRAINT_CASES])
def test_rubric_constraint(name: str, value: object, good: str, bad: str) -> None:
    row = _rubric_row(**{name: value})
    validate_check(row["check"], "test")
    assert check_rubric(row, good, 1.0).correct
    result = check_answer(row, bad)
    assert not result.correct and name in result.detail, result.detail


def test_rubric_score_is_the_fraction_met_and_detail_names_the_failures() -> None:
    row = _rubric_row(include_words=["fox"], max_words=3, title_case=True)
    assert rubric_score(row["check"], "Brave Fox") == 10.0
    assert rubric_score(row["check"], "brave fox") == pytest.approx(10 * 2 / 3)
    assert rubric_score(row["check"], "the brave old dog") == pytest.approx(0.0)
    detail = check_answer(row, "the brave old dog").detail
    assert detail.startswith("3/3 constraints unmet")
    assert all(name in detail for name in ("include_words", "max_words", "title_case"))
    assert check_answer(row, "   ").detail.startswith("3/3 constraints unmet")


def _with(constraints: object) -> dict:
    return {"kind": "rubric", "rubric": "x", "constraints": constraints}


@pytest.mark.parametrize(("check", "message"), [
    ({"kind": "rubric", "constraints": {"max_words": 3}}, "needs field 'check.rubric'"),
    ({"kind": "rubric", "rubric": "x"}, "needs field 'check.constraints'"),
    ({"kind": "rubric", "rubric": "  ", "constraints": {"max_words": 3}}, "'check.rubric' is empty"),
    (_with([]), "'check.constraints' has the wrong type"),
    (_with({}), "'check.constraints' is empty"),
    (_with({"rhymes": True}), "'check.constraints.rhymes' is not a known constraint"),
    (_with({"max_words": "five"}), "'check.constraints.max_words' must be an integer >= 1"),
    (_with({"max_words": True}), "'check.constraints.max_words' must be an integer >= 1"),
    (_with({"exclude_letters": ["ab"]}), "a non-empty list of single letters"),
    (_with({"include_words": []}), "a non-empty list of non-empty strings"),
])
def test_malformed_rubric_checks_are_rejected(check: dict, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)) as err:
        validate_check(check, "data/user.jsonl line 7")
    assert str(err.value).startswith("data/user.jsonl line 7: ")


def test_a_config_enabling_every_post_mvp_domain_loads(forge_home) -> None:
    enabled = ["code", "reasoning", "automation", *POST_MVP]
    cfg = load_config(profile="demo", overrides={"modifiers": {"enabled": enabled}})
    assert cfg.modifiers.enabled == enabled
    for domain in POST_MVP:
        assert cfg.modifiers.suite_of(domain) in SUITES
        assert cfg.teachers.tiers_for(domain)
    assert cfg.modifiers.domains["creative"].judge == "rubric"
