"""2C: GGUF export + llama.cpp quantization settings (the `gguf` section of the pipeline config).

Cheap to import (pydantic only): the phase registry and the DAG may read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config_base import Strict


class GGUFConfig(Strict):
    """llama.cpp's own converter (from the pinned llama-cpp-python sdist), then llama_model_quantize."""

    # the plan's Q5_K_M; K-quants want row widths in multiples of 256 (else llama.cpp falls back)
    quant_type: Literal["Q5_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "Q8_0", "F16"] = "Q5_K_M"
    # what convert_hf_to_gguf writes before quantizing (kept only in scratch)
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    # a locally trained BPE tokenizer is unknown to llama.cpp's pre-tokenizer table: use this one
    # (its regex split) instead of failing; null = fail like llama.cpp does
    bpe_pre_tokenizer_fallback: str | None = "gpt-2"
    n_ctx: int = Field(2048, ge=64)  # llama.cpp context for evaluation/serving
    n_threads: int = Field(1, ge=1)  # STACK.md: on a shared 2-core box 2 threads ran 4x slower than 1
    n_batch: int = Field(512, ge=1)
    # acceptance check: the GGUF's first greedy tokens vs the HF (2A) model's on this many dev prompts
    greedy_check_prompts: int = Field(4, ge=0)
    greedy_check_tokens: int = Field(8, ge=1)
