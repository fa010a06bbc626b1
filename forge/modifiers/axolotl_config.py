"""Axolotl as the training backend: the knobs we expose (AxolotlConfig) and the Axolotl YAML they render to.

Axolotl itself runs in its own runtime (.venv-axolotl locally, the trainer image in production), driven by
forge.modifiers.axolotl_runner. This module only builds the YAML, so it stays cheap to import (pydantic,
pyyaml) and catches bad knobs with our own message before Axolotl starts.

Axolotl fields used here were read from axolotl 0.19.0's schemas (axolotl/utils/schemas/*.py):
- chat rows `{"messages": [{"role", "content"}]}` -> dataset `type: chat_template`, `field_messages`,
  `chat_template: tokenizer_default` (the base model's own template), loss on assistant turns only.
- CPU: the fused LoRA kernels are auto-enabled for lora/qlora unless any `lora_*_kernel` is set, and they
  need CUDA/Triton: we set them false (shared/STACK.md). No flash attention or sample packing on CPU.
- Resume: `resume_from_checkpoint` (a `checkpoint-N` folder: adapter, optimizer, scheduler, RNG, step)
  and `lora_model_dir` (an existing adapter to start from) are different things. Pointing `lora_model_dir`
  at the checkpoint being resumed wraps the model in PEFT twice (axolotl issue #2568), so a resume sets
  only `resume_from_checkpoint`; `lora_model_dir` is kept for warm starts from another phase's adapter.
- MLflow: `mlflow_tracking_uri` + `mlflow_experiment_name` turn on transformers' MLflowCallback; it
  attaches to an existing run when MLFLOW_RUN_ID is in its env (the runner sets it to the task's nested
  run). The experiment must be that run's experiment, or MLflow refuses to resume the run.
- DPO (`preference_beta`): `rl: dpo` + `rl_beta`, dataset `type: chat_template.default`
  (axolotl/prompt_strategies/dpo/chat_template.py): rows `{"messages": prompt turns, "chosen": str,
  "rejected": str}`, rendered with the top-level `chat_template` (the DPODataset schema has no per-dataset
  one). With an adapter, TRL's reference model is the base with the adapter disabled. Axolotl 0.19 loads only
  the LoRA *config* for rl: dpo (loaders/model.py `_load_adapters`, config_only=True): `lora_model_dir`'s
  weights would be silently dropped, so a warm start is refused here; merge the adapter into the base
  instead (which also makes the merged model DPO's reference, as DPO wants).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from forge.config_base import Strict

ROLES = ("system", "user", "assistant")
ATTENTION = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}  # ours -> attn_implementation


class AxolotlConfigError(ValueError):
    """A knob or an input that Axolotl would reject (or silently misuse): said before Axolotl runs."""


class AxolotlConfig(Strict):
    adapter: Literal["lora", "qlora"] = "qlora"  # qlora: the base loads 4-bit NF4 (bitsandbytes)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear" = Axolotl's lora_target_linear (every Linear but lm_head); or explicit module names
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Axolotl drops (by default) rows longer than this: keep it >= the longest tokenized row (STACK.md)
    sequence_len: int = Field(512, ge=16)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    micro_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # when set, it wins over num_epochs (Axolotl's rule)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adamw_torch"  # any Axolotl/transformers optimizer name, e.g. adamw_bnb_8bit on GPU
    max_grad_norm: float = Field(1.0, ge=0)
    save_steps: int = Field(50, ge=1)  # checkpoint-N folders: what a retried task resumes from
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(5, ge=1)
    # evaluation: a held-out fraction of the train file, or (if given to render) a separate eval file
    val_set_size: float = Field(0.0, ge=0.0, lt=1.0)
    # None: at every checkpoint (save_steps) when there is an eval set, so a max_steps run that ends
    # mid-epoch still has an eval loss in its last checkpoint
    eval_steps: int | None = Field(None, ge=1)
    seed: int = 42
    # auto: bf16 where the GPU has it, fp32 on CPU
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention: Literal["sdpa", "flash", "eager"] = "sdpa"  # flash needs CUDA and the flash-attn package
    # packs short rows into one sequence; Axolotl keeps packed rows apart with flash attention, or (>= 0.20,
    # the GPU trainer image) with its sdpa varlen patch
    sample_packing: bool = False
    gradient_checkpointing: bool = False
    dataset_num_proc: int = Field(1, ge=1)  # tokenizing processes (`train`; multi-GPU: `preprocess`)

    @model_validator(mode="after")
    def _consistent(self) -> AxolotlConfig:
        if self.sample_packing and self.attention == "eager":
            raise ValueError("sample_packing needs attention 'flash' or 'sdpa' (packed rows must not see "
                             "each other; eager attention would let them)")
        return self


@dataclass(frozen=True)
class MlflowTarget:
    """Where Axolotl's trainer logs: the task's nested run (the runner passes its id as MLFLOW_RUN_ID)."""

    tracking_uri: str
    experiment_name: str  # the nested run's experiment: MLflow refuses a run id from another one
    run_id: str


def resolve_device(cfg: AxolotlConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    from forge.modeling import pick_device  # imports torch: only when asked to guess

    return pick_device("auto")


def _precision(cfg: AxolotlConfig, device: str) -> dict[str, Any]:
    if device == "cpu":
        if cfg.precision in ("bf16", "fp16"):
            raise AxolotlConfigError(f"axolotl.precision={cfg.precision!r} needs a GPU (Axolotl's "
                                     "bf16/fp16 is CUDA AMP); use 'auto' or 'fp32' with device cpu")
        return {"bf16": False, "fp16": False, "tf32": False}
    return {"auto": {"bf16": "auto", "fp16": None}, "bf16": {"bf16": True, "fp16": False},
            "fp16": {"bf16": False, "fp16": True}, "fp32": {"bf16": False, "fp16": False}}[cfg.precision]


def _model_limits(base_model: str) -> dict[str, Any]:
    """config.json of a local base model folder ({} for a hub id: Axolotl checks those itself)."""
    path = Path(base_model)
    if not path.exists():
        return {}
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AxolotlConfigError(f"base model folder {path} has no config.json")
    return json.loads(cfg_file.read_text())


def _require_file(path: Path | str, what: str) -> Path:
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise AxolotlConfigError(f"{what} {p} is missing or empty")
    return p.resolve()


def _dataset(path: Path) -> dict[str, Any]:
    return {
        "path": str(path), "ds_type": "json", "split": "train",
        "type": "chat_template", "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
        "chat_template": "tokenizer_default",  # the base model's own template, as serving uses
        "roles_to_train": ["assistant"], "train_on_eos": "turn",
    }


def _preference_dataset(path: Path) -> dict[str, Any]:
    return {"path": str(path), "ds_type": "json", "split": "train", "type": "chat_template.default",
            "field_messages": "messages", "field_chosen": "chosen", "field_rejected": "rejected"}


def render_axolotl_yaml(
    cfg: AxolotlConfig,
    *,
    base_model: str | Path,
    dataset_path: str | Path,
    output_dir: str | Path,
    prepared_dir: str | Path | None = None,
    eval_path: str | Path | None = None,
    resume_from: str | Path | None = None,
    init_adapter: str | Path | None = None,
    mlflow: MlflowTarget | None = None,
    preference_beta: float | None = None,
) -> dict[str, Any]:
    """The Axolotl config (a dict; `to_yaml` writes it) for one LoRA/QLoRA run on our chat rows.

    dataset_path / eval_path: JSONL with a `messages` list per row (write_chat_jsonl writes one); with
    preference_beta, preference rows instead (write_preference_jsonl).
    output_dir: Axolotl's output (checkpoint-N folders, then the final adapter at its top).
    prepared_dir: where Axolotl puts the tokenized dataset (default: output_dir/prepared).
    resume_from: a checkpoint-N folder to continue from (step, optimizer, scheduler, adapter weights).
    init_adapter: an existing LoRA adapter folder to start from (a warm start, not a resume; SFT only).
    preference_beta: DPO (`rl: dpo`) with this beta instead of SFT; see the module doc.
    """
    preference = preference_beta is not None
    if preference:
        if not preference_beta > 0:
            raise AxolotlConfigError(f"preference_beta must be > 0 (got {preference_beta})")
        if cfg.sample_packing:
            raise AxolotlConfigError("axolotl.sample_packing does not work with DPO (Axolotl refuses rl + "
                                     "sample_packing); set it false for the preference stage")
        if init_adapter is not None:
            raise AxolotlConfigError("init_adapter with DPO: Axolotl 0.19 loads only the LoRA config under "
                                     "rl: dpo and would drop the adapter's weights; merge the adapter into "
                                     "the base model and train DPO on the merged model instead")
    dataset = _preference_dataset if preference else _dataset
    device = resolve_device(cfg)
    model_cfg = _model_limits(str(base_model))
    max_pos = model_cfg.get("max_position_embeddings")
    if max_pos and cfg.sequence_len > max_pos:
        raise AxolotlConfigError(f"axolotl.sequence_len={cfg.sequence_len} exceeds the base model's "
                                 f"max_position_embeddings={max_pos} ({base_model}/config.json)")
    if cfg.attention == "flash" and device != "cuda":
        raise AxolotlConfigError("axolotl.attention='flash' needs device cuda")
    if eval_path is not None and cfg.val_set_size > 0:
        raise AxolotlConfigError("give either an eval file or axolotl.val_set_size > 0, not both")
    output_dir = Path(output_dir).resolve()
    prepared = Path(prepared_dir).resolve() if prepared_dir else output_dir / "prepared"
    out: dict[str, Any] = {
        "base_model": str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model),
        "trust_remote_code": False,
        "datasets": [dataset(_require_file(dataset_path, "training data"))],
        "dataset_prepared_path": str(prepared),
        "dataset_num_proc": cfg.dataset_num_proc,
        "shuffle_merged_datasets": True,
        "output_dir": str(output_dir),
        "adapter": cfg.adapter,
        "load_in_4bit": cfg.adapter == "qlora",
        "load_in_8bit": False,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy,
        "sample_packing": cfg.sample_packing,
        "pad_to_sequence_len": cfg.sample_packing,
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_epochs": cfg.num_epochs,
        "optimizer": cfg.optimizer,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "save_safetensors": True,
        "save_only_model": False,  # optimizer/scheduler/RNG in each checkpoint: what a resume needs
        "include_tokens_per_second": True,
        "val_set_size": cfg.val_set_size,
        "strict": False,
        **_precision(cfg, device),
    }
    if cfg.target_modules == "all-linear":
        out["lora_target_linear"] = True
    else:
        out["lora_target_modules"] = list(cfg.target_modules)
    if cfg.max_steps is not None:
        out["max_steps"] = cfg.max_steps
    if eval_path is not None:
        out["test_datasets"] = [dataset(_require_file(eval_path, "eval data"))]
    if eval_path is not None or cfg.val_set_size > 0:
        out["eval_strategy"] = "steps"
        out["eval_steps"] = cfg.eval_steps or cfg.save_steps
    elif cfg.eval_steps:
        raise AxolotlConfigError("axolotl.eval_steps is set but there is nothing to evaluate on: "
                                 "set axolotl.val_set_size > 0 or pass an eval file")
    else:
        out["eval_strategy"] = "no"
    if device == "cpu":
        # fused LoRA kernels are Triton/CUDA: setting any of them stops Axolotl from auto-enabling them
        out.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
                   dataloader_pin_memory=False)
    # attn_implementation replaces the deprecated *_attention flags (axolotl >= 0.19)
    out["attn_implementation"] = ATTENTION[cfg.attention]
    if resume_from is not None:
        ckpt = Path(resume_from).resolve()
        if not (ckpt / "trainer_state.json").is_file():
            raise AxolotlConfigError(f"resume_from {ckpt}: not a trainer checkpoint (no trainer_state.json)")
        out["resume_from_checkpoint"] = str(ckpt)
    if init_adapter is not None:
        adapter = Path(init_adapter).resolve()
        if not (adapter / "adapter_config.json").is_file():
            raise AxolotlConfigError(f"init_adapter {adapter} has no adapter_config.json")
        if resume_from is not None and adapter == Path(resume_from).resolve():
            raise AxolotlConfigError("init_adapter must not be the checkpoint being resumed "
                                     "(PEFT would wrap it twice)")
        out["lora_model_dir"] = str(adapter)
    if preference:
        # the prompt and both answers are rendered with the base model's own template, as for SFT
        out.update(rl="dpo", rl_beta=float(preference_beta), chat_template="tokenizer_default")
    if mlflow is not None:
        out.update(mlflow_tracking_uri=mlflow.tracking_uri, mlflow_experiment_name=mlflow.experiment_name,
                   hf_mlflow_log_artifacts=False)  # checkpoints go to the artifact store, not MLflow
    return out


def to_yaml(rendered: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(rendered, sort_keys=False)


def write_axolotl_yaml(rendered: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(rendered))
    return path


def _where(source: str, i: int, row: dict[str, Any]) -> str:
    return f"{source} row {i}" + (f" (id {row['id']!r})" if "id" in row else "")


def _messages(row: dict[str, Any], where: str, what: str) -> list[dict[str, str]]:
    """A row's `messages` checked and reduced to role + content (the only keys Axolotl reads)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise AxolotlConfigError(f"{where}: 'messages' must be a non-empty list{what}")
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise AxolotlConfigError(f"{where}: messages[{j}] needs role in {ROLES} and string content, "
                                     f"got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _write_lines(objects: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    return path


def write_chat_jsonl(rows: list[dict[str, Any]], path: str | Path, source: str = "rows") -> Path:
    """Our chat rows -> the JSONL Axolotl reads: only `messages` (other columns such as `check` differ in
    shape across rows and would trip the JSON loader). Bad rows are named by index before Axolotl runs."""
    if not rows:
        raise AxolotlConfigError(f"{source}: no rows to train on")
    out = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        where = _where(source, i, row)
        msgs = _messages(row, where, "")
        if not any(m["role"] == "assistant" for m in msgs):
            raise AxolotlConfigError(f"{where}: no assistant turn, nothing to learn from")
        out.append({"messages": msgs})
    return _write_lines(out, path)


def write_preference_jsonl(rows: list[dict[str, Any]], path: str | Path, source: str = "pairs") -> Path:
    """Preference pairs -> the JSONL Axolotl's DPO chat_template.default reads: `messages` (the prompt turns,
    ending with the user's), `chosen` and `rejected` (the two assistant answers, non-empty and different).
    Bad rows are named by index before Axolotl runs."""
    if not rows:
        raise AxolotlConfigError(f"{source}: no preference pairs to train on")
    out = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        where = _where(source, i, row)
        msgs = _messages(row, where, " of prompt turns")
        if msgs[-1]["role"] != "user":
            raise AxolotlConfigError(f"{where}: the prompt turns must end with the user's (the answers are "
                                     "'chosen' and 'rejected')")
        answers = [row.get("chosen"), row.get("rejected")]
        for name, answer in zip(("chosen", "rejected"), answers, strict=True):
            # Axolotl's length filter raises on an empty answer
            if not isinstance(answer, str) or not answer.strip():
                raise AxolotlConfigError(f"{where}: '{name}' must be a non-empty string")
        if answers[0].strip() == answers[1].strip():
            raise AxolotlConfigError(f"{where}: 'chosen' and 'rejected' are the same answer")
        out.append({"messages": msgs, "chosen": answers[0], "rejected": answers[1]})
    return _write_lines(out, path)
