"""Phase 0A (vocab analysis) and 0B (vocab trimming).

0A counts how often each token of the base tokenizer occurs in our corpus (train split +
pre-training text) and how many of the most frequent tokens cover `coverage_target` of it.
0B keeps those tokens (plus special tokens and the BPE base alphabet, so every text stays
encodable), rebuilds the BPE tokenizer around them, slices the embedding and lm_head rows and
checks that per-byte perplexity on the held-out split did not rise more than allowed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forge.data.records import DataError, iter_text, read_jsonl
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.vocab")

ENCODE_BATCH = 512
REPORT_KS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


# ---- 0A: counting and coverage ---------------------------------------------------------------


def corpus_texts(data_dir: Path) -> Iterator[str]:
    """The texts 0A counts over: every message of train.jsonl, then pretrain.txt line by line."""
    train = data_dir / "train.jsonl"
    if not train.is_file():
        raise DataError(f"{train}: prep_data output is missing train.jsonl")
    yield from iter_text(read_jsonl(train))
    pretrain = data_dir / "pretrain.txt"
    if pretrain.is_file():
        with open(pretrain, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_tokens(tokenizer: Any, texts: Iterable[str]) -> np.ndarray:
    """Occurrences of every token id (length = len(tokenizer)) over the texts, no special tokens."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for batch in _batches(texts, ENCODE_BATCH):
        ids = [i for seq in tokenizer(batch, add_special_tokens=False)["input_ids"] for i in seq]
        if ids:  # one bincount per batch: per text would cost a vocab-sized array each (128K for Llama 3)
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(counts))[: len(counts)]
    return counts


def coverage_curve(counts: np.ndarray) -> np.ndarray:
    """curve[k-1] = fraction of all corpus tokens covered by the k most frequent token ids."""
    total = int(counts.sum())
    if total == 0:
        raise DataError("vocab analysis: the corpus has no tokens (empty train.jsonl and pretrain.txt?)")
    return np.cumsum(np.sort(counts)[::-1]) / total


def k_for_coverage(counts: np.ndarray, target: float) -> int:
    """The smallest K whose top-K tokens cover at least `target` of the corpus."""
    curve = coverage_curve(counts)
    # tolerance: a cumulative float sum can land a hair under an exactly reachable target
    return int(np.searchsorted(curve, target - 1e-12, side="left")) + 1


def plot_coverage(curve: np.ndarray, target: float, k_target: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, len(curve) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ks, curve, lw=2, label="corpus coverage")
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target:.2%}")
    ax.axvline(k_target, color="tab:green", ls=":", lw=1.5, label=f"K = {k_target:,}")
    ax.set_xscale("log")
    ax.set_xlabel("top-K most frequent tokens (log scale)")
    ax.set_ylabel("fraction of corpus tokens covered")
    ax.set_title(f"Vocab coverage: {k_target:,} of {len(curve):,} tokens reach the target")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(ctx: JobContext) -> JobResult:
    """0A: token frequencies over our corpus, the coverage curve and the K for the target."""
    from forge.modeling import load_tokenizer, model_ref

    cfg = ctx.config
    target = cfg.vocab.coverage_target
    tokenizer = load_tokenizer(model_ref(ctx, "prep_model"), cfg.model.revision, cfg.model.trust_remote_code)
    log.info("0A: counting tokens of %d-token vocab over train.jsonl + pretrain.txt", len(tokenizer))
    counts = count_tokens(tokenizer, corpus_texts(ctx.input_dir("prep_data")))
    curve = coverage_curve(counts)
    k_target = k_for_coverage(counts, target)
    vocab_size = len(counts)
    corpus_tokens = int(counts.sum())
    unused = int((counts == 0).sum())
    ks = sorted({k for k in REPORT_KS if k < vocab_size} | {vocab_size})
    report = {
        "vocab_size": vocab_size,
        "corpus_tokens": corpus_tokens,
        "coverage_target": target,
        "k_for_target": k_target,
        "k_fraction_of_vocab": k_target / vocab_size,
        "coverage_at_k": {str(k): float(curve[k - 1]) for k in ks},
        "unused_tokens": unused,
        "used_tokens": vocab_size - unused,
    }
    (ctx.out_dir / "token_counts.json").write_text(
        json.dumps({str(i): int(c) for i, c in enumerate(counts)}))
    report_path = ctx.out_dir / "vocab_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    plot_path = ctx.out_dir / "coverage.png"
    plot_coverage(curve, target, k_target, plot_path)
    ctx.log_artifact(plot_path)
    ctx.log_artifact(report_path)
    log.info("0A: %d corpus tokens; top %d of %d tokens cover %.2f%%; %d tokens never used",
             corpus_tokens, k_target, vocab_size, 100 * target, unused)
    quality = {"k_for_target": float(k_target), "coverage_target": target,
               "vocab_size": float(vocab_size), "unused_tokens": float(unused),
               "k_fraction_of_vocab": k_target / vocab_size}
    return JobResult(
        metrics={"corpus_tokens": float(corpus_tokens), **quality},
        quality=quality,
        notes=f"{k_target}/{vocab_size} tokens cover {target:.1%} of {corpus_tokens} corpus tokens; "
              f"{unused} unused",
        info={"k_for_target": k_target, "vocab_size": vocab_size},
    )


# ---- 0B: trimming the BPE tokenizer ----------------------------------------------------------


def _merge_pair(merge: str | Sequence[str]) -> tuple[str, str]:
    if isinstance(merge, str):  # older tokenizer.json: "a b"
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def trim_tokenizer_json(tj: dict[str, Any], keep: set[int]) -> tuple[dict[str, Any], list[int]]:
    """A BPE tokenizer.json keeping `keep`, the added/special tokens and the base alphabet.

    The kept set is closed under merge parts (a kept token stays reachable by BPE); merges are
    filtered to those whose two parts and result are all kept. Returns the new tokenizer.json and
    `old_ids`: old_ids[new_id] = old_id (ids keep their relative order).
    """
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError("vocab trimming (0B) supports BPE tokenizers only; "
                         f"this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    id_to_tok = {i: t for t, i in vocab.items()}
    pairs = [_merge_pair(m) for m in model["merges"]]
    produced_by: dict[str, list[tuple[str, str]]] = {}
    for a, b in pairs:
        produced_by.setdefault(a + b, []).append((a, b))

    kept_toks = {id_to_tok[i] for i in keep if i in id_to_tok}
    # the base alphabet: every vocab entry that no merge produces (all 256 bytes for byte-level BPE)
    kept_toks |= {t for t in vocab if t not in produced_by}
    if model.get("unk_token") in vocab:
        kept_toks.add(model["unk_token"])
    stack = list(kept_toks)
    while stack:  # closure: the parts of a kept token must exist for BPE to ever build it
        for a, b in produced_by.get(stack.pop(), ()):
            for part in (a, b):
                if part in vocab and part not in kept_toks:
                    kept_toks.add(part)
                    stack.append(part)

    added = tj.get("added_tokens") or []
    old_ids = sorted({vocab[t] for t in kept_toks} | {a["id"] for a in added})
    new_id = {old: new for new, old in enumerate(old_ids)}

    new_tj = json.loads(json.dumps(tj))  # deep copy
    new_model = new_tj["model"]
    new_model["vocab"] = {t: new_id[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
                          if t in kept_toks}
    new_model["merges"] = [m for m, (a, b) in zip(model["merges"], pairs, strict=True)
                           if a in kept_toks and b in kept_toks and a + b in kept_toks]
    for tok in new_tj.get("added_tokens") or []:
        tok["id"] = new_id[tok["id"]]
    if new_tj.get("post_processor"):
        _remap_special_ids(new_tj["post_processor"], new_id)
    return new_tj, old_ids


def _remap_special_ids(node: Any, new_id: dict[int, int]) -> None:
    """TemplateProcessing stores special token ids (e.g. a BOS it prepends): renumber them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "special_tokens" and isinstance(value, dict):
                for spec in value.values():
                    if isinstance(spec, dict) and isinstance(spec.get("ids"), list):
                        spec["ids"] = [new_id[i] for i in spec["ids"]]
            else:
                _remap_special_ids(value, new_id)
    elif isinstance(node, list):
        for item in node:
            _remap_special_ids(item, new_id)


def trim_tokenizer(tokenizer: Any, keep: set[int], work_dir: Path) -> tuple[Any, list[int]]:
    """The HF tokenizer rebuilt around `keep` (chat template and special tokens preserved)."""
    from transformers import AutoTokenizer

    src = work_dir / "tokenizer_orig"
    tokenizer.save_pretrained(src)
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        raise ValueError("vocab trimming (0B) needs a fast tokenizer (tokenizer.json); the base has none")
    new_tj, old_ids = trim_tokenizer_json(json.loads(tj_path.read_text()), keep)
    tj_path.write_text(json.dumps(new_tj, ensure_ascii=False))
    # stale slow-tokenizer files would let a loader rebuild the old vocab: drop them
    for stale in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
        (src / stale).unlink(missing_ok=True)
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        conf = json.loads(config_path.read_text())
        if isinstance(conf.get("added_tokens_decoder"), dict):
            remap = {old: new for new, old in enumerate(old_ids)}
            conf["added_tokens_decoder"] = {str(remap[int(k)]): v
                                            for k, v in conf["added_tokens_decoder"].items()}
            config_path.write_text(json.dumps(conf, indent=2, ensure_ascii=False))
    trimmed = AutoTokenizer.from_pretrained(src)
    if trimmed.pad_token is None:
        trimmed.pad_token = trimmed.eos_token
    if len(trimmed) != len(old_ids):
        raise RuntimeError(f"trimmed tokenizer has {len(trimmed)} tokens, expected {len(old_ids)}")
    return trimmed, old_ids


# ---- 0B: slicing the model ---------------------------------------------------------------------


def slice_vocab_rows(model: Any, old_ids: list[int]) -> None:
    """Keep only the embedding / lm_head rows of `old_ids` (in that order), in place."""
    import torch

    emb = model.get_input_embeddings()
    n_rows = emb.weight.shape[0]
    if old_ids and old_ids[-1] >= n_rows:
        raise ValueError(f"token id {old_ids[-1]} is beyond the model's {n_rows} embedding rows")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    index = torch.tensor(old_ids, dtype=torch.long, device=emb.weight.device)
    new_emb = torch.nn.Embedding(len(old_ids), emb.weight.shape[1], device=emb.weight.device,
                                 dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight.index_select(0, index))
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = torch.nn.Linear(head.weight.shape[1], len(old_ids), bias=head.bias is not None,
                                   device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            if tied:
                new_head.weight = new_emb.weight
            else:
                new_head.weight.copy_(head.weight.index_select(0, index))
            if head.bias is not None:
                new_head.bias.copy_(head.bias.index_select(0, index))
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(old_ids)


def _remap_token_ids(obj: Any, new_id: dict[int, int]) -> None:
    """Renumber pad/bos/eos ids in a model config or generation config (dropped ones -> None)."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(obj, name, None)
        if isinstance(value, int):
            setattr(obj, name, new_id.get(value))
        elif isinstance(value, list):
            setattr(obj, name, [new_id[v] for v in value if v in new_id] or None)


# ---- 0B: validation (per-byte perplexity) --------------------------------------------------------


def nll_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], device: str,
                 batch_size: int = 8, max_len: int | None = None) -> tuple[float, int]:
    """(summed NLL in nats, UTF-8 bytes) of the texts. Per-byte because tokenizations differ.

    Each text starts after BOS (or EOS) so its first token is scored too; long texts are scored
    in windows, each conditioned on the last token of the previous one.
    """
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    max_len = max_len or getattr(model.config, "max_position_embeddings", 1024) or 1024
    windows: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        n_bytes += len(text.encode("utf-8"))
        seq = ([start] if start is not None else []) + ids
        for i in range(0, len(seq) - 1, max_len - 1):
            windows.append(seq[i:i + max_len])
    windows.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = 0.0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float((nll * mask[:, 1:]).sum())
    if n_bytes == 0:
        raise DataError("vocab trim validation: no non-empty held-out texts to score")
    return total, n_bytes


def _stored_dtype(ref: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The dtype the base's weights are stored in (the loaded model reports its compute dtype)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    dtype = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype, None)
    return dtype


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def trim(ctx: JobContext) -> JobResult:
    """0B: keep the top-K tokens of 0A, rebuild tokenizer + embeddings, gate on per-byte perplexity."""
    import torch

    from forge.modeling import compute_dtype, count_params, load_model, load_tokenizer, model_ref, pick_device

    cfg = ctx.config
    ref = model_ref(ctx, "prep_model")
    a_dir = ctx.input_dir("0A")
    counts_map = json.loads((a_dir / "token_counts.json").read_text())
    report = json.loads((a_dir / "vocab_report.json").read_text())
    k = int(report["k_for_target"])
    counts = np.zeros(len(counts_map), dtype=np.int64)
    for i, c in counts_map.items():
        counts[int(i)] = c
    # stable sort: ties among equally frequent tokens resolve to the lower id, reproducibly
    top_k = set(np.argsort(-counts, kind="stable")[:k].tolist())

    tokenizer = load_tokenizer(ref, cfg.model.revision, cfg.model.trust_remote_code)
    if len(tokenizer) != len(counts):
        raise ValueError(f"0A counted {len(counts)} tokens but the base tokenizer has {len(tokenizer)}: "
                         "0A's output does not belong to this base model")
    keep = top_k | set(tokenizer.all_special_ids)
    trimmed_tok, old_ids = trim_tokenizer(tokenizer, keep, ctx.work_dir)
    new_id = {old: new for new, old in enumerate(old_ids)}
    log.info("0B: vocab %d -> %d tokens (top %d + specials + base alphabet)", len(tokenizer), len(old_ids), k)

    device = pick_device("auto")
    model = load_model(ref, device, revision=cfg.model.revision,
                       trust_remote_code=cfg.model.trust_remote_code)
    save_dtype = _stored_dtype(ref, cfg.model.revision, cfg.model.trust_remote_code)
    heldout_path = ctx.input_dir("prep_data") / "heldout.jsonl"
    texts = [t for t in iter_text(read_jsonl(heldout_path)) if t.strip()]
    nll_before, n_bytes = nll_per_byte(model, tokenizer, texts, device, cfg.eval.batch_size)
    params_before = count_params(model)

    slice_vocab_rows(model, old_ids)
    _remap_token_ids(model.config, new_id)
    if getattr(model, "generation_config", None) is not None:
        _remap_token_ids(model.generation_config, new_id)
    nll_after, _ = nll_per_byte(model, trimmed_tok, texts, device, cfg.eval.batch_size)
    params_after = count_params(model)

    ppl_before = math.exp(nll_before / n_bytes)
    ppl_after = math.exp(nll_after / n_bytes)
    increase = ppl_after / ppl_before - 1.0
    quality = {"vocab_before": float(len(tokenizer)), "vocab_after": float(len(old_ids)),
               "ppl_per_byte_before": ppl_before, "ppl_per_byte_after": ppl_after,
               "ppl_increase": increase}
    log.info("0B: per-byte perplexity %.4f -> %.4f (%+.2f%%, limit %.2f%%)",
             ppl_before, ppl_after, 100 * increase, 100 * cfg.vocab.max_ppl_increase)
    if increase > cfg.vocab.max_ppl_increase:
        raise ValueError(
            f"vocab trimming raised per-byte perplexity on heldout.jsonl from {ppl_before:.4f} to "
            f"{ppl_after:.4f} (+{increase:.2%}), above vocab.max_ppl_increase = "
            f"{cfg.vocab.max_ppl_increase:.2%}: raise vocab.coverage_target or the limit")

    if save_dtype is not None and save_dtype != compute_dtype(device):
        model.to(save_dtype)  # keep the base's storage dtype (bf16 stays bf16 on disk)
    model.save_pretrained(ctx.out_dir)
    trimmed_tok.save_pretrained(ctx.out_dir)
    (ctx.out_dir / "vocab_map.json").write_text(json.dumps({"k_for_target": k, "old_ids": old_ids}))
    itemsize = (save_dtype or torch.float32).itemsize
    # measured on disk when the base is a local folder; else from the parameter counts
    before = _weights_bytes(Path(ref)) if Path(ref).is_dir() else params_before * itemsize
    after = _weights_bytes(ctx.out_dir)
    saved = float(before - after)
    metrics = {**quality, "bits_per_byte_before": nll_before / n_bytes / math.log(2),
               "bits_per_byte_after": nll_after / n_bytes / math.log(2),
               "weights_bytes_before": float(before), "weights_bytes_after": float(after),
               "bytes_saved": saved, "params_before": float(params_before),
               "params_after": float(params_after)}
    return JobResult(
        metrics=metrics,
        quality={**quality, "bytes_saved": saved},
        notes=f"vocab {len(tokenizer)} -> {len(old_ids)}; per-byte ppl {ppl_before:.3f} -> "
              f"{ppl_after:.3f} ({increase:+.2%}); {saved / 1e6:.2f} MB of weights saved",
        info={"vocab_before": len(tokenizer), "vocab_after": len(old_ids)},
    )
