"""GPU proof of 2A + 2B: structured width pruning, then AWQ W4A16 g128 (llm-compressor), on a >1B Llama.

  python benchmarks/gpu_compress.py                      # H100: ~1.06B params, 32 x 512 calibration
  python benchmarks/gpu_compress.py --ft-steps 0         # pruning without the fine-tune steps
  python benchmarks/gpu_compress.py --tiny               # CPU smoke test (seconds)

Builds a Llama from a config with random bf16 weights (nothing is downloaded) and saves it; runs 2A's
core (forge.compress.pruning.prune_gradually: one round of activation-importance MLP pruning plus a few
full fine-tune steps on random token batches) and saves the pruned dense model; then runs 2B's core
(forge.compress.awq.quantize: AWQModifier + W4A16 g128 oneshot, lm_head ignored) on random-token
calibration, saves the compressed-tensors checkpoint and loads it back with AutoModelForCausalLM.
Needs no Airflow, MLflow or artifact store. Prints one JSON line: params before/after, wall time and
peak GPU memory of each step, output sizes, the saved quantization format.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_qlora import build_random_llama  # noqa: E402  (one builder for both GPU proofs)

# 1.06B: hidden and MLP widths multiples of 256, so pruning to a multiple of 256 keeps AWQ g128 valid
FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 32000}
TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and data (CPU smoke test)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="MLP channels removed (default 0.5)")
    ap.add_argument("--ft-steps", type=int, help="fine-tune steps after pruning (default 10; tiny 2)")
    ap.add_argument("--batch", type=int, help="fine-tune / importance batch (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 512; tiny 64)")
    ap.add_argument("--calib", type=int, help="AWQ calibration samples (default 32; tiny 4)")
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ scale grid points")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    defaults = ({"ft_steps": 2, "batch": 2, "seq": 64, "calib": 4} if args.tiny else
                {"ft_steps": 10, "batch": 4, "seq": 512, "calib": 32})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def random_ids(n: int, seq: int, vocab: int, seed: int) -> Any:
    import torch

    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def as_batches(ids: Any, batch: int) -> list[dict[str, Any]]:
    import torch

    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in ids.split(batch)]


def cycle(batches: list[dict[str, Any]]):
    i = 0
    while True:
        yield 0, i, batches[i % len(batches)]
        i += 1


class Meter:
    """Wall time and peak GPU memory of one step."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> Meter:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        self.seconds = round(time.perf_counter() - self.t0, 2)
        self.peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.device == "cuda" else None


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6, 2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from forge.compress import awq
    from forge.compress.awq_config import AWQConfig
    from forge.compress.pruning import prune_gradually
    from forge.compress.pruning_config import PruningConfig
    from forge.modeling import pick_device
    from forge.train.base_model import train_tokenizer

    logging.basicConfig(level=logging.WARNING)
    sizes = TINY if args.tiny else FULL
    device = pick_device("auto")
    amp = torch.bfloat16 if device == "cuda" else None
    multiple = 128 if args.tiny else 256
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                              "sizes": sizes, "seq": args.seq}
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        root = Path(tmp)
        src, pruned_dir, awq_dir = root / "src", root / "pruned", root / "awq"
        result["params_before"] = build_random_llama(sizes, args.seq, src, args.seed)
        result["size_mb_src"] = dir_mb(src)
        # oneshot needs a tokenizer object even for pre-tokenized data; the ids below are random anyway
        tok = train_tokenizer(["forge benchmark calibration text"] * 8, vocab_size=300, max_length=args.seq)

        # ---- 2A: one round of width pruning (+ a short full fine-tune), fp32 master weights
        pcfg = PruningConfig(target_mlp_sparsity=args.sparsity, rounds=1,
                             finetune_steps_per_round=args.ft_steps, calib_samples=args.calib,
                             multiple_of=multiple, batch_size=args.batch,
                             max_seq_len=args.seq, learning_rate=1e-4, seed=args.seed, device=device)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device)
        model.train()
        vocab = sizes["vocab_size"]
        calib = as_batches(random_ids(args.calib, args.seq, vocab, args.seed), args.batch)
        train = as_batches(random_ids(4 * args.batch, args.seq, vocab, args.seed + 1), args.batch)
        with Meter(device) as m_prune:
            outcome = prune_gradually(model, pcfg, calib, cycle(train), [], device, amp)
        model.to(torch.bfloat16).save_pretrained(pruned_dir)
        tok.save_pretrained(pruned_dir)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        r = outcome.rounds[-1]
        result["prune"] = {"seconds": m_prune.seconds, "peak_gb": m_prune.peak_gb,
                           "intermediate_size": r.intermediate_size, "params_after": outcome.params_after,
                           "finetune_steps": args.ft_steps, "finetune_loss": r.finetune_loss,
                           "size_mb": dir_mb(pruned_dir)}

        # ---- 2B: AWQ W4A16 g128 on random-token calibration (llm-compressor onloads layer by layer)
        acfg = AWQConfig(calib_samples=args.calib, max_seq_len=args.seq, n_grid=args.n_grid)
        from datasets import Dataset

        ids = random_ids(args.calib, args.seq, sizes["vocab_size"], args.seed + 2).tolist()
        data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * args.seq] * len(ids)})
        model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=amp or torch.float32)
        with Meter(device) as m_awq:
            q = awq.quantize(model, tok, data, acfg)
        t0 = time.perf_counter()
        awq.save_compressed(model, tok, awq_dir)
        save_s = round(time.perf_counter() - t0, 2)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        qcfg = awq.read_quant_config(awq_dir)
        t0 = time.perf_counter()
        reloaded = awq.load_check(awq_dir)
        result["awq"] = {"seconds": m_awq.seconds, "peak_gb": m_awq.peak_gb, "save_s": save_s,
                         "reload_s": round(time.perf_counter() - t0, 2), **reloaded,
                         "calib_samples": q.calib_samples, "calib_tokens": q.calib_tokens,
                         "pin_guard": q.pin_guard, "format": qcfg.get("format"),
                         "bits": awq.weight_bits(qcfg), "ignore": qcfg.get("ignore"),
                         "size_mb": dir_mb(awq_dir)}
    result["params_after"] = result["prune"]["params_after"]
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "llmcompressor": llmcompressor.__version__,
                          "compressed_tensors": compressed_tensors.__version__}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
