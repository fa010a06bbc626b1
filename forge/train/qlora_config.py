"""What 1A derives from `forge.config.TrainConfig`: the device, the quantization, the autocast
dtype and the peft LoraConfig. The fields themselves live in TrainConfig; nothing is repeated here.

    setup = resolve_setup(cfg.train)      # QLoRASetup(device="cuda", quantization="nf4", ...)
    lora = build_lora_config(cfg.train)   # peft.LoraConfig(task_type="CAUSAL_LM", ...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from forge.config import TrainConfig


@dataclass(frozen=True)
class QLoRASetup:
    """The resolved run-time choices of one training run (JSON-able: it lands in the manifest)."""

    device: str  # "cuda" or "cpu"
    quantization: str  # "nf4" (bitsandbytes 4-bit base) or "none" (full-precision base)
    autocast_dtype: str | None  # "bfloat16"/"float16" on CUDA; None = no autocast (CPU runs in fp32)

    @property
    def four_bit(self) -> bool:
        return self.quantization == "nf4"

    def torch_autocast_dtype(self) -> Any:
        import torch

        return getattr(torch, self.autocast_dtype) if self.autocast_dtype else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_quantization(cfg: TrainConfig, device: str) -> str:
    """'auto' = NF4 on CUDA (QLoRA proper), none on CPU (bitsandbytes' CPU path is slow)."""
    if cfg.quantization == "auto":
        return "nf4" if device == "cuda" else "none"
    return cfg.quantization


def resolve_setup(cfg: TrainConfig) -> QLoRASetup:
    from forge.modeling import compute_dtype, pick_device

    device = pick_device(cfg.device)
    dtype = compute_dtype(device) if device == "cuda" else None
    return QLoRASetup(
        device=device,
        quantization=resolve_quantization(cfg, device),
        autocast_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


def build_lora_config(cfg: TrainConfig) -> Any:
    """peft.LoraConfig for a causal LM. "all-linear" = every Linear but the output head (peft's rule)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules),
        bias="none",
    )
