"""1A's loop on a tiny Llama: masking, batching order, schedule, accumulation, learning, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from forge.config import TrainConfig  # noqa: E402
from forge.data.records import DataError  # noqa: E402
from forge.train import qlora_trainer as qt  # noqa: E402
from forge.train.qlora_config import (  # noqa: E402
    QLoRASetup,
    build_lora_config,
    resolve_quantization,
    resolve_setup,
)
from tests.tiny_model import save_tiny_model  # noqa: E402

CPU = QLoRASetup(device="cpu", quantization="none", autocast_dtype=None)


def make_rows(n: int = 12) -> list[dict]:
    """Chat rows whose answers differ in length (so token-weighting matters)."""
    rows = []
    for i in range(n):
        a, b = i + 3, 2 * i + 1
        answer = " ".join([str(a + b)] * (1 + i % 4))
        rows.append({"id": f"r{i}", "domain": "reasoning", "check": {"kind": "exact", "answer": answer},
                     "messages": [{"role": "system", "content": "Answer with numbers."},
                                  {"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + the demo chat tokenizer, saved as an HF folder."""
    texts = [m["content"] for r in make_rows(40) for m in r["messages"]] + ["plus minus times"] * 5
    return save_tiny_model(tmp_path_factory.mktemp("tiny_base"), texts, vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    from forge.modeling import load_tokenizer

    return load_tokenizer(tiny_base)


def train_cfg(**over) -> TrainConfig:
    base = dict(max_steps=6, batch_size=2, grad_accum=1, warmup_steps=0, learning_rate=1e-2,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, log_every=1, eval_every=1000,
                checkpoint_every=1000, grad_clip=0.0, seed=7, max_seq_len=128)
    return TrainConfig(**{**base, **over})


def peft_model(tiny_base: Path, cfg: TrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return qt.prepare_peft_model(str(tiny_base), cfg, CPU)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- config ------------------------------------------------------------------------------------

def test_setup_resolves_auto_quantization_and_lora_config() -> None:
    cfg = TrainConfig()
    assert resolve_quantization(cfg, "cuda") == "nf4"
    assert resolve_quantization(cfg, "cpu") == "none"
    assert resolve_quantization(TrainConfig(quantization="nf4"), "cpu") == "nf4"
    setup = resolve_setup(TrainConfig(device="cpu"))
    assert (setup.device, setup.quantization, setup.autocast_dtype) == ("cpu", "none", None)
    lora = build_lora_config(TrainConfig(lora_r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert lora.r == 8 and lora.lora_alpha == 16 and set(lora.target_modules) == {"q_proj", "v_proj"}
    assert build_lora_config(TrainConfig()).target_modules == "all-linear"


# ---- data --------------------------------------------------------------------------------------

def test_labels_cover_only_the_answer_and_its_end_token(tokenizer) -> None:
    row = make_rows(3)[2]
    ex = qt.tokenize_row(tokenizer, row, max_seq_len=256)
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert ex["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = ex["labels"]
    assert all(t == qt.IGNORE for t in labels[:n_prompt])
    learned = [t for t in labels if t != qt.IGNORE]
    assert tokenizer.decode(learned) == row["messages"][-1]["content"] + "<|end|>"
    # what the template adds after the end token (a newline) is not learned
    assert labels[-1] == qt.IGNORE and ex["input_ids"][-2] == tokenizer.eos_token_id


def test_truncation_that_cuts_the_whole_answer_drops_the_row(tokenizer) -> None:
    rows = make_rows(2)
    assert qt.tokenize_row(tokenizer, rows[0], max_seq_len=8) is None
    with pytest.raises(DataError, match="max_seq_len=8"):
        qt.tokenize_rows(tokenizer, rows, 8, "train.jsonl")
    ex = qt.tokenize_row(tokenizer, rows[1], max_seq_len=256)
    cut = qt.tokenize_row(tokenizer, rows[1], max_seq_len=len(ex["input_ids"]) - 3)
    assert len(cut["input_ids"]) == len(ex["input_ids"]) - 3 and cut["labels"] == ex["labels"][:-3]


def test_collate_pads_right_with_masked_labels() -> None:
    b = qt.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batch_stream_is_seeded_per_epoch_and_resumable() -> None:
    examples = [{"input_ids": [i], "labels": [i]} for i in range(10)]  # 5 batches of 2 per epoch

    def ids(stream, n):
        taken = [next(stream) for _ in range(n)]
        return [(e, i, b["input_ids"].flatten().tolist()) for e, i, b in taken]

    full = ids(qt.batch_stream(examples, 2, seed=3, pad_id=0), 12)
    assert [(e, i) for e, i, _ in full[:7]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    assert sorted(x for _, _, b in full[:5] for x in b) == list(range(10))  # one epoch = a permutation
    assert [b for _, _, b in full[:5]] != [b for _, _, b in full[5:10]]  # reshuffled per epoch
    assert full == ids(qt.batch_stream(examples, 2, seed=3, pad_id=0), 12)  # deterministic
    assert ids(qt.batch_stream(examples, 2, seed=3, pad_id=0, start_epoch=1, start_index=2), 4) == full[7:11]
    # a position at the end of an epoch continues with the next epoch
    assert ids(qt.batch_stream(examples, 2, seed=3, pad_id=0, start_epoch=0, start_index=5), 1) == full[5:6]


# ---- schedule ----------------------------------------------------------------------------------

def test_cosine_schedule_with_warmup_values() -> None:
    from transformers import get_cosine_schedule_with_warmup

    f = qt.cosine_with_warmup(warmup_steps=10, total_steps=110)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, 10, 110)
    for step in range(111):
        assert f(step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-9)
    sched = qt.make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0),
                              train_cfg(warmup_steps=2, max_steps=10))
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[:3] == [0.0, 1.0, 2.0] and lrs[2] > lrs[5] > lrs[9] > 0


# ---- the loop ----------------------------------------------------------------------------------

def repeat(batch, epoch: int = 0):
    i = 0
    while True:
        yield epoch, i, batch
        i += 1


def test_loss_decreases_on_a_repeated_batch(tiny_base: Path, tokenizer) -> None:
    cfg = train_cfg(max_steps=25, learning_rate=3e-3, lora_r=8, lora_alpha=16)
    model = peft_model(tiny_base, cfg)
    examples = qt.tokenize_rows(tokenizer, make_rows(4), cfg.max_seq_len, "rows")
    batch = qt.collate(examples, tokenizer.pad_token_id)
    opt = qt.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    before = qt.evaluate_loss(model, [batch], "cpu")
    state = qt.train_loop(model, repeat(batch), lambda: qt.evaluate_loss(model, [batch], "cpu"),
                          opt, qt.make_scheduler(opt, cfg), cfg, "cpu")
    losses = [e["loss"] for e in state.history if "loss" in e]
    assert state.step == 25 and len(losses) == 25
    assert losses[0] == pytest.approx(before, rel=1e-4)  # step 1 trains on the same batch, same weights
    assert losses[-1] < 0.6 * losses[0]
    assert state.last("eval_loss") < 0.6 * before
    assert state.tokens == 25 * int(batch["attention_mask"].sum())
    assert all(e["tokens_per_s"] > 0 for e in state.history if "loss" in e)


def test_grad_accumulation_equals_one_big_batch(tiny_base: Path, tokenizer) -> None:
    """grad_accum=2 x batch 2 == batch 4 (token-weighted). With SGD lr=1, the update IS the gradient."""
    examples = qt.tokenize_rows(tokenizer, make_rows(4), 128, "rows")
    lengths = [sum(t != qt.IGNORE for t in ex["labels"]) for ex in examples[:4]]
    assert len(set(lengths[:2] + lengths[2:])) > 1  # answers differ in length: weighting matters
    pad = tokenizer.pad_token_id

    def one_step(batches, grad_accum):
        cfg = train_cfg(max_steps=1, grad_accum=grad_accum, batch_size=len(batches[0][2]["input_ids"]))
        model = peft_model(tiny_base, cfg, seed=0)
        # B of LoRA starts at 0 (so A gets no gradient); give it values so every adapter weight learns
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        before = params_of(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = qt.train_loop(model, iter(batches), None, opt, sched, cfg, "cpu")
        after = params_of(model)
        return {n: before[n] - after[n] for n in before}, state

    big, s_big = one_step([(0, 0, qt.collate(examples[:4], pad))], grad_accum=1)
    halves = [(0, 0, qt.collate(examples[:2], pad)), (0, 1, qt.collate(examples[2:4], pad))]
    acc, s_acc = one_step(halves, grad_accum=2)
    assert s_acc.history[0]["loss"] == pytest.approx(s_big.history[0]["loss"], rel=1e-5)
    assert (s_acc.epoch, s_acc.index) == (0, 2)
    for name in big:
        assert torch.allclose(acc[name], big[name], rtol=1e-4, atol=1e-7), name
    # The naive alternative (mean loss per micro-batch, averaged) gives a different update here,
    # so the check above can tell the two apart.
    first, _ = one_step(halves[:1], grad_accum=1)
    second, _ = one_step([(0, 0, halves[1][2])], grad_accum=1)
    naive = {n: (first[n] + second[n]) / 2 for n in first}
    assert any(not torch.allclose(naive[n], big[n], rtol=1e-3, atol=1e-6) for n in big)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_base: Path, tokenizer,
                                                              tmp_path: Path) -> None:
    """Stop after step 3, restore into a fresh model, finish: same weights and losses as 6 straight
    steps. Dropout is on, so the RNG state must be restored too; the data order must continue."""
    cfg = train_cfg(max_steps=6, lora_dropout=0.2, warmup_steps=2, checkpoint_every=3, grad_accum=2)
    examples = qt.tokenize_rows(tokenizer, make_rows(10), cfg.max_seq_len, "rows")  # 5 batches/epoch
    pad = tokenizer.pad_token_id

    def fresh(seed):
        model = peft_model(tiny_base, cfg, seed=seed)
        opt = qt.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
        return model, opt, qt.make_scheduler(opt, cfg)

    model, opt, sched = fresh(seed=0)
    straight = qt.train_loop(model, qt.batch_stream(examples, 2, cfg.seed, pad), None, opt, sched, cfg, "cpu")
    expected = params_of(model)

    model, opt, sched = fresh(seed=0)
    ckpt = tmp_path / "ckpt"

    def save_and_stop(state):
        if state.step == 3:
            qt.save_training_state(ckpt, model, opt, sched, state)
            raise KeyboardInterrupt  # the kill

    with pytest.raises(KeyboardInterrupt):
        qt.train_loop(model, qt.batch_stream(examples, 2, cfg.seed, pad), None, opt, sched, cfg, "cpu",
                      on_checkpoint=save_and_stop)
    torch.manual_seed(999)  # whatever the new process's RNG is, the checkpoint's wins
    model, opt, sched = fresh(seed=1)
    state = qt.load_training_state(ckpt, model, opt, sched)
    assert (state.step, state.epoch, state.index) == (3, 1, 1)  # 6 micro-batches of a 5-batch epoch
    assert len(state.history) == 3
    resumed = qt.train_loop(model, qt.batch_stream(examples, 2, cfg.seed, pad, state.epoch, state.index),
                            None, opt, sched, cfg, "cpu", state=state)
    assert resumed.step == 6
    assert [e["loss"] for e in resumed.history] == pytest.approx([e["loss"] for e in straight.history],
                                                                 rel=1e-5)
    assert [e["lr"] for e in resumed.history] == pytest.approx([e["lr"] for e in straight.history])
    got = params_of(model)
    for name, want in expected.items():
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-7), name


def test_checkpoint_rejects_a_model_with_other_trainable_params(tiny_base: Path, tmp_path: Path) -> None:
    cfg = train_cfg()
    model = peft_model(tiny_base, cfg)
    opt = qt.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    sched = qt.make_scheduler(opt, cfg)
    qt.save_training_state(tmp_path / "c", model, opt, sched, qt.LoopState(step=2))
    other_cfg = train_cfg(target_modules=["q_proj"])
    other = peft_model(tiny_base, other_cfg)
    other_opt = qt.make_optimizer([p for p in other.parameters() if p.requires_grad], other_cfg, "cpu")
    with pytest.raises(RuntimeError, match="does not match the model's trainable parameters"):
        qt.load_training_state(tmp_path / "c", other, other_opt, qt.make_scheduler(other_opt, other_cfg))


def test_nf4_base_trains_lora_and_merges(tiny_base: Path, tokenizer, tmp_path: Path) -> None:
    """The QLoRA path itself (bitsandbytes NF4 works on CPU, slowly): 4-bit layers, a step, a merge."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = train_cfg(max_steps=2, learning_rate=1e-2)
    model = qt.prepare_peft_model(str(tiny_base), cfg, QLoRASetup("cpu", "nf4", None))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = qt.collate(qt.tokenize_rows(tokenizer, make_rows(2), 128, "rows"), tokenizer.pad_token_id)
    opt = qt.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, "cpu")
    state = qt.train_loop(model, repeat(batch), None, opt, qt.make_scheduler(opt, cfg), cfg, "cpu")
    assert state.step == 2 and math.isfinite(state.last("loss"))
    model.save_pretrained(tmp_path / "adapter")
    qt.merge_adapter(str(tiny_base), tmp_path / "adapter", tmp_path / "merged", tokenizer, "cpu")
    from forge.modeling import load_model

    merged = load_model(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_plot_losses_writes_a_png(tmp_path: Path) -> None:
    qt.plot_losses([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}],
                   tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
