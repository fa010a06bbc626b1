"""15A's weight-space distillation: shared adapter + per-domain heads reproduce each domain's delta (exactly
when the ranks allow it), the sizes add up, and adapters of different shapes are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from forge.modifiers.shared_backbone import distil, load_deltas

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj")
SHAPES = {"q_proj": (32, 32), "v_proj": (16, 32), "up_proj": (48, 32)}  # (out, in)


def fake_adapter(dest: Path, seed: int, r: int = 4, alpha: int = 8, common: float = 1.0) -> Path:
    """A peft-format LoRA folder; `common` scales a component every seed shares (what a backbone shares)."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(999)
    tensors = {}
    for m in MODULES:
        out, inp = SHAPES[m.rsplit(".", 1)[1]]
        a = torch.randn(r, inp, generator=gen) + common * torch.randn(r, inp, generator=shared)
        tensors[f"base_model.model.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.1
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": ["q_proj", "v_proj", "up_proj"],
            }
        )
    )
    return dest


def test_enough_rank_reproduces_every_delta(tmp_path: Path) -> None:
    adapters = {d: fake_adapter(tmp_path / d, i) for i, d in enumerate(("code", "math", "finance"))}
    # mean of three rank-4 deltas: rank <= 12; each residual then rank <= 16
    fig = distil(adapters, shared_rank=12, head_rank=16, out=tmp_path / "out", work=tmp_path / "work")
    for d in adapters:
        assert fig["domains"][d]["relative_error"] < 1e-5
        _, own = load_deltas(adapters[d])
        _, rebuilt = load_deltas(tmp_path / "work" / "combined" / d)
        for k in own:
            torch.testing.assert_close(rebuilt[k], own[k], atol=1e-4, rtol=1e-4)
    assert fig["params_saved"] < 0  # that much rank costs more than it saves


def test_small_heads_save_size_and_keep_most_of_the_delta(tmp_path: Path) -> None:
    adapters = {d: fake_adapter(tmp_path / d, i, common=3.0) for i, d in enumerate(("a", "b", "c", "d"))}
    fig = distil(adapters, shared_rank=4, head_rank=1, out=tmp_path / "out", work=tmp_path / "work")
    per_module = sum(o + i for o, i in SHAPES.values())
    assert fig["own_params"] == 4 * 4 * per_module
    assert fig["backbone_params"] == (4 + 4 * 1) * per_module
    assert fig["params_saved"] == pytest.approx(1 - 8 / 16)
    assert fig["bytes_saved"] > 0.3
    errors = [v["relative_error"] for v in fig["domains"].values()]
    assert all(0 < e < 0.9 for e in errors), errors
    shared_cfg = json.loads((tmp_path / "out" / "shared" / "adapter_config.json").read_text())
    head_cfg = json.loads((tmp_path / "out" / "heads" / "a" / "adapter_config.json").read_text())
    assert (shared_cfg["r"], shared_cfg["lora_alpha"], head_cfg["r"]) == (4, 4, 1)


def test_adapters_of_other_shapes_are_refused(tmp_path: Path) -> None:
    a = fake_adapter(tmp_path / "a", 0)
    b = fake_adapter(tmp_path / "b", 1)
    (b / "adapter_model.safetensors").unlink()
    save_file(
        {
            "base_model.model.other.lora_A.weight": torch.zeros(4, 8),
            "base_model.model.other.lora_B.weight": torch.zeros(8, 4),
        },
        str(b / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="other modules or shapes"):
        distil({"a": a, "b": b}, 4, 1, tmp_path / "out", tmp_path / "work")


def test_skip_below_the_domain_count_unless_forced() -> None:
    from forge.modifiers.backbone_config import SharedBackboneConfig

    assert "below backbone.min_domains (15)" in SharedBackboneConfig().skip_reason(3)
    assert SharedBackboneConfig().skip_reason(15) is None
    assert SharedBackboneConfig(force=True).skip_reason(2) is None
    with pytest.raises(ValueError, match="head_rank"):
        SharedBackboneConfig(shared_rank=2, head_rank=4)
