"""2C: 2A's pruned model -> GGUF (llama.cpp's own converter) -> Q5_K_M (llama_model_quantize), scored
with llama.cpp itself.

Read top to bottom: 1. the files that ship beside the GGUF  2. checks against the HF model
(tokenization, greedy tokens)  3. the job. The conversion and quantization live in llama_cpp_tools.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.compress.gguf_config import GGUFConfig
from forge.data.records import prompt_messages, read_jsonl, reference

if TYPE_CHECKING:
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend
    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.compress")


# ---- 1. the files that ship beside the GGUF ---------------------------------------------------

# What LlamaCppBackend (chat template, EOS), 2E (config.json for the LoRA converter and dequantization)
# and serving read next to the GGUF; whichever of them the HF folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "config.json", "generation_config.json")


def copy_tokenizer_files(src: Path, dest: Path) -> list[str]:
    if not (src / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{src} has no tokenizer_config.json: the GGUF needs the HF tokenizer and "
                                "its chat template beside it")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    return copied


# ---- 2. checks against the HF model -----------------------------------------------------------

def tokenization_agreement(backend: LlamaCppBackend, texts: list[str]) -> tuple[float, dict[str, Any] | None]:
    """Fraction of texts that llama.cpp tokenizes exactly as the HF tokenizer does, and the first one
    that it does not (text and both id lists), if any."""
    tok = backend.tokenizer
    same, first_diff = 0, None
    for text in texts:
        ours, theirs = backend.tokenize(text), tok(text, add_special_tokens=False)["input_ids"]
        if ours == theirs:
            same += 1
        elif first_diff is None:
            first_diff = {"text": text, "llama_cpp": ours, "hf": theirs}
    return same / max(len(texts), 1), first_diff


def hf_greedy_token_ids(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    """The first n argmax tokens of an HF model after prompt (not stopping at EOS, like
    LlamaCppBackend.greedy_token_ids), with the KV cache."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]], device=device)
    return out


def greedy_agreement(backend: LlamaCppBackend, model: Any, prompts: list[str], n: int) -> dict[str, Any]:
    """match: fraction of prompts whose first n greedy tokens are identical on both; prefix: mean
    fraction of leading tokens that agree; examples: both id lists per prompt."""
    examples, full, prefix = [], 0, 0.0
    for prompt in prompts:
        ours = backend.greedy_token_ids(prompt, n)
        theirs = hf_greedy_token_ids(model, backend.tokenizer, prompt, n)
        # (a prompt near the context limit may leave room for fewer than n tokens: those count as misses)
        pairs = zip(ours, theirs, strict=False)
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
        full += agree == n
        prefix += agree / n
        examples.append({"prompt": prompt, "llama_cpp": ours, "hf": theirs, "agree": agree})
    k = max(len(prompts), 1)
    return {"match": full / k, "prefix": prefix / k, "n_prompts": len(prompts), "n_tokens": n,
            "examples": examples}


def load_reference_model(src: Path) -> Any:
    """2A's HF model in fp32 (the weights the GGUF was converted from), on the accelerator if any."""
    import torch

    from forge.modeling import load_model, pick_device

    return load_model(src, pick_device("auto"), dtype=torch.float32)


# ---- 3. the job -------------------------------------------------------------------------------

def run(ctx: JobContext) -> JobResult:
    from forge.compress import llama_cpp_tools as lt
    from forge.compress.pruning import dir_mb
    from forge.evaluate.harness import run_eval
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend
    from forge.ledger import with_deltas
    from forge.runner import JobResult

    cfg: GGUFConfig = ctx.config.gguf
    src = ctx.input_dir("2A")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"2C needs 2A's pruned model at {src} (config.json missing)")
    dev_path = ctx.input_dir("prep_data") / "dev.jsonl"
    dev_rows = read_jsonl(dev_path)
    if not dev_rows:
        raise ValueError(f"2C: {dev_path} has no rows to evaluate the GGUF on")
    out = ctx.out_dir

    started = time.perf_counter()
    converted = lt.convert_hf_to_gguf(src, ctx.work_dir / f"model-{cfg.outtype}.gguf", cfg.outtype,
                                      cfg.bpe_pre_tokenizer_fallback)
    convert_seconds = time.perf_counter() - started
    name = f"model-{cfg.quant_type.lower()}.gguf"
    quant_log: list[str] = []
    started = time.perf_counter()
    lt.quantize(converted, out / name, cfg.quant_type, cfg.n_threads, quant_log)
    quantize_seconds = time.perf_counter() - started
    fallbacks = lt.quant_fallbacks(quant_log)
    if fallbacks:
        log.warning("%d tensor(s) could not use %s's block size and fell back: %s", len(fallbacks),
                    cfg.quant_type, ", ".join(f"{f['tensor']} -> {f['used']}" for f in fallbacks[:5]))
    copied = copy_tokenizer_files(src, out)
    conv_summary, quant_summary = lt.gguf_summary(converted), lt.gguf_summary(out / name)
    meta = quant_summary.pop("metadata")
    conv_summary.pop("metadata")
    pre_tokenizer, bpe_fallback = meta.get("tokenizer.ggml.pre"), meta.get(lt.FALLBACK_KEY)

    with LlamaCppBackend(out / name, out, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_batch=cfg.n_batch,
                         max_new_tokens=ctx.config.eval.max_new_tokens) as backend:
        prompts = [backend.prompt(prompt_messages(r)) for r in dev_rows]
        texts = prompts + [p + reference(r) for p, r in zip(prompts, dev_rows, strict=True)]
        tok_match, tok_diff = tokenization_agreement(backend, texts)
        if bpe_fallback and tok_match < 1.0:
            raise ValueError(
                f"gguf.bpe_pre_tokenizer_fallback={bpe_fallback!r} does not tokenize like the HF tokenizer "
                f"of {src} ({tok_match:.0%} of {len(texts)} dev texts agree; first difference: {tok_diff}); "
                f"pick another pre-tokenizer")
        log.info("evaluating %s on %d dev rows with llama.cpp", name, len(dev_rows))
        report = run_eval(backend, dev_rows, ctx.config.eval, backend.prompt)
        greedy = None
        if cfg.greedy_check_prompts:
            model = load_reference_model(src)
            greedy = greedy_agreement(backend, model, prompts[:cfg.greedy_check_prompts],
                                      cfg.greedy_check_tokens)
            del model
    report.to_jsonl(out / "dev_eval.jsonl")
    after = report.summary()

    size_mb, size_before = dir_mb(out, ".gguf"), dir_mb(src)
    prev = ctx.input_info("2A").get("quality", {}) or {}
    quality = with_deltas(after, prev)  # vs the previous step's ledger row (2A's fp weights), same dev suite
    bpw = quant_summary["bits_per_weight"]
    quality.update(size_mb=size_mb, size_mb_before=size_before, bits_per_weight=bpw,
                   compression_ratio=size_before / size_mb if size_mb else float("nan"))
    if greedy:
        quality["greedy_match"] = greedy["match"]

    version = lt.llama_cpp_version()
    gguf_report = {
        # no local paths or wall-clock times (those are metrics): a re-run writes the same bytes
        "config": cfg.model_dump(mode="json"), "llama_cpp_python": version,
        "source": {"phase": "2A", "cache_key": ctx.inputs["2A"].cache_key},
        "converted": {"outtype": cfg.outtype, **conv_summary},
        "quantized": {"file": name, "quant_type": cfg.quant_type, **quant_summary},
        "quant_fallbacks": fallbacks, "pre_tokenizer": pre_tokenizer,
        "bpe_pre_tokenizer_fallback": bpe_fallback,
        "tokenization_match": tok_match, "tokenization_first_difference": tok_diff, "greedy": greedy,
        "copied": copied, "after": after, "before": prev,
    }
    report_path = out / "gguf_report.json"
    report_path.write_text(json.dumps(gguf_report, indent=2))
    ctx.log_artifact(report_path)

    metrics = {"convert_seconds": convert_seconds, "quantize_seconds": quantize_seconds,
               "eval_seconds": report.seconds, "size_mb_before": size_before, "size_mb_after": size_mb,
               "size_mb_converted": conv_summary["file_bytes"] / 1e6,
               "bits_per_weight": bpw, "tokenization_match": tok_match,
               "quant_fallback_tensors": len(fallbacks), "n_tensors": quant_summary["n_tensors"]}
    if greedy:
        metrics.update(greedy_match=greedy["match"], greedy_prefix=greedy["prefix"])
    pre = f"{pre_tokenizer} (fallback)" if bpe_fallback else str(pre_tokenizer)
    greedy_note = (f"; greedy {greedy['match']:.0%} of {greedy['n_prompts']} prompts match HF for "
                   f"{greedy['n_tokens']} tokens" if greedy else "")
    fallback_note = f"; {len(fallbacks)} tensor(s) fell back from {cfg.quant_type}" if fallbacks else ""
    notes = (f"GGUF {cfg.quant_type} via llama.cpp (llama-cpp-python {version}, pre-tokenizer {pre}); "
             f"{size_before:.2f} MB -> {size_mb:.2f} MB ({bpw:.2f} bpw); dev acc "
             f"{quality.get('acc_before', float('nan')):.3f} -> {quality.get('acc', float('nan')):.3f}"
             f"{greedy_note}{fallback_note}")
    info = {"gguf": name, "quant_type": cfg.quant_type, "outtype": cfg.outtype, "llama_cpp_python": version,
            "pre_tokenizer": pre_tokenizer, "bpe_pre_tokenizer_fallback": bpe_fallback,
            "tensor_types": quant_summary["tensor_types"], "quant_fallbacks": fallbacks}
    return JobResult(metrics={k: float(v) for k, v in metrics.items()}, quality=quality, notes=notes,
                     info=info)
