"""Execute untrusted (model-written) Python against assert tests in a subprocess.

Isolation: `python -I -S` (no env vars, user site, site-packages or cwd on sys.path), a fresh
temp dir as cwd and HOME, a minimal environment, rlimits on memory / CPU / file size set by the
harness before the candidate runs, and a wall-clock timeout that kills the whole process group.
This guards against accidents (infinite loops, memory blow-ups), not a determined attacker.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = Path(__file__).with_name("sandbox_harness.py")
RESULT_MARK = "@@FORGE_RESULT@@"
MEMORY_LIMIT_BYTES = 1 << 30
FILE_LIMIT_BYTES = 8 << 20


def run_python_tests(code: str, tests: list[str], timeout_s: float = 5.0) -> tuple[bool, str]:
    """(passed, detail). Syntax errors are reported without starting a process."""
    try:
        compile(code, "solution.py", "exec")
    except SyntaxError as exc:
        return False, f"syntax error: line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # e.g. null bytes in the source
        return False, f"invalid source: {exc}"
    with tempfile.TemporaryDirectory(prefix="forge-sandbox-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({
            "code": code,
            "tests": tests,
            "limits": {"memory_bytes": MEMORY_LIMIT_BYTES, "cpu_seconds": max(1, math.ceil(timeout_s)) + 1,
                       "file_bytes": FILE_LIMIT_BYTES},
        }))
        env = {"PATH": os.defpath, "HOME": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
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
    if RESULT_MARK in text:
        try:
            result = json.loads(text.rsplit(RESULT_MARK, 1)[1].strip().splitlines()[0])
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
