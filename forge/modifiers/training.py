"""Modifier subphases F (render the Axolotl YAML) and G (train the LoRA/QLoRA adapter with Axolotl).

F turns E's curated chat rows into Axolotl's JSONL, renders the YAML against local copies of its inputs (the
base is 2A's pruned model, so the adapter fits 2C's GGUF, which is 2A converted) and has Axolotl's own loader
accept it. What it commits is portable: every input path in `axolotl.yaml` is written as "<phase>/<file>" and
`paths.json` maps those keys to (phase id, file inside that phase's output), so G, on any worker, points them
at its own verified copies.

G re-points the paths, puts Axolotl's output and tokenized data under its scratch dir, and adds what only G
knows: the device it trains on (F may have rendered on a CPU worker for a GPU trainer), the checkpoint it
resumes from and the task's MLflow run. It runs `axolotl train` (multi-GPU: `preprocess` first) in
Axolotl's runtime, pushes each checkpoint to the artifact store, and commits the adapter. A retried G stages
the newest stored checkpoint and sets only `resume_from_checkpoint` (never `lora_model_dir`: that would wrap
PEFT twice).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge.data.records import DataError, read_jsonl, write_jsonl
from forge.modifiers.axolotl_config import (
    AxolotlConfig,
    AxolotlConfigError,
    MlflowTarget,
    render_axolotl_yaml,
    resolve_device,
    write_axolotl_yaml,
    write_chat_jsonl,
)
from forge.modifiers.axolotl_runner import ADAPTER_FILES
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.modifiers")

YAML_NAME = "axolotl.yaml"
PATHS_NAME = "paths.json"
TRAIN_FILE = "data/train.jsonl"  # in F's output: E's rows as Axolotl reads them (messages only)
VAL_FILE = "data/val.jsonl"
# the YAML keys holding input paths (render_axolotl_yaml's base_model / dataset_path / eval_path)
BASE_KEY, TRAIN_KEY, VAL_KEY = "base_model", "datasets.0.path", "test_datasets.0.path"
ADAPTER_DIR = "adapter"
# Axolotl settings that name this machine's paths: kept out of F's info
MACHINE_KEYS = ("base_model", "output_dir", "resume_from_checkpoint", "lora_model_dir")
# wall-clock and machine numbers in the trainer's log history: metrics, never committed files
RUN_DEPENDENT = ("runtime", "per_sec", "_seconds", "memory/")


# ---- dotted keys ("datasets.0.path") into the YAML dict -------------------------------------------------

def get_key(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def set_key(tree: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def portable_path(phase: str, rel: str) -> str:
    """What a path key holds in the committed YAML: "<phase>/<file>" ("2A" for a whole phase's output)."""
    return f"{phase}/{rel}" if rel else phase


def make_portable(rendered: dict[str, Any], paths: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The rendered YAML with its input paths replaced by portable_path and the run's own dirs relative."""
    out = json.loads(json.dumps(rendered))  # a deep copy of plain YAML data
    for key, (phase, rel) in paths.items():
        set_key(out, key, portable_path(phase, rel))
    out["output_dir"], out["dataset_prepared_path"] = "output", "prepared"  # G puts them under its scratch
    return out


def repoint(portable: dict[str, Any], paths: dict[str, list[str]],
            locate: Callable[[str, str], Path]) -> dict[str, Any]:
    """F's YAML with every mapped key pointed at locate(phase, file): this worker's verified copy."""
    out = json.loads(json.dumps(portable))
    for key, (phase, rel) in paths.items():
        try:
            get_key(out, key)
        except (KeyError, IndexError, ValueError, TypeError):
            raise DataError(f"paths.json names {key!r}, which the Axolotl YAML does not have") from None
        set_key(out, key, str(locate(phase, rel)))
    return out


# ---- F -------------------------------------------------------------------------------------------------

def read_chat_rows(path: Path, where: str, required: bool) -> list[dict[str, Any]]:
    """E's rows (records schema); a bad row raises DataError naming file:line and the field."""
    if not path.is_file():
        if required:
            raise DataError(f"{where} is missing: E writes train.jsonl and val.jsonl")
        return []
    rows = read_jsonl(path)
    if required and not rows:
        raise DataError(f"{where} has no rows to train on")
    return rows


def write_axolotl_data(rows: list[dict[str, Any]], path: Path, where: str) -> Path:
    try:
        return write_chat_jsonl(rows, path, source=where)
    except AxolotlConfigError as e:  # a row Axolotl would misread: bad input data, named by row
        raise DataError(str(e)) from e


def token_lengths(base_dir: Path, rows: list[dict[str, Any]]) -> list[int]:
    """Tokens per row as Axolotl sees it (the base's own chat template over the whole conversation)."""
    from forge.modeling import load_tokenizer

    tok = load_tokenizer(base_dir)
    texts = [tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in r["messages"]],
                                     tokenize=False) for r in rows]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def check_lengths(lengths: list[int], rows: list[dict[str, Any]], cfg: AxolotlConfig, where: str) -> int:
    """Rows longer than sequence_len (Axolotl drops, truncates or raises on them); fails if none would fit."""
    long_ids = [r.get("id", i) for i, (r, n) in enumerate(zip(rows, lengths, strict=True))
                if n > cfg.sequence_len]
    if long_ids and len(long_ids) == len(rows) and cfg.excess_length_strategy != "truncate":
        raise DataError(f"{where}: every row is longer than axolotl.sequence_len={cfg.sequence_len} tokens "
                        f"(shortest {min(lengths)}): nothing would be trained on; raise sequence_len")
    if long_ids:
        log.warning("%s: %d of %d rows exceed sequence_len=%d (axolotl %s them), e.g. %s", where,
                    len(long_ids), len(rows), cfg.sequence_len, cfg.excess_length_strategy, long_ids[:3])
    return len(long_ids)


def render(ctx: JobContext) -> JobResult:
    """F: E's train/val -> Axolotl JSONL, the YAML (validated by Axolotl's loader) and paths.json."""
    from forge.modifiers.axolotl_runner import validate_yaml
    from forge.phases import modifier_input

    cfg: AxolotlConfig = ctx.config.modifiers.axolotl
    e_id = modifier_input(ctx.phase, "E", ctx.config)
    e_dir = ctx.input_dir(e_id)
    base_dir = ctx.input_dir("2A")
    if not (base_dir / "config.json").is_file():
        raise DataError(f"{ctx.phase.id} needs 2A's pruned model at {base_dir} (config.json missing)")
    train = read_chat_rows(e_dir / "train.jsonl", f"{e_id}/train.jsonl", required=True)
    val = read_chat_rows(e_dir / "val.jsonl", f"{e_id}/val.jsonl", required=False)
    out = ctx.out_dir
    write_axolotl_data(train, out / TRAIN_FILE, f"{e_id}/train.jsonl")
    use_val = bool(val) and cfg.val_set_size == 0  # val_set_size > 0: Axolotl splits the train file instead
    if use_val:
        write_axolotl_data(val, out / VAL_FILE, f"{e_id}/val.jsonl")
    elif val:
        log.info("axolotl.val_set_size=%s: Axolotl holds out part of train; E's val.jsonl is not used",
                 cfg.val_set_size)
    too_long = check_lengths(token_lengths(base_dir, train), train, cfg, f"{e_id}/train.jsonl")

    device = resolve_device(cfg)
    rendered = render_axolotl_yaml(cfg, base_model=base_dir, dataset_path=out / TRAIN_FILE,
                                   eval_path=out / VAL_FILE if use_val else None,
                                   output_dir=ctx.work_dir / "output", prepared_dir=ctx.work_dir / "prepared")
    checked = validate_yaml(write_axolotl_yaml(rendered, ctx.work_dir / YAML_NAME), log)

    paths = {BASE_KEY: ("2A", ""), TRAIN_KEY: (ctx.phase.id, TRAIN_FILE)}
    if use_val:
        paths[VAL_KEY] = (ctx.phase.id, VAL_FILE)
    write_axolotl_yaml(make_portable(rendered, paths), out / YAML_NAME)
    (out / PATHS_NAME).write_text(json.dumps({k: list(v) for k, v in paths.items()}, indent=2) + "\n")
    ctx.log_artifact(out / YAML_NAME)

    settings = {k: v for k, v in checked.items() if k not in MACHINE_KEYS}
    quality = {"rows": float(len(train)), "val_rows": float(len(val) if use_val else 0),
               "rows_too_long": float(too_long)}
    notes = (f"{len(train)} train + {len(val) if use_val else 0} val rows of {e_id}; {cfg.adapter} "
             f"r={cfg.lora_r} on 2A, batch {checked.get('batch_size')}, rendered for {device}; accepted by "
             "Axolotl's loader")
    if too_long:
        notes += (f"; {too_long} rows longer than sequence_len {cfg.sequence_len} "
                  f"({cfg.excess_length_strategy})")
    return JobResult(metrics=dict(quality), quality=quality, notes=notes,
                     info={"yaml": YAML_NAME, "paths": PATHS_NAME, "train": TRAIN_FILE,
                           "val": VAL_FILE if use_val else None, "device": device, "axolotl": settings})


# ---- G -------------------------------------------------------------------------------------------------

def mlflow_target(ctx: JobContext) -> MlflowTarget | None:
    """The task's nested run (Axolotl's trainer attaches to it), or None when the task is not tracked."""
    if ctx.mlflow is None:
        return None
    tcfg = ctx.mlflow.tracker.cfg
    return MlflowTarget(tcfg.tracking_uri, tcfg.experiment, ctx.mlflow.id)


def run_overlay(reference: dict[str, Any], wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What changes from F's render to G's: keys set or changed, and keys dropped (device, resume, MLflow)."""
    changed = {k: v for k, v in wanted.items() if reference.get(k, object()) != v}
    return changed, [k for k in reference if k not in wanted]


def apply_overlay(config: dict[str, Any], reference: dict[str, Any],
                  wanted: dict[str, Any]) -> dict[str, Any]:
    """`config` (F's YAML) with run_overlay(reference, wanted) applied: every other key stays F's."""
    changed, dropped = run_overlay(reference, wanted)
    out = {k: v for k, v in config.items() if k not in dropped}
    out.update(changed)
    if changed or dropped:
        log.info("G's overlay on F's YAML: set %s, dropped %s", sorted(changed), dropped)
    return out


def locate_input(ctx: JobContext) -> Callable[[str, str], Path]:
    def locate(phase: str, rel: str) -> Path:
        if phase not in ctx.inputs:
            raise DataError(f"paths.json names phase {phase}, which is not an input of {ctx.phase.id} "
                            f"(inputs: {sorted(ctx.inputs)})")
        path = ctx.input_dir(phase) / rel if rel else ctx.input_dir(phase)
        if not path.exists():
            raise DataError(f"paths.json: {portable_path(phase, rel)} does not exist in {phase}'s output "
                            f"({path})")
        return path
    return locate


def build_train_yaml(ctx: JobContext, output_dir: Path, prepared_dir: Path, resume_from: Path | None,
                     mlflow: MlflowTarget | None) -> dict[str, Any]:
    """F's YAML re-pointed at this worker's copies, plus the run overlay (device, resume, MLflow)."""
    import yaml

    from forge.phases import modifier_input

    cfg: AxolotlConfig = ctx.config.modifiers.axolotl
    f_id = modifier_input(ctx.phase, "F", ctx.config)
    f_dir = ctx.input_dir(f_id)
    portable = yaml.safe_load((f_dir / YAML_NAME).read_text())
    paths = json.loads((f_dir / PATHS_NAME).read_text())
    local = repoint(portable, paths, locate_input(ctx))
    local["output_dir"], local["dataset_prepared_path"] = str(output_dir), str(prepared_dir)

    # render twice with the same local paths: as F did (its device) and as G needs; the difference is what
    # G adds to F's YAML, so knobs F validated stay as they are
    common = dict(base_model=get_key(local, BASE_KEY), dataset_path=get_key(local, TRAIN_KEY),
                  eval_path=get_key(local, VAL_KEY) if VAL_KEY in paths else None,
                  output_dir=output_dir, prepared_dir=prepared_dir)
    f_device = ctx.input_info(f_id).get("device") or "cpu"
    reference = render_axolotl_yaml(cfg.model_copy(update={"device": f_device}), **common)
    wanted = render_axolotl_yaml(cfg.model_copy(update={"device": resolve_device(cfg)}), **common,
                                 resume_from=resume_from, mlflow=mlflow)
    return apply_overlay(local, reference, wanted)


def portable_adapter(output_dir: Path, dest: Path, base: str) -> list[Path]:
    """Axolotl's final adapter -> dest: adapter_config.json naming `base` (not this machine's 2A path, which
    names a run) and the weights."""
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(output_dir / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    return [dest / f for f in ADAPTER_FILES]


def committed_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's log history without its wall-clock and memory figures (they differ between runs)."""
    return [{k: v for k, v in entry.items() if not any(w in k for w in RUN_DEPENDENT)} for entry in history]


def train(ctx: JobContext) -> JobResult:
    """G: Axolotl train on F's YAML; checkpoints to the store; the adapter committed."""
    from forge.modifiers.axolotl_runner import run_axolotl, stage_checkpoint
    from forge.train.qlora_trainer import base_name, plot_losses

    cfg: AxolotlConfig = ctx.config.modifiers.axolotl
    output_dir, prepared_dir = ctx.work_dir / "output", ctx.work_dir / "prepared"
    resume_from = None
    stored = ctx.latest_checkpoint()
    if stored is not None:
        step, folder = stored
        resume_from = stage_checkpoint(step, folder, output_dir)
        log.info("%s: resuming from the stored checkpoint at step %d", ctx.phase.id, step)
    mlflow = mlflow_target(ctx)
    yaml_path = write_axolotl_yaml(build_train_yaml(ctx, output_dir, prepared_dir, resume_from, mlflow),
                                   ctx.work_dir / YAML_NAME)

    def save(step: int, folder: Path) -> None:
        ctx.save_checkpoint(step, folder)
        log.info("%s: checkpoint-%d saved to the artifact store", ctx.phase.id, step)

    started = time.time()
    result = run_axolotl(yaml_path, logger=log, mlflow_run_id=mlflow.run_id if mlflow else None,
                         on_checkpoint=save)
    seconds = time.time() - started

    out = ctx.out_dir
    files = portable_adapter(result.output_dir, out / ADAPTER_DIR, base_name("2A", str(ctx.input_dir("2A"))))
    write_jsonl(out / "train_log.jsonl", committed_history(result.log_history))
    history = [h for h in result.log_history if "step" in h]
    plot_losses(history, out / "loss_curve.png", title=f"{ctx.phase.id} {ctx.phase.domain} adapter (Axolotl)")
    ctx.log_artifact(out / "loss_curve.png")

    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h and h["step"] > 0]  # step 0: before training
    m = result.metrics
    nan = float("nan")
    quality = {"steps": float(result.global_step), "train_loss": float(losses[-1]) if losses else nan}
    if evals:
        quality["eval_loss"] = float(evals[-1])
    metrics = {**quality, "resumed_from": float(result.resumed_from or 0), "axolotl_seconds": seconds,
               "first_loss": float(losses[0]) if losses else nan,
               "adapter_bytes": float(sum(f.stat().st_size for f in files))}
    for ours, theirs in (("tokens_per_s", "train_tokens_per_second"), ("grad_norm", "grad_norm"),
                         ("tokens_seen", "num_input_tokens_seen"), ("learning_rate", "learning_rate")):
        if theirs in m:
            metrics[ours] = m[theirs]
    start = [h["eval_loss"] for h in history if "eval_loss" in h and h["step"] == 0]
    if start:
        metrics["eval_loss_start"] = float(start[0])
    notes = (f"{cfg.adapter} r={cfg.lora_r} on 2A, {result.global_step} steps, train loss "
             f"{metrics['first_loss']:.3f} -> {quality['train_loss']:.3f}")
    if "eval_loss" in quality:
        notes += f", eval loss {quality['eval_loss']:.3f}"
    if result.resumed_from:
        notes += f"; resumed from the stored checkpoint at step {result.resumed_from}"
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"adapter": ADAPTER_DIR, "adapter_files": [f.name for f in files],
                           "global_step": result.global_step, "resumed_from": result.resumed_from,
                           "device": resolve_device(cfg), "train_log": "train_log.jsonl"})
