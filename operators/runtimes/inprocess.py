"""Run the job in the task's own process: the default runtime (main venv, no extra startup)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from forge.artifacts import Manifest
from operators.runtimes.base import JobRequest


@contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """Set env vars for the job's duration, then restore: the task process may run more work."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcessRuntime:
    name = "inprocess"

    def run(self, request: JobRequest, log: logging.Logger) -> Manifest:
        from forge.runner import run_phase  # lazy: keeps the DAG file's imports light

        env = {**request.storage.env, **request.env}
        if request.env:  # names only: extra env may carry secrets
            log.info("job env: %s (CUDA_VISIBLE_DEVICES=%s)", sorted(request.env),
                     request.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")))
        with patched_environ(env):
            return run_phase(request.phase_id, request.config, request.run_id,
                             storage_options=request.storage.storage_options, track=request.track)

    def kill(self) -> None:
        # Airflow terminates the task process itself; nothing of ours outlives it.
        pass
