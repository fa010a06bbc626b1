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


CHECKERS: dict[str, Callable[[dict[str, Any], str, float], CheckResult]] = {
    "exact": check_exact,
    "numeric": check_numeric,
    "python_tests": check_python_tests,
    "tool_call": check_tool_call,
    "reference": check_reference,
}

# Fields each kind needs, with their type: user datasets are validated against this on load.
REQUIRED_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "exact": {},
    "numeric": {"answer": (int, float, str)},
    "python_tests": {"tests": list},
    "tool_call": {"name": str, "arguments": dict, "schema": dict},
    "reference": {},
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
    return check


def check_answer(row: dict[str, Any], output: str, timeout_s: float = 5.0) -> CheckResult:
    """Is `output` a correct answer to `row`? Dispatches on row["check"]["kind"]."""
    where = f"row {row.get('id', '?')!r}"
    check = row.get("check")
    if check is None:
        raise DataError(f"{where}: missing field 'check'")
    validate_check(check, where)
    return CHECKERS[check["kind"]](row, output, timeout_s)
