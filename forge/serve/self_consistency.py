"""11A: self-consistency. Several sampled answers, the final answer extracted from each the way the domain's
task suite checks it, the majority wins (ties: the earliest sample). Extraction per check kind:

    numeric       the number after the last "Answer:", else the last number (the suites' numeric check)
    python_tests  the code (a fenced block if any), blank lines and trailing spaces dropped
    tool_call     the first JSON object, canonicalised (key order, number formatting)
    exact, reference, rubric    the whole answer, whitespace-normalised and case-folded
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=64)
def answer_kind(suite: str) -> str:
    """The check kind of a suite's rows (what its answers are compared by)."""
    from forge.data.suites import generate

    return str(generate(suite, 1, 0, "dev")[0]["check"]["kind"])


def extract(kind: str, text: str) -> str | None:
    """The comparable final answer of `text`; None when it has none (it then gets no vote)."""
    from forge.data.suites.checks import extract_code, extract_json_object, extract_number, normalize_ws

    if kind == "numeric":
        value = extract_number(text)
        return None if value is None else f"{round(value, 6):g}"
    if kind == "python_tests":
        code = "\n".join(line.rstrip() for line in extract_code(text).splitlines() if line.strip())
        return code or None
    if kind == "tool_call":
        obj = extract_json_object(text)
        return None if obj is None else json.dumps(obj, sort_keys=True)
    norm = normalize_ws(text).casefold()
    return norm or None


@dataclass
class Vote:
    index: int  # the sample whose answer is returned
    answer: str | None  # the extracted answer that won
    agreement: float  # share of samples that extracted to it
    counts: dict[str, int]


def majority(samples: Sequence[str], kind: str) -> Vote:
    if not samples:
        raise ValueError("majority() of no samples")
    answers = [extract(kind, s) for s in samples]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(0, None, 0.0, {})
    best = max(counts.values())
    # ties go to the answer seen first
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return Vote(answers.index(winner), winner, best / len(samples), dict(counts))
