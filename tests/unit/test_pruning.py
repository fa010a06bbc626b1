"""2A width pruning on a tiny Llama: schedule, exact slicing, importance, gradual rounds, reload, job."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from forge.compress import pruning as pr  # noqa: E402
from forge.compress.pruning_config import PruningConfig  # noqa: E402
from forge.config import EvalConfig  # noqa: E402
from forge.data.records import write_jsonl  # noqa: E402
from forge.train import qlora_trainer as qt  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402

HIDDEN, INTER, LAYERS = 256, 768, 2


def make_rows(n: int, prefix: str = "r") -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i + 3, 2 * i + 1
        rows.append({"id": f"{prefix}{i}", "domain": "reasoning",
                     "check": {"kind": "exact", "answer": str(a + b)},
                     "messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def build(path: Path, kv_heads: int = 4) -> Path:
    texts = [m["content"] for r in make_rows(40) for m in r["messages"]]
    return save_tiny_model(path, texts, vocab_size=512, intermediate_size=INTER, num_hidden_layers=LAYERS,
                           hidden_size=HIDDEN, num_key_value_heads=kv_heads, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny_prune"))


def load(path: Path):
    from forge.modeling import load_model, load_tokenizer

    return load_model(path, "cpu", dtype=torch.float32), load_tokenizer(path)


def batches(tok, rows: list[dict], bs: int = 4) -> list:
    ex = qt.tokenize_rows(tok, rows, 64, "test")
    return qt.fixed_batches(ex, bs, tok.pad_token_id, len(ex))


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# ---- schedule ----------------------------------------------------------------------------------

def test_widths_round_to_multiples_and_follow_the_schedule() -> None:
    assert pr.final_width(768, 0.65, 256) == 256  # 268.8 -> nearest multiple
    assert pr.final_width(14336, 0.65, 256) == 5120  # Llama-3-8B: 5017.6 -> 5120
    assert pr.final_width(14336, 0.65, 128) == 4992  # 5017.6 -> 39 x 128
    assert pr.final_width(768, 0.95, 256) == 256  # never below one multiple
    assert pr.final_width(768, 0.0, 256) == 768
    assert pr.final_width(800, 0.0, 256) == 768  # never above the largest multiple that fits
    with pytest.raises(ValueError, match="multiple_of"):
        pr.final_width(200, 0.5, 256)
    assert pr.round_widths(768, 256, 4) == [640, 512, 384, 256]
    assert pr.round_widths(768, 256, 1) == [256]
    assert pr.final_kv_groups(8, 512, 0.25, 256) == 6  # Llama-3-8B: 8 groups of 4 heads x 128
    assert pr.final_kv_groups(4, 64, 0.5, 256) == 4  # 2 x 64 = 128 is no multiple of 256: keep all
    with pytest.raises(Exception, match="target_mlp_sparsity"):
        PruningConfig(target_mlp_sparsity=0.99)


# ---- slicing and importance --------------------------------------------------------------------

def test_slicing_is_exact_when_the_dropped_channels_are_zero(tiny: Path) -> None:
    model, tok = load(tiny)
    b = batches(tok, make_rows(4))[0]
    keep = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            perm = torch.randperm(INTER, generator=torch.Generator().manual_seed(i))
            layer.mlp.gate_proj.weight[perm[256:]] = 0.0  # silu(0) * up = 0: these channels add nothing
            keep.append(torch.sort(perm[:256]).values)
    before = logits(model, b)
    assert pr.prune_mlp(model, keep) == 256
    assert model.model.layers[0].mlp.down_proj.in_features == 256
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=1e-5)


def test_importance_ranks_a_zeroed_channel_lowest(tiny: Path) -> None:
    model, tok = load(tiny)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[17] = 0.0
        model.model.layers[1].mlp.up_proj.weight[300] = 0.0
    imp = pr.collect_importance(model, batches(tok, make_rows(8)), "cpu")
    assert imp.tokens > 0 and [s.shape[0] for s in imp.mlp] == [INTER, INTER]
    assert int(imp.mlp[0].argmin()) == 17 and float(imp.mlp[0][17]) == 0.0
    assert int(imp.mlp[1].argmin()) == 300 and float(imp.mlp[1][300]) == 0.0
    assert float(imp.mlp[0].min()) < float(imp.mlp[0].median())
    assert 17 not in pr.keep_top(imp.mlp[0], 256).tolist()


def test_kv_group_pruning_is_exact_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build(tmp_path / "gqa", kv_heads=2)  # 4 query heads share 2 KV heads: groups of 2 x 64
    model, tok = load(path)
    b = batches(tok, make_rows(4))[0]
    with torch.no_grad():
        for layer in model.model.layers:  # group 1 = query heads 2, 3: their o_proj input columns
            layer.self_attn.o_proj.weight[:, 128:] = 0.0
    before = logits(model, b)
    assert pr.prune_kv_groups(model, [torch.tensor([0])] * LAYERS) == 1
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    c = again.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 64)
    torch.testing.assert_close(logits(again, b), before, atol=1e-5, rtol=1e-5)


# ---- gradual rounds ----------------------------------------------------------------------------

def test_gradual_rounds_shrink_on_schedule_and_the_result_reloads(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load(tiny)
    cfg = PruningConfig(target_mlp_sparsity=0.65, rounds=2, finetune_steps_per_round=3, batch_size=4,
                        learning_rate=1e-3, max_seq_len=64, calib_samples=8)
    train_ex = qt.tokenize_rows(tok, make_rows(16), 64, "train")
    stream = qt.batch_stream(train_ex, 4, 0, tok.pad_token_id)
    seen = []
    out = pr.prune_gradually(model, cfg, batches(tok, make_rows(8)), stream, batches(tok, make_rows(4, "d")),
                             "cpu", on_round=seen.append)
    assert [r.intermediate_size for r in out.rounds] == [512, 256] and seen == out.rounds
    per_channel = 3 * HIDDEN  # one gate row, one up row, one down column
    assert out.params_before - out.params_after == LAYERS * per_channel * (INTER - 256)
    assert out.rounds[0].params - out.rounds[1].params == LAYERS * per_channel * 256
    assert all(r.finetune_loss is not None and r.eval_loss is not None for r in out.rounds)

    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    assert again.config.intermediate_size == 256 and again.config.intermediate_size % cfg.multiple_of == 0
    assert sum(p.numel() for p in again.parameters()) == out.params_after
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 1?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = again.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


# ---- the job -----------------------------------------------------------------------------------

class FakeContext:
    """What 2A's run() uses of JobContext, over plain folders (the runner wiring is the lead's)."""

    def __init__(self, root: Path, merged: Path, cfg: PruningConfig):
        self.dirs = {"1A": root / "1A", "prep_data": root / "prep_data"}
        (root / "1A").mkdir()
        (root / "1A" / "merged").symlink_to(merged, target_is_directory=True)
        self.dirs["prep_data"].mkdir()
        write_jsonl(self.dirs["prep_data"] / "train.jsonl", make_rows(16))
        write_jsonl(self.dirs["prep_data"] / "dev.jsonl", make_rows(4, "d"))
        self.config = SimpleNamespace(pruning=cfg, eval=EvalConfig(max_new_tokens=6, batch_size=4))
        self.out_dir, self.work_dir = root / "out", root / "work"
        self.out_dir.mkdir()
        self.work_dir.mkdir()
        self.logged: list[tuple[dict, int | None]] = []
        self.artifacts: list[Path] = []

    def input_dir(self, phase_id: str) -> Path:
        return self.dirs[phase_id]

    def input_info(self, phase_id: str) -> dict:
        return {"quality": {"acc": 0.5, "logprob": -2.0}} if phase_id == "1A" else {}

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((metrics, step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path))


def test_run_writes_a_loadable_smaller_model_and_quality(tiny: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    cfg = PruningConfig(rounds=2, finetune_steps_per_round=2, batch_size=4, max_seq_len=64, calib_samples=8,
                        device="cpu")
    ctx = FakeContext(tmp_path, tiny, cfg)
    result = pr.run(ctx)
    saved = json.loads((ctx.out_dir / "config.json").read_text())
    assert saved["intermediate_size"] == 256
    assert (ctx.out_dir / "tokenizer.json").exists() and (ctx.out_dir / "dev_eval.jsonl").exists()
    q = result.quality
    assert q["params_after"] < q["params_before"] and 0 < q["size_mb"]
    assert q["delta_acc"] == pytest.approx(q["acc"] - 0.5)
    assert q["delta_logprob"] == pytest.approx(q["logprob"] + 2.0)
    assert {"acc", "logprob", "acc_before", "logprob_before"} <= set(q)
    assert result.metrics["size_mb_after"] < result.metrics["size_mb_before"]
    assert [step for _, step in ctx.logged] == [1, 2]
    assert result.info["intermediate_size"] == 256
