"""Execution modes: one module per runtime (like astronomer-cosmos), chosen by name or by config.

  "inprocess"      the task's own process (default)
  "venv[:NAME]"    another interpreter: `python=` or env FORGE_RUNTIME_<NAME> (FORGE_RUNTIME_VENV)
  "kubernetes"     a pod of the trainer image (operators/runtimes/kubernetes.py); also what every task
                   uses when the run's config says `runtime.backend: kubernetes` (local: the operator's own)

Celery needs no runtime of its own: a task runs locally on the worker that took it, and GPU phases go to
queue `gpu` / pool `gpu` with pool_slots = their GPUs (operators/gpu_job.py).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from forge.runtime_config import RuntimeConfig
from operators.runtimes.base import JobRequest, Runtime

RUNTIMES = ("inprocess", "venv", "kubernetes")


def get_runtime(spec: str, python: str | None = None, *, settings: RuntimeConfig | None = None,
                gpus: int = 0, context: Any = None, task_id: str = "forge_job") -> Runtime:
    kind, _, name = spec.partition(":")
    if kind == "inprocess" and not name:
        from operators.runtimes.inprocess import InProcessRuntime

        return InProcessRuntime()
    if kind == "venv":
        from operators.runtimes.venv import VenvRuntime

        return VenvRuntime(name or None, python)
    if kind == "kubernetes" and not name:
        from operators.runtimes.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings or RuntimeConfig(), gpus=gpus, context=context, task_id=task_id)
    raise ValueError(f"unknown runtime {spec!r}; known: 'inprocess', 'venv', 'venv:<name>' or 'kubernetes'")


def runtime_settings(cfg: Any) -> RuntimeConfig:
    """A config's `runtime` section (its defaults until PipelineConfig carries one)."""
    return getattr(cfg, "runtime", None) or RuntimeConfig()


def deployment_runtime() -> RuntimeConfig:
    """The `runtime` section of the deployment's profile (FORGE_CONFIG, FORGE_PROFILE, default demo), as the
    DAG processor sees it: what parse-time decisions (GPU pool slots, the queue) are made from. Re-read when
    the file changes, as the DAG's domain catalog is (no processor restart for new GPU counts)."""
    from forge.config import config_stamp

    return _deployment_runtime(*config_stamp(), os.environ.get("FORGE_PROFILE"))


@lru_cache(maxsize=8)
def _deployment_runtime(path: str, stamp: tuple[int, int, int] | None, profile: str | None) -> RuntimeConfig:
    from forge.config import load_config

    return runtime_settings(load_config(path, profile))


__all__ = ["JobRequest", "Runtime", "RUNTIMES", "deployment_runtime", "get_runtime", "runtime_settings"]
