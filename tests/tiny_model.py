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


def train_tiny_model(path: Path, rows: list[dict[str, Any]], steps: int = 40, seed: int = 0,
                     max_seq_len: int = 64) -> Path:
    """A few dozen full fine-tuning AdamW steps on chat rows (1A's batching and loss), saved back to `path`:
    the weights then decide greedy argmax (not init noise) and carry something quantization can disturb."""
    import torch

    from forge.modeling import load_model, load_tokenizer
    from forge.train import qlora_trainer as qt

    torch.manual_seed(seed)
    tok = load_tokenizer(path)
    model = load_model(path, "cpu", dtype=torch.float32)
    examples = qt.tokenize_rows(tok, rows, max_seq_len, "train_tiny_model")
    stream = qt.batch_stream(examples, 8, seed, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        b = next(stream)[2]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        (qt.token_loss_sum(logits, b["labels"]) / qt.count_targets(b["labels"])).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path
