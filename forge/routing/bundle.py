"""What serving and 13A load: the routing policy (`forge-router`: router + thresholds, by 6C or 13A) and the
escalation detector (`forge-escalation-detector`, by 6B), found in the MLflow registry by alias, their files
read from the artifact store and checked against their manifests.

A registered version's source is a phase's output folder in the store (it holds manifest.json). Inside a
policy, bundle.json names everything else by content (phase + cache key [+ file, sha256]): the routing table
and features it was trained on, the GGUF of base_hidden features. `resolve_ref` finds those through the
store's cache index, so a bundle never carries a path or a run id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.artifacts import ArtifactError, ArtifactStore

if TYPE_CHECKING:
    from forge.config import TrackingConfig
    from forge.routing.router import Router

POLICY_FORMAT = "forge-routing-policy/v1"
BUNDLE = "bundle.json"
THRESHOLDS = "thresholds.json"
ROUTER_DIR = "router"


@dataclass
class RegisteredVersion:
    name: str
    version: str
    source: str  # store URI of the phase output that was registered
    run_id: str | None  # its MLflow run
    tags: dict[str, str] = field(default_factory=dict)


def registered(tracking: TrackingConfig, name: str, alias: str) -> RegisteredVersion | None:
    """The version of `name` that `alias` points at; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return RegisteredVersion(name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))


def materialize_source(store: ArtifactStore, source_uri: str) -> Path:
    """A verified local copy of a registered version's files. The source is a phase's output folder, or a
    folder inside one (JobResult.register names a subfolder): the manifest is the nearest one above."""
    base, sub = source_uri.rstrip("/"), ""
    for _ in range(3):
        manifest = store.load_manifest(base)
        if manifest is not None:
            if manifest.status != "complete":
                break
            return store.materialize(manifest) / sub if sub else store.materialize(manifest)
        base, _, name = base.rpartition("/")
        sub = f"{name}/{sub}".rstrip("/")
    raise ArtifactError(f"{source_uri}: no complete manifest (the registered output is gone or partial)")


def resolve_ref(store: ArtifactStore, ref: dict[str, Any]) -> Path:
    """A content reference {"phase", "cache_key"[, "file", "sha256"]} -> the verified local folder or file."""
    manifest = store.find_cached(ref["phase"], ref["cache_key"])
    if manifest is None:
        raise ArtifactError(f"no complete output of phase {ref['phase']} with cache key "
                            f"{ref['cache_key'][:16]} in {store.root} (the store's cache index has none)")
    folder = store.materialize(manifest)
    if "file" not in ref:
        return folder
    entry = manifest.files.get(ref["file"])
    if entry is None or ("sha256" in ref and entry.sha256 != ref["sha256"]):
        raise ArtifactError(f"{manifest.base_uri}: {ref['file']!r} is missing or is not the file referenced "
                            f"(sha256 {str(ref.get('sha256'))[:16]})")
    return folder / ref["file"]


@dataclass
class RoutingPolicy:
    """A router with its thresholds (and A/B arms), as 6C or 13A wrote it."""

    folder: Path
    router: Router
    thresholds: dict[str, Any]
    bundle: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> RoutingPolicy:
        from forge.routing.router import Router

        folder = Path(folder)
        path = folder / BUNDLE
        if not path.is_file():
            raise ArtifactError(f"{folder}: no {BUNDLE}: not a routing policy")
        bundle = json.loads(path.read_text())
        if bundle.get("format") != POLICY_FORMAT:
            raise ArtifactError(f"{path}: format {bundle.get('format')!r}, expected {POLICY_FORMAT!r}")
        thresholds = json.loads((folder / THRESHOLDS).read_text())
        return cls(folder, Router.load(folder / ROUTER_DIR), thresholds, bundle)

    def save(self, folder: Path) -> Path:
        """router/ + thresholds.json + bundle.json: what `load` reads (the folder may hold other files)."""
        folder = Path(folder)
        self.router.save(folder / ROUTER_DIR)
        for name, obj in ((THRESHOLDS, self.thresholds), (BUNDLE, self.bundle)):
            (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        self.folder = folder
        return folder

    def extractor(self, store: ArtifactStore) -> Any:
        """The router's feature extractor (a base_hidden one finds its GGUF in `store` by content)."""
        from forge.routing.features import open_extractor

        return open_extractor(self.router.features, lambda ref: resolve_ref(store, ref))

    def embed(self, store: ArtifactStore, texts: list[str]) -> Any:
        """The router's features of these texts (the extractor opened and closed around them)."""
        extractor = self.extractor(store)
        try:
            return extractor.embed(texts)
        finally:
            extractor.close()

    @property
    def threshold(self) -> float:
        return float(self.thresholds["chosen"]["threshold"])

    @property
    def arms(self) -> list[dict[str, Any]]:
        return list(self.thresholds["arms"])


def load_policy(store: ArtifactStore, tracking: TrackingConfig, name: str, alias: str = "champion",
                ) -> tuple[RegisteredVersion, RoutingPolicy] | None:
    version = registered(tracking, name, alias)
    if version is None:
        return None
    return version, RoutingPolicy.load(materialize_source(store, version.source))
