"""15A: distil the domain adapters into one shared adapter + a small head per domain.

Weight-space distillation, per LoRA target module: each domain's delta dW_d = scale_d * B_d A_d. The shared
adapter is the best rank-`shared_rank` approximation (SVD) of the mean delta; each domain's head is the best
rank-`head_rank` approximation of what its delta keeps beyond that. A domain is then served by
shared + head (a LoRA of rank shared_rank + head_rank), instead of its own adapter.

Reported per domain: the relative reconstruction error of the deltas, and the quality kept: accuracy and
reference log-prob on A's held-out rows with the original adapter vs shared + head (2A's model, HF). And the
size saved: the shared adapter + every head against all the domain adapters, in parameters and bytes.

Output: shared/ (peft adapter), heads/<domain>/ (peft adapters, rank head_rank), backbone_report.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.runner import JobContext, JobResult, PhaseSkipped

if TYPE_CHECKING:
    import torch

log = logging.getLogger("forge.modifiers")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def load_deltas(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(peft config, {module prefix: dW = scale * B @ A}) of a peft LoRA adapter folder."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    tensors = load_file(str(adapter_dir / WEIGHTS))
    scale = cfg["lora_alpha"] / cfg["r"]
    deltas = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            prefix = key[: -len("lora_A.weight")]
            b = tensors[prefix + "lora_B.weight"]
            deltas[prefix] = scale * b.float() @ a.float()
    if not deltas:
        raise ValueError(f"{adapter_dir}/{WEIGHTS}: no lora_A/lora_B pairs")
    return cfg, deltas


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with B @ A the best rank-r approximation of delta."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()


def save_lora(dest: Path, base_cfg: dict[str, Any], factors: dict[str, tuple[Any, Any]]) -> int:
    """A peft LoRA folder (scale 1: alpha = r) from {prefix: (B, A)}; returns its parameter count."""
    from safetensors.torch import save_file

    rank = next(iter(factors.values()))[0].shape[1]
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, (b, a) in factors.items():
        tensors[prefix + "lora_B.weight"], tensors[prefix + "lora_A.weight"] = b.contiguous(), a.contiguous()
    save_file(tensors, str(dest / WEIGHTS))
    cfg = {**base_cfg, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}
    (dest / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() for t in tensors.values())


def distil(
    adapters: dict[str, Path], shared_rank: int, head_rank: int, out: Path, work: Path
) -> dict[str, Any]:
    """shared/ + heads/<domain>/ into out, shared+head adapters per domain into work/combined/<domain>;
    returns the size and reconstruction figures."""
    import torch

    loaded = {d: load_deltas(p) for d, p in adapters.items()}
    cfgs = {d: c for d, (c, _) in loaded.items()}
    deltas = {d: x for d, (_, x) in loaded.items()}
    first = next(iter(deltas.values()))
    for d, x in deltas.items():
        if x.keys() != first.keys() or any(x[k].shape != first[k].shape for k in x):
            raise ValueError(
                f"15A: the {d} adapter targets other modules or shapes than "
                f"{next(iter(deltas))}'s: adapters of one base model only"
            )
    base_cfg = next(iter(cfgs.values()))
    shared = {k: low_rank(torch.stack([x[k] for x in deltas.values()]).mean(0), shared_rank) for k in first}
    shared_params = save_lora(out / "shared", base_cfg, shared)
    figures: dict[str, Any] = {"domains": {}, "shared_params": shared_params}
    for d, x in deltas.items():
        heads = {k: low_rank(x[k] - shared[k][0] @ shared[k][1], head_rank) for k in x}
        head_params = save_lora(out / "heads" / d, base_cfg, heads)
        combined = {
            k: (torch.cat([shared[k][0], heads[k][0]], 1), torch.cat([shared[k][1], heads[k][1]], 0))
            for k in x
        }
        save_lora(work / "combined" / d, base_cfg, combined)
        err = sum(float((x[k] - combined[k][0] @ combined[k][1]).norm() ** 2) for k in x)
        norm = sum(float(x[k].norm() ** 2) for k in x)
        own = sum(t.numel() for t in _factors(adapters[d]))
        figures["domains"][d] = {
            "own_params": own,
            "head_params": head_params,
            "original_rank": cfgs[d]["r"],
            "relative_error": (err / norm) ** 0.5 if norm else 0.0,
        }
    own_total = sum(v["own_params"] for v in figures["domains"].values())
    kept_total = shared_params + sum(v["head_params"] for v in figures["domains"].values())
    figures.update(
        own_params=own_total,
        backbone_params=kept_total,
        params_saved=1 - kept_total / own_total,
        own_bytes=sum((p / WEIGHTS).stat().st_size for p in adapters.values()),
        backbone_bytes=sum(f.stat().st_size for f in out.rglob(WEIGHTS)),
    )
    figures["bytes_saved"] = 1 - figures["backbone_bytes"] / figures["own_bytes"]
    return figures


def _factors(adapter_dir: Path) -> list[Any]:
    from safetensors.torch import load_file

    return [t for k, t in load_file(str(adapter_dir / WEIGHTS)).items() if ".lora_" in k]


def evaluate_adapter(model_dir: Path, adapter_dir: Path, rows: list[dict[str, Any]], ctx: JobContext) -> Any:
    from peft import PeftModel

    from forge.evaluate.harness import evaluate
    from forge.modeling import compute_dtype, load_model, load_tokenizer, pick_device

    device = pick_device("auto")
    model = load_model(str(model_dir), device, dtype=compute_dtype(device))
    return evaluate(
        PeftModel.from_pretrained(model, str(adapter_dir)),
        load_tokenizer(model_dir),
        rows,
        ctx.config.eval,
        device,
    )


def run(ctx: JobContext) -> JobResult:
    from forge.data.records import read_jsonl
    from forge.phases import modifier_phase_id
    from forge.runner import input_file

    cfg, bb = ctx.config, ctx.config.backbone
    domains = [
        d
        for d in cfg.modifiers.enabled
        if not ctx.input_skipped(modifier_phase_id(cfg.modifiers.domains[d], "H"))
    ]
    if reason := bb.skip_reason(len(domains)):
        raise PhaseSkipped(reason)
    if not domains:
        raise PhaseSkipped("no modifier adapter in this run (every H skipped): nothing to share")
    h_ids = {d: modifier_phase_id(cfg.modifiers.domains[d], "H") for d in domains}
    from forge.modifiers.evaluation import ADAPTER_DIR  # H ships G's peft adapter in this folder

    adapters = {d: ctx.input_dir(h) / ADAPTER_DIR for d, h in h_ids.items()}
    figures = distil(adapters, bb.shared_rank, bb.head_rank, ctx.out_dir, ctx.work_dir)
    model_dir = ctx.input_dir("2A")
    for d in domains:
        rows = read_jsonl(input_file(ctx, modifier_phase_id(cfg.modifiers.domains[d], "A"), "heldout").path)
        rows = rows[: bb.eval_rows] if bb.eval_rows else rows
        log.info("15A: %s: original adapter vs shared + head on %d held-out rows", d, len(rows))
        own = evaluate_adapter(model_dir, adapters[d], rows, ctx).summary()
        both = evaluate_adapter(model_dir, ctx.work_dir / "combined" / d, rows, ctx).summary()
        f = figures["domains"][d]
        f.update(
            rows=len(rows),
            acc_own=own["acc"],
            acc_backbone=both["acc"],
            acc_kept=both["acc"] / own["acc"] if own["acc"] else None,
            logprob_own=own["logprob"],
            logprob_backbone=both["logprob"],
            logprob_change=both["logprob"] - own["logprob"],
        )
    report = {
        "shared_rank": bb.shared_rank,
        "head_rank": bb.head_rank,
        "forced": len(domains) < bb.min_domains,
        **figures,
    }
    (ctx.out_dir / "backbone_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    per = "; ".join(
        f"{d}: acc {v['acc_own']:.3f} -> {v['acc_backbone']:.3f}, log-prob {v['logprob_change']:+.3f}, "
        f"delta error {v['relative_error']:.1%}"
        for d, v in figures["domains"].items()
    )
    return JobResult(
        metrics={
            "params_saved": figures["params_saved"],
            "bytes_saved": figures["bytes_saved"],
            **{
                f"acc_kept.{d}": v["acc_kept"]
                for d, v in figures["domains"].items()
                if v["acc_kept"] is not None
            },
            **{f"relative_error.{d}": v["relative_error"] for d, v in figures["domains"].items()},
        },
        quality={
            "params_saved": figures["params_saved"],
            **{f"acc.{d}": v["acc_backbone"] for d, v in figures["domains"].items()},
        },
        notes=(
            f"{len(domains)} domain adapters ({figures['own_params']:,} params) -> shared "
            f"r={bb.shared_rank} + "
            f"heads r={bb.head_rank} ({figures['backbone_params']:,} params, {figures['params_saved']:.1%} "
            f"saved, {figures['bytes_saved']:.1%} of bytes); {per}"
            + ("; forced below backbone.min_domains" if report["forced"] else "")
        ),
        info={"report": "backbone_report.json", "shared": "shared", "heads": "heads"},
    )
