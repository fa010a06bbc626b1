"""Content-addressed, verified artifact store on fsspec (file:// by default, s3:// for MinIO/AWS).

Layout under the store root:
  runs/<run_id>/<phase>/...              a task's output files
  runs/<run_id>/<phase>/manifest.json    written LAST: its presence is the commit
  runs/<run_id>/ledger/<phase>.json      one quality-ledger row per phase
  cache/<phase>/<cache_key>.json         index: cache key -> manifest URI (written after it)
  work/<phase>/<cache_key>/...           resumable checkpoints (latest.json written last)

A reader only trusts a directory whose manifest exists and whose files match their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

MANIFEST = "manifest.json"
CHUNK = 8 << 20


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupted artifact."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Hash of the forge package's sources: a code change invalidates cached outputs."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def safe_run_id(run_id: str) -> str:
    """Airflow run ids hold ':' and '+'; keep store keys portable across S3 and filesystems."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


@dataclass
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    phase: str
    cache_key: str
    base_uri: str  # where `files` live (another run's dir on a cache hit)
    run_id: str  # the run that produced the files
    status: str = "complete"  # complete | skipped
    skip_reason: str | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # small job facts (e.g. model ref)
    inputs: dict[str, str] = field(default_factory=dict)  # upstream phase -> cache key
    code_version: str = ""
    mlflow_run_id: str | None = None
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["files"] = {k: FileEntry(**v) for k, v in d.get("files", {}).items()}
        return cls(**d)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class ArtifactStore:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None,
                 local_cache: str | Path | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})  # so a store for another prefix gets the same
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        home = Path(os.environ.get("FORGE_HOME", Path.cwd() / ".forge"))
        self.local_cache = Path(local_cache or home / "cache" / "store")
        if self.is_local:
            self.fs.makedirs(self._root_path, exist_ok=True)

    # ---- paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path inside the store as the filesystem sees it (no protocol)."""
        return "/".join([self._root_path.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def _to_path(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    def run_dir(self, run_id: str, phase: str) -> str:
        return self.uri("runs", safe_run_id(run_id), phase)

    # ---- small JSON objects --------------------------------------------------------------
    def write_text(self, uri: str, text: str) -> None:
        path = self._to_path(uri)
        if self.is_local:
            # write to a temp name, then rename: a reader never sees half a file
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            Path(tmp).write_text(text)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:  # S3 PUT is atomic per object
                f.write(text)

    def read_text(self, uri: str) -> str | None:
        path = self._to_path(uri)
        try:
            with self.fs.open(path, "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._to_path(uri))

    # ---- commit / read outputs ---------------------------------------------------------
    def commit(self, local_dir: Path, dest_uri: str, manifest: Manifest) -> Manifest:
        """Upload every file of local_dir to dest_uri, then write the manifest last."""
        dest = self._to_path(dest_uri)
        if self.fs.exists(dest):  # leftovers of a killed attempt: never part of a commit
            self.fs.rm(dest, recursive=True)
        files: dict[str, FileEntry] = {}
        for p in sorted(Path(local_dir).rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                if rel == MANIFEST:
                    raise ArtifactError(f"a job may not write its own {MANIFEST}")
                files[rel] = FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
                target = f"{dest}/{rel}"
                if self.is_local:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                else:
                    self.fs.put_file(str(p), target)
        manifest.files = files
        manifest.base_uri = dest_uri
        self.write_text(f"{dest_uri}/{MANIFEST}", manifest.to_json())
        return manifest

    def load_manifest(self, dir_uri: str) -> Manifest | None:
        text = self.read_text(f"{dir_uri}/{MANIFEST}")
        return Manifest.from_json(text) if text else None

    def verify(self, manifest: Manifest, deep: bool = False) -> bool:
        """Sizes always; sha256 too when deep. False if anything is missing or differs."""
        for rel, entry in manifest.files.items():
            path = self._to_path(f"{manifest.base_uri}/{rel}")
            try:
                if self.fs.size(path) != entry.size:
                    return False
            except FileNotFoundError:
                return False
            if deep and self.is_local and sha256_file(path) != entry.sha256:
                return False
        return True

    def materialize(self, manifest: Manifest) -> Path:
        """A local directory holding the manifest's files, each checked against its sha256."""
        if self.is_local:
            local = Path(self._to_path(manifest.base_uri))
            for rel, entry in manifest.files.items():
                p = local / rel
                if not p.is_file() or sha256_file(p) != entry.sha256:
                    raise ArtifactError(f"{manifest.base_uri}/{rel}: missing or checksum mismatch")
            return local
        local = self.local_cache / manifest.cache_key[:32] / manifest.phase
        for rel, entry in manifest.files.items():
            p = local / rel
            if p.is_file() and p.stat().st_size == entry.size and sha256_file(p) == entry.sha256:
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".part")
            self.fs.get_file(self._to_path(f"{manifest.base_uri}/{rel}"), str(tmp))
            if sha256_file(tmp) != entry.sha256:
                tmp.unlink(missing_ok=True)
                raise ArtifactError(f"{manifest.base_uri}/{rel}: checksum mismatch after download")
            os.replace(tmp, p)
        return local

    # ---- cache index ---------------------------------------------------------------------
    def cache_index_uri(self, phase: str, cache_key: str) -> str:
        return self.uri("cache", phase, f"{cache_key}.json")

    def find_cached(self, phase: str, cache_key: str) -> Manifest | None:
        """A complete, size-verified manifest for this key, or None."""
        text = self.read_text(self.cache_index_uri(phase, cache_key))
        if not text:
            return None
        manifest = self.load_manifest(json.loads(text)["manifest_dir"])
        if manifest is None or manifest.cache_key != cache_key or not self.verify(manifest):
            return None
        return manifest

    def index(self, manifest: Manifest) -> None:
        self.write_text(self.cache_index_uri(manifest.phase, manifest.cache_key),
                        json.dumps({"manifest_dir": manifest.base_uri}))

    def link_run(self, run_id: str, manifest: Manifest) -> None:
        """Make a manifest (possibly another run's, on a cache hit) this run's output."""
        here = self.run_dir(run_id, manifest.phase)
        if manifest.base_uri != here:
            self.write_text(f"{here}/{MANIFEST}", manifest.to_json())

    def run_manifest(self, run_id: str, phase: str) -> Manifest | None:
        return self.load_manifest(self.run_dir(run_id, phase))

    # ---- checkpoints (resume after a kill) -----------------------------------------------
    def checkpoint_uri(self, phase: str, cache_key: str) -> str:
        return self.uri("work", phase, cache_key[:32])

    def save_checkpoint(self, phase: str, cache_key: str, step: int, local_dir: Path) -> None:
        base = self.checkpoint_uri(phase, cache_key)
        m = Manifest(phase=phase, cache_key=cache_key, base_uri="", run_id="",
                     info={"step": step})
        self.commit(local_dir, f"{base}/step-{step:08d}", m)
        # latest.json last: a checkpoint is usable only once this points at it
        previous = self.read_text(f"{base}/latest.json")
        self.write_text(f"{base}/latest.json", json.dumps({"step": step, "dir": m.base_uri}))
        if previous:  # keep only the newest checkpoint
            old = json.loads(previous)["dir"]
            if old != m.base_uri and self.exists(old):
                self.fs.rm(self._to_path(old), recursive=True)

    def latest_checkpoint(self, phase: str, cache_key: str) -> tuple[int, Path] | None:
        text = self.read_text(f"{self.checkpoint_uri(phase, cache_key)}/latest.json")
        if not text:
            return None
        info = json.loads(text)
        manifest = self.load_manifest(info["dir"])
        if manifest is None:
            return None
        manifest.cache_key = f"ckpt-{cache_key[:20]}-{info['step']}"
        return int(info["step"]), self.materialize(manifest)

    def clear_checkpoints(self, phase: str, cache_key: str) -> None:
        base = self._to_path(self.checkpoint_uri(phase, cache_key))
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)
