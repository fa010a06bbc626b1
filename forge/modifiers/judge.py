"""The judge teacher: scores an answer 0-10 against its row's rubric, over the same HTTP client as every
teacher (forge.modifiers.teachers.TeacherClient: its cost tracker, response cache and retries apply).

A domain whose answers a program cannot check (creative) names a judge in `modifiers.domains.<d>.judge`. Its
JudgeVerifier is the cascade's `verify` (forge.modifiers.cascade.run_cascade) and what evaluation scores a
model's outputs with; `verifier_for` picks it, or the suites' checker for domains without a judge.

The judge prompt (judge_messages) has four marked sections: the task, the rubric (or, for a row without one,
its reference answer as the gold), the answer, and the instruction to end with "Score: N". The local rubric
judge (forge.modifiers.local_teachers.rubric_judge_server) reads it back with parse_judge_prompt.
A judge call that fails (retries exhausted, a refused request, the cost cap) raises: an answer nobody could
judge is neither right nor wrong, so the run stops with the teacher's error instead of guessing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from forge.data.records import prompt_messages, reference
from forge.data.suites.checks import CheckResult
from forge.modifiers.cascade import Item, Verify, suite_verify
from forge.modifiers.local_teachers import last_user_message
from forge.modifiers.teacher_config import TeacherConfig, TeacherConfigError
from forge.modifiers.teachers import CostTracker, ResponseCache, TeacherClient

if TYPE_CHECKING:
    from forge.config import PipelineConfig

TASK = "### Task"
RUBRIC = "### Rubric"
GOLD = "### Reference answer (gold)"
ANSWER = "### Answer to grade"
INSTRUCTIONS = "### Instructions"
JUDGE_SYSTEM = ("You are a strict, fair grader. You read a task, a rubric (or a reference answer) and an "
                "answer, and you score how well the answer meets the rubric: 0 (not at all) to 10 (fully).")
JUDGE_INSTRUCTIONS = ('Give a one-line reason, then on the last line write "Score: N" with N from 0 to 10. '
                      "Judge only the answer above.")

_SCORE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*(?P<a>[-+]?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*10)?"
                    r"|(?P<b>[-+]?\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)


def _task_prompt(row: Mapping[str, Any]) -> str:
    prompt = last_user_message(prompt_messages(dict(row)))
    if prompt is None:
        raise ValueError(f"row {row.get('id', '?')!r} has no user message: no task to judge against")
    return prompt


def judge_messages(row: Mapping[str, Any], answer: str) -> list[dict[str, str]]:
    """The judge's chat: a system message and one user message with the task, the rubric (the reference answer
    as the gold for rows without one), the answer, and the "Score: N" instruction."""
    check = row.get("check") or {}
    if check.get("kind") == "rubric":
        standard = f"{RUBRIC}\n{check['rubric']}"
    else:
        standard = f"{GOLD}\n{reference(dict(row))}"
    sections = [f"{TASK}\n{_task_prompt(row)}", standard, f"{ANSWER}\n{answer}",
                f"{INSTRUCTIONS}\n{JUDGE_INSTRUCTIONS}"]
    user = "\n\n".join(sections)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judge_prompt(text: str) -> tuple[str, str] | None:
    """(task, answer) from a judge_messages user message; None when `text` is not one."""
    if not text.startswith(TASK + "\n"):
        return None
    body = text[len(TASK) + 1:]
    ends = [i for i in (body.find(f"\n\n{RUBRIC}\n"), body.find(f"\n\n{GOLD}\n")) if i >= 0]
    if not ends:
        return None
    task_end = min(ends)
    answer_at = body.find(f"\n\n{ANSWER}\n", task_end)
    instructions_at = body.rfind(f"\n\n{INSTRUCTIONS}\n")  # the last one: an answer may quote the headers
    if answer_at < 0 or instructions_at < answer_at:
        return None
    return body[:task_end], body[answer_at + len(ANSWER) + 3:instructions_at]


def parse_score(text: str) -> float | None:
    """The last "Score: N" (or "N/10", "N out of 10") in a judge's reply, clamped to 0..10; None if absent."""
    matches = list(_SCORE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return min(10.0, max(0.0, float(last.group("a") or last.group("b"))))


class JudgeVerifier:
    """A cascade `Verify`: asks the judge teacher for a 0-10 score; correct when it is >= min_score."""

    def __init__(self, client: TeacherClient, min_score: float) -> None:
        if not 0 <= min_score <= 10:
            raise ValueError(f"min_score must be within 0..10 (got {min_score})")
        self.client = client
        self.min_score = min_score

    @property
    def name(self) -> str:
        return self.client.cfg.name

    def __repr__(self) -> str:
        return f"JudgeVerifier({self.name!r}, min_score={self.min_score:g})"

    def __call__(self, item: Item, answer: str) -> CheckResult:
        reply = self.client.chat(judge_messages(item, answer))
        score = parse_score(reply.text)
        if score is None:
            shown = " ".join(reply.text.split())[:120]
            return CheckResult(False, f"unparseable judge reply from {self.name}: {shown!r}")
        return CheckResult(score >= self.min_score, f"judge {self.name}: {score:g}/10")


@contextlib.contextmanager
def verifier_for(cfg: PipelineConfig, domain: str, ready: Mapping[str, TeacherConfig],
                 cost: CostTracker | None, cache: ResponseCache | None) -> Iterator[Verify]:
    """How `domain`'s answers are verified: the suites' checker, or (with a judge configured) a JudgeVerifier
    on the judge among `ready` (what forge.modifiers.endpoints.started_teachers yields), closed on exit."""
    if domain not in cfg.modifiers.domains:
        raise TeacherConfigError(f"modifiers.domains has no domain {domain!r} (known: "
                                 f"{sorted(cfg.modifiers.domains)})")
    spec = cfg.modifiers.domains[domain]
    if spec.judge is None:
        yield suite_verify
        return
    teacher = ready.get(spec.judge)
    if teacher is None:
        raise TeacherConfigError(f"modifiers.domains.{domain}.judge: teacher {spec.judge!r} was not started "
                                 f"for this task (started: {sorted(ready)}); pass it to started_teachers")
    with TeacherClient(teacher, cost=cost, cache=cache) as client:
        yield JudgeVerifier(client, spec.min_judge_score)
