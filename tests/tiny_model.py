"""The tiny demo model the unit tests build: our BPE tokenizer (with its chat template) trained on
a few texts, and a random-init Llama from DemoModelConfig, both through forge.train.base_model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forge.config import DemoModelConfig


def tiny_model(texts: list[str], vocab_size: int, **sizes: int) -> tuple[Any, Any]:
    """(model, tokenizer); sizes override DemoModelConfig (default: hidden 256, MLP 256, 2 layers)."""
    from forge.train.base_model import build_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size, max_length=256)
    fields = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
              "max_position_embeddings": 256, **sizes}
    demo = DemoModelConfig(vocab_size=vocab_size, **fields)
    return build_model(demo, tok, seed=0), tok


def save_tiny_model(path: Path, texts: list[str], vocab_size: int, **sizes: int) -> Path:
    """The same, saved as an HF folder (model + tokenizer) at `path`."""
    model, tok = tiny_model(texts, vocab_size, **sizes)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
