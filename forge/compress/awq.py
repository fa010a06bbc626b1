"""2B: AWQ 4-bit weight quantization of 2A's pruned model with llm-compressor -> compressed-tensors.

The recipe is llm-compressor's AWQModifier (activation-aware per-channel scales, smoothed into the
preceding norms/linears) followed by a QuantizationModifier (W4A16: int4 symmetric weights, one
scale per group of `group_size` inputs, lm_head left in full precision). The output is a
`pack-quantized` compressed-tensors checkpoint: transformers loads it with compressed-tensors
installed, vLLM serves it. AutoAWQ is not used: it is deprecated in favour of exactly this.

Read top to bottom: 1. calibration data  2. the CPU pin_memory guard  3. recipe + oneshot
4. output checks  5. the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.compress.awq_config import AWQConfig
from forge.data.records import read_jsonl

if TYPE_CHECKING:
    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.compress")


# ---- 1. calibration data ---------------------------------------------------------------------

def calibration_dataset(tokenizer: Any, rows: list[dict[str, Any]], n_samples: int, max_seq_len: int,
                        where: str) -> Any:
    """The first n_samples rows, each the whole conversation rendered with the chat template and
    tokenized (truncated to max_seq_len), as the pre-tokenized datasets.Dataset oneshot accepts."""
    from datasets import Dataset

    from forge.train.qlora_trainer import tokenize_rows

    examples = tokenize_rows(tokenizer, rows[:n_samples], max_seq_len, where)
    ids = [ex["input_ids"] for ex in examples]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


# ---- 2. the CPU pin_memory guard -------------------------------------------------------------

@contextlib.contextmanager
def cpu_pin_memory_guard() -> Iterator[bool]:
    """While oneshot runs with no accelerator, make llm-compressor's cache pinning a no-op.

    AWQModifier pins each cached batch before its scale grid search
    (`IntermediatesCache.pin_memory`, llmcompressor/pipelines/cache.py, called from
    modifiers/transform/awq/base.py), only to speed up later host-to-device copies; without an
    accelerator torch refuses ("Cannot access accelerator device when none is available").
    Pinning changes no values, so skipping it is exact. The patch covers that one method, only on
    machines without an accelerator, only inside this block; yields whether it was applied.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


# ---- 3. recipe + oneshot ---------------------------------------------------------------------

def build_recipe(cfg: AWQConfig) -> list[Any]:
    """[AWQModifier, QuantizationModifier] for cfg.scheme with cfg.group_size as the group width."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    scheme = preset_name_to_scheme(cfg.scheme, list(cfg.targets))
    scheme.weights.group_size = cfg.group_size
    return [AWQModifier(n_grid=cfg.n_grid, duo_scaling=cfg.duo_scaling),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(cfg.ignore))]


def check_group_widths(model: Any, group_size: int) -> None:
    """Every Linear that will be quantized needs an input width divisible by the group size."""
    import torch

    bad = [f"{name} (in_features={m.in_features})" for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head") and m.in_features % group_size]
    if bad:
        raise ValueError(f"awq.group_size={group_size} does not divide the input width of {len(bad)} "
                         f"Linear layer(s), e.g. {bad[:3]}; prune to a multiple of it in 2A "
                         f"(pruning.multiple_of) or lower awq.group_size")


@dataclass
class QuantOutcome:
    seconds: float
    calib_samples: int
    calib_tokens: int
    pin_guard: bool  # whether the CPU pin_memory guard was needed


def quantize(model: Any, tokenizer: Any, dataset: Any, cfg: AWQConfig) -> QuantOutcome:
    """Run AWQ + W4A16 oneshot on `model` in place (llm-compressor uses the accelerator when present)."""
    from llmcompressor import oneshot

    check_group_widths(model, cfg.group_size)
    tokens = sum(len(x) for x in dataset["input_ids"])
    t0 = time.perf_counter()
    with cpu_pin_memory_guard() as guarded:
        oneshot(model=model, tokenizer=tokenizer, recipe=build_recipe(cfg), dataset=dataset,
                num_calibration_samples=len(dataset), max_seq_length=cfg.max_seq_len,
                pipeline=cfg.pipeline, shuffle_calibration_samples=False)
    return QuantOutcome(seconds=time.perf_counter() - t0, calib_samples=len(dataset), calib_tokens=tokens,
                        pin_guard=guarded)


def save_compressed(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """compressed-tensors pack-quantized checkpoint + tokenizer (with its chat template)."""
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


# ---- 4. output checks ------------------------------------------------------------------------

def read_quant_config(model_dir: Path) -> dict[str, Any]:
    """The saved quantization_config; raises if the folder is not a compressed-tensors checkpoint."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not cfg or cfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{model_dir}/config.json has no compressed-tensors quantization_config")
    return cfg


def weight_bits(qcfg: dict[str, Any]) -> int:
    bits = {g["weights"]["num_bits"] for g in qcfg["config_groups"].values() if g.get("weights")}
    if len(bits) != 1:
        raise ValueError(f"expected one weight bit width in quantization_config, got {sorted(bits)}")
    return bits.pop()


def load_check(model_dir: Path) -> dict[str, int]:
    """Load the checkpoint back with AutoModelForCausalLM (proof that it loads). transformers keeps the
    linears compressed in memory (int32-packed weights + scales, decompressed in forward); returns the
    count of such layers and of stored tensor elements."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    packed = [name for name, m in model.named_modules() if "weight_packed" in m._parameters]
    if not packed:
        raise ValueError(f"{model_dir} loaded without any packed-quantized layer")
    stored = sum(p.numel() for p in model.parameters())
    del model
    return {"packed_linears": len(packed), "stored_elements": stored}


# ---- 5. the job ------------------------------------------------------------------------------

def run(ctx: JobContext) -> JobResult:
    import torch

    from forge.compress.pruning import dir_mb
    from forge.evaluate.harness import evaluate_ref
    from forge.ledger import with_deltas
    from forge.modeling import load_tokenizer, pick_device
    from forge.runner import JobResult
    from forge.train.qlora_trainer import seed_everything

    cfg: AWQConfig = ctx.config.awq
    src = ctx.input_dir("2A")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"2B needs 2A's pruned model at {src} (config.json missing)")
    device = pick_device(cfg.device)
    if device == "cpu" and torch.accelerator.is_available():
        raise ValueError("awq.device='cpu' but an accelerator is visible and llm-compressor always uses "
                         "it; hide it (CUDA_VISIBLE_DEVICES='') or set awq.device to auto")
    data_dir = ctx.input_dir("prep_data")
    train_rows, dev_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "dev.jsonl")

    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(src)
    dataset = calibration_dataset(tokenizer, train_rows, cfg.calib_samples, cfg.max_seq_len,
                                  "prep_data/train.jsonl")
    from transformers import AutoModelForCausalLM

    # 16-bit weights on an accelerator (llm-compressor onloads layer by layer); fp32 on CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    log.info("AWQ %s g%d on %d calibration rows (%s)", cfg.scheme, cfg.group_size, len(dataset), device)
    outcome = quantize(model, tokenizer, dataset, cfg)
    out = ctx.out_dir
    save_compressed(model, tokenizer, out)
    del model

    qcfg = read_quant_config(out)
    bits = weight_bits(qcfg)
    reload = load_check(out)
    log.info("evaluating the AWQ model on %d dev rows", len(dev_rows))
    report = evaluate_ref(str(out), dev_rows, ctx.config.eval, device)
    report.to_jsonl(out / "dev_eval.jsonl")
    after = report.summary()

    size_mb, size_before = dir_mb(out), dir_mb(src)
    prev = ctx.input_info("2A").get("quality", {}) or {}
    quality = with_deltas(after, prev)  # vs the previous step's ledger row, same dev suite
    quality.update(size_mb=size_mb, size_mb_before=size_before, bits=float(bits),
                   compression_ratio=size_before / size_mb if size_mb else float("nan"))

    awq_report = {"config": cfg.model_dump(mode="json"), "quantization_config": qcfg,
                  "calib_samples": outcome.calib_samples, "calib_tokens": outcome.calib_tokens,
                  "pin_guard": outcome.pin_guard, "params": params,  # seconds: a metric, not in the file
                  "reload": reload, "size_mb_before": size_before, "size_mb_after": size_mb,
                  "after": after, "before": prev}
    report_path = out / "awq_report.json"  # beside the model files: from_pretrained ignores it
    report_path.write_text(json.dumps(awq_report, indent=2))
    ctx.log_artifact(report_path)

    metrics = {"quantize_seconds": outcome.seconds, "calib_samples": outcome.calib_samples,
               "calib_tokens": outcome.calib_tokens, "size_mb_before": size_before, "size_mb_after": size_mb,
               "weight_bits": bits, "group_size": cfg.group_size, "params": params,
               "packed_linears": reload["packed_linears"]}
    notes = (f"AWQ {cfg.scheme} g{cfg.group_size} ({outcome.calib_samples} calib rows, "
             f"{outcome.seconds:.1f}s, {device}); {size_before:.2f} MB -> {size_mb:.2f} MB; dev acc "
             f"{quality.get('acc_before', float('nan')):.3f} -> {quality.get('acc', float('nan')):.3f}")
    return JobResult(metrics={k: float(v) for k, v in metrics.items()}, quality=quality, notes=notes,
                     info={"scheme": cfg.scheme, "group_size": cfg.group_size, "bits": bits,
                           "format": qcfg.get("format"), "device": device, "params": params})
