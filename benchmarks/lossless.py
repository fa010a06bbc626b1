"""Lossless (2D) benchmark: ratio, saved % and one-thread MB/s of every scheme on a model folder.

    .venv/bin/python benchmarks/lossless.py                 # a random bf16 Llama built from config
    .venv/bin/python benchmarks/lossless.py --model PATH    # any HF model folder (e.g. 1A's merged/)

Random weights have near-uniform mantissas and compress differently than trained ones: use --model
for figures that speak for a real model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forge.compress.lossless import build_report, compress_folder, verify_restore  # noqa: E402
from forge.compress.lossless_config import KNOWN_SCHEMES, LosslessConfig  # noqa: E402


def build_random_llama(dest: Path, hidden: int, layers: int, vocab: int, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, max_position_embeddings=512, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model folder; default: build a random bf16 Llama")
    ap.add_argument("--level", type=int, default=LosslessConfig().level)
    ap.add_argument("--dict-size", type=int, default=LosslessConfig().dict_size)
    ap.add_argument("--schemes", nargs="+", default=list(KNOWN_SCHEMES))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the full report here")
    args = ap.parse_args()
    cfg = LosslessConfig(level=args.level, dict_size=args.dict_size, schemes=args.schemes)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = args.model or build_random_llama(tmp_path / "model", args.hidden, args.layers, args.vocab,
                                                 args.seed)
        t0 = time.perf_counter()
        res = compress_folder(model, tmp_path / "out", cfg, tmp_path / "scratch")
        checked = verify_restore(model, tmp_path / "out", tmp_path / "restored")
        report = build_report(res, cfg)
        elapsed = time.perf_counter() - t0

    print(f"model: {args.model or f'random bf16 Llama (hidden {args.hidden}, {args.layers} layers)'}; "
          f"zstd level {cfg.level}; {checked} files restored bit-exact in {elapsed:.1f}s total")
    print(f"{'scheme':<16}{'MB in':>10}{'MB out':>10}{'ratio':>9}{'saved %':>9}"
          f"{'comp MB/s':>11}{'dec MB/s':>10}")
    rows = list(report["weights"].values()) + [report["small_files"]["without_dictionary"],
                                                report["small_files"]["with_dictionary"]]
    for r in rows:
        print(f"{r['scheme']:<16}{r['bytes_in'] / 1e6:>10.2f}{r['bytes_out'] / 1e6:>10.2f}{r['ratio']:>9.4f}"
              f"{r['saved_pct']:>9.2f}{r['compress_mbps']:>11.1f}{r['decompress_mbps']:>10.1f}")
    print("(small:* rows are the non-weight files, without and with the trained dictionary)")
    zipnn = report["weights"].get("zipnn")
    best = report["best_scheme"]
    if zipnn and best:
        b = report["weights"][best]
        print(f"best: {best}, saves {b['saved_pct'] - zipnn['saved_pct']:+.3f} pt vs zipnn "
              f"({b['saved_pct']:.3f}% vs {zipnn['saved_pct']:.3f}%), "
              f"decompress {b['decompress_mbps']:.0f} MB/s "
              f"on one thread (target >= 200)")
    print(f"dictionary: {report['small_files']['dictionary']}")
    print(f"stored total: {report['total']['saved_pct']:.2f}% saved (ratio {report['total']['ratio']:.4f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
