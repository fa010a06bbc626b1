"""GPU proof of 1A: an NF4 4-bit Llama + LoRA r16 on every linear layer, trained by Forge's own loop.

  python benchmarks/gpu_qlora.py                            # H100: ~220M params, batch 8 x 1024
  python benchmarks/gpu_qlora.py --compile --steps 40       # the same with torch.compile
  python benchmarks/gpu_qlora.py --tiny                     # CPU smoke test (seconds)

Builds a Llama from a config with random init (no weights are downloaded), saves it to a temp folder,
loads it back 4-bit through forge.modeling.load_model, wraps it with peft exactly as the 1A job does
(forge.train.qlora_trainer.prepare_peft_model) and runs forge.train.qlora_trainer.train_loop on a
few random token batches, cycled (so the loss must fall). Needs no Airflow, MLflow or artifact store.
Prints one JSON line: sizes, tokens/s after warm-up, peak GPU memory, first/last loss, 4-bit check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 32000}
TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU smoke test)")
    ap.add_argument("--steps", type=int, help="measured optimizer steps (default 30; tiny 4)")
    ap.add_argument("--warmup", type=int, help="steps left out of tokens/s (default 5, 10 with "
                                               "--compile; tiny 1)")
    ap.add_argument("--batch", type=int, help="micro-batch size (default 8; tiny 2)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 1024; tiny 64)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the peft model")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls in full fp32 (A/B of TF32)")
    ap.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distinct", type=int, default=4, help="distinct random batches, cycled")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    defaults = ({"steps": 4, "warmup": 1, "batch": 2, "seq": 64} if args.tiny else
                {"steps": 30, "warmup": 10 if args.compile else 5, "batch": 8, "seq": 1024})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_random_llama(sizes: dict[str, int], seq: int, path: Path, seed: int) -> int:
    """A random-init Llama saved as an HF folder (bf16 weights); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, max_position_embeddings=max(2048, seq), tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(path)
    return n_params


def random_batches(n: int, batch: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        pool.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    i = 0
    while True:
        yield 0, i, pool[i % n]
        i += 1


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    from forge.config import TrainConfig
    from forge.train.qlora_config import QLoRASetup
    from forge.train.qlora_trainer import (
        configure_cuda,
        make_optimizer,
        make_scheduler,
        prepare_peft_model,
        train_loop,
    )

    logging.basicConfig(level=logging.WARNING)
    sizes = TINY if args.tiny else FULL
    total_steps = args.warmup + args.steps
    cfg = TrainConfig(
        quantization=args.quantization, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
        target_modules="all-linear", learning_rate=args.lr, warmup_steps=min(5, total_steps),
        max_steps=total_steps, batch_size=args.batch, grad_accum=args.grad_accum, max_seq_len=args.seq,
        log_every=1, eval_every=10**9, checkpoint_every=10**9, compile=args.compile, seed=args.seed,
        device=args.device,
    )
    from forge.modeling import compute_dtype, pick_device

    device = pick_device(args.device)
    amp = compute_dtype(device) if device == "cuda" else None
    if device == "cuda" and not args.no_tf32:
        configure_cuda()
    setup = QLoRASetup(device=device, quantization=args.quantization,
                       autocast_dtype=str(amp).removeprefix("torch.") if amp is not None else None)

    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        t0 = time.time()
        n_params = build_random_llama(sizes, args.seq, Path(tmp), args.seed)
        build_s = time.time() - t0
        t0 = time.time()
        model = prepare_peft_model(tmp, cfg, setup, gradient_checkpointing=args.grad_ckpt)
        load_s = time.time() - t0

    n4 = 0
    try:
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    except ImportError:
        bnb = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, cfg, device)
    sched = make_scheduler(opt, cfg)
    forward = torch.compile(model) if args.compile else model
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    batches = random_batches(args.distinct, args.batch, args.seq, sizes["vocab_size"], args.seed)
    state = train_loop(forward, batches, None, opt, sched, cfg, device, amp)
    wall_s = time.time() - t0

    logs = [e for e in state.history if "loss" in e]
    measured = [e for e in logs if e["step"] > args.warmup]
    tokens, seconds = sum(e["tokens"] for e in measured), sum(e["seconds"] for e in measured)
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "params": n_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "quantization": args.quantization,
        "linear4bit_layers": n4,
        "four_bit": n4 > 0,
        "lora_r": args.lora_r,
        "batch": args.batch, "seq": args.seq, "grad_accum": args.grad_accum,
        "compile": args.compile, "grad_ckpt": args.grad_ckpt, "tf32": device == "cuda" and not args.no_tf32,
        "warmup_steps": args.warmup, "measured_steps": len(measured),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "step_ms": round(1000 * seconds / len(measured), 2) if measured else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
        "loss_first": round(logs[0]["loss"], 4),
        "loss_last": round(logs[-1]["loss"], 4),
        "build_s": round(build_s, 1), "load_s": round(load_s, 1), "train_wall_s": round(wall_s, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": getattr(bnb, "__version__", None)},
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
