"""What every runtime receives (a JobRequest of plain values) and must provide (run, kill)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forge.artifacts import Manifest
from forge.config import PipelineConfig
from operators.hooks.storage import StorageCredentials

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class JobRequest:
    phase_id: str
    run_id: str  # the artifact store's run id = the DAG run's run_id
    config: PipelineConfig  # already validated in the operator
    overrides: dict[str, Any]  # what built `config` on top of its profile (for other processes)
    storage: StorageCredentials = field(default_factory=StorageCredentials)
    env: dict[str, str] = field(default_factory=dict)  # extra env for the job (CUDA_VISIBLE_DEVICES...)
    config_path: str | None = None
    track: bool = True


def committed_manifest(request: JobRequest, where: str) -> Manifest:
    """The manifest the job committed, read back from the store (a job in another process or pod reports
    nothing else); `where` says where it ran, for the error when there is none."""
    from forge.artifacts import ArtifactError
    from forge.runner import make_store

    store = make_store(request.config, request.storage.storage_options)
    manifest = store.run_manifest(request.run_id, request.phase_id)
    if manifest is None:
        raise ArtifactError(f"{where} succeeded but run {request.run_id!r} has no manifest for "
                            f"{request.phase_id} in {store.root}: does it write to the same store?")
    return manifest


class Runtime(Protocol):
    """Where a phase's job runs. It returns the phase's committed (or skipped) manifest."""

    name: str

    def run(self, request: JobRequest, log: logging.Logger) -> Manifest: ...

    def kill(self) -> None: ...
