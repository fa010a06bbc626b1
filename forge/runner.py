"""Run one phase: resolve inputs, compute the cache key, skip / reuse / run, commit, track.

This is the whole job/operator contract. It runs the same from `python -m forge run`, inside
an Airflow task, or in another runtime's venv: nothing here imports Airflow.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.artifacts import (
    ArtifactError,
    ArtifactStore,
    Manifest,
    code_version,
    digest_json,
    safe_run_id,
    sha256_file,
)
from forge.config import PipelineConfig, forge_home
from forge.data.records import DataError
from forge.ledger import write_row
from forge.phases import Phase, get_phase
from forge.tracking import PhaseRun, Tracker

log = logging.getLogger("forge")


class InjectedFault(RuntimeError):
    """Raised by the `faults` config to drill failure recovery."""


class PhaseSkipped(Exception):  # noqa: N818 (a signal, like Airflow's AirflowSkipException)
    """Raised by a job that finds, from its data, nothing to do (e.g. no feedback this week): the phase is
    recorded as skipped with the reason, exactly like a config skip."""


@dataclass
class JobResult:
    metrics: dict[str, float] = field(default_factory=dict)  # to MLflow and the manifest
    quality: dict[str, float] = field(default_factory=dict)  # the ledger's quality column
    notes: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # small facts kept in the manifest
    register: str | None = None  # output subdir to register as a model version (challenger)
    register_model: str | None = None  # registered model name; default tracking.registered_model
    aliases: tuple[str, ...] = ()  # besides challenger, e.g. ("champion",) when the job's own gate passed
    tags: dict[str, str] = field(default_factory=dict)  # extra tags of the registered model version


@dataclass
class JobContext:
    phase: Phase
    config: PipelineConfig
    run_id: str
    cache_key: str
    store: ArtifactStore
    inputs: dict[str, Manifest]
    out_dir: Path  # everything written here is committed as the phase's output
    work_dir: Path  # scratch space, not committed
    mlflow: PhaseRun | None = None

    def input_skipped(self, phase_id: str) -> bool:
        return self.inputs[phase_id].status == "skipped"

    def input_dir(self, phase_id: str) -> Path:
        """A verified local copy of an upstream phase's outputs."""
        m = self.inputs[phase_id]
        if m.status == "skipped":
            raise ArtifactError(f"input {phase_id} was skipped ({m.skip_reason}); it has no files")
        return self.store.materialize(m)

    def input_info(self, phase_id: str) -> dict[str, Any]:
        return self.inputs[phase_id].info

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Small files (plots, reports) to MLflow; big ones belong in out_dir."""
        if self.mlflow:
            self.mlflow.log_artifact(path, artifact_path)

    def save_checkpoint(self, step: int, local_dir: Path) -> None:
        self.store.save_checkpoint(self.phase.id, self.cache_key, step, local_dir)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        return self.store.latest_checkpoint(self.phase.id, self.cache_key)


@dataclass
class InputFile:
    """One file of an upstream phase's output, as its manifest records it."""

    phase: str
    name: str  # file name inside the phase's output
    path: Path  # verified local copy
    uri: str  # where it lives in the artifact store
    sha256: str
    size: int
    cache_key: str  # of the phase's output

    def describe(self) -> dict[str, Any]:
        """Content-addressed: the phase's cache key finds its output through the store's cache index; the
        URI (which names the run that produced it) lives in the manifest's info, not in bundle.json."""
        return {"phase": self.phase, "file": self.name, "cache_key": self.cache_key, "sha256": self.sha256,
                "size": self.size}


def input_file(ctx: JobContext, phase: str, info_key: str) -> InputFile:
    """The file an upstream phase names in its manifest info (e.g. 2C's "gguf"), checked against its files."""
    manifest = ctx.inputs[phase]
    name = manifest.info.get(info_key)
    if not name:
        raise DataError(f"the {phase} manifest ({manifest.base_uri}) has no info[{info_key!r}] naming "
                        f"its file; files there: {sorted(manifest.files)}")
    if name not in manifest.files:
        raise DataError(f"{phase} info[{info_key!r}] names {name!r}, which is not among its files "
                        f"{sorted(manifest.files)} ({manifest.base_uri})")
    entry = manifest.files[name]
    return InputFile(phase, name, ctx.input_dir(phase) / name, f"{manifest.base_uri}/{name}", entry.sha256,
                     entry.size, manifest.cache_key)


def make_store(cfg: PipelineConfig, storage_options: dict[str, Any] | None = None) -> ArtifactStore:
    opts = dict(storage_options or {})
    if cfg.storage.root.startswith("s3://") and cfg.storage.endpoint_url:
        opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", cfg.storage.endpoint_url)
    return ArtifactStore(cfg.storage.root, opts)


def cache_key_for(phase: Phase, cfg: PipelineConfig, inputs: dict[str, Manifest]) -> str:
    return digest_json({
        "phase": phase.id,
        "params": {s: cfg.section(s) for s in phase.sections},
        "inputs": {p: m.cache_key for p, m in sorted(inputs.items())},
        "code": code_version(),
    })


def lineage_tags(inputs: dict[str, Manifest]) -> dict[str, str]:
    """Model-version tags naming the MLflow run and cache key of every input phase."""
    tags: dict[str, str] = {}
    for p, m in sorted(inputs.items()):
        if m.mlflow_run_id:
            tags[f"forge.lineage.{p}.mlflow_run_id"] = m.mlflow_run_id
        tags[f"forge.lineage.{p}.cache_key"] = m.cache_key
    return tags


def _load_job(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _maybe_fault(store: ArtifactStore, cfg: PipelineConfig, run_id: str, phase_id: str) -> None:
    mode = cfg.faults.get(phase_id)
    if not mode:
        return
    marker = store.uri("runs", safe_run_id(run_id), "faults", f"{phase_id}.fired")
    if mode == "always" or not store.exists(marker):
        store.write_text(marker, str(time.time()))
        raise InjectedFault(f"fault injected into {phase_id} by config (faults.{phase_id}={mode})")


def run_phase(
    phase_id: str,
    cfg: PipelineConfig,
    run_id: str,
    storage_options: dict[str, Any] | None = None,
    track: bool = True,
) -> Manifest:
    phase = get_phase(phase_id, cfg)
    store = make_store(cfg, storage_options)
    inputs: dict[str, Manifest] = {}
    for up in phase.inputs:
        m = store.run_manifest(run_id, up)
        if m is None:
            raise ArtifactError(
                f"phase {phase_id} needs the output of {up}, but run {run_id!r} has no complete "
                f"manifest for it in {store.root}: run {up} first"
            )
        inputs[up] = m
    key = cache_key_for(phase, cfg, inputs)
    started = time.time()
    tracker = Tracker(cfg.tracking, run_id) if track else None
    params = {s: cfg.section(s) for s in phase.sections}
    mlrun = tracker.start_phase(phase.id, phase.task_id, params) if tracker else None
    base_row = {"phase": phase.id, "title": phase.title, "cache_key": key[:16]}
    try:
        if mlrun:
            mlrun.set_tags({"forge.cache_key": key, "forge.code_version": code_version(),
                            **{f"forge.input.{p}": m.base_uri for p, m in inputs.items()}})

        def skipped(reason: str) -> Manifest:
            log.info("phase %s skipped: %s", phase.id, reason)
            m = Manifest(phase=phase.id, cache_key=key, base_uri="", run_id=run_id,
                         status="skipped", skip_reason=reason,
                         inputs={p: i.cache_key for p, i in inputs.items()},
                         code_version=code_version(), mlflow_run_id=mlrun.id if mlrun else None)
            store.write_text(f"{store.run_dir(run_id, phase.id)}/manifest.json", m.to_json())
            write_row(store, run_id, {**base_row, "status": "skipped", "notes": reason,
                                      "seconds": time.time() - started})
            if mlrun:
                mlrun.set_tags({"forge.status": "skipped", "forge.skip_reason": reason})
                mlrun.finish()
            return m

        def reuse(cached: Manifest, how: str) -> Manifest:
            log.info("phase %s: %s %s, reusing outputs of run %s at %s",
                     phase.id, how, cached.cache_key[:16], cached.run_id, cached.base_uri)
            store.link_run(run_id, cached)
            write_row(store, run_id, {**base_row, "cache_key": cached.cache_key[:16], "status": "complete",
                                      "cached": True, "seconds": time.time() - started,
                                      "output_bytes": cached.total_bytes,
                                      "quality": cached.info.get("quality"),
                                      "notes": f"{how} (outputs of run {cached.run_id})"})
            if mlrun:
                mlrun.set_tags({"forge.status": "cache_hit", "forge.output": cached.base_uri,
                                "forge.cached_from_run": cached.run_id, "forge.cache_key": cached.cache_key})
                mlrun.log_metrics(cached.metrics)
                mlrun.finish()
            return cached

        reason = phase.skip(cfg) if phase.skip else None
        if reason:
            return skipped(reason)

        # a drill fault fires before the cache lookup: the first attempt fails even if cached
        _maybe_fault(store, cfg, run_id, phase.id)
        use_cache = cfg.cache.enabled and phase.id not in cfg.cache.force
        # a live-input phase reads what the store's manifests do not pin (serving feedback, the registry):
        # it always runs, and is cached by what it wrote (below)
        cached = store.find_cached(phase.id, key) if use_cache and not phase.live_inputs else None
        if cached:
            return reuse(cached, "cache hit")

        work = forge_home() / "work" / safe_run_id(run_id) / phase.id
        shutil.rmtree(work, ignore_errors=True)
        out_dir, work_dir = work / "out", work / "scratch"
        out_dir.mkdir(parents=True)
        work_dir.mkdir(parents=True)
        ctx = JobContext(phase, cfg, run_id, key, store, inputs, out_dir, work_dir, mlrun)
        log.info("phase %s (%s): running %s, cache key %s", phase.id, phase.title, phase.job, key[:16])
        job_started = time.time()
        try:
            result: JobResult = _load_job(phase.job)(ctx)
        except PhaseSkipped as exc:
            shutil.rmtree(work, ignore_errors=True)
            return skipped(str(exc))
        job_seconds = time.time() - job_started
        if phase.live_inputs:
            # keyed by content: the same feedback and champion give the same key, so what depends on this
            # phase is a cache hit, and an identical output already stored is linked, not written again
            key = digest_json({"key": key, "files": {p.relative_to(out_dir).as_posix(): sha256_file(p)
                                                     for p in sorted(out_dir.rglob("*")) if p.is_file()}})
            base_row["cache_key"] = key[:16]
            same = store.find_cached(phase.id, key) if use_cache else None
            if same:
                shutil.rmtree(work, ignore_errors=True)
                return reuse(same, "same content as")

        manifest = Manifest(phase=phase.id, cache_key=key, base_uri="", run_id=run_id,
                            metrics={**result.metrics, "job_seconds": job_seconds},
                            info={**result.info, "quality": result.quality, "notes": result.notes},
                            inputs={p: i.cache_key for p, i in inputs.items()},
                            code_version=code_version(), mlflow_run_id=mlrun.id if mlrun else None)
        manifest = store.commit(out_dir, store.run_dir(run_id, phase.id), manifest)
        store.index(manifest)
        store.clear_checkpoints(phase.id, key)  # the finished output supersedes them
        shutil.rmtree(work, ignore_errors=True)
        notes = result.notes
        if tracker and mlrun and result.register is not None:
            name = result.register_model or cfg.tracking.registered_model
            source = f"{manifest.base_uri}/{result.register}" if result.register else manifest.base_uri
            version = tracker.register_model(name, source, mlrun.id,
                                             tags={"forge.phase": phase.id, "forge.run_id": run_id,
                                                   "forge.cache_key": key, **lineage_tags(inputs),
                                                   **result.tags},
                                             extra_aliases=tuple(result.aliases))
            at = " ".join(f"@{a}" for a in ("challenger", *result.aliases))
            notes = f"{notes}; registered {name} v{version} {at}".strip("; ")
        write_row(store, run_id, {**base_row, "status": "complete", "cached": False,
                                  "seconds": time.time() - started, "job_seconds": job_seconds,
                                  "output_bytes": manifest.total_bytes, "quality": result.quality,
                                  "notes": notes})
        if mlrun:
            mlrun.log_metrics({**result.metrics, **{f"quality.{k}": v for k, v in result.quality.items()},
                               "job_seconds": job_seconds, "output_bytes": manifest.total_bytes})
            mlrun.set_tags({"forge.status": "complete", "forge.output": manifest.base_uri,
                            "forge.cache_key": key, **result.tags})
            mlrun.finish()
        log.info("phase %s done in %.1fs: %d files, %.2f MB at %s", phase.id, job_seconds,
                 len(manifest.files), manifest.total_bytes / 1e6, manifest.base_uri)
        return manifest
    except BaseException as exc:
        if mlrun:
            try:
                mlrun.set_tags({"forge.status": "failed", "forge.error": f"{type(exc).__name__}: {exc}"})
                mlrun.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception:
                log.warning("could not mark MLflow run failed:\n%s", traceback.format_exc())
        raise
