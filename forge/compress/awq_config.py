"""2B: AWQ 4-bit quantization settings (the `awq` section of the pipeline config).

Cheap to import (pydantic only): the phase registry and the DAG may read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config_base import Strict


class AWQConfig(Strict):
    """llm-compressor AWQModifier + QuantizationModifier: weight-only int4, per-group scales."""

    # compressed-tensors preset: W4A16 = int4 symmetric weights, 16-bit activations (what vLLM serves)
    scheme: Literal["W4A16", "W4A16_ASYM"] = "W4A16"
    # every quantized Linear's input width must be a multiple of this (2A keeps widths so)
    group_size: int = Field(128, ge=32)
    # llm-compressor matches module names: a bare "lm_head" does not match, the regex does (STACK.md)
    ignore: list[str] = ["re:.*lm_head"]
    targets: list[str] = ["Linear"]
    calib_samples: int = Field(128, ge=1)  # train rows rendered with the chat template
    max_seq_len: int = Field(512, ge=8)
    n_grid: int = Field(20, ge=1)  # AWQ's per-layer scale grid search points
    duo_scaling: bool = True  # scales from activations and weights (the AWQ paper's choice)
    # "sequential" runs one decoder layer at a time on calibration data (low memory, any model size)
    pipeline: Literal["sequential", "basic", "independent"] = "sequential"
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
