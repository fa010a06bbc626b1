"""7B: few-shot prompt templates with retrieved demonstrations (the `meta` section's `few_shot`)."""

from __future__ import annotations

from pydantic import Field

from forge.config_base import Strict


class FewShotConfig(Strict):
    """Per domain: the k nearest training examples (MiniLM embeddings of the prompts) become demonstration
    turns before the question. Serving uses them when a request asks (`few_shot: true`) or
    `serving_default`."""

    domains: list[str] = ["general", "code", "reasoning", "automation", "math"]
    k: int = Field(3, ge=1, le=16)
    pool_rows: int = Field(400, ge=8)  # train-split rows per domain the demonstrations come from
    eval_rows: int = Field(48, ge=4)  # held-out rows per domain: zero-shot vs few-shot
    max_demo_chars: int = Field(1200, ge=64)  # a longer demonstration is skipped (prompt budget)
    serving_default: bool = False  # prepend demonstrations to every request that names no preference
