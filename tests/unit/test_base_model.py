"""prep_model: the demo build (tokenizer, pre-training, HF folder) and the HF-reference branch."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from forge.config import PipelineConfig, load_config
from forge.runner import make_store, run_phase
from tests.conftest import TINY_OVERRIDES

RUN = "base-model-test"


def _config(**model: object) -> PipelineConfig:
    overrides = copy.deepcopy(TINY_OVERRIDES)
    overrides["model"].update(model)
    return load_config(profile="demo", overrides=overrides)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """prep_data then prep_model once for the module, in a private FORGE_HOME."""
    home = tmp_path_factory.mktemp("forge_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(home))
        cfg = _config()
        run_phase("prep_data", cfg, RUN, track=False)
        manifest = run_phase("prep_model", cfg, RUN, track=False)
        store = make_store(cfg)
        yield cfg, manifest, store.materialize(manifest), store


def test_demo_folder_loads_with_auto_classes_and_generates(demo_run) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, manifest, model_dir, _ = demo_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "eval/dev_eval.jsonl"):
        assert name in manifest.files, name
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok) == cfg.model.demo.vocab_size
    assert model.config.num_hidden_layers == 2
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    assert model.generation_config.eos_token_id == end_id == model.config.eos_token_id
    assert manifest.info["source"] == "demo"
    assert manifest.info["n_params"] == sum(p.numel() for p in model.parameters())

    prompt = tok("Sort the words: cat kiwi boat", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_chat_template_round_trips(demo_run) -> None:
    from transformers import AutoTokenizer

    _, _, model_dir, _ = demo_run
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "Answer: 5"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n"
                    "<|assistant|>\nAnswer: 5<|end|>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Each chat marker is one token, and no BOS/EOS sneaks in implicitly.
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert ids.count(tok.convert_tokens_to_ids(marker)) == text.count(marker)
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True) == "\nBe brief.\n\nWhat is 2 + 3?\n\nAnswer: 5\n"


def test_pretraining_made_the_model_better_than_random(demo_run) -> None:
    from transformers import AutoTokenizer

    from forge.data.records import prompt_messages, read_jsonl, reference
    from forge.evaluate.harness import HFBackend
    from forge.train.base_model import build_model

    cfg, manifest, model_dir, store = demo_run
    m = manifest.metrics
    assert abs(m["pretrain_initial_loss"] - math.log(cfg.model.demo.vocab_size)) < 1.0  # starts random
    assert m["pretrain_final_loss"] < m["pretrain_initial_loss"] - 1.5
    assert m["pretrain_tokens_per_s"] > 0 and m["pretrain_tokens"] == 40 * 8 * 128

    q = manifest.info["quality"]
    assert set(q) == {"acc", "logprob", "n", *(f"acc.{d}" for d in cfg.domains)}
    assert q["n"] == 8 * len(cfg.domains)
    # The dev log-prob of the references beats the same architecture freshly initialized.
    tok = AutoTokenizer.from_pretrained(model_dir)
    random_model = build_model(cfg.model.demo, tok, seed=cfg.data.seed).eval()
    backend = HFBackend(random_model, tok, "cpu", batch_size=16)
    data_dir = store.materialize(store.run_manifest(RUN, "prep_data"))
    dev = read_jsonl(data_dir / "dev.jsonl")
    random_lp = backend.answer_logprobs([backend.prompt(prompt_messages(r)) for r in dev],
                                        [reference(r) for r in dev])
    assert q["logprob"] > sum(random_lp) / len(random_lp) + 1.0
    records = (model_dir / "eval" / "dev_eval.jsonl").read_text().splitlines()
    assert len(records) == q["n"]


def test_hf_branch_references_a_local_folder_without_copying(demo_run, monkeypatch) -> None:
    cfg, demo_manifest, model_dir, store = demo_run
    home = Path(store.root.removeprefix("file://")).parent
    monkeypatch.setenv("FORGE_HOME", str(home))
    hf_cfg = _config(base=str(model_dir))
    run_phase("prep_data", hf_cfg, "hf-branch", track=False)  # a cache hit: same data config
    manifest = run_phase("prep_model", hf_cfg, "hf-branch", track=False)
    assert manifest.info["model_ref"] == str(model_dir.resolve())
    assert manifest.info["source"] == "hf" and manifest.info["revision"] is None
    assert not [f for f in manifest.files if f.endswith((".safetensors", ".bin"))]
    assert "eval/dev_eval.jsonl" in manifest.files
    assert manifest.info["n_params"] == demo_manifest.info["n_params"]
    # Same weights, same dev rows, greedy: the same quality as the demo build measured in memory.
    q, demo_q = manifest.info["quality"], demo_manifest.info["quality"]
    assert q["acc"] == demo_q["acc"]
    assert q["logprob"] == pytest.approx(demo_q["logprob"], abs=1e-4)


def test_bad_model_base_gives_clear_errors(tmp_path: Path, monkeypatch) -> None:
    from forge.train.base_model import _load_hf, resolve_hf_ref

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_hf_ref(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_hf_ref(str(tmp_path / "missing"))
    assert resolve_hf_ref("org/some-model") == "org/some-model"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _config(base="forge-tests/not-a-real-model")
    with pytest.raises(RuntimeError, match="HF_TOKEN.*HF_HUB_OFFLINE"):
        _load_hf(cfg, "forge-tests/not-a-real-model", "cpu")


def test_tokenizer_vocab_must_hold_bytes_and_specials() -> None:
    from forge.train.base_model import train_tokenizer

    with pytest.raises(ValueError, match="vocab_size must be >= 262"):
        train_tokenizer(["hello"], vocab_size=100, max_length=64)
