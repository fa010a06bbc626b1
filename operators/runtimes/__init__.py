"""Execution modes: one module per runtime (like astronomer-cosmos), chosen by name.

  "inprocess"      the task's own process (default)
  "venv[:NAME]"    another interpreter: `python=` or env FORGE_RUNTIME_<NAME> (FORGE_RUNTIME_VENV)
"""

from __future__ import annotations

from operators.runtimes.base import JobRequest, Runtime

RUNTIMES = ("inprocess", "venv")


def get_runtime(spec: str, python: str | None = None) -> Runtime:
    kind, _, name = spec.partition(":")
    if kind == "inprocess" and not name:
        from operators.runtimes.inprocess import InProcessRuntime

        return InProcessRuntime()
    if kind == "venv":
        from operators.runtimes.venv import VenvRuntime

        return VenvRuntime(name or None, python)
    raise ValueError(f"unknown runtime {spec!r}; known: 'inprocess', 'venv' or 'venv:<name>'")


__all__ = ["JobRequest", "Runtime", "RUNTIMES", "get_runtime"]
