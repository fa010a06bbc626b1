"""A release: everything the inference server loads, in one folder (what 8A assembles and uploads to the Hub).

    release.json            format, options, files (sha256, size), lineage, the run's figures
    model/                  base.gguf (2C's Q5_K_M) + the HF tokenizer files (the chat template)
    adapters/<option>.gguf  GGUF LoRAs: "base" = 2E's recovery adapter, one per modifier (its H phase)
    calibration.json        2F's temperature (confidence of the base's answers)
    routing/policy/         6C's (or 13A's champion) router + thresholds (forge.routing.bundle.RoutingPolicy)
    routing/detector/       6B's escalation detector
    critic/                 12A's critique classifier
    README.md               the model card

An option is what a request can be answered by: "base" (the GGUF with its recovery adapter) or a modifier
(the GGUF with that modifier's adapter, as 6A scored it). Every file is checked against release.json on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.artifacts import ArtifactError, sha256_file

RELEASE_FORMAT = "forge-release/v1"
RELEASE_JSON = "release.json"
BASE = "base"
MODEL_DIR = "model"
BASE_GGUF = "model/base.gguf"
ADAPTERS_DIR = "adapters"
CALIBRATION = "calibration.json"
POLICY_DIR = "routing/policy"
DETECTOR_DIR = "routing/detector"
CRITIC_DIR = "critic"
FEW_SHOT_DIR = "few_shot"  # 7B's template set (forge.serve.few_shot)
MODEL_CARD = "README.md"


@dataclass
class Release:
    folder: Path
    meta: dict[str, Any]
    adapters: dict[str, Path | None]  # option -> GGUF LoRA (None: the GGUF alone)
    policy_dir: Path | None = None
    detector_dir: Path | None = None
    critic_dir: Path | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    few_shot_dir: Path | None = None

    @property
    def gguf(self) -> Path:
        return self.folder / BASE_GGUF

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def options(self) -> list[str]:
        return list(self.adapters)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "forge"))

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Release:
        folder = Path(folder)
        path = folder / RELEASE_JSON
        if not path.is_file():
            raise ArtifactError(f"{folder}: no {RELEASE_JSON}: not a Forge release (8A writes one)")
        meta = json.loads(path.read_text())
        if meta.get("format") != RELEASE_FORMAT:
            raise ArtifactError(f"{path}: format {meta.get('format')!r}, expected {RELEASE_FORMAT!r}")
        if verify:
            verify_files(folder, meta.get("files", {}))
        adapters: dict[str, Path | None] = {}
        for option, rel in meta["adapters"].items():
            adapters[option] = folder / rel if rel else None
        if BASE not in adapters:
            raise ArtifactError(f"{path}: adapters has no {BASE!r} option")

        def opt(rel: str) -> Path | None:
            return folder / rel if (folder / rel).is_dir() else None

        calibration = (
            json.loads((folder / CALIBRATION).read_text()) if (folder / CALIBRATION).is_file() else {}
        )
        # by keyword: a positional slip between two optional fields once passed calibration as a folder
        return cls(folder, meta, adapters, policy_dir=opt(POLICY_DIR), detector_dir=opt(DETECTOR_DIR),
                   critic_dir=opt(CRITIC_DIR), calibration=calibration, few_shot_dir=opt(FEW_SHOT_DIR))


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file under folder except release.json."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in (RELEASE_JSON, RELEASE_JSON + ".tmp")
    }


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    if not files:
        raise ArtifactError(f"{folder}/{RELEASE_JSON}: lists no files")
    for rel, entry in files.items():
        p = folder / rel
        if not p.is_file():
            raise ArtifactError(f"{folder}: {rel} is listed in {RELEASE_JSON} but missing")
        if p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            raise ArtifactError(
                f"{folder}: {rel} does not match its sha256 in {RELEASE_JSON} (corrupt or "
                "partially copied release)"
            )


def write_release_json(folder: Path, meta: dict[str, Any]) -> Path:
    """release.json last, with every other file's checksum: a release without it is incomplete."""
    body = {**meta, "format": RELEASE_FORMAT, "files": file_entries(folder)}
    tmp = folder / (RELEASE_JSON + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / RELEASE_JSON)
    return folder / RELEASE_JSON
