"""1A: base QLoRA fine-tuning in our own PyTorch loop.

Read top to bottom:
  1. data      chat rows -> token ids with the prompt masked out; a deterministic, resumable
               stream of dynamically padded batches (shuffled per epoch by seed + epoch)
  2. loss      token-weighted causal-LM loss, so grad_accum x batch == one big batch
  3. schedule  AdamW, linear warmup then cosine decay
  4. state     what a checkpoint holds (trainable weights, optimizer, scheduler, data
               position, RNG states, train log) and how it is restored
  5. loop      `train_loop`: accumulate, clip, step, log, eval, checkpoint
  6. outputs   adapter/, merged/ (full-precision base + adapter, merged), loss curve
  7. job       `run(ctx)`: the phase, wiring the above to the artifact store and MLflow

Heavy libraries (torch, transformers, peft) are imported inside functions.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.config import TrainConfig
from forge.data.records import DataError, prompt_messages, read_jsonl, write_jsonl
from forge.train.qlora_config import QLoRASetup, build_lora_config, resolve_setup

if TYPE_CHECKING:
    import torch

    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.train")

IGNORE = -100  # label of a token the loss does not count (prompt, padding)
# Wall-clock fields of a training-log entry: MLflow gets them, committed files do not. An output is a
# function of its inputs, params and code, so a recovered or re-run phase writes the same bytes.
TIMING_KEYS = ("seconds", "tokens_per_s", "peak_mem_gb")
Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}
Batch = dict[str, "torch.Tensor"]  # input_ids, attention_mask, labels: [batch, seq]


# ---- 1. data ---------------------------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(tokenizer: Any, row: dict[str, Any], max_seq_len: int) -> Example | None:
    """Token ids of the whole conversation; labels only on the final answer and its end token.

    None when truncation to max_seq_len leaves no answer token to learn from.
    """
    try:
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt = tokenizer.apply_chat_template(prompt_messages(row), tokenize=False,
                                               add_generation_prompt=True)
    except ValueError as exc:  # e.g. a base (non-chat) tokenizer with no template
        raise DataError(f"row {row.get('id')!r}: the tokenizer cannot render it as chat: {exc}") from exc
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # The prompt is a prefix of the conversation; if a tokenizer merges across the boundary,
    # the answer starts where the two token sequences part.
    start = _common_prefix(ids, prompt_ids)
    eos = tokenizer.eos_token_id
    ends = [i for i in range(start, len(ids)) if ids[i] == eos]
    if ends:
        end = ends[-1] + 1  # the answer's end token is learned; what the template adds after is not
    else:  # a template that does not close the turn with eos: teach the model to stop anyway
        ids = [*ids, eos]
        end = len(ids)
    labels = [IGNORE] * start + ids[start:end] + [IGNORE] * (len(ids) - end)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_rows(tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, where: str) -> list[Example]:
    examples = [ex for row in rows if (ex := tokenize_row(tokenizer, row, max_seq_len)) is not None]
    dropped = len(rows) - len(examples)
    if dropped:
        log.warning("%s: %d of %d rows have no answer token left within max_seq_len=%d; skipped",
                    where, dropped, len(rows), max_seq_len)
    if not examples:
        raise DataError(f"{where}: no usable rows (empty file, or every answer is cut off by "
                        f"train.max_seq_len={max_seq_len})")
    return examples


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example of this batch (dynamic padding)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, n_examples // batch_size)  # the ragged tail is dropped: every batch is full


def batch_stream(examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 start_epoch: int = 0, start_index: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index in epoch, batch) forever. Each epoch's order comes from seed + epoch alone, so
    a resumed run that starts at (epoch, index) sees exactly the batches an uninterrupted one would."""
    import torch

    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, index = start_epoch, start_index
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(index, per_epoch):
            chunk = order[i * batch_size:(i + 1) * batch_size]
            yield epoch, i, collate([examples[j] for j in chunk], pad_id)
        epoch, index = epoch + 1, 0


def fixed_batches(examples: list[Example], batch_size: int, pad_id: int, limit: int) -> list[Batch]:
    """The first `limit` batches in file order (eval: the same batches every time)."""
    return [collate(examples[i:i + batch_size], pad_id)
            for i in range(0, len(examples), batch_size)][:limit]


# ---- 2. loss ---------------------------------------------------------------------------------

def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (fp32 for a stable softmax)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def autocast(device: str, dtype: Any) -> contextlib.AbstractContextManager:
    import torch

    return torch.autocast(device_type=device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def evaluate_loss(model: Any, batches: list[Batch], device: str, autocast_dtype: Any = None) -> float:
    """Token-weighted mean loss over fixed batches, dropout off."""
    import torch

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast(device, autocast_dtype):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(token_loss_sum(logits, b["labels"]))
            n += count_targets(b["labels"])
    model.train(was_training)
    return total / max(n, 1)


# ---- 3. optimizer and schedule ---------------------------------------------------------------

def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 linearly over warmup, then half a cosine down to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def make_optimizer(params: list[Any], cfg: TrainConfig, device: str) -> Any:
    import torch

    # fused AdamW: one kernel for all params instead of a few per tensor (CUDA only)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=device == "cuda")


def make_scheduler(optimizer: Any, cfg: TrainConfig) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.max_steps))


# ---- 4. state and checkpoints ----------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next micro-batch
    index: int = 0
    tokens: int = 0  # non-pad tokens trained on
    train_seconds: float = 0.0  # training time (eval and checkpoint time left out)
    history: list[dict[str, float]] = field(default_factory=list)  # the train log

    def last(self, key: str) -> float | None:
        return next((e[key] for e in reversed(self.history) if key in e), None)


def rng_state() -> dict[str, Any]:
    import torch

    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_training_state(path: Path, model: Any, optimizer: Any, scheduler: Any, state: LoopState) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(path / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, path / "trainer.pt")
    (path / "state.json").write_text(json.dumps({
        "step": state.step, "epoch": state.epoch, "index": state.index,
        "tokens": state.tokens, "train_seconds": state.train_seconds}))
    write_jsonl(path / "train_log.jsonl", state.history)


def load_training_state(path: Path, model: Any, optimizer: Any, scheduler: Any) -> LoopState:
    """Restore what save_training_state wrote; the model must have the same trainable params."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RuntimeError(f"checkpoint {path} does not match the model's trainable parameters: "
                           f"missing {missing[:3]}..., unexpected {extra[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    s = json.loads((path / "state.json").read_text())
    history = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line]
    return LoopState(step=s["step"], epoch=s["epoch"], index=s["index"], tokens=s["tokens"],
                     train_seconds=s["train_seconds"], history=history)


# ---- 5. the loop -----------------------------------------------------------------------------

class _Meter:
    """Loss and throughput since the last log line; eval and checkpoint time are left out."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()
        self.start()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since start(), once the GPU has finished the queued work."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        self.seconds += dt
        return dt


def train_loop(
    model: Any,
    batches: Iterator[tuple[int, int, Batch]],
    eval_fn: Callable[[], float] | None,
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    device: str,
    autocast_dtype: Any = None,
    state: LoopState | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> LoopState:
    """Run optimizer steps from state.step to cfg.max_steps; returns the final state.

    One step = cfg.grad_accum micro-batches. Each micro-batch's summed token loss is divided by
    the labelled-token count of the whole step, so the gradient equals that of one big batch.
    """
    import torch

    state = state or LoopState()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")
    model.train()
    meter = _Meter(cuda)
    while state.step < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        n_targets = sum(count_targets(b["labels"]) for _, _, b in micro)
        step_loss = torch.zeros((), device=device)
        step_tokens = sum(int(b["attention_mask"].sum()) for _, _, b in micro)
        for _, _, b in micro:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with autocast(device, autocast_dtype):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = token_loss_sum(logits, b["labels"]) / max(n_targets, 1)
            loss.backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.epoch, state.index = micro[-1][0], micro[-1][1] + 1
        state.tokens += step_tokens
        meter.tokens += step_tokens
        meter.loss += step_loss  # stays on the device: no sync per step
        meter.steps += 1

        last = state.step == cfg.max_steps
        do_log = state.step % cfg.log_every == 0 or last
        do_eval = eval_fn is not None and (state.step % cfg.eval_every == 0 or last)
        do_ckpt = on_checkpoint is not None and (state.step % cfg.checkpoint_every == 0 or last)
        if not (do_log or do_eval or do_ckpt):
            continue
        state.train_seconds += meter.stop()
        if do_log:
            entry = {"step": state.step, "epoch": state.epoch, "loss": float(meter.loss) / meter.steps,
                     "lr": scheduler.get_last_lr()[0], "tokens": meter.tokens, "seconds": meter.seconds,
                     "tokens_per_s": meter.tokens / max(meter.seconds, 1e-9)}
            if cuda:
                entry["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            state.history.append(entry)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s%s", state.step, cfg.max_steps,
                     entry["loss"], entry["lr"], entry["tokens_per_s"],
                     f"  peak {entry['peak_mem_gb']:.2f} GiB" if cuda else "")
            if on_log:
                on_log(entry)
            meter.reset()
        if do_eval:
            eval_loss = eval_fn()
            state.history.append({"step": state.step, "eval_loss": eval_loss})
            log.info("step %d  eval loss %.4f", state.step, eval_loss)
            if on_log:
                on_log({"step": state.step, "eval_loss": eval_loss})
        if do_ckpt:
            on_checkpoint(state)
        meter.start()
    return state


# ---- 6. outputs ------------------------------------------------------------------------------

def merge_adapter(base_ref: str, adapter_dir: Path, out_dir: Path, tokenizer: Any, device: str,
                  revision: str | None = None, trust_remote_code: bool = False) -> None:
    """Full-precision base + adapter, merged into plain weights (safetensors) with the tokenizer."""
    import torch
    from peft import PeftModel

    from forge.modeling import compute_dtype, load_model

    # merge in fp32 so the small LoRA delta is not rounded away, then save in the usual dtype
    base = load_model(base_ref, device, "none", revision, trust_remote_code, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(compute_dtype(device))
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    merged.generation_config.save_pretrained(out_dir)


def plot_losses(history: list[dict[str, float]], path: Path, title: str = "1A base QLoRA",
                train_label: str = "train loss", dev_label: str = "eval loss (dev)",
                dev_start: float | None = None, reference: tuple[str, float] | None = None) -> None:
    """Train and dev loss per optimizer step; dev_start plots the dev loss before step 1, reference a
    horizontal (label, loss) line to compare against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    dev = ([(0, dev_start)] if dev_start is not None else []) + [
        (e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label=train_label)
    if dev:
        ax.plot(*zip(*dev, strict=True), marker="o", label=dev_label)
    if reference:
        ax.axhline(reference[1], color="gray", linestyle="--", label=reference[0])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 7. the job ------------------------------------------------------------------------------

def configure_cuda() -> None:
    """TF32 for the fp32 matmuls autocast leaves alone (fp32 LoRA/head weights): Ampere+ standard."""
    import torch

    torch.set_float32_matmul_precision("high")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def prepare_peft_model(base_ref: str, cfg: TrainConfig, setup: QLoRASetup, revision: str | None = None,
                       trust_remote_code: bool = False, gradient_checkpointing: bool = False) -> Any:
    """The base (4-bit NF4 when setup says so) with LoRA adapters on cfg.target_modules.

    Gradient checkpointing is off by default: it trades ~30% speed for activation memory, which a
    LoRA run at the demo/1-GPU sizes does not need.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from forge.modeling import load_model

    model = load_model(base_ref, setup.device, setup.quantization, revision, trust_remote_code)
    if setup.four_bit:  # norms and head in fp32 for stability; input grads if checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, build_lora_config(cfg))


@dataclass
class TrainOutcome:
    state: LoopState
    resumed_from: int  # 0 when the run started fresh
    trainable_params: int
    peak_mem_gb: float | None  # CUDA only


def committed_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training log as committed with the outputs: without its wall-clock fields."""
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def base_name(phase_id: str, ref: str) -> str:
    """What a saved adapter names as its base: a hub id as is, an upstream phase's output by the phase (the
    manifest's inputs hold its cache key). Its local path would name the run that produced it, so a
    recovered and a fresh run would write different bytes."""
    return ref if not Path(ref).exists() else f"forge:{phase_id}"


def save_adapter(model: Any, adapter_dir: Path, base: str) -> None:
    """peft's save_pretrained, naming `base` as the base model in adapter_config.json and in the model
    card (peft takes the card's from the base model's config; llama.cpp's LoRA converter reads the card)."""
    for peft_cfg in model.peft_config.values():
        peft_cfg.base_model_name_or_path = base
    model.get_base_model().config.name_or_path = base
    model.get_base_model().name_or_path = base  # the card's "base_model:adapter:..." tag
    model.save_pretrained(adapter_dir)


def resume_state(ctx: JobContext, model: Any, optimizer: Any, scheduler: Any) -> LoopState:
    """The loop state to start from: the phase's latest checkpoint (model, optimizer, scheduler and
    data position restored into the given objects), or a fresh state."""
    latest = ctx.latest_checkpoint()
    if latest is None:
        return LoopState()
    state = load_training_state(latest[1], model, optimizer, scheduler)
    log.info("resumed from checkpoint at step %d (epoch %d, batch %d of the epoch)",
             state.step, state.epoch, state.index)
    ctx.log_metrics({"resumed_from_step": state.step}, step=state.step)
    return state


def checkpoint_saver(ctx: JobContext, model: Any, optimizer: Any,
                     scheduler: Any) -> Callable[[LoopState], None]:
    """train_loop's on_checkpoint: the training state to the store's checkpoint area (latest.json last)."""
    def save(s: LoopState) -> None:
        local = ctx.work_dir / "checkpoint"
        shutil.rmtree(local, ignore_errors=True)
        save_training_state(local, model, optimizer, scheduler, s)
        ctx.save_checkpoint(s.step, local)
        shutil.rmtree(local, ignore_errors=True)
        log.info("checkpoint saved at step %d", s.step)
    return save


def metrics_logger(ctx: JobContext) -> Callable[[dict[str, float]], None]:
    """train_loop's on_log: loss and eval figures to MLflow, by step (counters and timings stay out)."""
    def log_metrics(entry: dict[str, float]) -> None:
        ctx.log_metrics({("train_loss" if k == "loss" else k): v for k, v in entry.items()
                         if k not in ("step", "epoch", "tokens", "seconds")}, step=int(entry["step"]))
    return log_metrics


def train_adapter(ctx: JobContext, setup: QLoRASetup, base_ref: str, revision: str | None,
                  train_ex: list[Example], dev_ex: list[Example], pad_id: int,
                  adapter_dir: Path, base: str | None = None) -> TrainOutcome:
    """Train (or resume training) the LoRA adapter and save it to adapter_dir (peft format), naming
    `base` (default base_ref) as its base model."""
    import torch

    cfg = ctx.config.train
    if setup.device == "cuda":
        configure_cuda()
    seed_everything(cfg.seed)
    model = prepare_peft_model(base_ref, cfg, setup, revision, ctx.config.model.trust_remote_code,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg, setup.device)
    scheduler = make_scheduler(optimizer, cfg)

    state = resume_state(ctx, model, optimizer, scheduler)
    resumed_from = state.step
    save_checkpoint = checkpoint_saver(ctx, model, optimizer, scheduler)
    log_metrics = metrics_logger(ctx)

    forward = torch.compile(model) if cfg.compile else model
    eval_set = fixed_batches(dev_ex, cfg.batch_size, pad_id, cfg.eval_batches)
    amp = setup.torch_autocast_dtype()
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_trainable = sum(p.numel() for p in trainable)
    log.info("training %d LoRA params (r=%d) on %d examples, %d batches/epoch, steps %d -> %d",
             n_trainable, cfg.lora_r, len(train_ex), batches_per_epoch(len(train_ex), cfg.batch_size),
             state.step, cfg.max_steps)
    state = train_loop(
        forward,
        batch_stream(train_ex, cfg.batch_size, cfg.seed, pad_id, state.epoch, state.index),
        # eval runs uncompiled: compiling a second (no-grad) graph costs more than a few eval batches
        lambda: evaluate_loss(model, eval_set, setup.device, amp),
        optimizer, scheduler, cfg, setup.device, amp,
        state=state, on_checkpoint=save_checkpoint, on_log=log_metrics,
    )
    save_adapter(model, adapter_dir, base or base_ref)
    peak = torch.cuda.max_memory_allocated() / 2**30 if setup.device == "cuda" else None
    return TrainOutcome(state, resumed_from, n_trainable, peak)


def run(ctx: JobContext) -> JobResult:
    import torch

    from forge.modeling import load_tokenizer, model_ref
    from forge.runner import JobResult

    cfg, mcfg = ctx.config.train, ctx.config.model
    setup = resolve_setup(cfg)
    base_phase = "prep_model" if ctx.input_skipped("0B") else "0B"
    base_ref = model_ref(ctx, base_phase)
    revision = None if Path(base_ref).exists() else mcfg.revision  # only a hub id has revisions
    log.info("1A: base %s (from %s), device %s, quantization %s", base_ref, base_phase,
             setup.device, setup.quantization)

    tokenizer = load_tokenizer(base_ref, revision, mcfg.trust_remote_code)
    data_dir = ctx.input_dir("prep_data")
    train_rows, dev_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "dev.jsonl")
    train_ex = tokenize_rows(tokenizer, train_rows, cfg.max_seq_len, "prep_data/train.jsonl")
    dev_ex = tokenize_rows(tokenizer, dev_rows, cfg.max_seq_len, "prep_data/dev.jsonl")

    out = ctx.out_dir
    trained = train_adapter(ctx, setup, base_ref, revision, train_ex, dev_ex, tokenizer.pad_token_id,
                            out / "adapter", base_name(base_phase, base_ref))
    state = trained.state
    gc.collect()  # the 4-bit training model is gone: make room for the full-precision merge
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    write_jsonl(out / "train_log.jsonl", committed_history(state.history))
    plot_losses(state.history, out / "loss_curve.png")
    ctx.log_artifact(out / "loss_curve.png")

    log.info("merging the adapter into the full-precision base")
    merge_adapter(base_ref, out / "adapter", out / "merged", tokenizer, setup.device, revision,
                  mcfg.trust_remote_code)

    from forge.evaluate.harness import evaluate_ref

    log.info("evaluating the merged model on %d dev rows", len(dev_rows))
    report = evaluate_ref(str(out / "merged"), dev_rows, ctx.config.eval, setup.device)
    report.to_jsonl(out / "dev_eval.jsonl")
    quality = {k: float(v) for k, v in report.summary().items()}
    base_acc = ctx.input_info("prep_model").get("quality", {}).get("acc")
    if base_acc is not None and "acc" in quality:
        quality["delta_acc"] = quality["acc"] - float(base_acc)

    metrics = {
        "train_loss": state.last("loss"),
        "eval_loss": state.last("eval_loss"),
        "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds,
        "steps": float(state.step),
        "resumed_from_step": float(trained.resumed_from),
        "trainable_params": float(trained.trainable_params),
    }
    if trained.peak_mem_gb is not None:
        metrics["peak_mem_gb"] = trained.peak_mem_gb
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    base_kind = "4-bit NF4" if setup.four_bit else "full-precision"
    notes = (f"{state.step} steps LoRA r={cfg.lora_r} on a {base_kind} base ({setup.device}); "
             f"train loss {metrics.get('train_loss', float('nan')):.3f}, "
             f"eval loss {metrics.get('eval_loss', float('nan')):.3f}, "
             f"dev acc {quality.get('acc', float('nan')):.3f}")
    if trained.resumed_from:
        notes += f"; resumed from checkpoint at step {trained.resumed_from}"
    return JobResult(
        metrics=metrics, quality=quality, notes=notes,
        info={"steps": state.step, "quantization": setup.quantization, "device": setup.device,
              "base_phase": base_phase},
        register="merged",
    )
