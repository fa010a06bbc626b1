"""2E: a recovery LoRA trained against the *quantized* weights, shipped beside the GGUF.

2C's Q5_K_M GGUF is dequantized back into an HF model (2A's architecture), so the forward pass
during training sees exactly the rounded weights llama.cpp will serve; a LoRA trained on top then
learns to compensate the quantization error on our data (1B's hardest examples, repeated, plus
ordinary train rows). It is converted to a GGUF LoRA adapter and evaluated with llama.cpp: the
base GGUF alone (before) against GGUF + adapter (after), on the dev split.

Read top to bottom:
  1. dequantize  GGUF tensors -> HF names (transformers' GGUF loader, or gguf-py directly), checked
                 against 2A's weights: every parameter filled, each close but not equal
  2. data        the training mix: hardest rows x hardest_repeat + the first train_rows train rows
  3. train       LoRA on the dequantized model with 1A's loop pieces; resumable checkpoints
  4. outputs     peft adapter -> GGUF LoRA; loss plot
  5. evaluate    llama.cpp before/after: acc, logprob, changed greedy outputs
  6. job         `run(ctx)`
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.data.records import DataError, read_jsonl, write_jsonl
from forge.train.recovery_config import RecoveryConfig

if TYPE_CHECKING:
    import torch

    from forge.evaluate.harness import EvalReport
    from forge.runner import JobContext, JobResult
    from forge.train.qlora_trainer import Example, LoopState

log = logging.getLogger("forge.train")

# architectures whose q/k rows llama.cpp's converter permutes (rotary layout) and we know to undo
PERMUTED_ARCHS = ("llama",)


# ---- 1. dequantize ---------------------------------------------------------------------------

def gguf_package_installed() -> bool:
    """True when gguf-py is installed with package metadata (what transformers' loader checks)."""
    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's LlamaModel.permute)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: Any, key: str) -> Any:
    if key not in reader.fields:
        raise ValueError(f"GGUF {reader.data.filename}: metadata key {key!r} missing")
    return reader.fields[key].contents()


def read_gguf_with_gguf_py(path: Path, model: Any) -> dict[str, torch.Tensor]:
    """Dequantized tensors named like model's parameters, read with gguf-py alone: GGUFReader,
    gguf.dequantize, gguf's HF<->GGUF name map, and the q/k permutation undone."""
    import numpy as np
    import torch

    from forge.compress.llama_cpp_tools import gguf_module

    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))
    arch_name = _field(reader, "general.architecture")
    if arch_name not in PERMUTED_ARCHS:
        raise ValueError(f"{path}: architecture {arch_name!r} is not supported by the gguf-py reader "
                         f"(only {PERMUTED_ARCHS}); install gguf into the venv to use transformers' loader")
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    to_hf: dict[str, str] = {}
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            to_hf[f"{gguf_name}.{suffix}"] = hf_name
    n_head = int(_field(reader, f"{arch_name}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch_name}.attention.head_count_kv"))
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in to_hf:
            log.info("GGUF tensor %s has no parameter in the HF model; ignored", t.name)
            continue
        w = gguf.dequantize(t.data, t.tensor_type)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, n_kv)
        out[to_hf[t.name]] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    return out


def read_gguf_tensors(path: Path, model: Any) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantized to fp32 and named like `model`'s parameters.

    transformers' GGUF loader when gguf is installed as a package (its version check needs the
    package metadata); otherwise gguf-py from llama.cpp's tools dir, the same steps done here.
    """
    if gguf_package_installed():
        import torch
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                      torch_dtype=torch.float32)
        return parsed["tensors"]
    log.info("gguf is not installed as a package: reading %s with gguf-py directly", path.name)
    return read_gguf_with_gguf_py(path, model)


@dataclass
class DequantCheck:
    """How far the dequantized weights are from 2A's: the error the adapter is there to absorb."""

    tensors: int  # parameters filled from the GGUF
    elements: int
    rel_error: dict[str, float]  # per parameter: ||W_gguf - W_2A|| / ||W_2A||
    rel_error_total: float  # over all parameters at once

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error.values())

    @property
    def exact(self) -> int:
        """Parameters stored unquantized (norms are kept f32 by llama.cpp)."""
        return sum(1 for e in self.rel_error.values() if e == 0.0)

    def summary(self) -> dict[str, float]:
        return {"dequant_tensors": float(self.tensors), "dequant_exact_tensors": float(self.exact),
                "dequant_rel_error_total": self.rel_error_total, "dequant_rel_error_max": self.max_rel_error}


def load_dequantized(model: Any, tensors: dict[str, torch.Tensor], max_rel_error: float,
                     where: str) -> DequantCheck:
    """Overwrite every parameter of `model` (which holds 2A's weights) with its dequantized tensor.

    Raises if any parameter has no tensor (it would keep full-precision weights and hide the
    quantization error), if a shape differs, if a tensor is further than max_rel_error from the
    original (a mapping bug), or if nothing differs at all (the file was not quantized).
    """
    import torch

    params = dict(model.named_parameters())  # tied weights appear once
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"{where}: {len(missing)} of {len(params)} model parameters have no tensor in the "
                         f"GGUF, e.g. {missing[:3]}; the file does not match 2A's model")
    errors: dict[str, float] = {}
    diff_sq = ref_sq = 0.0
    n = 0
    with torch.no_grad():
        for name, p in params.items():
            w = tensors[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"{where}: tensor for {name} has shape {tuple(w.shape)}, the model's "
                                 f"parameter {tuple(p.shape)}")
            # compared in the dtype the model trains in (bf16 on CUDA): the error as training sees it
            w = w.to(device=p.device, dtype=p.dtype)
            d = float((w.float() - p.float()).pow(2).sum())
            r = float(p.float().pow(2).sum())
            errors[name] = (d / r) ** 0.5 if r > 0 else (0.0 if d == 0 else float("inf"))
            diff_sq, ref_sq, n = diff_sq + d, ref_sq + r, n + p.numel()
            p.copy_(w)
    check = DequantCheck(tensors=len(params), elements=n, rel_error=errors,
                         rel_error_total=(diff_sq / ref_sq) ** 0.5 if ref_sq else 0.0)
    bad = {k: v for k, v in errors.items() if v > max_rel_error}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1])[:3]
        raise ValueError(f"{where}: {len(bad)} dequantized tensor(s) are far from 2A's weights (relative "
                         f"error > recovery.max_dequant_rel_error={max_rel_error}), e.g. "
                         f"{[(k, round(v, 3)) for k, v in worst]}: a name or q/k layout mismatch")
    if check.rel_error_total == 0.0:
        raise ValueError(f"{where}: the GGUF's weights equal 2A's exactly: it is not quantized, there is "
                         "no quantization error to recover")
    return check


def dequantize_into(model: Any, gguf_path: Path, max_rel_error: float) -> DequantCheck:
    """Replace the weights of `model` (2A's, loaded from its folder) by the GGUF's dequantized ones."""
    tensors = read_gguf_tensors(gguf_path, model)
    check = load_dequantized(model, tensors, max_rel_error, str(gguf_path))
    log.info("dequantized %d tensors from %s: relative error %.4f overall, %.4f max, %d stored exactly",
             check.tensors, gguf_path.name, check.rel_error_total, check.max_rel_error, check.exact)
    return check


# ---- 2. data ---------------------------------------------------------------------------------

@dataclass
class TrainingMix:
    rows: list[dict[str, Any]]
    hardest: int  # distinct hardest rows
    hardest_repeat: int
    train: int  # train.jsonl rows


def training_mix(hardest_path: Path, train_path: Path, cfg: RecoveryConfig) -> TrainingMix:
    """1B's hardest rows, each cfg.hardest_repeat times, then the first cfg.train_rows train rows.

    The train rows keep the adapter a general correction of quantization error rather than a
    memory of the failures; batch_stream shuffles the mix each epoch.
    """
    if not hardest_path.is_file():
        raise DataError(f"{hardest_path}: 1B's hardest examples (hardest.jsonl) are missing; "
                        "2E trains on them: rerun 1B")
    hardest = read_jsonl(hardest_path)  # a bad row raises DataError naming file:line and field
    if not hardest:
        log.warning("%s is empty (1B found no failures): training on train rows only", hardest_path)
    train = read_jsonl(train_path)[:cfg.train_rows]
    rows = [r for r in hardest for _ in range(cfg.hardest_repeat)] + train
    if not rows:
        raise DataError(f"{hardest_path} is empty and recovery.train_rows=0: no rows to train on")
    return TrainingMix(rows=rows, hardest=len(hardest), hardest_repeat=cfg.hardest_repeat, train=len(train))


# ---- 3. train --------------------------------------------------------------------------------

@dataclass
class RecoveryOutcome:
    state: LoopState
    resumed_from: int  # 0 when the run started fresh
    trainable_params: int
    dev_loss_start: float  # the dequantized model before training (LoRA B = 0)


def add_lora(model: Any, cfg: RecoveryConfig) -> Any:
    from peft import get_peft_model

    from forge.train.qlora_config import build_lora_config
    from forge.train.qlora_trainer import seed_everything

    seed_everything(cfg.seed)  # the LoRA A init: the same for a fresh run and a resumed one
    return get_peft_model(model, build_lora_config(cfg))


def train_recovery(ctx: JobContext, model: Any, train_ex: list[Example], dev_ex: list[Example], pad_id: int,
                   cfg: RecoveryConfig, device: str, amp: Any = None) -> RecoveryOutcome:
    """Train (or resume) a LoRA on `model` (peft-wrapped) with 1A's loop; checkpoints go through ctx."""
    from forge.train import qlora_trainer as qt

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = qt.make_optimizer(trainable, cfg, device)
    scheduler = qt.make_scheduler(optimizer, cfg)
    dev_batches = qt.fixed_batches(dev_ex, cfg.batch_size, pad_id, cfg.eval_batches)
    dev_loss_start = qt.evaluate_loss(model, dev_batches, device, amp)

    state = qt.resume_state(ctx, model, optimizer, scheduler)
    resumed_from = state.step

    log.info("recovery LoRA: %d trainable params, %d examples, steps %d -> %d (dev loss %.4f at start)",
             sum(p.numel() for p in trainable), len(train_ex), state.step, cfg.max_steps, dev_loss_start)
    state = qt.train_loop(
        model, qt.batch_stream(train_ex, cfg.batch_size, cfg.seed, pad_id, state.epoch, state.index),
        lambda: qt.evaluate_loss(model, dev_batches, device, amp),
        optimizer, scheduler, cfg, device, amp,
        state=state, on_checkpoint=qt.checkpoint_saver(ctx, model, optimizer, scheduler),
        on_log=qt.metrics_logger(ctx),
    )
    return RecoveryOutcome(state, resumed_from, sum(p.numel() for p in trainable), dev_loss_start)


# ---- 4. outputs ------------------------------------------------------------------------------

def export_adapter(model: Any, peft_dir: Path, base_model_dir: Path, out_file: Path, outtype: str,
                   base: str) -> Path:
    """The peft adapter folder (naming `base` as its base model), then llama.cpp's GGUF LoRA converted
    from it (base config from 2A)."""
    from forge.compress.llama_cpp_tools import convert_lora_to_gguf
    from forge.train.qlora_trainer import save_adapter

    save_adapter(model, peft_dir, base)
    return convert_lora_to_gguf(peft_dir, base_model_dir, out_file, outtype)


def plot_recovery(history: list[dict[str, float]], dev_loss_fp: float, dev_loss_start: float,
                  path: Path) -> None:
    """Train and dev loss per step, against the dev loss of 2A's full-precision weights (the target)
    and of the dequantized weights before training."""
    from forge.train.qlora_trainer import plot_losses

    plot_losses(history, path, title="2E recovery LoRA", train_label="train loss (mix)",
                dev_label="dev loss, dequantized GGUF + LoRA", dev_start=dev_loss_start,
                reference=("dev loss, 2A full precision", dev_loss_fp))


# ---- 5. evaluate -----------------------------------------------------------------------------

@dataclass
class BeforeAfter:
    before: dict[str, float]  # base GGUF alone
    after: dict[str, float]  # base GGUF + adapter
    changed_ids: list[str] = field(default_factory=list)  # dev rows whose greedy output changed
    n: int = 0
    seconds: float = 0.0

    @property
    def changed_frac(self) -> float:
        return len(self.changed_ids) / self.n if self.n else 0.0

    def quality(self) -> dict[str, float]:
        """After's numbers, plus <metric>_before and delta_<metric> for acc and logprob."""
        from forge.ledger import with_deltas

        return {**with_deltas(self.after, self.before), "changed_frac": self.changed_frac}


def compare_reports(before: EvalReport, after: EvalReport) -> BeforeAfter:
    outs = {r["id"]: r["output"] for r in before.records}
    changed = [r["id"] for r in after.records if outs.get(r["id"]) != r["output"]]
    return BeforeAfter(before.summary(), after.summary(), changed, len(after.records),
                       before.seconds + after.seconds)


def evaluate_before_after(gguf_path: Path, adapter_path: Path, tokenizer_dir: Path,
                          rows: list[dict[str, Any]], ctx: JobContext, out_dir: Path) -> BeforeAfter:
    """Dev eval with llama.cpp: base GGUF alone, then with the GGUF LoRA applied."""
    from forge.evaluate.llama_cpp_backend import evaluate_gguf

    ecfg, gcfg = ctx.config.eval, ctx.config.gguf
    before = evaluate_gguf(gguf_path, tokenizer_dir, rows, ecfg, gcfg)
    after = evaluate_gguf(gguf_path, tokenizer_dir, rows, ecfg, gcfg, lora_path=adapter_path)
    before.to_jsonl(out_dir / "dev_eval_before.jsonl")
    after.to_jsonl(out_dir / "dev_eval.jsonl")
    return compare_reports(before, after)


# ---- 6. the job ------------------------------------------------------------------------------

def run(ctx: JobContext) -> JobResult:
    import torch

    from forge.modeling import compute_dtype, load_model, load_tokenizer, pick_device
    from forge.runner import JobResult, input_file
    from forge.train import qlora_trainer as qt

    cfg: RecoveryConfig = ctx.config.recovery
    model_dir = ctx.input_dir("2A")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"2E needs 2A's pruned model at {model_dir} (config.json missing)")
    gguf_path = input_file(ctx, "2C", "gguf").path  # 2C's quantized GGUF, named by its manifest
    tokenizer_dir = ctx.input_dir("2C")
    device = pick_device(cfg.device)
    amp = compute_dtype(device) if device == "cuda" else None
    if device == "cuda":
        qt.configure_cuda()

    data_dir = ctx.input_dir("prep_data")
    mix = training_mix(ctx.input_dir("1B") / "hardest.jsonl", data_dir / "train.jsonl", cfg)
    dev_rows = read_jsonl(data_dir / "dev.jsonl")
    tokenizer = load_tokenizer(model_dir)
    train_ex = qt.tokenize_rows(tokenizer, mix.rows, cfg.max_seq_len,
                                "1B/hardest.jsonl + prep_data/train.jsonl")
    dev_ex = qt.tokenize_rows(tokenizer, dev_rows, cfg.max_seq_len, "prep_data/dev.jsonl")
    pad = tokenizer.pad_token_id

    # 2A's weights first: their dev loss is what the adapter tries to get back to, and the
    # dequantized tensors are checked against them in place
    model = load_model(str(model_dir), device, dtype=compute_dtype(device))
    dev_loss_fp = qt.evaluate_loss(model, qt.fixed_batches(dev_ex, cfg.batch_size, pad, cfg.eval_batches),
                                   device, amp)
    check = dequantize_into(model, gguf_path, cfg.max_dequant_rel_error)
    model = add_lora(model, cfg)
    trained = train_recovery(ctx, model, train_ex, dev_ex, pad, cfg, device, amp)
    state = trained.state

    out = ctx.out_dir
    adapter_gguf = export_adapter(model, out / "adapter", model_dir, out / "adapter.gguf",
                                  cfg.adapter_outtype, qt.base_name("2A", str(model_dir)))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    write_jsonl(out / "train_log.jsonl", qt.committed_history(state.history))
    plot_recovery(state.history, dev_loss_fp, trained.dev_loss_start, out / "loss_curve.png")
    ctx.log_artifact(out / "loss_curve.png")

    log.info("evaluating the GGUF on %d dev rows without and with the adapter (llama.cpp)", len(dev_rows))
    ba = evaluate_before_after(gguf_path, adapter_gguf, tokenizer_dir, dev_rows, ctx, out)
    adapter_bytes = adapter_gguf.stat().st_size
    peft_bytes = sum(f.stat().st_size for f in (out / "adapter").iterdir() if f.is_file())
    quality = ba.quality()
    quality["adapter_mb"] = adapter_bytes / 1e6

    losses = {"dev_loss_fp": dev_loss_fp, "dev_loss_quantized": trained.dev_loss_start,
              "dev_loss_recovered": state.last("eval_loss")}
    report = {"config": cfg.model_dump(mode="json"), "gguf": gguf_path.name, "device": device,
              "dequant": {**asdict(check), "rel_error_max": check.max_rel_error,
                          "exact_tensors": check.exact},
              "mix": {"rows": len(mix.rows), "hardest": mix.hardest, "hardest_repeat": mix.hardest_repeat,
                      "train": mix.train},
              "losses": losses, "steps": state.step, "resumed_from_step": trained.resumed_from,
              "trainable_params": trained.trainable_params,
              "adapter_bytes": adapter_bytes, "peft_adapter_bytes": peft_bytes,
              "before": ba.before, "after": ba.after, "changed_ids": ba.changed_ids,
              "changed_frac": ba.changed_frac}  # wall-clock times are metrics only: same bytes on a re-run
    report_path = out / "recovery_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    ctx.log_artifact(report_path)

    metrics = {**check.summary(), **losses, "steps": state.step, "resumed_from_step": trained.resumed_from,
               "train_seconds": state.train_seconds, "train_loss": state.last("loss"),
               "trainable_params": trained.trainable_params, "adapter_bytes": adapter_bytes,
               "mix_rows": len(mix.rows), "mix_hardest": mix.hardest, "eval_seconds": ba.seconds}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    nan = float("nan")
    notes = (f"LoRA r={cfg.lora_r} on the dequantized {gguf_path.name} ({check.rel_error_total:.3f} "
             f"rel. weight error), {state.step} steps on {mix.hardest} hardest x{mix.hardest_repeat} + "
             f"{mix.train} train rows ({device}); dev acc {quality.get('acc_before', nan):.3f} -> "
             f"{quality.get('acc', nan):.3f}, logprob {quality.get('logprob_before', nan):.3f} -> "
             f"{quality.get('logprob', nan):.3f}; {ba.changed_frac:.0%} of outputs changed; "
             f"adapter {adapter_bytes / 1e6:.2f} MB")
    if trained.resumed_from:
        notes += f"; resumed from checkpoint at step {trained.resumed_from}"
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"adapter": adapter_gguf.name, "peft_dir": "adapter", "base_gguf": gguf_path.name,
                           "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "device": device})

