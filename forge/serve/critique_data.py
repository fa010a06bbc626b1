"""12A's examples: (question, answer, correct) triples the critic learns from.

Questions: task-suite prompts of serving.critique.domains, drawn as the suites' split "critique" (the train
buckets, a random stream of its own: never a prompt of the dev / heldout / calib splits that 10A-12B and 2F
measure on), plus the user datasets' checkable train rows of those domains (prep_data's train.jsonl).

Answers per question:
  reference   the row's reference answer
  rewrite     the same answer in another form (final answer only, fenced code, pretty-printed JSON...)
  perturbed   a realistic wrong answer for the row's check kind: a number off by a little, a slipped step,
              the wrong operation, code with a broken line or a swapped operator, a tool call with a wrong,
              missing or extra argument, a truncated answer...
  model       the served base's own greedy answer (2C's GGUF + 2E's LoRA in llama.cpp), when there is one
Every label comes from the suites' check (forge.data.suites.check_answer), never from the intent: a
"perturbation" that still passes is labelled correct (`intended` keeps what was meant, for the report).

Splits are by question (a stable hash of domain + prompt, salted by serving.critique.seed): no question, and
so none of its answers, is in two splits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge.data.records import DataError, prompt_messages, reference, stable_int, stable_unit

if TYPE_CHECKING:
    from forge.serve.serve_config import CritiqueConfig

log = logging.getLogger("forge.serve")

QUESTION_SPLIT = "critique"
SPLITS = ("train", "val", "test")
VAL_FRACTION, TEST_FRACTION = 0.15, 0.2
REWRITES_PER_PROMPT = 1  # besides the reference
WRONG_PER_PROMPT = 2
PER_PROMPT = 1 + REWRITES_PER_PROMPT + WRONG_PER_PROMPT  # what sizes the question pool
SOURCES = ("reference", "rewrite", "perturbed", "model")


# ---- questions -------------------------------------------------------------------------------------------

def question_text(row: dict[str, Any]) -> str:
    """What the critic reads as the question: the user's turns of the prompt."""
    return "\n".join(m["content"] for m in prompt_messages(row) if m["role"] == "user").strip()


def split_of(domain: str, question: str, seed: int) -> str:
    u = stable_unit(f"forge-12a|{seed}|{domain}|{question}")
    return "test" if u < TEST_FRACTION else "val" if u < TEST_FRACTION + VAL_FRACTION else "train"


def question_rows(cfg: CritiqueConfig, n_synthetic: int, user_rows: Sequence[dict[str, Any]] = ()
                  ) -> list[dict[str, Any]]:
    """Distinct questions, domain by domain: the suites' rows, then (up to as many again per domain) the user
    datasets' checkable rows of the same domains."""
    from forge.data.suites import SUITES, generate

    unknown = [d for d in cfg.domains if d not in SUITES]
    if unknown:
        raise DataError(f"serving.critique.domains: {unknown} have no task suite (known: {sorted(SUITES)})")
    per_domain = max(1, math.ceil(n_synthetic / (PER_PROMPT * len(cfg.domains))))
    rows, seen = [], set()
    for domain in cfg.domains:
        users = [r for r in user_rows if r.get("domain") == domain and r.get("check")][:per_domain]
        for row in [*generate(domain, per_domain, cfg.seed, QUESTION_SPLIT), *users]:
            key = (domain, question_text(row))
            if key[1] and key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def user_dataset_rows(rows: Iterable[dict[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """prep_data's rows that came from the user's datasets (not the suites), of the critic's domains."""
    return [r for r in rows
            if not str(r.get("source", "")).startswith("suite:") and r.get("domain") in domains]


# ---- answers: rewrites and perturbations per check kind --------------------------------------------------

@dataclass(frozen=True)
class Item:
    row: dict[str, Any]
    question: str
    ref: str

    @property
    def check(self) -> dict[str, Any]:
        return self.row["check"]


Variant = Callable[[Item, random.Random], str | None]  # None: does not apply to this item

_NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_TAG = re.compile(r"answer\s*[:=]", re.IGNORECASE)


def _final_span(text: str) -> tuple[int, int] | None:
    """Where the final number is (the suites' numeric reading: after the last "Answer:", else the last)."""
    tags = list(_TAG.finditer(text))
    if tags:
        m = _NUM.search(text, tags[-1].end())
        if m:
            return m.span()
    found = list(_NUM.finditer(text))
    return found[-1].span() if found else None


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if decimals else str(int(round(value)))


def _final(item: Item) -> tuple[float, str, int] | None:
    span = _final_span(item.ref)
    if span is None:
        return None
    text = item.ref[span[0]:span[1]].replace(",", "")
    return float(text), text, len(text.split(".")[1]) if "." in text else 0


def _with_final(item: Item, new: str) -> str | None:
    span = _final_span(item.ref)
    return None if span is None else item.ref[:span[0]] + new + item.ref[span[1]:]


def _nudged(value: float, decimals: int, rng: random.Random) -> str:
    unit = 10.0 ** -decimals
    return _fmt(value + rng.choice([-1, 1]) * rng.randint(1, 3) * unit, decimals)


def _question_numbers(item: Item) -> list[str]:
    return [n.replace(",", "") for n in _NUM.findall(item.question)]


# numeric: "<work>. Answer: <number>"
def n_final_only(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None else f"Answer: {f[1]}"


def n_sentence(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None else f"The answer is {f[1]}."


def n_newline(item: Item, rng: random.Random) -> str | None:
    return item.ref.replace(". Answer:", ".\nAnswer:") if ". Answer:" in item.ref else None


def n_thousands(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None or f[2] or abs(f[0]) < 1000 else _with_final(item, f"{int(f[0]):,}")


def n_off_by_little(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None else _with_final(item, _nudged(f[0], f[2], rng))


def n_bare_wrong(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None else f"Answer: {_nudged(f[0], f[2], rng)}"


def n_slipped_step(item: Item, rng: random.Random) -> str | None:
    """The last step's result and the final answer both wrong, the same way (a consistent slip)."""
    f, span = _final(item), _final_span(item.ref)
    if f is None or span is None:
        return None
    work = item.ref[:span[0]]
    hits = [m for m in _NUM.finditer(work) if m.group().replace(",", "") == f[1]]
    if not hits:
        return None
    wrong = _nudged(f[0], f[2], rng)
    m = hits[-1]
    return work[:m.start()] + wrong + work[m.end():] + wrong + item.ref[span[1]:]


def n_wrong_operation(item: Item, rng: random.Random) -> str | None:
    nums = list(dict.fromkeys(_question_numbers(item)))
    if len(nums) < 2:
        return None
    a, b = rng.sample(nums[:4], 2)
    op = rng.choice("+-*/")
    x, y = float(a), float(b)
    if op == "/" and y == 0:
        return None
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else 0.0}[op]
    text = _fmt(value, 0 if float(value).is_integer() else 2)
    return f"{a} {op} {b} = {text}. Answer: {text}"


def n_echo_number(item: Item, rng: random.Random) -> str | None:
    nums = _question_numbers(item)
    return f"Answer: {rng.choice(nums)}" if nums else None


def n_rounded(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    if f is None or not f[2]:
        return None
    digits = rng.randrange(f[2])  # fewer decimals than asked for
    return _with_final(item, _fmt(round(f[0], digits), digits))


def n_scaled(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    if f is None or f[0] == 0:
        return None
    return _with_final(item, _fmt(f[0] * 10, f[2]) if rng.random() < 0.5 else _fmt(f[0] / 10, f[2] + 1))


def n_sign(item: Item, rng: random.Random) -> str | None:
    f = _final(item)
    return None if f is None or f[0] == 0 else _with_final(item, _fmt(-f[0], f[2]))


def truncated(item: Item, rng: random.Random) -> str | None:
    """The answer cut off at a word boundary between 30% and 80% of the way (a generation that stopped)."""
    words = item.ref.split(" ")
    if len(words) < 3:
        return item.ref[: max(1, len(item.ref) // 2)] if len(item.ref) > 2 else None
    return " ".join(words[: max(1, int(len(words) * rng.uniform(0.3, 0.8)))])


# exact (and the generic text kinds): short strings
def _swap(words: list[str], rng: random.Random) -> list[str] | None:
    pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if not pairs:
        return None
    i = rng.choice(pairs)
    return [*words[:i], words[i + 1], words[i], *words[i + 2:]]


def t_spacing(item: Item, rng: random.Random) -> str | None:
    return f"{item.ref}\n" if rng.random() < 0.5 else f" {item.ref.strip()} "


def t_case(item: Item, rng: random.Random) -> str | None:
    return item.ref.swapcase() if item.check.get("case_insensitive") else None


def t_echo_input(item: Item, rng: random.Random) -> str | None:
    payload = item.question.rsplit(":", 1)[-1].strip()
    return payload if ":" in item.question and payload else None


def t_swap_words(item: Item, rng: random.Random) -> str | None:
    lines = item.ref.splitlines()
    if len(lines) > 1:  # multi-line answers: swap two lines
        swapped = _swap(lines, rng)
        return "\n".join(swapped) if swapped else None
    swapped = _swap(item.ref.split(), rng)
    return " ".join(swapped) if swapped else None


def t_drop_word(item: Item, rng: random.Random) -> str | None:
    words = item.ref.split(" ")
    if len(words) < 2:
        return None
    del words[rng.randrange(len(words))]
    return " ".join(words)


def t_repeat_word(item: Item, rng: random.Random) -> str | None:
    words = item.ref.split(" ")
    i = rng.randrange(len(words))
    return " ".join([*words[:i + 1], words[i], *words[i + 1:]])


def t_wrong_case(item: Item, rng: random.Random) -> str | None:
    options = {item.ref.upper(), item.ref.lower(), item.ref.title(), item.ref.capitalize()} - {item.ref}
    return rng.choice(sorted(options)) if options else None


def t_chatty(item: Item, rng: random.Random) -> str | None:
    return rng.choice([f"Sure! {item.ref}", f"The answer is: {item.ref}", f"{item.ref}\nHope this helps!"])


def t_int_off(item: Item, rng: random.Random) -> str | None:
    return str(int(item.ref) + rng.choice([-1, 1])) if item.ref.strip().lstrip("-").isdigit() else None


def t_drop_line(item: Item, rng: random.Random) -> str | None:
    lines = item.ref.splitlines()
    if len(lines) < 2:
        return None
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def t_lowercase(item: Item, rng: random.Random) -> str | None:
    return item.ref.lower() if item.ref.lower() != item.ref else None


def t_padding(item: Item, rng: random.Random) -> str | None:
    return item.ref + rng.choice([" And that is all there is to it.", " It is what it is, again and again."])


# python_tests: a function definition
def _code_lines(item: Item) -> list[str]:
    from forge.data.suites.checks import extract_code

    return extract_code(item.ref).rstrip("\n").splitlines()


def _fence(code: str) -> str:
    return f"```python\n{code}\n```"


def c_fenced(item: Item, rng: random.Random) -> str | None:
    return None if "```" in item.ref else _fence(item.ref)


def c_explained(item: Item, rng: random.Random) -> str | None:
    code = "\n".join(_code_lines(item))
    return f"Here is the function:\n\n{_fence(code)}\n\nIt returns the result directly."


def c_docstring(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    i = next((k for k, line in enumerate(lines) if line.lstrip().startswith("def ")), None)
    if i is None or i + 1 >= len(lines):
        return None
    indent = re.match(r"\s*", lines[i + 1]).group()
    return "\n".join([*lines[:i + 1], f'{indent}"""Compute the requested value."""', *lines[i + 1:]])


_OPERATOR_SWAPS = ((" + ", " - "), (" - ", " + "), (" * ", " + "), (" ** ", " * "), (" / ", " // "),
                   (" < ", " <= "), (" > ", " >= "), (" <= ", " < "), (" >= ", " > "), (" == ", " != "),
                   ("max(", "min("), ("min(", "max("), (".upper()", ".lower()"), (".lower()", ".upper()"),
                   ("startswith", "endswith"), ("endswith", "startswith"), ("== 1", "== 0"), ("== 0", "== 1"),
                   (".count(", ".find("), ("sum(", "len("), ("sorted(", "list("), ("[::-1]", "[1:]"))


def _body(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.startswith((" ", "\t")) and line.strip()]


def _rejoin(item: Item, lines: list[str], rng: random.Random) -> str:
    code = "\n".join(lines)
    return _fence(code) if rng.random() < 0.4 else code  # wrong code comes fenced as often as right code


def c_wrong_operator(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    options = [(i, a, b) for i in _body(lines) for a, b in _OPERATOR_SWAPS if a in lines[i]]
    if not options:
        return None
    i, a, b = rng.choice(options)
    lines[i] = lines[i].replace(a, b, 1)
    return _rejoin(item, lines, rng)


def c_wrong_constant(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    options = [(i, m) for i in _body(lines) for m in re.finditer(r"(?<![\w.])\d+(?![\w.])", lines[i])]
    if not options:
        return None
    i, m = rng.choice(options)
    lines[i] = lines[i][:m.start()] + str(int(m.group()) + rng.choice([-1, 1])) + lines[i][m.end():]
    return _rejoin(item, lines, rng)


def c_syntax_error(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    options = []
    for i, line in enumerate(lines):
        if line.rstrip().endswith(":"):
            options.append((i, line.rstrip()[:-1]))  # the colon forgotten
        for closer in ")]":
            if closer in line:
                k = line.rindex(closer)
                options.append((i, line[:k] + line[k + 1:]))  # a bracket never closed
    if not options:
        return None
    i, broken = rng.choice(options)
    lines[i] = broken
    return _rejoin(item, lines, rng)


def c_renamed(item: Item, rng: random.Random) -> str | None:
    name = item.check.get("entry_point")
    lines = _code_lines(item)
    if not name or not any(f"def {name}(" in line for line in lines):
        return None
    new = rng.choice([f"{name}_fn", f"my_{name}", "solution"])
    return _rejoin(item, [line.replace(f"def {name}(", f"def {new}(") for line in lines], rng)


def c_no_return(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    options = [i for i in _body(lines) if lines[i].lstrip().startswith("return ")]
    if not options:
        return None
    i = rng.choice(options)
    lines[i] = lines[i].replace("return ", "result = ", 1)
    return _rejoin(item, lines, rng)


def c_stub(item: Item, rng: random.Random) -> str | None:
    lines = _code_lines(item)
    heads = [line for line in lines if line.lstrip().startswith("def ")]
    if not heads:
        return None
    body = rng.choice(["    pass", "    # TODO", "    return None"])
    return _rejoin(item, [heads[0], body] if body != "    # TODO" else [heads[0]], rng)


# tool_call: one JSON object {"name", "arguments"}
def _call(item: Item) -> dict[str, Any] | None:
    try:
        call = json.loads(item.ref)
    except json.JSONDecodeError:
        return None
    return call if isinstance(call, dict) and isinstance(call.get("arguments"), dict) else None


def _arg_enum(item: Item, key: str) -> list[Any]:
    schema = item.check.get("schema", {})
    prop = schema.get("properties", {}).get("arguments", {}).get("properties", {}).get(key, {})
    return list(prop.get("enum", []))


def j_pretty(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    return None if call is None else json.dumps(call, indent=2)


def j_reordered(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None:
        return None
    return json.dumps({"arguments": dict(reversed(list(call["arguments"].items()))), "name": call["name"]})


def j_preamble(item: Item, rng: random.Random) -> str | None:
    return None if _call(item) is None else f"Calling the tool:\n{item.ref}"


def j_case(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None or not any(isinstance(v, str) for v in call["arguments"].values()):
        return None
    recase = rng.choice([str.lower, str.title, str.upper])
    args = {k: recase(v) if isinstance(v, str) else v for k, v in call["arguments"].items()}
    return json.dumps({**call, "arguments": args})


def _dumps_call(call: dict[str, Any], args: dict[str, Any]) -> str:
    return json.dumps({**call, "arguments": args})


def j_wrong_value(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None or not call["arguments"]:
        return None
    args = dict(call["arguments"])
    key = rng.choice(sorted(args))
    value = args[key]
    if isinstance(value, bool):
        args[key] = not value
    elif isinstance(value, int | float):
        args[key] = value + rng.choice([-1, 1]) * rng.randint(1, 5) if rng.random() < 0.7 else value * 10
    elif isinstance(value, str):
        others = [v for v in _arg_enum(item, key) if v != value]
        words = [w for w in re.findall(r"[A-Za-z]+", item.question) if w.lower() not in value.lower()]
        if others:
            args[key] = rng.choice(others)
        elif " " in value and rng.random() < 0.5:
            args[key] = value.rsplit(" ", 1)[0]
        elif words:
            args[key] = rng.choice(words[-8:])
        else:
            args[key] = value + " tomorrow"
    else:
        return None
    return _dumps_call(call, args)


def j_missing_arg(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None or not call["arguments"]:
        return None
    args = dict(call["arguments"])
    del args[rng.choice(sorted(args))]
    return _dumps_call(call, args)


def j_extra_arg(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None:
        return None
    return _dumps_call(call, {**call["arguments"], rng.choice(["note", "priority_level", "confirm"]): "yes"})


def j_wrong_tool(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    tools = re.findall(r"(\w+)\(", item.question)
    others = [t for t in dict.fromkeys(tools) if call is not None and t != call["name"]]
    return None if not others else json.dumps({**call, "name": rng.choice(others)})


def j_string_number(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None:
        return None
    keys = [k for k, v in call["arguments"].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if not keys:
        return None
    key = rng.choice(keys)
    return _dumps_call(call, {**call["arguments"], key: str(call["arguments"][key])})


def j_swapped_args(item: Item, rng: random.Random) -> str | None:
    call = _call(item)
    if call is None:
        return None
    keys = [k for k, v in call["arguments"].items() if isinstance(v, str)]
    if len(keys) < 2:
        return None
    a, b = rng.sample(keys, 2)
    args = dict(call["arguments"])
    args[a], args[b] = args[b], args[a]
    return _dumps_call(call, args)


def j_truncated(item: Item, rng: random.Random) -> str | None:
    return item.ref[: int(len(item.ref) * rng.uniform(0.3, 0.9))]


GENERIC_WRONG: tuple[tuple[str, Variant], ...] = (
    ("truncated", truncated), ("drop_line", t_drop_line), ("drop_word", t_drop_word),
    ("swap_words", t_swap_words), ("lowercase", t_lowercase), ("padding", t_padding), ("chatty", t_chatty))

REWRITES: dict[str, tuple[tuple[str, Variant], ...]] = {
    "numeric": (("final_only", n_final_only), ("sentence", n_sentence), ("newline", n_newline),
                ("thousands", n_thousands)),
    "exact": (("spacing", t_spacing), ("case", t_case)),
    "python_tests": (("fenced", c_fenced), ("explained", c_explained), ("docstring", c_docstring)),
    "tool_call": (("pretty", j_pretty), ("reordered", j_reordered), ("preamble", j_preamble),
                  ("case", j_case)),
}
PERTURBATIONS: dict[str, tuple[tuple[str, Variant], ...]] = {
    "numeric": (("off_by_little", n_off_by_little), ("bare_wrong", n_bare_wrong),
                ("slipped_step", n_slipped_step), ("wrong_operation", n_wrong_operation),
                ("echo_number", n_echo_number), ("rounded", n_rounded), ("scaled", n_scaled),
                ("sign", n_sign), ("truncated", truncated)),
    "exact": (("echo_input", t_echo_input), ("swap_words", t_swap_words), ("drop_word", t_drop_word),
              ("repeat_word", t_repeat_word), ("wrong_case", t_wrong_case), ("chatty", t_chatty),
              ("int_off", t_int_off), ("truncated", truncated)),
    "python_tests": (("wrong_operator", c_wrong_operator), ("wrong_constant", c_wrong_constant),
                     ("syntax_error", c_syntax_error), ("renamed", c_renamed), ("no_return", c_no_return),
                     ("stub", c_stub)),
    "tool_call": (("wrong_value", j_wrong_value), ("missing_arg", j_missing_arg), ("extra_arg", j_extra_arg),
                  ("wrong_tool", j_wrong_tool), ("string_number", j_string_number),
                  ("swapped_args", j_swapped_args), ("truncated", j_truncated)),
}


@dataclass(frozen=True)
class Candidate:
    answer: str
    source: str  # one of SOURCES
    variant: str  # the rewrite / perturbation name ("reference", "model" for those)


def _pick(item: Item, variants: Sequence[tuple[str, Variant]], k: int, rng: random.Random, source: str,
          taken: set[str]) -> list[Candidate]:
    out = []
    for name, fn in rng.sample(list(variants), len(variants)):
        if len(out) >= k:
            break
        text = fn(item, rng)
        if text is not None and text.strip() and text not in taken:
            taken.add(text)
            out.append(Candidate(text, source, name))
    return out


def candidates(row: dict[str, Any], seed: int) -> list[Candidate]:
    """The reference, REWRITES_PER_PROMPT rewrites and WRONG_PER_PROMPT perturbations of one row (fewer where
    fewer apply), the same for the same (row, seed)."""
    item = Item(row, question_text(row), reference(row))
    kind = row["check"]["kind"]
    rng = random.Random(stable_int(f"forge-12a|{seed}|{row['domain']}|{item.question}"))
    taken = {item.ref}
    return [Candidate(item.ref, "reference", "reference"),
            *_pick(item, REWRITES.get(kind, ()), REWRITES_PER_PROMPT, rng, "rewrite", taken),
            *_pick(item, PERTURBATIONS.get(kind, GENERIC_WRONG), WRONG_PER_PROMPT, rng, "perturbed", taken)]


# ---- labels ----------------------------------------------------------------------------------------------

def label_examples(pairs: Sequence[tuple[dict[str, Any], Candidate]], seed: int, timeout_s: float
                   ) -> list[dict[str, Any]]:
    """Check every (row, candidate) with the row's suite check (code runs in the sandbox: in parallel), one
    example dict per distinct (question, answer), in order."""
    from forge.data.suites import check_answer

    started, done = time.time(), 0

    def check(pair: tuple[dict[str, Any], Candidate]) -> Any:
        return check_answer(pair[0], pair[1].answer, timeout_s)

    results = []
    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(workers) as pool:
        for result in pool.map(check, pairs):
            results.append(result)
            done += 1
            if done % 1000 == 0:
                log.info("12A: checked %d/%d answers (%.0f/s)", done, len(pairs),
                         done / max(time.time() - started, 1e-9))
    examples, seen = [], set()
    for (row, cand), result in zip(pairs, results, strict=True):
        q = question_text(row)
        if (q, cand.answer) in seen:
            continue
        seen.add((q, cand.answer))
        examples.append({
            "question": q, "answer": cand.answer, "correct": bool(result.correct), "source": cand.source,
            "variant": cand.variant,
            "intended": None if cand.source == "model" else cand.source != "perturbed",
            "domain": row["domain"], "kind": row["check"]["kind"], "row_id": row.get("id"),
            "detail": result.detail, "split": split_of(row["domain"], q, seed)})
    return examples


def build_examples(rows: Sequence[dict[str, Any]], seed: int, timeout_s: float,
                   model_answers: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Every row's candidates (its model answer first, when `model_answers` has one for its index), labelled
    by the suites' checks."""
    model_answers = model_answers or {}
    pairs = []
    for i, row in enumerate(rows):
        if i in model_answers:
            pairs.append((row, Candidate(model_answers[i], "model", "model")))
        pairs.extend((row, c) for c in candidates(row, seed))
    return label_examples(pairs, seed, timeout_s)


def model_rows(rows: Sequence[dict[str, Any]], n: int) -> list[int]:
    """Indices of n rows for the base model to answer, round-robin over the domains."""
    by_domain: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_domain.setdefault(row["domain"], []).append(i)
    groups = list(by_domain.values())
    order = [g[k] for k in range(max((len(g) for g in groups), default=0)) for g in groups if k < len(g)]
    return sorted(order[:n])


def generate_answers(backend: Any, rows: Sequence[dict[str, Any]], batch_size: int) -> list[str]:
    """The backend's greedy answer to each row's prompt (backend: LlamaCppBackend's prompt / generate)."""
    outputs: list[str] = []
    started = time.time()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        outputs.extend(backend.generate([backend.prompt(prompt_messages(r)) for r in batch]))
        log.info("12A: the base answered %d/%d questions (%.1f/s)", len(outputs), len(rows),
                 len(outputs) / max(time.time() - started, 1e-9))
    return outputs


def by_split(examples: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Examples per split; every split needs both labels (else: a DataError saying what to raise)."""
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ex in examples:
        splits[ex["split"]].append(ex)
    for name, rows in splits.items():
        labels = {ex["correct"] for ex in rows}
        if labels != {True, False}:
            raise DataError(f"12A: the {name} split has {len(rows)} examples with labels {sorted(labels)}; "
                            "both correct and wrong answers are needed: raise "
                            "serving.critique.train_examples")
    return splits
