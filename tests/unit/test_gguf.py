"""2C on a tiny, briefly trained Llama with our locally trained BPE tokenizer: llama.cpp's converter (with
the pre-tokenizer fallback), tokenization and greedy agreement with HF, Q5_K_M, LoRA, the job, errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from forge.compress import gguf_export  # noqa: E402
from forge.compress import llama_cpp_tools as lt  # noqa: E402
from forge.data.records import prompt_messages, reference, write_jsonl  # noqa: E402
from forge.evaluate.harness import HFBackend  # noqa: E402
from forge.evaluate.llama_cpp_backend import LlamaCppBackend  # noqa: E402
from tests.tiny_model import save_tiny_model, train_tiny_model  # noqa: E402
from tests.unit.test_pruning import make_rows  # noqa: E402

N_CTX = 512


@pytest.fixture(scope="module")
def tools() -> Path:
    try:
        return lt.ensure_tools()
    except lt.LlamaCppToolsError as exc:
        pytest.skip(f"llama.cpp converters unavailable: {exc}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gguf")
    texts = [m["content"] for r in make_rows(40) for m in r["messages"]]
    save_tiny_model(path, texts, vocab_size=512, max_position_embeddings=128)
    train_tiny_model(path, make_rows(40), max_seq_len=128)
    return path


@pytest.fixture(scope="module")
def f32_gguf(tools: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lt.convert_hf_to_gguf(tiny, tmp_path_factory.mktemp("f32") / "model-f32.gguf", "f32", "gpt-2")


@pytest.fixture(scope="module")
def hf(tiny: Path) -> HFBackend:
    from forge.modeling import load_model, load_tokenizer

    model = load_model(tiny, "cpu", dtype=torch.float32)
    return HFBackend(model, load_tokenizer(tiny), "cpu", max_new_tokens=8)


@pytest.fixture(scope="module")
def f32(f32_gguf: Path, tiny: Path):
    with LlamaCppBackend(f32_gguf, tiny, n_ctx=N_CTX, max_new_tokens=8) as backend:
        yield backend


def chat_prompts(backend: LlamaCppBackend, n: int = 6) -> tuple[list[str], list[str]]:
    rows = make_rows(n, "d")
    return [backend.prompt(prompt_messages(r)) for r in rows], [reference(r) for r in rows]


# ---- conversion ------------------------------------------------------------------------------

def test_conversion_falls_back_for_our_tokenizer_and_records_it(f32_gguf: Path) -> None:
    s = lt.gguf_summary(f32_gguf)
    meta = s["metadata"]
    assert meta[lt.FALLBACK_KEY] == "gpt-2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 128
    # 2 layers x (4 attention + 3 MLP + 2 norms) + embeddings, output norm, lm_head
    assert s["n_tensors"] == 21 and s["tensor_types"] == {"F32": 21}
    assert s["bits_per_weight"] == pytest.approx(32.0)


def test_without_fallback_the_converters_error_comes_back(tools: Path, tiny: Path, tmp_path: Path) -> None:
    message = r"(?s)convert_hf_to_gguf.py failed.*pre-tokenizer was not recognized"
    with pytest.raises(lt.LlamaCppToolsError, match=message):
        lt.convert_hf_to_gguf(tiny, tmp_path / "x.gguf", "f16", None)
    assert not (tmp_path / "x.gguf").exists()


def test_clear_errors_for_bad_inputs(tools: Path, tiny: Path, tmp_path: Path) -> None:
    assert "gpt-2" in lt.known_pre_tokenizers(tools) and "llama-bpe" in lt.known_pre_tokenizers(tools)
    with pytest.raises(ValueError, match=r"bpe_pre_tokenizer_fallback='gpt-3' is not a pre-tokenizer.*gpt-2"):
        lt.convert_hf_to_gguf(tiny, tmp_path / "x.gguf", "f16", "gpt-3")
    with pytest.raises(FileNotFoundError, match=r"no HF model to convert at .*nowhere \(config.json"):
        lt.convert_hf_to_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype 'q4' is not one of"):
        lt.convert_hf_to_gguf(tiny, tmp_path / "x.gguf", "q4")
    with pytest.raises(FileNotFoundError, match="no peft adapter at"):
        lt.convert_lora_to_gguf(tmp_path, tiny, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match=r"unknown llama.cpp quant type 'Q5_K_X'.*Q5_K_M"):
        lt.ftype_for("Q5_K_X")
    with pytest.raises(FileNotFoundError, match="no GGUF to quantize"):
        lt.quantize(tmp_path / "none.gguf", tmp_path / "q.gguf", "Q5_K_M")
    with pytest.raises(FileNotFoundError, match="no GGUF model at"):
        LlamaCppBackend(tmp_path / "none.gguf", tiny)


# ---- the llama.cpp backend vs HF -------------------------------------------------------------

def test_llama_cpp_tokenizes_chat_prompts_like_hf(f32: LlamaCppBackend) -> None:
    prompts, answers = chat_prompts(f32, 8)
    texts = prompts + [p + a + "<|end|>\n" for p, a in zip(prompts, answers, strict=True)]
    texts += ["  two  spaces\n\n\tand tabs", "It's 3.14, isn't it? ünïcödé 🦙",
              "<|user|>\nhi<|end|>\n<|assistant|>\n"]
    agree, diff = gguf_export.tokenization_agreement(f32, texts)
    assert agree == 1.0 and diff is None
    assert f32.tokenize("<|user|>")[0] == f32.tokenizer.convert_tokens_to_ids("<|user|>")  # parsed as special
    assert f32.tokenize("x")[0] != f32.tokenizer.bos_token_id  # no BOS added by llama.cpp


def test_f32_greedy_tokens_and_text_match_hf(f32: LlamaCppBackend, hf: HFBackend) -> None:
    prompts, _ = chat_prompts(f32, 4)
    agreement = gguf_export.greedy_agreement(f32, hf.model, prompts, 8)
    assert agreement["match"] == 1.0, agreement["examples"]
    assert f32.generate(prompts) == hf.generate(prompts)
    assert any(text for text in f32.generate(prompts))  # the trained model answers something


def test_answer_logprobs_match_hf(f32: LlamaCppBackend, hf: HFBackend) -> None:
    prompts, answers = chat_prompts(f32, 6)
    ours, theirs = f32.answer_logprobs(prompts, answers), hf.answer_logprobs(prompts, answers)
    assert ours == pytest.approx(theirs, abs=1e-3)
    at = f32.answer_logprobs_at(prompts[:2], answers[:2], [0.5, 1.0, 2.0])
    assert [r[1] for r in at] == pytest.approx(ours[:2], abs=1e-9)
    # temperature 2 by hand on the HF logits: log_softmax(logits / 2) at the answer + EOS tokens
    p_ids, a_ids = hf._prompt_answer_ids(prompts[:1], answers[:1])
    seq = p_ids[0] + a_ids[0] + [hf.tokenizer.eos_token_id]
    with torch.no_grad():
        logits = hf.model(input_ids=torch.tensor([seq])).logits[0].double()
    n = len(a_ids[0]) + 1
    lp = torch.log_softmax(logits[-n - 1:-1] / 2.0, dim=-1).gather(-1, torch.tensor(seq[-n:])[:, None])
    assert at[0][2] == pytest.approx(lp.mean().item(), abs=1e-3)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        f32.answer_logprobs_at(prompts[:1], answers[:1], [0.0])


# ---- quantization ------------------------------------------------------------------------------

def test_q5_k_m_quantizes_loads_and_keeps_the_first_greedy_tokens(f32_gguf: Path, tiny: Path, hf: HFBackend,
                                                                 tmp_path: Path) -> None:
    log_lines: list[str] = []
    q = lt.quantize(f32_gguf, tmp_path / "model-q5_k_m.gguf", "Q5_K_M", n_threads=1, log_lines=log_lines)
    s = lt.gguf_summary(q)
    assert set(s["tensor_types"]) == {"Q5_K", "Q6_K", "F32"}  # Q5_K_M: Q6_K for some v/down, F32 norms
    assert 5.0 < s["bits_per_weight"] < 6.5 and s["metadata"]["general.file_type"] == 17  # MOSTLY_Q5_K_M
    assert lt.quant_fallbacks(log_lines) == []  # every row width is a multiple of 256
    assert any("quant size" in line for line in log_lines)
    with LlamaCppBackend(q, tiny, n_ctx=N_CTX, max_new_tokens=8) as backend:
        prompts, answers = chat_prompts(backend, 4)
        agreement = gguf_export.greedy_agreement(backend, hf.model, prompts, 4)
        # Q5_K_M moves near-tied logits of this barely trained model; which ties flip depends on the CPU's
        # kernels (4 of 4 prompts identical on an AVX-512 host; on an AMX host 2 of 4, the other two off by
        # their first token only). The log-probs below bound the drift.
        assert agreement["match"] >= 0.5, agreement["examples"]
        quantized = backend.answer_logprobs(prompts, answers)
    assert quantized == pytest.approx(hf.answer_logprobs(prompts, answers), abs=0.1)


def test_fallback_lines_of_the_quantize_log_are_parsed() -> None:
    # verbatim from llama.cpp 0.3.36 quantizing a model whose MLP width is 320
    line = ("warning: blk.0.ffn_down.weight                - ncols    320 not divisible by 256 (required for "
            "type    q6_K) -> falling back to    q8_0")
    assert lt.quant_fallbacks(["[ 1/ 12] token_embd.weight", line]) == [
        {"tensor": "blk.0.ffn_down.weight", "ncols": 320, "block": 256, "wanted": "q6_K", "used": "q8_0"}]


# ---- LoRA --------------------------------------------------------------------------------------

def test_lora_adapter_converts_and_llama_cpp_applies_it_like_peft(tools: Path, tiny: Path, f32_gguf: Path,
                                                                 tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from forge.modeling import load_model, load_tokenizer

    torch.manual_seed(1)
    base = load_model(tiny, "cpu", dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter really changes the outputs
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = lt.convert_lora_to_gguf(tmp_path / "adapter", tiny, tmp_path / "adapter.gguf", "f32")
    meta = lt.gguf_summary(lora)["metadata"]
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    merged = HFBackend(peft_model.merge_and_unload(), load_tokenizer(tiny), "cpu")
    with LlamaCppBackend(f32_gguf, tiny, lora_path=lora, n_ctx=N_CTX) as backend:
        prompts, answers = chat_prompts(backend, 3)
        with_lora = backend.answer_logprobs(prompts, answers)
    assert with_lora == pytest.approx(merged.answer_logprobs(prompts, answers), abs=1e-3)
    with LlamaCppBackend(f32_gguf, tiny, n_ctx=N_CTX) as backend:
        without = backend.answer_logprobs(prompts, answers)
    # the adapter did act: far more than the 1e-3 by which llama.cpp and peft may differ
    assert max(abs(x - y) for x, y in zip(with_lora, without, strict=True)) > 0.01


# ---- fetching the converters ---------------------------------------------------------------------

def fake_sdist(path: Path, parts: tuple[str, ...]) -> Path:
    src = path / "src" / "llama_cpp_python-9.9.9"
    files = {"vendor/llama.cpp/src/llama.cpp": "// not needed", "pyproject.toml": "", "README.md": ""}
    for part in parts:
        rel = f"vendor/llama.cpp/{part}" if part.endswith(".py") else f"vendor/llama.cpp/{part}/x.py"
        files[rel] = "# " + part
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    tar = path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(src, arcname=src.name)
    return tar


def test_ensure_tools_extracts_only_the_converter_parts(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "share" / "llama.cpp-x"
    monkeypatch.setenv(lt.ENV_TOOLS, str(target))
    monkeypatch.setenv(lt.ENV_SDIST, str(fake_sdist(tmp_path, lt.PARTS)))
    assert lt.tools_dir() == target and not lt.tools_complete(target)
    assert lt.ensure_tools() == target
    assert sorted(p.name for p in target.iterdir()) == sorted([*lt.PARTS, "SOURCE"])
    assert (target / "gguf-py" / "x.py").read_text() == "# gguf-py"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp folder left behind
    assert lt.ensure_tools() == target  # second call: already there

    broken = tmp_path / "broken"
    broken.mkdir()
    monkeypatch.setenv(lt.ENV_TOOLS, str(tmp_path / "other"))
    monkeypatch.setenv(lt.ENV_SDIST, str(fake_sdist(broken, ("conversion",))))
    with pytest.raises(lt.LlamaCppToolsError, match="has no .*convert_hf_to_gguf.py"):
        lt.ensure_tools()
    assert not (tmp_path / "other").exists()


# ---- the 2C job, through the runner ----------------------------------------------------------------

RUN = "gguf-test"


def commit_input(store, phase: str, folder: Path, info: dict) -> None:
    """An upstream phase's output committed as if it had run in RUN (the runner reads its manifest)."""
    from forge.artifacts import Manifest

    manifest = Manifest(phase=phase, cache_key=f"key-{phase}", base_uri="", run_id=RUN, info=info)
    store.commit(folder, store.run_dir(RUN, phase), manifest)


def test_run_phase_exports_q5_k_m_with_tokenizer_and_a_quality_row(
        tools: Path, tiny: Path, tmp_path: Path, forge_home: Path, tiny_overrides: dict) -> None:
    from forge.config import load_config
    from forge.ledger import read_rows
    from forge.runner import make_store, run_phase

    cfg = load_config(profile="demo", overrides={
        **tiny_overrides, "gguf": {"n_ctx": N_CTX, "greedy_check_prompts": 3},
        "eval": {"max_new_tokens": 6, "batch_size": 4}})
    store = make_store(cfg)
    data = tmp_path / "prep_data"
    data.mkdir()
    write_jsonl(data / "dev.jsonl", make_rows(4, "d"))
    commit_input(store, "prep_data", data, {})
    commit_input(store, "2A", tiny, {"quality": {"acc": 0.25, "logprob": -3.0}})

    manifest = run_phase("2C", cfg, RUN, track=False)
    info, q = manifest.info, manifest.info["quality"]
    assert info["gguf"] == "model-q5_k_m.gguf" and info["quant_type"] == "Q5_K_M"
    for name in ("model-q5_k_m.gguf", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", "dev_eval.jsonl", "gguf_report.json"):
        assert name in manifest.files, name
    assert not any(name.endswith("f16.gguf") for name in manifest.files)  # the f16 stays in scratch
    assert q["n"] == 4.0 and q["delta_acc"] == pytest.approx(q["acc"] - 0.25)
    assert q["delta_logprob"] == pytest.approx(q["logprob"] + 3.0)
    assert q["greedy_match"] == 1.0 and 5.0 < q["bits_per_weight"] < 6.5
    assert 0 < q["size_mb"] < q["size_mb_before"] and q["compression_ratio"] > 4  # from fp32 safetensors
    assert info["bpe_pre_tokenizer_fallback"] == "gpt-2" and info["quant_fallbacks"] == []
    assert manifest.metrics["tokenization_match"] == 1.0 and "pre-tokenizer gpt-2 (fallback)" in info["notes"]
    row = read_rows(store, RUN)[-1]
    assert row["phase"] == "2C" and row["quality"]["greedy_match"] == 1.0

    out = store.materialize(manifest)
    report = json.loads((out / "gguf_report.json").read_text())
    assert report["greedy"]["n_prompts"] == 3 and report["greedy"]["n_tokens"] == 8
    assert report["converted"]["tensor_types"] == {"F16": 16, "F32": 5}
    # the job's eval is the harness over llama.cpp: rows carry the rendered chat prompt
    first = json.loads((out / "dev_eval.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<|user|>\n") and first["prompt"].endswith("<|assistant|>\n")
    # the GGUF loads from the committed output with the tokenizer beside it
    with LlamaCppBackend(out / info["gguf"], out, n_ctx=N_CTX) as backend:
        assert backend.generate([first["prompt"]]) == [first["output"]]
