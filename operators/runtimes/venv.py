"""Run the job with another interpreter (a venv whose pins clash with the main one).

The job is `python -m forge run PHASE --run-id RUN --profile P --conf JSON`; its output is read
back from the artifact store, where the runner committed it with its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path

from forge.artifacts import Manifest
from operators.runtimes.base import REPO_ROOT, JobRequest, committed_manifest

CONFIG_ERROR_RC = 2  # what `python -m forge` returns for an invalid config


class RuntimeSetupError(RuntimeError):
    """The runtime itself is unusable (no interpreter): retrying won't help."""


class JobFailed(RuntimeError):
    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def resolve_python(name: str | None, python: str | None) -> str:
    """The interpreter: `python=` if given, else env FORGE_RUNTIME_<NAME>."""
    var = f"FORGE_RUNTIME_{(name or 'venv').upper()}"
    path = python or os.environ.get(var)
    if not path:
        raise RuntimeSetupError(f"runtime 'venv:{name or ''}' needs an interpreter: pass python=... "
                                f"to the operator or set {var}=/path/to/venv/bin/python")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise RuntimeSetupError(f"runtime interpreter {path!r} (from {'python=' if python else var}) "
                                "is not an executable file")
    return path


class VenvRuntime:
    def __init__(self, name: str | None = None, python: str | None = None):
        self.name = f"venv:{name}" if name else "venv"
        self.venv_name = name
        self.python = python
        self._proc: subprocess.Popen[str] | None = None

    def command(self, request: JobRequest) -> list[str]:
        cmd = [resolve_python(self.venv_name, self.python), "-m", "forge", "run", request.phase_id,
               "--run-id", request.run_id, "--profile", request.config.profile,
               "--conf", json.dumps(request.overrides)]
        if request.config_path:
            cmd += ["--config", request.config_path]
        if not request.track:
            cmd.append("--no-track")
        return cmd

    def run(self, request: JobRequest, log: logging.Logger) -> Manifest:
        cmd = self.command(request)
        env = {**os.environ, **request.storage.env, **request.env}
        # the forge package comes from this checkout, whatever the other venv has installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        log.info("running in %s: %s", self.name, " ".join(cmd[:5] + ["..."]))
        self._proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            log.info("%s", line.rstrip())
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            raise JobFailed(f"phase {request.phase_id} failed in runtime {self.name} (exit code {rc}); "
                            "its traceback is in the log above", rc)
        return committed_manifest(request, f"runtime {self.name}")

    def kill(self) -> None:
        proc = self._proc
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the job and its children
