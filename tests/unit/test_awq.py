"""2B AWQ W4A16 on a tiny Llama on CPU: packed 4-bit compressed-tensors output that loads and
generates, lm_head untouched, the pin_memory guard scoped, and the job's quality row."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")

from forge.compress import awq  # noqa: E402
from forge.compress.awq_config import AWQConfig  # noqa: E402
from forge.config import EvalConfig  # noqa: E402
from forge.data.records import write_jsonl  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402
from tests.unit.test_pruning import make_rows  # noqa: E402

CFG = AWQConfig(calib_samples=8, max_seq_len=64, n_grid=4, device="cpu")


def build(path: Path) -> Path:
    """A 2A-shaped model: hidden 256, MLP 256 (multiples of 128), 2 layers, vocab 512."""
    texts = [m["content"] for r in make_rows(40) for m in r["messages"]]
    return save_tiny_model(path, texts, vocab_size=512, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny_awq"))


@pytest.fixture(scope="module")
def quantized(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, awq.QuantOutcome]:
    from transformers import AutoModelForCausalLM

    from forge.modeling import load_tokenizer

    tok = load_tokenizer(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    data = awq.calibration_dataset(tok, make_rows(16), CFG.calib_samples, CFG.max_seq_len, "test")
    outcome = awq.quantize(model, tok, data, CFG)
    out = tmp_path_factory.mktemp("awq_out")
    awq.save_compressed(model, tok, out)
    return out, outcome


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_calibration_rows_are_chat_rendered_token_ids(tiny: Path) -> None:
    from forge.modeling import load_tokenizer

    tok = load_tokenizer(tiny)
    data = awq.calibration_dataset(tok, make_rows(10), 6, 64, "test")
    assert len(data) == 6 and set(data.column_names) == {"input_ids", "attention_mask"}
    text = tok.decode(data["input_ids"][0])
    assert text.startswith("<|user|>\nWhat is 3 plus 1?") and "<|assistant|>\n4<|end|>" in text


def test_oneshot_on_cpu_packs_4bit_leaves_lm_head_and_reloads(tiny: Path, quantized) -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM

    out, outcome = quantized
    assert outcome.pin_guard is True and outcome.calib_samples == 8 and outcome.calib_tokens > 8 * 10
    assert IntermediatesCache.pin_memory.__name__ == "pin_memory"  # the guard is gone again

    qcfg = awq.read_quant_config(out)
    group = qcfg["config_groups"]["group_0"]["weights"]
    assert qcfg["format"] == "pack-quantized" and qcfg["quantization_status"] == "compressed"
    assert (group["num_bits"], group["group_size"], group["strategy"]) == (4, 128, "group")
    assert awq.weight_bits(qcfg) == 4 and "lm_head" in qcfg["ignore"]

    src, dst = tensors(tiny), tensors(out)
    packed = dst["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (256, 256 // 8)  # 8 int4 values per int32
    assert dst["model.layers.1.self_attn.q_proj.weight_scale"].shape == (256, 256 // 128)
    assert "model.layers.0.mlp.down_proj.weight" not in dst
    torch.testing.assert_close(dst["lm_head.weight"], src["lm_head.weight"], rtol=0, atol=0)
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(out) < 0.6 * size(tiny)  # 4-bit linears; embeddings + lm_head stay fp32

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert "weight_packed" in model.model.layers[0].self_attn.o_proj._parameters  # stays 4-bit in memory
    assert "weight_packed" not in model.lm_head._parameters and model.lm_head.weight.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    # dequantized weights differ from the source: quantization did happen (and AWQ rescaled them)
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, src["model.layers.0.mlp.down_proj.weight"])


def test_pin_memory_guard_is_scoped_and_restores_on_error() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original, tensor_pin = IntermediatesCache.pin_memory, torch.Tensor.pin_memory
    with pytest.raises(RuntimeError, match="boom"), awq.cpu_pin_memory_guard() as applied:
        assert applied is (not torch.accelerator.is_available())
        if applied:
            assert IntermediatesCache.pin_memory is not original
            assert IntermediatesCache.pin_memory(None, 0) is None
        assert torch.Tensor.pin_memory is tensor_pin  # torch itself is never patched
        raise RuntimeError("boom")
    assert IntermediatesCache.pin_memory is original


def test_group_width_not_dividing_is_a_clear_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(192, 8))
    with pytest.raises(ValueError, match=r"group_size=128 .*in_features=192"):
        awq.check_group_widths(model, 128)
    awq.check_group_widths(torch.nn.Sequential(torch.nn.Linear(256, 8)), 128)


class FakeContext:
    """What 2B's run() uses of JobContext, over plain folders (the runner wiring is the lead's)."""

    def __init__(self, root: Path, pruned: Path):
        self.dirs = {"2A": pruned, "prep_data": root / "prep_data"}
        self.dirs["prep_data"].mkdir()
        write_jsonl(self.dirs["prep_data"] / "train.jsonl", make_rows(16))
        write_jsonl(self.dirs["prep_data"] / "dev.jsonl", make_rows(4, "d"))
        self.config = SimpleNamespace(awq=CFG, eval=EvalConfig(max_new_tokens=6, batch_size=4))
        self.out_dir, self.work_dir = root / "out", root / "work"
        self.out_dir.mkdir()
        self.work_dir.mkdir()
        self.artifacts: list[Path] = []

    def input_dir(self, phase_id: str) -> Path:
        return self.dirs[phase_id]

    def input_info(self, phase_id: str) -> dict:
        return {"quality": {"acc": 0.25, "logprob": -3.0}} if phase_id == "2A" else {}

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


def test_run_writes_a_compressed_model_and_a_quality_row(tiny: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    ctx = FakeContext(tmp_path, tiny)
    result = awq.run(ctx)
    out = ctx.out_dir
    assert (out / "tokenizer.json").exists() and (out / "dev_eval.jsonl").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    q = result.quality
    assert q["delta_acc"] == pytest.approx(q["acc"] - 0.25)
    assert q["delta_logprob"] == pytest.approx(q["logprob"] + 3.0)
    assert q["bits"] == 4.0 and 0 < q["size_mb"] < q["size_mb_before"]
    assert result.info["format"] == "pack-quantized" and ctx.artifacts == [out / "awq_report.json"]
    report = json.loads((out / "awq_report.json").read_text())
    # q k v o gate up down in each of the 2 layers
    assert report["reload"]["packed_linears"] == 2 * 7 and report["calib_samples"] == 8
    assert result.metrics["packed_linears"] == 14.0
