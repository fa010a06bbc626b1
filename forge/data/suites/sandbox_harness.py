"""Runs inside the sandbox subprocess (`python -I -S sandbox_harness.py spec.json`): sets resource
limits, executes the candidate code, then each test, and prints one JSON result line.

Stdlib only: it runs isolated from the venv's site-packages and from forge itself.
"""

import ast
import io
import json
import sys

_RESULT_MARK = "@@FORGE_RESULT@@"


def _limit(resource_mod, name, value):
    kind = getattr(resource_mod, name, None)
    if kind is None or value is None:
        return
    try:
        resource_mod.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass  # not permitted or not supported on this platform: the parent's timeout still holds


def _apply_limits(limits):
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    _limit(resource, "RLIMIT_AS", limits.get("memory_bytes"))
    _limit(resource, "RLIMIT_CPU", limits.get("cpu_seconds"))
    _limit(resource, "RLIMIT_FSIZE", limits.get("file_bytes"))
    _limit(resource, "RLIMIT_CORE", 0)


def _got_value(test, namespace):
    """For `assert X == Y`, the value X actually had: makes the failure detail useful."""
    try:
        node = ast.parse(test).body[0]
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare):
            left = compile(ast.Expression(node.test.left), "<test>", "eval")
            return f" (got {eval(left, namespace)!r})"[:200]
    except BaseException:
        pass
    return ""


def _run(spec):
    namespace = {"__name__": "__solution__"}
    captured = io.StringIO()
    real_stdout = sys.stdout
    sys.stdout = captured  # the candidate's prints must not mix with our result line
    try:
        try:
            exec(compile(spec["code"], "solution.py", "exec"), namespace)
        except BaseException as exc:
            detail = f"exception while defining the code: {type(exc).__name__}: {exc}"
            return {"correct": False, "detail": detail}
        for test in spec["tests"]:
            try:
                exec(compile(test, "<test>", "exec"), namespace)
            except AssertionError:
                return {"correct": False, "detail": f"test failed: {test}{_got_value(test, namespace)}"}
            except BaseException as exc:
                detail = f"exception in test {test!r}: {type(exc).__name__}: {exc}"
                return {"correct": False, "detail": detail}
        return {"correct": True, "detail": f"{len(spec['tests'])} tests passed"}
    finally:
        sys.stdout = real_stdout


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    _apply_limits(spec.get("limits", {}))
    result = _run(spec)
    sys.stdout.write("\n" + _RESULT_MARK + json.dumps(result)[:2000] + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
