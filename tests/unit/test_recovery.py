"""2E on a tiny, briefly trained Llama: dequantizing its Q5_K_M GGUF back into the HF model, the training
mix, the recovery LoRA (trained on the dequantized weights, converted to a GGUF LoRA, served by llama.cpp
beside the base), resume from a checkpoint, and the job's ledger row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from forge.artifacts import FileEntry, Manifest, sha256_file  # noqa: E402
from forge.compress import llama_cpp_tools as lt  # noqa: E402
from forge.compress.gguf_config import GGUFConfig  # noqa: E402
from forge.config import EvalConfig  # noqa: E402
from forge.data.records import DataError, write_jsonl  # noqa: E402
from forge.train import qlora_trainer as qt  # noqa: E402
from forge.train import recovery as rc  # noqa: E402
from forge.train.recovery_config import RecoveryConfig  # noqa: E402
from tests.tiny_model import save_tiny_model, train_tiny_model  # noqa: E402
from tests.unit.test_pruning import make_rows  # noqa: E402

CFG = RecoveryConfig(lora_r=8, lora_alpha=16, learning_rate=2e-3, warmup_steps=0, max_steps=24, batch_size=8,
                     train_rows=32, hardest_repeat=2, max_seq_len=64, eval_every=8, eval_batches=2,
                     checkpoint_every=8, log_every=4, seed=3, device="cpu")
GGUF_NAME = "model-q5_k_m.gguf"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2A's output: config + tokenizer + fp32 safetensors."""
    path = tmp_path_factory.mktemp("pruned")
    texts = [m["content"] for r in make_rows(60) for m in r["messages"]]
    save_tiny_model(path, texts, vocab_size=512, max_position_embeddings=128)
    train_tiny_model(path, make_rows(48, "p"))
    return path


@pytest.fixture(scope="module")
def gguf_dir(pruned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2C's output: the Q5_K_M GGUF beside the tokenizer files and config.json."""
    try:
        lt.ensure_tools()
    except lt.LlamaCppToolsError as exc:
        pytest.skip(f"llama.cpp converters unavailable: {exc}")
    out = tmp_path_factory.mktemp("gguf")
    f16 = lt.convert_hf_to_gguf(pruned, out / "model-f16.gguf", "f16", "gpt-2")
    lt.quantize(f16, out / GGUF_NAME, "Q5_K_M")
    f16.unlink()
    for f in pruned.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


def load_pruned(pruned: Path):
    from forge.modeling import load_model

    return load_model(pruned, "cpu", dtype=torch.float32)


# ---- dequantization ----------------------------------------------------------------------------

def test_dequantized_weights_fill_every_parameter_close_to_but_not_equal_to_the_original(
        pruned: Path, gguf_dir: Path) -> None:
    model = load_pruned(pruned)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = rc.read_gguf_tensors(gguf_dir / GGUF_NAME, model)
    assert set(tensors) == set(original)  # 2 layers x 9 + embed, norm, lm_head

    # the gguf-py reader (the path used when gguf is not installed as a package) agrees exactly
    direct = rc.read_gguf_with_gguf_py(gguf_dir / GGUF_NAME, model)
    assert set(direct) == set(tensors) and all(torch.equal(direct[k], tensors[k]) for k in tensors)

    check = rc.load_dequantized(model, tensors, CFG.max_dequant_rel_error, "test")
    assert check.tensors == len(original) == 21
    for name, p in model.named_parameters():  # every parameter now holds the GGUF's values
        assert torch.equal(p, tensors[name])
    linear = {k: v for k, v in check.rel_error.items() if k.endswith("proj.weight")}
    assert len(linear) == 14 and all(0.005 < e < 0.1 for e in linear.values())  # 5/6-bit rounding
    norms = [k for k in check.rel_error if "norm" in k]
    assert len(norms) == 5 and all(check.rel_error[k] == 0.0 for k in norms)  # llama.cpp keeps them f32
    assert check.exact == 5 and 0 < check.rel_error_total < 0.1

    # q comes back in HF's rotary layout (llama.cpp's converter permutes its rows), elementwise close
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(tensors[q], original[q], atol=0.05)


def test_a_missing_tensor_a_wrong_layout_or_no_quantization_is_a_clear_error(pruned: Path,
                                                                             gguf_dir: Path) -> None:
    model = load_pruned(pruned)
    tensors = rc.read_gguf_tensors(gguf_dir / GGUF_NAME, model)
    k = "model.layers.1.self_attn.k_proj.weight"

    with pytest.raises(ValueError, match=r"1 of 21 model parameters have no tensor.*k_proj"):
        rc.load_dequantized(load_pruned(pruned), {n: t for n, t in tensors.items() if n != k}, 0.25, "f.gguf")
    permuted = dict(tensors)
    permuted[k] = tensors[k].reshape(4, 2, 32, 256).swapaxes(1, 2).reshape(256, 256)  # llama.cpp's order
    with pytest.raises(ValueError, match=r"far from 2A's weights.*max_dequant_rel_error.*k_proj"):
        rc.load_dequantized(load_pruned(pruned), permuted, 0.25, "f.gguf")
    wrong_shape = {**tensors, k: tensors[k][:128]}
    with pytest.raises(ValueError, match=r"shape \(128, 256\)"):
        rc.load_dequantized(load_pruned(pruned), wrong_shape, 0.25, "f.gguf")
    same = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="not quantized"):
        rc.load_dequantized(model, same, 0.25, "f.gguf")


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    permuted = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # convert_hf_to_gguf's permute, 2 heads
    assert not torch.equal(permuted, w)
    assert torch.equal(rc.unpermute_rows(permuted, 2), w)


# ---- the training mix --------------------------------------------------------------------------

def test_training_mix_repeats_the_hardest_rows_and_takes_the_first_train_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "hardest.jsonl", make_rows(3, "h"))
    write_jsonl(tmp_path / "train.jsonl", make_rows(10, "t"))
    cfg = RecoveryConfig(train_rows=4, hardest_repeat=3)
    mix = rc.training_mix(tmp_path / "hardest.jsonl", tmp_path / "train.jsonl", cfg)
    ids = [r["id"] for r in mix.rows]
    assert sorted(i for i in ids if i.startswith("h")) == ["h0"] * 3 + ["h1"] * 3 + ["h2"] * 3
    assert [i for i in ids if i.startswith("t")] == ["t0", "t1", "t2", "t3"]
    assert (mix.hardest, mix.hardest_repeat, mix.train, len(mix.rows)) == (3, 3, 4, 13)

    write_jsonl(tmp_path / "empty.jsonl", [])  # 1B found no failures: train rows only
    mix = rc.training_mix(tmp_path / "empty.jsonl", tmp_path / "train.jsonl", cfg)
    assert (mix.hardest, mix.train) == (0, 4)
    with pytest.raises(DataError, match="no rows to train on"):
        rc.training_mix(tmp_path / "empty.jsonl", tmp_path / "train.jsonl", RecoveryConfig(train_rows=0))


def test_training_mix_names_a_missing_or_bad_hardest_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", make_rows(4))
    with pytest.raises(DataError, match=r"nope/hardest.jsonl.*missing.*rerun 1B"):
        rc.training_mix(tmp_path / "nope" / "hardest.jsonl", tmp_path / "train.jsonl", CFG)
    bad = make_rows(2, "h")
    del bad[1]["messages"]
    write_jsonl(tmp_path / "hardest.jsonl", bad)
    with pytest.raises(DataError, match=r"hardest.jsonl:2: missing field 'messages'"):
        rc.training_mix(tmp_path / "hardest.jsonl", tmp_path / "train.jsonl", CFG)


# ---- the job (train, export, llama.cpp before/after) -------------------------------------------

class FakeContext:
    """What 2E's run() uses of JobContext, over plain folders; checkpoints are step-N folders."""

    def __init__(self, root: Path, pruned: Path, gguf_dir: Path, cfg: RecoveryConfig = CFG):
        self.dirs = {"2A": pruned, "2C": gguf_dir, "prep_data": root / "prep_data", "1B": root / "1B"}
        write_jsonl(self.dirs["prep_data"] / "train.jsonl", make_rows(48, "t"))
        # dev = the same task, other numbers; hardest = the larger sums a little model gets wrong
        write_jsonl(self.dirs["prep_data"] / "dev.jsonl", make_rows(56, "d")[48:])
        write_jsonl(self.dirs["1B"] / "hardest.jsonl", make_rows(64, "h")[56:])
        self.config = SimpleNamespace(recovery=cfg, eval=EvalConfig(max_new_tokens=8, batch_size=8),
                                      gguf=GGUFConfig(n_ctx=256))
        self.out_dir, self.work_dir, self.ckpt_dir = root / "out", root / "work", root / "ckpt"
        for d in (self.out_dir, self.work_dir, self.ckpt_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.artifacts: list[Path] = []
        self.stop_after_checkpoint: int | None = None

    def input_dir(self, phase_id: str) -> Path:
        return self.dirs[phase_id]

    @property
    def inputs(self) -> dict[str, Manifest]:
        """2C's manifest as the runner keeps it: its GGUF named in info and listed with its sha256."""
        gguf = self.dirs["2C"] / GGUF_NAME
        entry = FileEntry(gguf.stat().st_size, sha256_file(gguf))
        return {"2C": Manifest(phase="2C", cache_key="key-2C", base_uri=f"file://{self.dirs['2C']}",
                               run_id="r1", files={GGUF_NAME: entry}, info={"gguf": GGUF_NAME})}

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))

    def save_checkpoint(self, step: int, local_dir: Path) -> None:
        shutil.copytree(local_dir, self.ckpt_dir / f"step-{step}")
        if self.stop_after_checkpoint == step:
            raise KeyboardInterrupt(f"killed after the checkpoint at step {step}")

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        steps = sorted(int(p.name.removeprefix("step-")) for p in self.ckpt_dir.iterdir())
        return (steps[-1], self.ckpt_dir / f"step-{steps[-1]}") if steps else None


@pytest.fixture(scope="module")
def job(pruned: Path, gguf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    ctx = FakeContext(tmp_path_factory.mktemp("job"), pruned, gguf_dir)
    return ctx, rc.run(ctx)


def test_run_trains_exports_and_improves_the_quantized_model_on_dev(job) -> None:
    ctx, result = job
    out, q = ctx.out_dir, result.quality
    assert result.info["adapter"] == "adapter.gguf" and result.info["peft_dir"] == "adapter"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert ctx.artifacts == [out / "loss_curve.png", out / "recovery_report.json"]
    assert (out / "loss_curve.png").stat().st_size > 1000

    # measured with llama.cpp: the base GGUF alone, then with the GGUF LoRA
    assert q["logprob"] > q["logprob_before"]
    assert q["delta_logprob"] == pytest.approx(q["logprob"] - q["logprob_before"])
    assert q["delta_acc"] == pytest.approx(q["acc"] - q["acc_before"]) and q["delta_acc"] >= 0
    assert q["changed_frac"] > 0 and q["n"] == 8.0
    assert 0 < q["adapter_mb"] < 1.0

    report = json.loads((out / "recovery_report.json").read_text())
    assert report["mix"] == {"rows": 8 * 2 + 32, "hardest": 8, "hardest_repeat": 2, "train": 32}
    assert report["dequant"]["tensors"] == 21 and 0 < report["dequant"]["rel_error_total"] < 0.1
    losses = report["losses"]  # HF side: the dequantized model before and after the adapter, vs 2A
    assert losses["dev_loss_recovered"] < losses["dev_loss_quantized"]
    assert losses["dev_loss_quantized"] != losses["dev_loss_fp"]
    assert report["steps"] == CFG.max_steps and report["resumed_from_step"] == 0
    assert 0 < report["changed_frac"] == q["changed_frac"]
    before = {r["id"]: r["output"] for r in map(json.loads, (out / "dev_eval_before.jsonl").open())}
    after = {r["id"]: r["output"] for r in map(json.loads, (out / "dev_eval.jsonl").open())}
    assert sorted(i for i in after if after[i] != before[i]) == sorted(report["changed_ids"])


def test_the_gguf_lora_in_llama_cpp_matches_the_peft_adapter_on_the_dequantized_model(
        job, pruned: Path, gguf_dir: Path) -> None:
    """llama.cpp (Q5_K_M base + GGUF LoRA) scores like transformers (dequantized base + peft LoRA): the
    converted adapter is the trained one, q/k layout included; and it differs from the base alone."""
    from peft import PeftModel

    from forge.data.records import prompt_messages, reference
    from forge.evaluate.harness import HFBackend
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend
    from forge.modeling import load_tokenizer

    ctx, _ = job
    rows = make_rows(52, "d")[48:]
    tok = load_tokenizer(pruned)
    prompts = [tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
               for r in rows]
    refs = [reference(r) for r in rows]
    model = load_pruned(pruned)
    rc.dequantize_into(model, gguf_dir / GGUF_NAME, 0.25)
    peft = PeftModel.from_pretrained(model, str(ctx.out_dir / "adapter")).eval()
    hf = HFBackend(peft, tok, "cpu").answer_logprobs(prompts, refs)
    with LlamaCppBackend(gguf_dir / GGUF_NAME, gguf_dir, ctx.out_dir / "adapter.gguf", n_ctx=256) as lc:
        with_lora = lc.answer_logprobs(prompts, refs)
        tokens_lora = [lc.greedy_token_ids(p, 6) for p in prompts]
    with LlamaCppBackend(gguf_dir / GGUF_NAME, gguf_dir, n_ctx=256) as lc:
        base = lc.answer_logprobs(prompts, refs)
        tokens_base = [lc.greedy_token_ids(p, 6) for p in prompts]
    # llama.cpp multiplies Q5_K weights by Q8_K-quantized activations, transformers in fp32: how close they
    # land depends on the CPU's kernels (all 4 rows within 0.05 on an AVX-512 host; one row 0.22 off on an
    # AMX host). The adapter must bring llama.cpp much closer to peft than the base alone is.
    def mean_gap(xs: list[float]) -> float:
        return sum(abs(a - b) for a, b in zip(xs, hf, strict=True)) / len(hf)

    assert with_lora == pytest.approx(hf, abs=0.3)
    assert mean_gap(with_lora) < 0.5 * mean_gap(base), (with_lora, base, hf)
    assert max(abs(a - b) for a, b in zip(with_lora, base, strict=True)) > 0.1
    assert tokens_lora != tokens_base


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(
        pruned: Path, gguf_dir: Path, tmp_path: Path) -> None:
    from forge.modeling import load_tokenizer

    cfg = CFG.model_copy(update={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "log_every": 1})
    tok = load_tokenizer(pruned)
    ex = qt.tokenize_rows(tok, make_rows(24, "t"), cfg.max_seq_len, "train")
    dev = qt.tokenize_rows(tok, make_rows(28, "d")[24:], cfg.max_seq_len, "dev")

    def lora_model():
        model = load_pruned(pruned)
        rc.dequantize_into(model, gguf_dir / GGUF_NAME, 0.25)
        return rc.add_lora(model, cfg)

    def lora_params(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    ctx = FakeContext(tmp_path / "a", pruned, gguf_dir, cfg)
    unbroken = lora_model()
    rc.train_recovery(ctx, unbroken, ex, dev, tok.pad_token_id, cfg, "cpu")

    ctx = FakeContext(tmp_path / "b", pruned, gguf_dir, cfg)
    ctx.stop_after_checkpoint = 2
    with pytest.raises(KeyboardInterrupt):
        rc.train_recovery(ctx, lora_model(), ex, dev, tok.pad_token_id, cfg, "cpu")
    ctx.stop_after_checkpoint = None
    resumed = lora_model()
    outcome = rc.train_recovery(ctx, resumed, ex, dev, tok.pad_token_id, cfg, "cpu")
    assert outcome.resumed_from == 2 and outcome.state.step == 4
    a, b = lora_params(unbroken), lora_params(resumed)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in b.items() if "lora_B" in k)  # it trained
