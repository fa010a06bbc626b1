"""Execute untrusted (model-written) Python against assert tests, or a whole program, in a subprocess.

Isolation: `python -I -S` (no env vars, user site, site-packages or cwd on sys.path), a fresh
temp dir as cwd, HOME and TMPDIR, a minimal environment, rlimits on memory / CPU / file size set by the
harness, a sandbox policy (an audit hook, see sandbox_harness.py) installed right before the candidate
runs: no network, no process spawning, no ctypes, no writes outside the temp dir (a denied action raises
PermissionError "sandbox: ... is not allowed (<event>)", which the detail reports), and a wall-clock
timeout that kills the whole process group.
This guards against accidents (infinite loops, memory blow-ups, stray writes), not a determined attacker.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = Path(__file__).with_name("sandbox_harness.py")
RESULT_MARK = "@@FORGE_RESULT@@"
MEMORY_LIMIT_BYTES = 1 << 30
FILE_LIMIT_BYTES = 8 << 20


def run_python_program(program: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(passed, detail): passes iff the whole program runs to completion without an exception (its own
    asserts are the tests, e.g. HumanEval's `check(...)`)."""
    return run_python_tests(program, [], timeout_s)


def run_python_tests(code: str, tests: list[str], timeout_s: float = 5.0) -> tuple[bool, str]:
    """(passed, detail). Syntax errors are reported without starting a process. With no tests, the code
    itself must run without an exception."""
    try:
        compile(code, "solution.py", "exec")
    except SyntaxError as exc:
        return False, f"syntax error: line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # e.g. null bytes in the source
        return False, f"invalid source: {exc}"
    # the result line carries a per-run token the harness reads and deletes before the candidate runs: code
    # that prints its own result line and exits cannot pass for the harness
    token = secrets.token_hex(16)
    mark = f"{RESULT_MARK}{token}@@"
    with tempfile.TemporaryDirectory(prefix="forge-sandbox-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({
            "token": token,
            "code": code,
            "tests": tests,
            "limits": {"memory_bytes": MEMORY_LIMIT_BYTES, "cpu_seconds": max(1, math.ceil(timeout_s)) + 1,
                       "file_bytes": FILE_LIMIT_BYTES},
        }))
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(HARNESS), str(spec_path)],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills children it forked too
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return False, f"timeout: no result within {timeout_s:g}s"
    text = out.decode("utf-8", "replace")
    if mark in text:
        try:
            result = json.loads(text.rsplit(mark, 1)[1].strip().splitlines()[0])
            return bool(result["correct"]), str(result["detail"])
        except (ValueError, KeyError, IndexError):
            pass
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    reason = _describe_exit(proc.returncode)
    return False, f"no result ({reason}){': ' + tail[0][:200] if tail[0] else ''}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = {"SIGXCPU": "CPU limit", "SIGKILL": "killed, likely the memory limit",
                "SIGSEGV": "crashed"}.get(name, "signal")
        return f"{name}: {hint}"
    return f"exit code {code}: the code exited before the tests ran, or ran out of memory"
