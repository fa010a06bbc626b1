"""Serving test scaffolding: a real release folder built from the session's tiny run (2C's Q5_K_M GGUF
and tokenizer, 2E's recovery LoRA as the base's adapter) plus two modifier adapters made here (random peft
LoRAs on 2A's model, converted by llama.cpp's converter: different weights, so switching them changes the
output), and a routing policy over {base, code, reasoning} trained by forge.routing's own code on synthetic
routing truth (tests/routing_fixtures.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from forge.serve.release import (
    ADAPTERS_DIR,
    BASE_GGUF,
    MODEL_DIR,
    POLICY_DIR,
    write_release_json,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "config.json",
)


def random_lora(model_dir: Path, out_file: Path, seed: int, scale: float = 0.05) -> Path:
    """A peft LoRA with nonzero B (a real adapter that changes the model) -> GGUF LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forge.compress.llama_cpp_tools import convert_lora_to_gguf

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft_dir = out_file.parent / f"{out_file.stem}-peft"
    peft.save_pretrained(peft_dir)
    out = convert_lora_to_gguf(peft_dir, model_dir, out_file, "f16")
    shutil.rmtree(peft_dir)
    return out


def build_release(
    tiny_run: Any, dest: Path, with_policy: bool = True, options: tuple[str, ...] = ("code", "reasoning")
) -> Path:
    """A release folder from tiny_run's 2A/2C/2E outputs (call with FORGE_HOME = tiny_run.home)."""
    from forge.artifacts import ArtifactStore
    from forge.runner import make_store

    cfg = tiny_run.config()
    store = make_store(cfg)
    m2a, m2c, m2e = (store.load_manifest(store.run_dir(tiny_run.run_id, p)) for p in ("2A", "2C", "2E"))
    d2a, d2c, d2e = store.materialize(m2a), store.materialize(m2c), store.materialize(m2e)
    dest.mkdir(parents=True)
    (dest / MODEL_DIR).mkdir()
    shutil.copy2(d2c / m2c.info["gguf"], dest / BASE_GGUF)
    for name in TOKENIZER_FILES:
        if (d2c / name).is_file():
            shutil.copy2(d2c / name, dest / MODEL_DIR / name)
    (dest / ADAPTERS_DIR).mkdir()
    shutil.copy2(d2e / m2e.info["adapter"], dest / ADAPTERS_DIR / "base.gguf")
    adapters: dict[str, str | None] = {"base": f"{ADAPTERS_DIR}/base.gguf"}
    model_dir = (
        d2a / m2a.info.get("model_dir", "model")
        if (d2a / m2a.info.get("model_dir", "model")).is_dir()
        else d2a
    )
    for i, option in enumerate(options):
        random_lora(model_dir, dest / ADAPTERS_DIR / f"{option}.gguf", seed=11 + i)
        adapters[option] = f"{ADAPTERS_DIR}/{option}.gguf"
    meta: dict[str, Any] = {
        "name": "forge-tiny",
        "adapters": adapters,
        "lineage": {"run_id": tiny_run.run_id},
    }
    if with_policy:
        from tests.routing_fixtures import build_champion

        scratch = dest.parent / f"{dest.name}-scratch"
        champion = build_champion(cfg, ArtifactStore(f"file://{scratch}/store"), scratch, register=False)
        from forge.routing.bundle import RoutingPolicy

        RoutingPolicy.load(store_folder(champion["m6c"], scratch)).save(dest / POLICY_DIR)
        meta["routing"] = {"features": "minilm"}
    write_release_json(dest, meta)
    return dest


def store_folder(manifest: Any, scratch: Path) -> Path:
    from forge.artifacts import ArtifactStore

    return ArtifactStore(f"file://{scratch}/store").materialize(manifest)
