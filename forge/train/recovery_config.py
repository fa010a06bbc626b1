"""2E: recovery LoRA settings (the `recovery` section of the pipeline config).

A LoRA trained on top of the *dequantized* GGUF weights (so it learns to undo quantization error),
on 1B's hardest examples mixed with ordinary train rows. Cheap to import (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config_base import Strict


class RecoveryConfig(Strict):
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # AdamW, as in 1A
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(256, ge=8)
    # rows of train.jsonl mixed with 1B's hardest examples, so the adapter fixes quantization
    # error in general and does not only memorise the failures
    train_rows: int = Field(200, ge=0)
    hardest_repeat: int = Field(2, ge=1)  # hardest examples appear this many times in the mix
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the GGUF LoRA's tensor type (convert_lora_to_gguf --outtype); the adapter is small either way
    adapter_outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    # a dequantized tensor further than this (relative L2) from 2A's weight is a mapping bug (a wrong
    # name or q/k permutation gives ~1.4), not quantization error (Q5_K ~0.03, Q4_K ~0.06)
    max_dequant_rel_error: float = Field(0.25, gt=0)
