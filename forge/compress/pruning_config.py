"""2A: structured width pruning settings (the `pruning` section of the pipeline config).

Cheap to import (pydantic only): the phase registry and the DAG may read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config_base import Strict


class PruningConfig(Strict):
    """Minitron-style width pruning: activation importance, gradual rounds, short fine-tunes between."""

    # fraction of MLP intermediate channels removed (the plan's 65%); the final width is then
    # rounded to a multiple of `multiple_of`, so the realised fraction is reported separately
    target_mlp_sparsity: float = Field(0.65, ge=0.0, le=0.95)
    rounds: int = Field(4, ge=1)  # gradual: each round removes an equal share, then fine-tunes
    finetune_steps_per_round: int = Field(50, ge=0)
    calib_samples: int = Field(64, ge=1)  # train rows whose activations score the channels
    # K-quants (Q4_K/Q5_K) pack rows in super-blocks of 256 and AWQ uses groups of 128: the pruned
    # widths stay multiples of this so 2B/2C need no padding. Never pruned below one multiple.
    multiple_of: int = Field(256, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(256, ge=8)
    # attention: remove whole KV groups (a KV head with the query heads that share it), so
    # grouped-query attention keeps its ratio and the config stays uniform across layers
    prune_heads: bool = False
    target_head_sparsity: float = Field(0.25, ge=0.0, lt=1.0)  # fraction of KV groups removed
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"

