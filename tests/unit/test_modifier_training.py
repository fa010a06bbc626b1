"""Modifier subphases F, G, H on the tiny pipeline: F's portable Axolotl YAML (accepted by Axolotl's loader,
re-pointed on another worker), G trained by Axolotl with checkpoints in the store and a retried task resuming
from the stored one, and H's scores, GGUF LoRA, zstd file, modifier.json and registration.

A and E are written here from the code suite (E's rows as a cascade would accept them), so these tests do not
depend on the teacher phases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from forge.artifacts import ArtifactStore, Manifest, digest_json, sha256_file
from forge.data.records import DataError, write_jsonl
from forge.data.suites import generate
from forge.ledger import read_rows
from forge.modifiers.axolotl_config import AxolotlConfig, render_axolotl_yaml, write_axolotl_yaml
from forge.modifiers.axolotl_runner import validate_yaml
from forge.modifiers.training import BASE_KEY, TRAIN_KEY, VAL_KEY, apply_overlay, get_key, repoint
from forge.runner import JobContext, make_store, run_phase
from tests.axolotl_env import needs_axolotl
from tests.conftest import UPSTREAM_PHASES, TinyRun

DOMAIN, A, E, F, G, H = "code", "3A", "3E", "3F", "3G", "3H"
STOP_AT = 3  # attempt 1 of G dies right after this checkpoint reached the store (save_steps=3, max_steps=6)


class Interrupted(RuntimeError):
    """Stands in for a worker lost mid-training."""


def commit_fake(store: ArtifactStore, run_id: str, phase: str, files: dict[str, Any], info: dict[str, Any],
                scratch: Path) -> Manifest:
    """Commit an A- or E-shaped output (JSONL rows or JSON) to the run, as the real phase would."""
    folder = scratch / run_id / phase
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, list):
            write_jsonl(folder / name, content)
        else:
            (folder / name).write_text(json.dumps(content, indent=2))
    manifest = Manifest(phase=phase, cache_key=digest_json({"fake": phase, "files": files}), base_uri="",
                        run_id=run_id, info=info)
    return store.commit(folder, store.run_dir(run_id, phase), manifest)


def accepted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Suite rows as E writes them: the reference solver's answer, accepted at tier 1."""
    return [{**r, "source": "teacher:reference", "teacher": "reference", "tier": 1} for r in rows]


def modifier_run(tiny: TinyRun, run_id: str, train_rows: list[dict[str, Any]]) -> tuple[Any, ArtifactStore]:
    """A run that shares tiny_run's upstream outputs and has its own A and E for the code domain."""
    cfg = tiny.config()
    store = make_store(cfg)
    for phase in UPSTREAM_PHASES:
        store.link_run(run_id, store.run_manifest(tiny.run_id, phase))
    scratch = tiny.home / "fake-phases"
    commit_fake(store, run_id, A, {"prompts.jsonl": generate(DOMAIN, 16, 0, "train"),
                                   "dev.jsonl": generate(DOMAIN, 4, 0, "dev"),
                                   "heldout.jsonl": generate(DOMAIN, 12, 0, "heldout")},
                {"prompts": "prompts.jsonl", "dev": "dev.jsonl", "heldout": "heldout.jsonl", "suite": DOMAIN},
                scratch)
    val = accepted(generate(DOMAIN, 4, 0, "dev"))
    commit_fake(store, run_id, E, {"train.jsonl": train_rows, "val.jsonl": val,
                                   "cascade.json": {"accepted": len(train_rows)}},
                {"train": "train.jsonl", "val": "val.jsonl"}, scratch)
    return cfg, store


@pytest.fixture(scope="module")
def run_f(tiny_run: TinyRun) -> tuple[TinyRun, str, Any, ArtifactStore, Manifest]:
    run_id = "tiny-modifier-fgh"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny_run.home))
        cfg, store = modifier_run(tiny_run, run_id, accepted(generate(DOMAIN, 24, 0, "train")))
        manifest = run_phase(F, cfg, run_id, track=False)
    return tiny_run, run_id, cfg, store, manifest


@pytest.fixture(scope="module")
def run_g(run_f) -> dict[str, Any]:
    """G twice: attempt 1 is lost right after checkpoint STOP_AT reached the store, attempt 2 (the retry)
    resumes from it. Both tracked, so Axolotl's own MLflow logging lands in each attempt's nested run."""
    tiny, run_id, cfg, store, _ = run_f
    saved: list[tuple[int, str]] = []
    original = JobContext.save_checkpoint

    def save_then_die(self: JobContext, step: int, local_dir: Path) -> None:
        original(self, step, local_dir)
        saved.append((step, self.cache_key))
        if len(saved) == 1 and step == STOP_AT:
            raise Interrupted(f"worker lost after checkpoint {step}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny.home))
        mp.setattr(JobContext, "save_checkpoint", save_then_die)
        with pytest.raises(Interrupted):
            run_phase(G, cfg, run_id)
        step, folder = store.latest_checkpoint(G, saved[0][1])
        stored_state = json.loads((folder / "trainer_state.json").read_text())
        manifest = run_phase(G, cfg, run_id)
    return {"saved": saved, "stored_step": step, "stored_state": stored_state, "manifest": manifest,
            "leftover": store.latest_checkpoint(G, saved[0][1])}


@pytest.fixture(scope="module")
def run_h(run_f, run_g) -> Manifest:
    tiny, run_id, cfg, _, _ = run_f
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tiny.home))
        return run_phase(H, cfg, run_id)


def mlflow_client(cfg: Any) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)


# ---- F -------------------------------------------------------------------------------------------------

@needs_axolotl
def test_f_commits_a_portable_yaml_that_axolotl_accepts_after_repointing(run_f, tmp_path: Path) -> None:
    tiny, run_id, cfg, store, manifest = run_f
    out = store.materialize(manifest)
    text = (out / "axolotl.yaml").read_text()
    assert str(tiny.home) not in text and "/tmp" not in text  # no path of the machine that rendered it
    portable = yaml.safe_load(text)
    paths = json.loads((out / "paths.json").read_text())
    assert paths == {BASE_KEY: ["2A", ""], TRAIN_KEY: [F, "data/train.jsonl"], VAL_KEY: [F, "data/val.jsonl"]}
    assert get_key(portable, BASE_KEY) == "2A" and get_key(portable, TRAIN_KEY) == f"{F}/data/train.jsonl"
    # E's rows in Axolotl's JSONL: messages only (check/teacher columns would trip its JSON loader)
    first = json.loads((out / "data/train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"messages"} and [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert manifest.info["quality"]["rows"] == 24 and manifest.info["quality"]["val_rows"] == 4
    seen = manifest.info["axolotl"]  # what Axolotl's loader made of it, as F validated it
    assert seen["adapter"] == "lora" and seen["max_steps"] == 6 and seen["batch_size"] == 4
    assert seen["dataset_types"] == ["chat_template"] and "base_model" not in seen

    # another worker: its own copies of 2A and F's output, somewhere else
    worker = tmp_path / "worker2"
    shutil.copytree(store.materialize(store.run_manifest(run_id, "2A")), worker / "2A")
    shutil.copytree(out, worker / F)
    local = repoint(portable, paths, lambda phase, rel: worker / phase / rel if rel else worker / phase)
    local.update(output_dir=str(worker / "output"), dataset_prepared_path=str(worker / "prepared"))
    checked = validate_yaml(write_axolotl_yaml(local, worker / "axolotl.yaml"))
    assert checked["base_model"] == str(worker / "2A")
    assert get_key(local, VAL_KEY) == str(worker / F / "data/val.jsonl")
    with pytest.raises(DataError, match="names 'test_datasets.9.path'"):
        repoint(portable, {**paths, "test_datasets.9.path": [F, "x"]}, lambda p, r: worker)


@needs_axolotl
def test_g_overlay_changes_only_what_the_training_device_needs(run_f) -> None:
    """F on a CPU worker, G on a GPU one: G swaps the device settings and keeps every other key of F's."""
    _, run_id, _, store, manifest = run_f
    out = store.materialize(manifest)
    cfg = AxolotlConfig(adapter="qlora", sequence_len=128, device="cpu")
    common = dict(base_model=store.materialize(store.run_manifest(run_id, "2A")),
                  dataset_path=out / "data/train.jsonl", output_dir=out / "o")
    on_cpu = render_axolotl_yaml(cfg, **common)
    on_gpu = render_axolotl_yaml(cfg.model_copy(update={"device": "cuda"}), **common)
    edited = {**on_cpu, "learning_rate": 1e-5}  # a knob F's YAML holds: not G's to change
    moved = apply_overlay(edited, on_cpu, on_gpu)
    assert moved == {**on_gpu, "learning_rate": 1e-5}
    assert "lora_mlp_kernel" not in moved and moved["bf16"] == "auto"  # CPU-only settings gone


def test_a_bad_e_row_fails_f_naming_the_row(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_HOME", str(tiny_run.home))
    rows = accepted(generate(DOMAIN, 6, 1, "train"))
    rows[2]["messages"][1]["role"] = "bot"
    cfg, _ = modifier_run(tiny_run, "tiny-modifier-bad-row", rows)
    with pytest.raises(DataError, match=r"3E/train\.jsonl:3: messages\[1\] must be"):
        run_phase(F, cfg, "tiny-modifier-bad-row", track=False)


def test_f_refuses_data_that_would_all_be_dropped_for_length(tiny_run: TinyRun,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_HOME", str(tiny_run.home))
    modifier_run(tiny_run, "tiny-modifier-short", accepted(generate(DOMAIN, 6, 2, "train")))
    cfg = tiny_run.config({"modifiers": {"axolotl": {"sequence_len": 16}}})
    with pytest.raises(DataError, match="every row is longer than axolotl.sequence_len=16 tokens"):
        run_phase(F, cfg, "tiny-modifier-short", track=False)


# ---- G -------------------------------------------------------------------------------------------------

@needs_axolotl
def test_g_saves_checkpoints_to_the_store_and_a_retry_resumes_from_them(run_f, run_g) -> None:
    _, _, cfg, store, _ = run_f
    # attempt 1 pushed checkpoint 3 before it was lost; the store held it, complete
    assert run_g["saved"][0][0] == STOP_AT and run_g["stored_step"] == STOP_AT
    assert run_g["stored_state"]["global_step"] == STOP_AT
    # attempt 2 pushed only the checkpoints after it, and continued the step count instead of restarting
    assert [s for s, _ in run_g["saved"][1:]] == [6]
    m: Manifest = run_g["manifest"]
    assert m.info["resumed_from"] == STOP_AT and m.info["global_step"] == 6
    assert m.metrics["resumed_from"] == STOP_AT and "resumed from the stored checkpoint at step 3" in \
        m.info["notes"]
    assert run_g["leftover"] is None  # the committed adapter supersedes the stored checkpoints

    out = store.materialize(m)
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "forge:2A" and adapter_cfg["r"] == 8
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # the restored trainer state carries attempt 1's steps
    assert not any("runtime" in k or "per_sec" in k for e in log for k in e)  # run-independent
    assert m.info["quality"]["train_loss"] == pytest.approx(losses[6])

    # Axolotl's trainer logged into each attempt's nested run: the retry's holds only steps 4-6
    client = mlflow_client(cfg)
    retry = client.get_run(m.mlflow_run_id)
    assert sorted(x.step for x in client.get_metric_history(retry.info.run_id, "loss")) == [4, 5, 6]
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(retry.info.run_id)]


# ---- H -------------------------------------------------------------------------------------------------

@needs_axolotl
def test_h_scores_the_adapter_against_the_base_and_records_what_ships(run_f, run_g, run_h) -> None:
    _, run_id, cfg, store, _ = run_f
    q = run_h.info["quality"]
    for key in ("acc_base", "acc", "delta_acc", "logprob_base", "logprob", "delta_logprob", "gguf_acc_base",
                "gguf_acc", "adapter_mb", "compressed_mb"):
        assert isinstance(q[key], float), key
    assert q["delta_acc"] == pytest.approx(q["acc"] - q["acc_base"])
    assert q["delta_logprob"] == pytest.approx(q["logprob"] - q["logprob_base"])
    assert q["delta_logprob"] != 0.0  # the adapter changed what the model assigns to the references
    assert 0 < q["compressed_mb"] < q["adapter_mb"]
    beats = q["acc"] > q["acc_base"]
    assert run_h.info["beats_base"] is beats
    assert ("beats the base" if beats else "does NOT beat the base") in run_h.info["notes"]
    ledger = {row["phase"]: row for row in read_rows(store, run_id)}
    assert ledger[H]["quality"] == q and ledger[H]["status"] == "complete"

    out = store.materialize(run_h)  # verifies every file against the manifest
    record = json.loads((out / "modifier.json").read_text())
    for name, entry in record["files"].items():
        assert entry["sha256"] == sha256_file(out / name) == run_h.files[name].sha256, name
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter.gguf",
            "adapter.gguf.fgz"} <= set(record["files"])
    gguf_2c = store.run_manifest(run_id, "2C")
    assert record["base"]["gguf"]["sha256"] == gguf_2c.files[gguf_2c.info["gguf"]].sha256
    assert record["base"]["gguf"]["cache_key"] == gguf_2c.cache_key
    lora_2e = store.run_manifest(run_id, "2E")
    assert record["base"]["recovery_adapter"]["sha256"] == lora_2e.files[lora_2e.info["adapter"]].sha256
    assert record["data"]["cache_key"] == store.run_manifest(run_id, E).cache_key
    assert record["scores"]["hf"]["acc"] == q["acc"] and record["beats_base"] is beats

    from forge.compress.codecs import decompress_blob

    dictionary = (out / "adapter.zstd.dict").read_bytes() if "adapter.zstd.dict" in record["files"] else None
    assert decompress_blob((out / "adapter.gguf.fgz").read_bytes(), dictionary) == \
        (out / "adapter.gguf").read_bytes()

    # registered as forge-modifier-code with lineage to the data (E), the training (G) and the base
    client = mlflow_client(cfg)
    name = cfg.modifiers.registered_name(DOMAIN)
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.source == run_h.base_uri and version.run_id == run_h.mlflow_run_id
    for phase in (E, G, "2A", "2C", "2E"):
        assert version.tags[f"forge.lineage.{phase}.cache_key"] == store.run_manifest(run_id, phase).cache_key
    aliases = set(client.get_registered_model(name).aliases)
    assert ("champion" in aliases) is beats
