"""0A vocab analysis and 0B trimming on a tiny BPE tokenizer + tiny Llama built here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from forge.artifacts import Manifest
from forge.config import load_config
from forge.data.records import iter_text, read_jsonl, write_jsonl
from forge.data.vocab import count_tokens, coverage_curve, k_for_coverage, trim_tokenizer_json
from forge.runner import make_store, run_phase

SPECIAL = ["<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
COMMON = ("the a of to and in is it for on that with as was at by this be from or are an "
          "sum list value return print def count total number first last add two three").split()
RARE = ("xylophone quixotic zephyr jubilant byzantine kaleidoscope onomatopoeia juxtapose "
        "naïve café Zürich façade").split()
RUN_ID = "test_vocab"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(RARE) if rng.random() < 0.04 else rng.choice(COMMON)
             for _ in range(rng.randint(5, 12))]
    return " ".join(words) + rng.choice([".", "?", "!", ": 42", " = 7"])


def _rows(rng: random.Random, n: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "domain": "general", "source": "test",
             "check": {"kind": "exact", "answer": "x"},
             "messages": [{"role": "user", "content": _sentence(rng)},
                          {"role": "assistant", "content": _sentence(rng)}]} for i in range(n)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """prep_data files + a prep_model folder (BPE tokenizer and a briefly trained tiny Llama)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("vocab_upstream")
    data, model_dir = root / "prep_data", root / "prep_model"
    data.mkdir()
    train, heldout = _rows(rng, 120, "train"), _rows(rng, 24, "heldout")
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "heldout.jsonl", heldout)
    pretrain = [_sentence(rng) for _ in range(300)]
    (data / "pretrain.txt").write_text("\n".join(pretrain) + "\n")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(pretrain + list(iter_text(train)), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>",
                                  pad_token="<|pad|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # a few dozen steps, so the model prefers the merged tokens it saw (the ppl gate needs that)
    stream: list[int] = []
    for text in pretrain:
        stream += [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    data_t = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, len(data_t) - 33, (16,))
        batch = torch.stack([data_t[s:s + 32] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(model_dir)
    return {"data": data, "model": model_dir}


def _seed_store(cfg, upstream: dict[str, Path]) -> None:
    """Commit the upstream folders as if prep_data and prep_model had run in RUN_ID."""
    store = make_store(cfg)
    for phase, folder in (("prep_data", upstream["data"]), ("prep_model", upstream["model"])):
        m = Manifest(phase=phase, cache_key=f"test-{phase}", base_uri="", run_id=RUN_ID)
        store.commit(folder, store.run_dir(RUN_ID, phase), m)


def _config(**vocab):
    return load_config(overrides={"vocab": {"trim_enabled": True, **vocab}, "eval": {"batch_size": 8}})


# ---- pure functions -----------------------------------------------------------------------------


def test_k_for_coverage_on_hand_made_counts() -> None:
    counts = np.array([5, 0, 50, 10, 30, 5])  # sorted: 50 30 10 5 5 0, total 100
    assert k_for_coverage(counts, 0.5) == 1
    assert k_for_coverage(counts, 0.8) == 2
    assert k_for_coverage(counts, 0.81) == 3
    assert k_for_coverage(counts, 0.9) == 3
    assert k_for_coverage(counts, 0.95) == 4
    assert k_for_coverage(counts, 1.0) == 5  # the unused token is never needed
    np.testing.assert_allclose(coverage_curve(counts), [0.5, 0.8, 0.9, 0.95, 1.0, 1.0])


def test_coverage_curve_monotone_and_complete(upstream: dict[str, Path]) -> None:
    from forge.modeling import load_tokenizer

    tok = load_tokenizer(upstream["model"])
    texts = list(iter_text(read_jsonl(upstream["data"] / "train.jsonl")))
    counts = count_tokens(tok, texts)
    assert counts.sum() == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    curve = coverage_curve(counts)
    assert len(curve) == len(tok)
    assert np.all(np.diff(curve) >= 0)
    assert curve[-1] == pytest.approx(1.0)
    assert curve[0] < 1.0


def test_trim_tokenizer_json_closes_over_merge_parts() -> None:
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5},
                    "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]},
          "added_tokens": [{"id": 6, "content": "<|end|>", "special": True}],
          "post_processor": {"type": "TemplateProcessing",
                             "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [6],
                                                            "tokens": ["<|end|>"]}}}}
    new, old_ids = trim_tokenizer_json(tj, {4})  # keep only "abc": "ab" must come back with it
    assert old_ids == [0, 1, 2, 3, 4, 6]
    assert new["model"]["vocab"] == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}
    assert new["model"]["merges"] == [["a", "b"], ["ab", "c"]]  # "bc" was dropped with its merge
    assert new["added_tokens"][0]["id"] == 5
    assert new["post_processor"]["special_tokens"]["<|end|>"]["ids"] == [5]
    with pytest.raises(ValueError, match="BPE"):
        trim_tokenizer_json({"model": {"type": "Unigram"}}, set())


# ---- the phases through the runner -----------------------------------------------------------------


def test_analyze_writes_consistent_report(forge_home: Path, upstream: dict[str, Path]) -> None:
    cfg = _config(coverage_target=0.9)
    _seed_store(cfg, upstream)
    manifest = run_phase("0A", cfg, RUN_ID, track=False)
    out = make_store(cfg).materialize(manifest)
    assert {"token_counts.json", "vocab_report.json", "coverage.png"} <= set(manifest.files)
    assert (out / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts_map = json.loads((out / "token_counts.json").read_text())
    counts = np.array([counts_map[str(i)] for i in range(len(counts_map))])
    report = json.loads((out / "vocab_report.json").read_text())
    from forge.modeling import load_tokenizer

    assert report["vocab_size"] == len(counts) == len(load_tokenizer(upstream["model"]))
    assert report["corpus_tokens"] == counts.sum()
    assert report["unused_tokens"] == int((counts == 0).sum()) >= len(SPECIAL)  # specials never in text
    k = report["k_for_target"]
    assert k == k_for_coverage(counts, 0.9)
    top = np.sort(counts)[::-1]
    assert top[:k].sum() / counts.sum() >= 0.9 > top[:k - 1].sum() / counts.sum()
    assert report["coverage_at_k"][str(len(counts))] == pytest.approx(1.0)
    assert manifest.info["quality"]["k_for_target"] == k


def test_trim_is_lossless_smaller_and_keeps_rows(forge_home: Path, upstream: dict[str, Path]) -> None:
    import torch

    from forge.modeling import load_model, load_tokenizer

    cfg = _config(coverage_target=0.9, max_ppl_increase=10.0)
    _seed_store(cfg, upstream)
    run_phase("0A", cfg, RUN_ID, track=False)
    manifest = run_phase("0B", cfg, RUN_ID, track=False)
    out = make_store(cfg).materialize(manifest)
    old_tok, new_tok = load_tokenizer(upstream["model"]), load_tokenizer(out)
    assert len(new_tok) < len(old_tok)
    q = manifest.info["quality"]
    assert q["vocab_after"] == len(new_tok) and q["vocab_before"] == len(old_tok)
    assert q["ppl_per_byte_before"] > 1 and q["ppl_per_byte_after"] > 1
    assert q["bytes_saved"] > 0

    texts = list(iter_text(read_jsonl(upstream["data"] / "heldout.jsonl")))
    texts += ["unseen: Ωmega 東京 🚀 tabs\tand\nnewlines", "quixotic zephyr façade"]
    for text in texts:
        assert new_tok.decode(new_tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = [{"role": "user", "content": "sum two"}, {"role": "assistant", "content": "three"}]
    rendered = new_tok.apply_chat_template(chat, tokenize=False)
    assert rendered == old_tok.apply_chat_template(chat, tokenize=False)
    ids = new_tok(rendered, add_special_tokens=False)["input_ids"]
    assert new_tok.convert_tokens_to_ids("<|end|>") in ids
    assert new_tok.decode(ids) == rendered

    old_model, new_model = load_model(upstream["model"]), load_model(out)
    assert new_model.config.vocab_size == len(new_tok)
    assert new_model.config.eos_token_id == new_tok.eos_token_id == new_tok.convert_tokens_to_ids("<|end|>")
    assert new_model.config.bos_token_id == new_tok.bos_token_id
    old_emb, new_emb = old_model.get_input_embeddings().weight, new_model.get_input_embeddings().weight
    old_head, new_head = old_model.get_output_embeddings().weight, new_model.get_output_embeddings().weight
    vocab = new_tok.get_vocab()
    for token, new_id in vocab.items():
        old_id = old_tok.convert_tokens_to_ids(token)
        assert torch.equal(new_emb[new_id], old_emb[old_id]), token
        assert torch.equal(new_head[new_id], old_head[old_id]), token
    batch = new_tok(["sum two three", "naïve café"], return_tensors="pt", padding=True)
    logits = new_model(**batch).logits
    assert logits.shape[-1] == len(new_tok) and torch.isfinite(logits).all()


def test_trim_gate_raises_when_perplexity_rises(forge_home: Path, upstream: dict[str, Path]) -> None:
    cfg = _config(coverage_target=0.8, max_ppl_increase=0.0)
    _seed_store(cfg, upstream)
    run_phase("0A", cfg, RUN_ID, track=False)
    with pytest.raises(ValueError, match=r"per-byte perplexity .* from \d+\.\d+ to \d+\.\d+") as err:
        run_phase("0B", cfg, RUN_ID, track=False)
    assert "max_ppl_increase" in str(err.value)
    assert make_store(cfg).run_manifest(RUN_ID, "0B") is None  # nothing committed


def test_trim_skipped_by_default(forge_home: Path, upstream: dict[str, Path]) -> None:
    cfg = load_config()
    _seed_store(cfg, upstream)
    run_phase("0A", cfg, RUN_ID, track=False)
    manifest = run_phase("0B", cfg, RUN_ID, track=False)
    assert manifest.status == "skipped" and "English" in (manifest.skip_reason or "")
