"""Entrypoint of the Forge images: write the deployment's pipeline config, then exec the command.

    python /opt/forge/docker/entrypoint.py COMMAND [ARGS...]

forge.config reads every setting from one YAML file (FORGE_CONFIG); where the artifacts and MLflow live
differs per deployment (MinIO in docker-compose, S3 on a cluster), so this copies the image's
config/pipeline.yaml (FORGE_CONFIG_BASE) to FORGE_CONFIG with these environment variables set in
`defaults` and in every profile (a deployment setting wins over a profile's):

    FORGE_STORAGE_ROOT                storage.root              s3://forge-artifacts
    FORGE_STORAGE_ENDPOINT_URL        storage.endpoint_url      http://minio:9000
    FORGE_TRACKING_URI                tracking.tracking_uri     http://mlflow:5000
    FORGE_TRACKING_ARTIFACT_LOCATION  tracking.artifact_location  mlflow-artifacts:/forge
    FORGE_MLFLOW_UI_URL               tracking.ui_url           http://localhost:5000
    FORGE_SESSIONS_URL (set at all)   routing.sessions.url = "env:FORGE_SESSIONS_URL"

Secrets never reach the file: credentials stay in the environment (AWS_*, FORGE_SESSIONS_URL is only named).
The file is written atomically, so containers sharing FORGE_HOME never read half of it. Stdlib + PyYAML only:
it runs in every image before anything else.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

DEFAULT_BASE = "/opt/forge/config/pipeline.yaml"
OVERLAY: dict[str, tuple[str, str]] = {  # env var -> (section, field)
    "FORGE_STORAGE_ROOT": ("storage", "root"),
    "FORGE_STORAGE_ENDPOINT_URL": ("storage", "endpoint_url"),
    "FORGE_TRACKING_URI": ("tracking", "tracking_uri"),
    "FORGE_TRACKING_ARTIFACT_LOCATION": ("tracking", "artifact_location"),
    "FORGE_MLFLOW_UI_URL": ("tracking", "ui_url"),
}


def overlay(env: dict[str, str]) -> dict[str, Any]:
    """The config sections the environment sets (empty values count as unset)."""
    out: dict[str, Any] = {}
    for var, (section, field) in OVERLAY.items():
        if env.get(var):
            out.setdefault(section, {})[field] = env[var]
    if env.get("FORGE_SESSIONS_URL"):  # a Redis URL carries a password: the config only names the variable
        out["routing"] = {"sessions": {"url": "env:FORGE_SESSIONS_URL"}}
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


def render(base: Path, target: Path, env: dict[str, str]) -> Path:
    raw = yaml.safe_load(base.read_text()) or {}
    top = overlay(env)
    raw["defaults"] = merge(raw.get("defaults") or {}, top)
    raw["profiles"] = {name: merge(p or {}, top) for name, p in (raw.get("profiles") or {}).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".pipeline-", delete=False) as tmp:
        tmp.write(f"# Written by docker/entrypoint.py from {base} and the environment; edit those.\n")
        yaml.safe_dump(raw, tmp, sort_keys=False)
    os.replace(tmp.name, target)
    return target


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: entrypoint.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    base = Path(env.get("FORGE_CONFIG_BASE", DEFAULT_BASE))
    target = env.get("FORGE_CONFIG")
    if target and Path(target).resolve() != base.resolve():
        try:
            render(base, Path(target), env)
        except (OSError, yaml.YAMLError) as exc:
            print(f"forge entrypoint: cannot write {target} from {base}: {exc}", file=sys.stderr)
            return 1
    os.execvp(argv[0], argv)  # replaces this process: signals go straight to the command


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
