"""Verifying a model's answer against a row's `check` spec.

Kinds (the spec is the row's "check" dict):
- exact:        {"answer"?: str, "case_insensitive"?: bool}  whitespace-normalized equality
- numeric:      {"answer": number, "tolerance"?: float}  the number after the last "Answer:",
                else the last number in the output
- python_tests: {"tests": [str, ...], "entry_point"?: str}  the output's code (a fenced block if
                any) runs with the assert tests in a sandboxed subprocess
- tool_call:    {"name": str, "arguments": dict, "schema": JSON schema of the whole call}
                the first JSON object in the output, schema-valid, with the same name + arguments
- reference:    {}  normalized exact match to the reference answer (user data without a checker)
- rubric:       {"rubric": str, "constraints": {name: value, ...}}  constrained writing (creative):
                correct iff every machine-checkable constraint holds (RUBRIC_CONSTRAINTS); the rubric says
                it in words for a judge model (forge.modifiers.judge); `rubric_score` gives the 0-10 score
"exact" and "reference" compare to the row's reference answer when the spec has no "answer".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge.data.records import DataError, reference
from forge.data.suites.sandbox import run_python_tests


@dataclass(frozen=True)
class CheckResult:
    correct: bool
    detail: str


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def _expected_text(row: dict[str, Any]) -> str:
    check = row.get("check") or {}
    return str(check["answer"]) if "answer" in check else reference(row)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_exact(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    expected, got = normalize_ws(_expected_text(row)), normalize_ws(output)
    if row["check"].get("case_insensitive"):
        expected, got = expected.casefold(), got.casefold()
    if got == expected:
        return CheckResult(True, "exact match")
    return CheckResult(False, f"expected {_short(expected)!r}, got {_short(got)!r}")


def check_reference(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    expected, got = normalize_ws(_expected_text(row)), normalize_ws(output)
    if got == expected:
        return CheckResult(True, "matches the reference")
    return CheckResult(False, f"differs from the reference {_short(expected)!r}: got {_short(got)!r}")


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"answer\s*[:=]", re.IGNORECASE)


def extract_number(text: str) -> float | None:
    """The number after the last "Answer:" if there is one, else the last number in the text."""
    tags = list(_ANSWER_TAG.finditer(text))
    if tags:
        after = _NUMBER.search(text, tags[-1].end())
        if after:
            return float(after.group().replace(",", ""))
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def check_numeric(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    spec = row["check"]
    expected = float(spec["answer"])
    tolerance = float(spec.get("tolerance", 1e-6))
    got = extract_number(output)
    if got is None:
        return CheckResult(False, f"no number in the output (expected {expected:g})")
    if math.isclose(got, expected, rel_tol=0.0, abs_tol=tolerance):
        return CheckResult(True, f"{got:g} == {expected:g}")
    return CheckResult(False, f"expected {expected:g}, got {got:g}")


_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block if the output has one, else the whole output."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def check_python_tests(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    code = extract_code(output)
    if not code.strip():
        return CheckResult(False, "no code in the output")
    correct, detail = run_python_tests(code, list(row["check"]["tests"]), timeout_s)
    return CheckResult(correct, detail)


def extract_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object that parses, scanning each '{' in order."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def _canonical(value: Any) -> Any:
    # Tool arguments compare modulo surrounding whitespace and case of strings; 5 == 5.0.
    if isinstance(value, str):
        return normalize_ws(value).casefold()
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def check_tool_call(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    import jsonschema

    spec = row["check"]
    call = extract_json_object(output)
    if call is None:
        return CheckResult(False, "no JSON object in the output")
    if call.get("name") != spec["name"]:
        return CheckResult(False, f"wrong tool: expected {spec['name']!r}, got {call.get('name')!r}")
    validator = jsonschema.Draft202012Validator(spec["schema"])
    error = jsonschema.exceptions.best_match(validator.iter_errors(call))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<call>"
        return CheckResult(False, f"schema violation at {where}: {_short(error.message, 160)}")
    expected, got = _canonical(spec["arguments"]), _canonical(call.get("arguments"))
    if got != expected:
        wrong = sorted(k for k in set(expected) | set(got or {}) if (got or {}).get(k) != expected.get(k))
        return CheckResult(False, f"wrong arguments {wrong}: expected {spec['arguments']}, "
                                  f"got {call.get('arguments')}")
    return CheckResult(True, f"correct call to {spec['name']}")


# ---- rubric: constrained writing ----------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _initial(line: str) -> str:
    # bullets, quotes and numbering before a line's first word do not count as its initial
    match = re.search(r"[A-Za-z]", line)
    return match.group().lower() if match else ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _say_list(items: list[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _include_words(value: list[str], text: str) -> str | None:
    said = f" {' '.join(_words(text)).casefold()} "
    missing = [w for w in value if f" {' '.join(_words(w)).casefold()} " not in said]
    return f"missing {_say_list(missing)}" if missing else None


def _exclude_letters(value: list[str], text: str) -> str | None:
    used = [c for c in value if c.casefold() in text.casefold()]
    return f"uses the letter {_say_list(used)}" if used else None


def _max_words(value: int, text: str) -> str | None:
    n = len(_words(text))
    return _plural(n, 'word') if n > value else None


def _exact_words(value: int, text: str) -> str | None:
    n = len(_words(text))
    return _plural(n, 'word') if n != value else None


def _max_sentences(value: int, text: str) -> str | None:
    n = sum(1 for part in _SENTENCE_END.split(text) if _WORD.search(part))
    return _plural(n, 'sentence') if n > value else None


def _line_count(value: int, text: str) -> str | None:
    n = len(_lines(text))
    return _plural(n, 'line') if n != value else None


def _line_initials(value: str, text: str) -> str | None:
    initials = "".join(_initial(line) for line in _lines(text))
    return f"the lines start with {initials.upper() or 'nothing'}" if initials != value.lower() else None


def _max_words_per_line(value: int, text: str) -> str | None:
    longest = max((len(_words(line)) for line in _lines(text)), default=0)
    return f"a line has {_plural(longest, 'word')}" if longest > value else None


def _line_suffix(value: str, text: str) -> str | None:
    last_words = [(_words(line) or [""])[-1] for line in _lines(text)]
    wrong = [w for w in last_words if not w.casefold().endswith(value.casefold())]
    return f"{_say_list(wrong)} do not end in -{value}" if wrong else None


def _distinct_lines(value: bool, text: str) -> str | None:
    keys = [" ".join(_words(line)).casefold() for line in _lines(text)]
    return "a line is repeated" if value and len(set(keys)) != len(keys) else None


def _title_case(value: bool, text: str) -> str | None:
    lower = [w for w in _words(text) if w[0].isalpha() and not w[0].isupper()]
    return f"{_say_list(lower)} not capitalized" if value and lower else None


def _count_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _strings_ok(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) and s.strip() for s in v)


def _letters_ok(v: Any) -> bool:
    return _strings_ok(v) and all(len(c) == 1 and c.isalpha() for c in v)


def _word_ok(v: Any) -> bool:
    return isinstance(v, str) and v.isalpha()


@dataclass(frozen=True)
class RubricConstraint:
    test: Callable[[Any, str], str | None]  # (value, output) -> None when met, else what is wrong
    describe: Callable[[Any], str]  # the requirement in words, for the rubric and failure details
    valid: Callable[[Any], bool]  # is `value` well-formed (validate_check)
    expects: str  # what a well-formed value is, for validate_check's message


_COUNT = (_count_ok, "an integer >= 1")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_LETTERS = (_word_ok, "a non-empty string of letters")

RUBRIC_CONSTRAINTS: dict[str, RubricConstraint] = {
    "include_words": RubricConstraint(_include_words, lambda v: f"uses the word(s) {_say_list(v)}",
                                      _strings_ok, "a non-empty list of non-empty strings"),
    "exclude_letters": RubricConstraint(_exclude_letters, lambda v: f"never uses the letter {_say_list(v)}",
                                        _letters_ok, "a non-empty list of single letters"),
    "max_words": RubricConstraint(_max_words, lambda v: f"at most {_plural(v, 'word')}", *_COUNT),
    "exact_words": RubricConstraint(_exact_words, lambda v: f"exactly {_plural(v, 'word')}", *_COUNT),
    "max_sentences": RubricConstraint(_max_sentences, lambda v: f"at most {_plural(v, 'sentence')}", *_COUNT),
    "lines": RubricConstraint(_line_count, lambda v: f"exactly {_plural(v, 'line')}", *_COUNT),
    "line_initials": RubricConstraint(
        _line_initials, lambda v: f"{_plural(len(v), 'line')} whose initials spell {v.upper()}", *_LETTERS),
    "max_words_per_line": RubricConstraint(
        _max_words_per_line, lambda v: f"at most {_plural(v, 'word')} per line", *_COUNT),
    "line_suffix": RubricConstraint(_line_suffix, lambda v: f"every line ends with a word ending in -{v}",
                                    *_LETTERS),
    "distinct_lines": RubricConstraint(_distinct_lines, lambda v: "no line repeated", *_FLAG),
    "title_case": RubricConstraint(_title_case, lambda v: "every word capitalized", *_FLAG),
}


def describe_constraints(constraints: dict[str, Any]) -> list[str]:
    """Each constraint as a requirement in words (what a rubric lists)."""
    return [RUBRIC_CONSTRAINTS[name].describe(value) for name, value in constraints.items()]


def _unmet(check: dict[str, Any], output: str) -> list[str]:
    """`name (what is wrong)` for each constraint the output breaks; an empty output breaks them all."""
    constraints = check["constraints"]
    if not output.strip():
        return [f"{name} (empty output)" for name in constraints]
    unmet = []
    for name, value in constraints.items():
        problem = RUBRIC_CONSTRAINTS[name].test(value, output)
        if problem is not None:
            unmet.append(f"{name} ({RUBRIC_CONSTRAINTS[name].describe(value)}: {problem})")
    return unmet


def rubric_score(check: dict[str, Any], output: str) -> float:
    """0-10: ten times the fraction of the rubric's constraints the output meets (the local judge's score)."""
    total = len(check["constraints"])
    return 10.0 * (total - len(_unmet(check, output))) / total


def check_rubric(row: dict[str, Any], output: str, timeout_s: float) -> CheckResult:
    total = len(row["check"]["constraints"])
    unmet = _unmet(row["check"], output)
    if not unmet:
        return CheckResult(True, f"all {_plural(total, 'constraint')} met")
    return CheckResult(False, f"{len(unmet)}/{total} constraints unmet: {'; '.join(unmet)}")


def _validate_rubric(check: dict[str, Any], where: str) -> None:
    if not check["rubric"].strip():
        raise DataError(f"{where}: field 'check.rubric' is empty; it is the rubric a judge model reads")
    constraints = check["constraints"]
    if not constraints:
        raise DataError(f"{where}: field 'check.constraints' is empty; a rubric check needs at least one of "
                        f"{sorted(RUBRIC_CONSTRAINTS)}")
    for name, value in constraints.items():
        if name not in RUBRIC_CONSTRAINTS:
            raise DataError(f"{where}: field 'check.constraints.{name}' is not a known constraint; known: "
                            f"{sorted(RUBRIC_CONSTRAINTS)}")
        if not RUBRIC_CONSTRAINTS[name].valid(value):
            raise DataError(f"{where}: field 'check.constraints.{name}' must be "
                            f"{RUBRIC_CONSTRAINTS[name].expects}, got {value!r}")


CHECKERS: dict[str, Callable[[dict[str, Any], str, float], CheckResult]] = {
    "exact": check_exact,
    "numeric": check_numeric,
    "python_tests": check_python_tests,
    "tool_call": check_tool_call,
    "reference": check_reference,
    "rubric": check_rubric,
}

# Fields each kind needs, with their type: user datasets are validated against this on load.
REQUIRED_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "exact": {},
    "numeric": {"answer": (int, float, str)},
    "python_tests": {"tests": list},
    "tool_call": {"name": str, "arguments": dict, "schema": dict},
    "reference": {},
    "rubric": {"rubric": str, "constraints": dict},
}


def validate_check(check: Any, where: str) -> dict[str, Any]:
    """Raise DataError naming `where` and the field if a check spec is malformed."""
    if not isinstance(check, dict):
        raise DataError(f"{where}: field 'check' must be an object, got {type(check).__name__}")
    kind = check.get("kind")
    if kind not in CHECKERS:
        raise DataError(f"{where}: field 'check.kind' is {kind!r}; known kinds: {sorted(CHECKERS)}")
    for name, typ in REQUIRED_FIELDS[kind].items():
        if name not in check:
            raise DataError(f"{where}: check kind {kind!r} needs field 'check.{name}'")
        if not isinstance(check[name], typ) or isinstance(check[name], bool):
            got = type(check[name]).__name__
            raise DataError(f"{where}: field 'check.{name}' has the wrong type ({got})")
    if kind == "numeric":
        try:
            float(check["answer"])
        except ValueError:
            raise DataError(f"{where}: field 'check.answer' is not a number: {check['answer']!r}") from None
    if kind == "python_tests" and not all(isinstance(t, str) for t in check["tests"]):
        raise DataError(f"{where}: field 'check.tests' must be a list of strings")
    if kind == "rubric":
        _validate_rubric(check, where)
    return check


def check_answer(row: dict[str, Any], output: str, timeout_s: float = 5.0) -> CheckResult:
    """Is `output` a correct answer to `row`? Dispatches on row["check"]["kind"]."""
    where = f"row {row.get('id', '?')!r}"
    check = row.get("check")
    if check is None:
        raise DataError(f"{where}: missing field 'check'")
    validate_check(check, where)
    return CHECKERS[check["kind"]](row, output, timeout_s)
