"""2A: structured width pruning of 1A's merged model -> a smaller *dense* HF checkpoint.

Minitron-style: each MLP channel is scored by the mean |activation| of its gate*up product (the
input of down_proj) over calibration tokens; every round drops the lowest-scoring channels of each
layer (the same count per layer, so the config keeps one `intermediate_size`), then fine-tunes
briefly (full fine-tune, AdamW) and re-scores. Optionally whole KV groups of attention go too.

Why a direct implementation and not torch-pruning (1.6.1, checked: a 70 kB pure-Python wheel,
installs cleanly): it prunes by tracing a dependency graph and handles Llama's MLP (and, with
`repeat_kv` index mapping, GQA heads), but (1) its importance criteria are weight-based
(magnitude / Taylor / Hessian): activation importance on our calibration data needs a custom
Importance class anyway; (2) it leaves the HF config alone, so intermediate_size / head counts must
be patched by hand for `from_pretrained` to load the result; (3) we need one uniform width per model
rounded to a quantization-friendly multiple, which means per-layer pruning with fixed counts, not
its global or ratio-based modes. What remains of it for us is slicing three Linear layers per
block: a few dozen lines below, with no graph tracing and no extra dependency.

Read top to bottom: 1. schedule (widths per round)  2. importance (forward hooks)
3. slicing  4. rounds (prune + fine-tune)  5. the job.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.compress.pruning_config import PruningConfig
from forge.data.records import read_jsonl

if TYPE_CHECKING:
    import torch

    from forge.runner import JobContext, JobResult
    from forge.train.qlora_trainer import Batch

log = logging.getLogger("forge.compress")


# ---- 1. schedule -----------------------------------------------------------------------------

def final_width(width: int, sparsity: float, multiple_of: int, where: str = "intermediate_size") -> int:
    """Width left after removing `sparsity` of `width`, rounded to the nearest multiple of multiple_of.

    Nearest rather than floor keeps the realised sparsity close to the target (768 x 0.35 = 269 -> 256;
    14336 x 0.35 = 5018 -> 5120). Never below one multiple, never above the largest multiple <= width.
    """
    if width < multiple_of:
        raise ValueError(f"{where}={width} is below pruning.multiple_of={multiple_of}: it cannot be "
                         f"pruned to a multiple of {multiple_of}; lower pruning.multiple_of")
    aligned = round(width * (1.0 - sparsity) / multiple_of) * multiple_of
    return min(max(multiple_of, aligned), (width // multiple_of) * multiple_of)


def round_widths(start: int, end: int, rounds: int) -> list[int]:
    """Width after each round: an equal share of the channels goes each round, the last lands on end."""
    return [start - round((start - end) * (r + 1) / rounds) for r in range(rounds)]


def final_kv_groups(n_kv: int, group_width: int, sparsity: float, multiple_of: int) -> int:
    """KV groups to keep: about (1 - sparsity) of them, with the query width (o_proj's input, which
    K-quants split in blocks) a multiple of multiple_of. The original count when nothing smaller fits."""
    want = max(1, round(n_kv * (1.0 - sparsity)))
    for g in range(want, n_kv + 1):
        if (g * group_width) % multiple_of == 0:
            return g
    return n_kv


# ---- 2. importance ---------------------------------------------------------------------------

def _layers(model: Any) -> list[Any]:
    try:
        return list(model.model.layers)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.layers: width pruning supports "
                         "Llama-style decoders (gate/up/down MLP, q/k/v/o attention)") from None


@dataclass
class Importance:
    mlp: list[torch.Tensor]  # per layer: [intermediate_size] mean |gate*up| over calibration tokens
    heads: list[torch.Tensor]  # per layer: [num_attention_heads] mean |attention output| per head
    tokens: int  # calibration tokens that were scored


def collect_importance(model: Any, batches: list[Batch], device: str,
                       autocast_dtype: Any = None) -> Importance:
    """Activation importance via forward pre-hooks on down_proj and o_proj; padding is not counted."""
    import torch

    from forge.train.qlora_trainer import autocast

    layers = _layers(model)
    head_dim = layers[0].self_attn.head_dim
    mlp_sum = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sum = [torch.zeros(layer.self_attn.o_proj.in_features // head_dim, dtype=torch.float64)
                for layer in layers]
    current: dict[str, torch.Tensor] = {}

    def hook(acc: list[torch.Tensor], i: int, per_head: bool):
        def pre(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().abs() * current["mask"]  # [batch, seq, width]
            s = x.sum(dim=(0, 1))
            if per_head:
                s = s.view(-1, head_dim).sum(dim=1)
            acc[i] += s.double().cpu()
        return pre

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(mlp_sum, i, False)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(head_sum, i, True)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with torch.no_grad():
            for b in batches:
                mask = b["attention_mask"].to(device)
                current["mask"] = mask.unsqueeze(-1).float()
                with autocast(device, autocast_dtype):
                    model(input_ids=b["input_ids"].to(device), attention_mask=mask)
                tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("calibration batches hold no tokens")
    return Importance(mlp=[(s / tokens).float() for s in mlp_sum],
                      heads=[(s / (tokens * head_dim)).float() for s in head_sum], tokens=tokens)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order (so kept channels stay in place)."""
    import torch

    return torch.sort(torch.topk(scores, keep).indices).values


# ---- 3. slicing ------------------------------------------------------------------------------

def slice_linear(linear: Any, index: torch.Tensor, dim: int) -> Any:
    """A new Linear holding only `index` of the output (dim=0) or input (dim=1) features."""
    import torch

    w = linear.weight.detach()
    index = index.to(w.device)
    weight = w.index_select(dim, index).clone()
    out_f, in_f = weight.shape
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:  # a bias belongs to the outputs: sliced only with them
            new.bias.copy_(linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def prune_mlp(model: Any, keep: list[torch.Tensor]) -> int:
    """Keep channels keep[i] of layer i's MLP (gate/up rows, down columns); returns the new width."""
    widths = {len(k) for k in keep}
    if len(widths) != 1:
        raise ValueError(f"every layer must keep the same number of MLP channels, got {sorted(widths)}")
    for layer, idx in zip(_layers(model), keep, strict=True):
        mlp = layer.mlp
        mlp.gate_proj = slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    width = widths.pop()
    model.config.intermediate_size = width
    return width


def prune_kv_groups(model: Any, keep: list[torch.Tensor]) -> int:
    """Keep KV groups keep[i] of layer i (each: one K/V head and the query heads sharing it)."""
    import torch

    counts = {len(k) for k in keep}
    if len(counts) != 1:
        raise ValueError(f"every layer must keep the same number of KV groups, got {sorted(counts)}")
    cfg = model.config
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, groups in zip(_layers(model), keep, strict=True):
        attn = layer.self_attn
        hd = attn.head_dim
        kv_idx = (groups[:, None] * hd + torch.arange(hd)).flatten()
        q_heads = (groups[:, None] * n_rep + torch.arange(n_rep)).flatten()
        q_idx = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
        attn.q_proj = slice_linear(attn.q_proj, q_idx, 0)
        attn.k_proj = slice_linear(attn.k_proj, kv_idx, 0)
        attn.v_proj = slice_linear(attn.v_proj, kv_idx, 0)
        attn.o_proj = slice_linear(attn.o_proj, q_idx, 1)
    g = counts.pop()
    # head_dim was implied by hidden_size / heads; pin it, or from_pretrained would recompute it
    cfg.head_dim = model.model.layers[0].self_attn.head_dim
    cfg.num_key_value_heads = g
    cfg.num_attention_heads = g * n_rep
    return g


def group_scores(head_scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    return head_scores.view(n_kv, -1).sum(dim=1)


# ---- 4. rounds -------------------------------------------------------------------------------

@dataclass
class RoundLog:
    round: int
    intermediate_size: int
    kv_groups: int
    params: int
    calib_tokens: int
    finetune_loss: float | None = None
    eval_loss: float | None = None
    seconds: float = 0.0


@dataclass
class PruneOutcome:
    rounds: list[RoundLog] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    eval_loss_before: float | None = None


def finetune_config(cfg: PruningConfig, steps: int) -> Any:
    """A TrainConfig for qlora_trainer.train_loop: the same loop, full fine-tune of the pruned model."""
    from forge.config import TrainConfig

    return TrainConfig(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_steps=steps,
                       warmup_steps=steps // 10, batch_size=cfg.batch_size, grad_accum=1,
                       max_seq_len=cfg.max_seq_len, eval_every=steps, checkpoint_every=steps,
                       log_every=max(1, steps // 5), grad_clip=cfg.grad_clip, seed=cfg.seed,
                       device=cfg.device, quantization="none")


def prune_gradually(model: Any, cfg: PruningConfig, calib: list[Batch], train_stream: Any,
                    dev_batches: list[Batch], device: str, autocast_dtype: Any = None,
                    on_round: Any = None) -> PruneOutcome:
    """Score, prune to this round's width, fine-tune; `cfg.rounds` times. Mutates `model`."""
    from forge.modeling import count_params
    from forge.train import qlora_trainer as qt

    c = model.config
    widths = round_widths(c.intermediate_size, final_width(c.intermediate_size, cfg.target_mlp_sparsity,
                                                           cfg.multiple_of), cfg.rounds)
    n_kv = c.num_key_value_heads
    head_dim = _layers(model)[0].self_attn.head_dim
    group_width = (c.num_attention_heads // n_kv) * head_dim
    kv_final = (final_kv_groups(n_kv, group_width, cfg.target_head_sparsity, cfg.multiple_of)
                if cfg.prune_heads else n_kv)
    if cfg.prune_heads and kv_final == n_kv:
        log.warning("prune_heads: no smaller KV group count keeps the query width a multiple of %d "
                    "(%d groups x %d); attention left whole", cfg.multiple_of, n_kv, group_width)
    groups = round_widths(n_kv, kv_final, cfg.rounds)
    out = PruneOutcome(params_before=count_params(model))
    if dev_batches:
        out.eval_loss_before = qt.evaluate_loss(model, dev_batches, device, autocast_dtype)
    log.info("pruning MLP %d -> %s, KV groups %d -> %s over %d rounds", c.intermediate_size, widths,
             n_kv, groups, cfg.rounds)
    for r, (width, g) in enumerate(zip(widths, groups, strict=True), start=1):
        t0 = time.perf_counter()
        imp = collect_importance(model, calib, device, autocast_dtype)
        if width < model.config.intermediate_size:
            prune_mlp(model, [keep_top(s, width) for s in imp.mlp])
        if g < model.config.num_key_value_heads:
            prune_kv_groups(model, [keep_top(group_scores(s, model.config.num_key_value_heads), g)
                                    for s in imp.heads])
        entry = RoundLog(round=r, intermediate_size=model.config.intermediate_size,
                         kv_groups=model.config.num_key_value_heads, params=count_params(model),
                         calib_tokens=imp.tokens)
        if cfg.finetune_steps_per_round > 0:
            tcfg = finetune_config(cfg, cfg.finetune_steps_per_round)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = qt.make_optimizer(params, tcfg, device)  # new params after slicing: new state
            scheduler = qt.make_scheduler(optimizer, tcfg)
            state = qt.train_loop(model, train_stream, None, optimizer, scheduler, tcfg, device,
                                  autocast_dtype)
            entry.finetune_loss = state.last("loss")
        if dev_batches:
            entry.eval_loss = qt.evaluate_loss(model, dev_batches, device, autocast_dtype)
        entry.seconds = time.perf_counter() - t0
        log.info("round %d/%d: intermediate %d, kv groups %d, %d params, eval loss %s (%.1fs)", r,
                 cfg.rounds, entry.intermediate_size, entry.kv_groups, entry.params, entry.eval_loss,
                 entry.seconds)
        out.rounds.append(entry)
        if on_round:
            on_round(entry)
    out.params_after = count_params(model)
    return out


# ---- 5. the job ------------------------------------------------------------------------------

def dir_mb(path: Path, suffix: str = ".safetensors") -> float:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}")) / 1e6


def round_record(entry: RoundLog) -> dict[str, Any]:
    """A round as the committed report keeps it: without its wall-clock seconds (a metric), so a re-run
    writes the same bytes."""
    return {k: v for k, v in asdict(entry).items() if k != "seconds"}


def run(ctx: JobContext) -> JobResult:
    import torch

    from forge.evaluate.harness import evaluate_ref
    from forge.ledger import with_deltas
    from forge.modeling import compute_dtype, load_model, load_tokenizer, pick_device
    from forge.runner import JobResult
    from forge.train import qlora_trainer as qt

    cfg: PruningConfig = ctx.config.pruning
    src = ctx.input_dir("1A") / "merged"
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"2A needs 1A's merged model at {src} (config.json missing)")
    device = pick_device(cfg.device)
    amp = compute_dtype(device) if device == "cuda" else None
    data_dir = ctx.input_dir("prep_data")
    train_rows, dev_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "dev.jsonl")

    tokenizer = load_tokenizer(src)
    pad = tokenizer.pad_token_id
    train_ex = qt.tokenize_rows(tokenizer, train_rows, cfg.max_seq_len, "prep_data/train.jsonl")
    dev_ex = qt.tokenize_rows(tokenizer, dev_rows, cfg.max_seq_len, "prep_data/dev.jsonl")
    calib = qt.fixed_batches(train_ex[:cfg.calib_samples], cfg.batch_size, pad, len(train_ex))
    dev_batches = qt.fixed_batches(dev_ex, cfg.batch_size, pad, len(dev_ex))

    qt.seed_everything(cfg.seed)
    # fp32 master weights for the full fine-tune (autocast on CUDA); saved in the usual dtype
    model = load_model(str(src), device, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)

    def log_round(e: RoundLog) -> None:
        ctx.log_metrics({k: float(v) for k, v in asdict(e).items() if v is not None and k != "round"},
                        step=e.round)

    t0 = time.perf_counter()
    outcome = prune_gradually(model, cfg, calib, qt.batch_stream(train_ex, cfg.batch_size, cfg.seed, pad),
                              dev_batches, device, amp, on_round=log_round)
    prune_seconds = time.perf_counter() - t0

    out = ctx.out_dir
    model.to(compute_dtype(device))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model

    log.info("evaluating the pruned model on %d dev rows", len(dev_rows))
    report = evaluate_ref(str(out), dev_rows, ctx.config.eval, device)
    report.to_jsonl(out / "dev_eval.jsonl")
    after = report.summary()

    # "before" is 1A's ledger row: the same model on the same dev split with the same eval config
    before = ctx.input_info("1A").get("quality", {}) or {}
    quality = with_deltas(after, before)
    size_mb, size_before = dir_mb(out), dir_mb(src)
    quality.update(params_before=float(outcome.params_before), params_after=float(outcome.params_after),
                   size_mb=size_mb)

    final = outcome.rounds[-1]
    pruned_frac = 1.0 - outcome.params_after / outcome.params_before
    prune_report = {"config": cfg.model_dump(mode="json"),
                    "rounds": [round_record(r) for r in outcome.rounds],
                    "params_before": outcome.params_before, "params_after": outcome.params_after,
                    "eval_loss_before": outcome.eval_loss_before, "before": before, "after": after,
                    "size_mb_before": size_before, "size_mb_after": size_mb}
    report_path = out / "prune_report.json"  # beside the model files: from_pretrained ignores it
    report_path.write_text(json.dumps(prune_report, indent=2))
    ctx.log_artifact(report_path)

    metrics = {"prune_seconds": prune_seconds, "params_before": outcome.params_before,
               "params_after": outcome.params_after, "params_removed_frac": pruned_frac,
               "size_mb_before": size_before, "size_mb_after": size_mb,
               "intermediate_size": final.intermediate_size, "kv_groups": final.kv_groups,
               "eval_loss_before": outcome.eval_loss_before, "eval_loss_after": final.eval_loss}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    notes = (f"MLP width -> {final.intermediate_size} ({cfg.rounds} rounds x "
             f"{cfg.finetune_steps_per_round} fine-tune steps, {device}); params "
             f"{outcome.params_before / 1e6:.2f}M -> {outcome.params_after / 1e6:.2f}M "
             f"(-{pruned_frac:.0%}); dev acc {quality.get('acc_before', float('nan')):.3f} -> "
             f"{quality.get('acc', float('nan')):.3f}")
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"intermediate_size": final.intermediate_size, "kv_groups": final.kv_groups,
                           "params": outcome.params_after, "device": device,
                           "rounds": [asdict(r) for r in outcome.rounds]})
