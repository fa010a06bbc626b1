"""Loading models and tokenizers: the one code path for the demo model, a local HF folder or a
hub id. Imports torch/transformers lazily (callers are jobs, never the DAG file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("forge.modeling")


def pick_device(pref: str = "auto") -> str:
    import torch

    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


def compute_dtype(device: str):
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_ref(ctx: Any, phase_id: str) -> str:
    """Where an upstream phase's model lives: its verified local folder, or an HF id it names."""
    info = ctx.input_info(phase_id)
    if info.get("model_ref"):  # an HF hub id referenced, not copied into the store
        return info["model_ref"]
    return str(ctx.input_dir(phase_id))


def load_tokenizer(ref: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ref), revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str | Path,
    device: str = "cpu",
    quantization: str = "none",
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: Any = None,
):
    """A causal LM from a folder or hub id; quantization 'nf4' loads it 4-bit (bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    dtype = dtype or compute_dtype(device)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = dtype
    if not Path(str(ref)).exists():
        log.info("loading %s from the Hugging Face hub (or HF_HOME cache)", ref)
    model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    if quantization != "nf4":
        model.to(device)
    model.eval()
    torch.set_grad_enabled(True)
    return model


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for generation: the model's own chat template with a generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
