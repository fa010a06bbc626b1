"""prep_model: the base model every later phase starts from.

- `model.base: demo` builds a tiny Llama locally: a byte-level BPE tokenizer trained on our corpus,
  random init with a fixed seed, then a short pre-training on prep_data's pretrain.txt so the
  base model is not random. The HF folder (safetensors + tokenizer + chat template) is the output.
- anything else is a local HF folder or a hub id: referenced (info["model_ref"]), never copied.
Both evaluate the base model on the dev split; that is the quality row of the ledger.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from forge.config import DemoModelConfig, PipelineConfig
from forge.data.records import DataError, iter_text, read_jsonl
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.train")

PAD, BOS, USER, ASSISTANT, SYSTEM, END = (
    "<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
SPECIAL_TOKENS = [PAD, BOS, USER, ASSISTANT, SYSTEM, END]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LOG_EVERY = 25


def run(ctx: JobContext) -> JobResult:
    cfg = ctx.config
    data_dir = ctx.input_dir("prep_data")
    dev_rows = read_jsonl(_require(data_dir / "dev.jsonl"))
    if cfg.model.is_demo:
        return _build_demo(ctx, data_dir, dev_rows)
    return _reference_hf(ctx, dev_rows)


# ---------------------------------------------------------------- demo model


def train_tokenizer(texts: Any, vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer with our chat special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"model.demo.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> ever
    )
    tok.train_from_iterator(texts, trainer)
    # No post-processor: BOS/EOS come only from the chat template or the caller, never implicitly,
    # so "template text -> ids" is the same with or without add_special_tokens.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT, SYSTEM], chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


def build_model(demo: DemoModelConfig, tokenizer: Any, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=demo.hidden_size, intermediate_size=demo.intermediate_size,
        num_hidden_layers=demo.num_hidden_layers, num_attention_heads=demo.num_attention_heads,
        num_key_value_heads=demo.num_key_value_heads, max_position_embeddings=demo.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model


def corpus_pieces(text: str) -> list[str]:
    """The corpus cut between the two newlines of each blank line. Byte-level pre-tokenization never
    joins a newline with a following one that precedes text, so encoding the pieces one by one gives
    exactly the ids of encoding the whole text (without ever building one giant encoding)."""
    return [p for p in re.split(r"(?<=\n)(?=\n)", text) if p]


def pack_tokens(tokenizer: Any, text: str, seq_len: int):
    """The corpus as one token stream cut into [n, seq_len] chunks (a tail short of one is dropped)."""
    import torch

    pieces = corpus_pieces(text)
    ids: list[int] = []
    for i in range(0, len(pieces), 1000):
        for enc in tokenizer(pieces[i:i + 1000], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    n = len(ids) // seq_len
    if n < 1:
        raise DataError(f"pretrain corpus has {len(ids)} tokens, fewer than one sequence of "
                        f"model.demo.pretrain_seq_len={seq_len}; grow data.suites.pretrain")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Any, chunks: Any, demo: DemoModelConfig, seed: int, device: str,
             ctx: JobContext | None = None) -> dict[str, Any]:
    """Short causal-LM pre-training over shuffled packed chunks. Returns the loss history and speed."""
    import torch

    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=demo.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, demo.pretrain_steps // 10)
    order = torch.randperm(len(chunks), generator=gen)
    cursor = 0
    losses: list[float] = []
    tokens = 0
    started = time.time()
    for step in range(demo.pretrain_steps):
        if cursor + demo.pretrain_batch_size > len(order):  # next epoch, reshuffled
            order, cursor = torch.randperm(len(chunks), generator=gen), 0
        idx = order[cursor:cursor + demo.pretrain_batch_size]
        cursor += demo.pretrain_batch_size
        batch = chunks[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, demo.pretrain_steps, demo.pretrain_lr, warmup)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += batch.numel()
        if step % LOG_EVERY == 0 or step == demo.pretrain_steps - 1:
            tps = tokens / max(time.time() - started, 1e-9)
            log.info("pretrain step %d/%d loss %.4f lr %.2e %.0f tokens/s", step + 1, demo.pretrain_steps,
                     losses[-1], opt.param_groups[0]["lr"], tps)
            if ctx:
                ctx.log_metrics({"pretrain_loss": losses[-1], "pretrain_tokens_per_s": tps}, step=step)
    seconds = time.time() - started
    model.eval()
    tail = losses[-max(1, min(10, len(losses) // 5)):]  # a few steps' mean: one step's loss is noisy
    return {"losses": losses, "initial_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


def plot_losses(losses: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("demo base model pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _build_demo(ctx: JobContext, data_dir: Path, dev_rows: list[dict[str, Any]]) -> JobResult:
    from forge.modeling import count_params, pick_device

    cfg = ctx.config
    demo = cfg.model.demo
    corpus = _require(data_dir / "pretrain.txt").read_text()
    if not corpus.strip():
        raise DataError(f"{data_dir / 'pretrain.txt'} is empty: the demo model needs a pre-training corpus "
                        "(data.suites.pretrain > 0)")
    train_rows = read_jsonl(_require(data_dir / "train.jsonl"))
    texts = corpus_pieces(corpus) + list(iter_text(train_rows))
    tokenizer = train_tokenizer(texts, demo.vocab_size, demo.max_position_embeddings)
    log.info("tokenizer: %d tokens trained on %d texts", len(tokenizer), len(texts))
    if len(tokenizer) < demo.vocab_size:  # the model is sized to the tokenizer, not to the request
        log.info("BPE ran out of merges at %d < model.demo.vocab_size=%d (a small corpus)",
                 len(tokenizer), demo.vocab_size)

    model = build_model(demo, tokenizer, cfg.data.seed)
    n_params = count_params(model)
    device = pick_device("auto")
    chunks = pack_tokens(tokenizer, corpus, demo.pretrain_seq_len)
    log.info("pre-training %.2fM params on %s: %d chunks x %d tokens, %d steps", n_params / 1e6, device,
             len(chunks), demo.pretrain_seq_len, demo.pretrain_steps)
    stats = pretrain(model, chunks, demo, cfg.data.seed, device, ctx)

    model.to("cpu").save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)
    curve = plot_losses(stats["losses"], ctx.work_dir / "pretrain_loss.png")
    ctx.log_artifact(curve)
    history = ctx.work_dir / "pretrain_history.json"
    history.write_text(json.dumps({"losses": stats["losses"]}))
    ctx.log_artifact(history)

    report, eval_s = _evaluate(ctx, model.to(device), tokenizer, dev_rows, device)
    metrics = {
        "n_params": float(n_params), "vocab_size": float(len(tokenizer)),
        "pretrain_initial_loss": stats["initial_loss"], "pretrain_final_loss": stats["final_loss"],
        "pretrain_tokens": float(stats["tokens"]), "pretrain_tokens_per_s": stats["tokens_per_s"],
        "pretrain_seconds": stats["seconds"], "pretrain_chunks": float(len(chunks)), "eval_seconds": eval_s,
    }
    summary = report.summary()
    notes = (f"demo Llama {n_params / 1e6:.2f}M params, pre-train loss {stats['initial_loss']:.2f} -> "
             f"{stats['final_loss']:.2f} in {demo.pretrain_steps} steps; dev acc {summary['acc']:.3f}")
    info = {"n_params": n_params, "source": "demo", "device": device, "model_type": "llama",
            "vocab_size": len(tokenizer), "eos_token": END}
    return JobResult(metrics=metrics, quality=summary, notes=notes, info=info)


# ---------------------------------------------------------------- a real HF model


def resolve_hf_ref(base: str) -> str:
    """An absolute local folder (must hold config.json) or the hub id unchanged."""
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.base={base!r}: {path.resolve()} is not an HF model folder "
                                    "(no config.json in it)")
        return str(path.resolve())
    if base.startswith(("/", ".", "~")) or base.count("/") > 1:
        raise FileNotFoundError(f"model.base={base!r}: no such folder ({path.resolve()})")
    return base


def _load_hf(cfg: PipelineConfig, ref: str, device: str):
    from forge.modeling import load_model, load_tokenizer

    opts = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    try:
        tokenizer = load_tokenizer(ref, **opts)
        model = load_model(ref, device=device, **opts)
    except (OSError, ValueError) as exc:
        where = "local folder" if Path(ref).is_absolute() else "Hugging Face hub id"
        raise RuntimeError(
            f"model.base={cfg.model.base!r} ({where}, revision {cfg.model.revision!r}) could not be loaded: "
            f"{exc}\nHints: a gated or private model needs HF_TOKEN; with HF_HUB_OFFLINE=1 the model must "
            "already be in the HF cache (HF_HOME); check the id and the revision."
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model.base={cfg.model.base!r}: its tokenizer has no chat template; Forge trains "
                         "and evaluates in chat format, so use an instruct/chat model (or a local folder "
                         "whose tokenizer_config.json / chat_template.jinja has one)")
    return model, tokenizer


def _reference_hf(ctx: JobContext, dev_rows: list[dict[str, Any]]) -> JobResult:
    from forge.modeling import count_params, pick_device

    cfg = ctx.config
    ref = resolve_hf_ref(cfg.model.base)
    device = pick_device("auto")
    started = time.time()
    model, tokenizer = _load_hf(cfg, ref, device)
    load_s = time.time() - started
    n_params = count_params(model)
    log.info("loaded %s (%.2fM params) on %s in %.1fs", ref, n_params / 1e6, device, load_s)
    report, eval_s = _evaluate(ctx, model, tokenizer, dev_rows, device)
    summary = report.summary()
    info = {
        "model_ref": ref, "revision": cfg.model.revision, "source": "hf", "n_params": n_params,
        "model_type": getattr(model.config, "model_type", None), "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token, "device": device,
        # The exact hub snapshot that was evaluated, so a moving revision (main) is still traceable.
        "commit": getattr(model.config, "_commit_hash", None),
    }
    return JobResult(
        metrics={"n_params": float(n_params), "load_seconds": load_s, "eval_seconds": eval_s},
        quality=summary, info=info,
        notes=f"referenced {ref} ({n_params / 1e6:.1f}M params, not copied); dev acc {summary['acc']:.3f}",
    )


# ---------------------------------------------------------------- shared


def _evaluate(ctx: JobContext, model: Any, tokenizer: Any, dev_rows: list[dict[str, Any]], device: str):
    from forge.evaluate.harness import evaluate

    report = evaluate(model, tokenizer, dev_rows, ctx.config.eval, device)
    eval_dir = ctx.out_dir / "eval"
    report.to_jsonl(eval_dir / "dev_eval.jsonl")
    table = eval_dir / "dev_eval.md"
    table.write_text(f"# Base model on the dev split\n\n{report.to_markdown()}")
    ctx.log_artifact(table)
    log.info("base model on dev:\n%s", report.to_markdown())
    return report, report.seconds


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"prep_model needs {path.name} from prep_data, but {path} does not exist")
    return path
