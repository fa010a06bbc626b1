"""GPU proof of Axolotl as Forge's modifier trainer: 4-bit QLoRA on a ~210M-parameter Llama, from a config.

  python benchmarks/gpu_axolotl.py --install-wheels .whl --out $OUT   # H100 (device machine), one call
  python benchmarks/gpu_axolotl.py --tiny --dry-run                   # CPU check: builds, renders, no Axolotl

Builds a Llama from a config (random init, no downloads) with our BPE tokenizer and chat template
(forge.train.base_model), trained on suite texts; writes suite chat rows (forge.data.suites) as Axolotl's
JSONL; renders the Axolotl YAML with forge.modifiers.axolotl_config (device cuda, adapter qlora, bf16,
LoRA r16 on all linear layers, sequence_len 1024, sample packing, micro batch 8) and runs `axolotl
preprocess` + `axolotl train` through forge.modifiers.axolotl_runner.run_axolotl. While it trains, a thread
samples `nvidia-smi --query-gpu=memory.used`. Prints one JSON line (versions, sizes, steps, tokens/s,
memory, losses) and writes it, the YAML and the log tail to --out.

--install-wheels DIR: the device machine has torch/transformers/peft/accelerate but no Axolotl and no
network, so Axolotl and the packages its pins want travel as wheels (benchmarks/README.md lists them).
WHEELS says when each goes in: Axolotl's exact pins (transformers, peft, datasets, trl, tokenizers, pydantic
...) unless that very version is there; others unless the machine's copy satisfies a bound, or only when
missing. torch (GBs) and pyarrow (~42 MB) cannot travel: PREREQS checks them, and the JSON lists whatever of
Axolotl's own requirements stays unmet (axolotl_requirements_unmet: its torch>=2.13 pin, extras it never
imports here). numba and wandb, if missing (too big to carry: llvmlite ~42 MB, wandb ~20 MB), get stubs:
Axolotl imports both at module level. This run uses neither. numba only jit-compiles the packing planner,
which also runs as plain Python.
Installs go into the interpreter's own site-packages: run_axolotl drops PYTHONPATH from Axolotl's env.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# wheel (distribution name as in the file name) -> when ours goes in. "pin": unless the installed version is
# the wheel's (what Axolotl pins exactly); a specifier (">=1.31.0"): unless the installed one satisfies it;
# "": only when missing (whatever version the machine has will do).
WHEELS: dict[str, str] = {
    "axolotl": "pin", "axolotl_contribs_lgpl": "pin", "axolotl_contribs_mit": "pin", "bitsandbytes": "pin",
    "transformers": "pin", "tokenizers": "pin", "peft": "pin", "accelerate": "pin", "datasets": "pin",
    "trl": "pin", "evaluate": "pin", "pydantic": "pin", "pydantic_core": "pin",
    "huggingface_hub": ">=1.31.0", "hf_xet": ">=1.6.0", "click": ">=8.4.2", "fsspec": "<=2026.6.0",
    "dill": "<0.4.2", "multiprocess": "<0.70.20", "typing_extensions": ">=4.14.1",
    "typing_inspection": ">=0.4.2", "annotated_types": ">=0.6.0",
    "xxhash": "", "addict": "", "fire": "", "termcolor": "", "colorama": "", "python_dotenv": "",
    "fastcore": "", "posthog": "", "backoff": "", "distro": "", "python_dateutil": "", "six": "",
    "responses": "",
}
# what the machine must already have, at these versions (too big to carry: pyarrow ~42 MB, torch GBs)
PREREQS = {"torch": ">=2.7.1", "pyarrow": ">=21.0.0", "pandas": "", "numpy": ">=2.1",
           "safetensors": ">=0.8.0", "regex": ">=2025.10.22", "psutil": "", "pyyaml": ">=5.1", "jinja2": "",
           "httpx": "<1.0.0"}
STUBS = {
    "numba": ("def njit(*args, **kwargs):\n"
              "    if len(args) == 1 and callable(args[0]) and not kwargs:\n"
              "        return args[0]\n"
              "    return lambda f: f\n\n"
              "jit = njit\nprange = range\n__version__ = '0.0-forge-stub'\n"),
    "wandb": "__version__ = '0.0-forge-stub'\nrun = None\n",
}
FULL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "max_position_embeddings": 2048}
TINY = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model, short sequences (CPU check)")
    ap.add_argument("--dry-run", action="store_true", help="build model + data + YAML, do not run Axolotl")
    ap.add_argument("--install-wheels", type=Path, help="install the missing packages from this wheel folder")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="result folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rows", type=int, default=2048, help="chat rows (spread over the suites)")
    ap.add_argument("--seq", type=int, help="sequence_len (default 1024; tiny 128)")
    ap.add_argument("--batch", type=int, default=8, help="micro batch size")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--no-packing", action="store_true", help="no sample packing (rows padded per batch)")
    ap.add_argument("--fallback-no-packing", action="store_true",
                    help="if the packed run fails, run again without packing")
    args = ap.parse_args(argv)
    if args.seq is None:
        args.seq = 128 if args.tiny else 1024
    return args


# ---------------------------------------------------------------- packages (device machine only)


def install_wheels(folder: Path) -> dict[str, Any]:
    """pip-install the wheels that WHEELS says are needed here; stub numba/wandb if missing."""
    chosen, skipped = [], []
    for whl in sorted(folder.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if name not in WHEELS:
            raise SystemExit(f"{whl}: not in WHEELS (add it with its install rule, or remove the file)")
        rule = WHEELS[name]
        (chosen if _needs(name, "==" + version if rule == "pin" else rule) else skipped).append(whl)
    if chosen:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--break-system-packages"]
        subprocess.run([*pip, *map(str, chosen)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    stubbed = []
    for name, code in STUBS.items():
        if importlib.util.find_spec(name) is None:
            (site / name).mkdir(exist_ok=True)
            (site / name / "__init__.py").write_text(code)
            stubbed.append(name)
    importlib.invalidate_caches()
    return {"installed": [w.name for w in chosen], "already_there": [w.name for w in skipped],
            "stubbed": stubbed, "prereqs_unmet": [f"{n}{s} (have {_installed(n)})" for n, s in PREREQS.items()
                                                  if _needs(n, s)]}


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _needs(dist: str, spec: str) -> bool:
    """True when `dist` is missing or its installed version does not satisfy `spec` ("" = any)."""
    from packaging.specifiers import SpecifierSet

    have = _installed(dist)
    return have is None or (bool(spec) and not SpecifierSet(spec).contains(have, prereleases=True))


def unmet_requirements(dist: str = "axolotl") -> list[str]:
    """`dist`'s own requirements (extras aside) that this interpreter does not meet: what runs unpinned."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    if _installed(dist) is None:
        return []
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = _installed(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name}{req.specifier} (have {have})")
    return out


# ---------------------------------------------------------------- model, data, config


def build_base(path: Path, rows: list[dict[str, Any]], sizes: dict[str, int], vocab: int, seq: int) -> int:
    """Our tokenizer (trained on the rows' texts) + a random-init Llama, saved at `path`; its param count."""
    from forge.config import DemoModelConfig
    from forge.train.base_model import build_model, train_tokenizer

    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = train_tokenizer(texts, vocab_size=vocab, max_length=seq)
    model = build_model(DemoModelConfig(vocab_size=vocab, **sizes), tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    import torch

    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return n_params


def suite_rows(n: int) -> list[dict[str, Any]]:
    from forge.data import suites

    domains = sorted(suites.SUITES)
    return [r for d in domains for r in suites.generate(d, n // len(domains), seed=0, split="train")]


def render(args: argparse.Namespace, base: Path, data: Path, out_dir: Path, device: str) -> dict[str, Any]:
    from forge.modifiers.axolotl_config import AxolotlConfig, render_axolotl_yaml

    packing = not args.no_packing
    # attention sdpa: no flash-attn on the device. lora_dropout 0: Axolotl's fused LoRA kernels (auto-enabled
    # on CUDA) want it.
    cfg = AxolotlConfig(adapter="qlora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                        target_modules="all-linear", sequence_len=args.seq, micro_batch_size=args.batch,
                        max_steps=args.steps, num_epochs=100, learning_rate=2e-4, warmup_steps=5,
                        save_steps=args.steps, logging_steps=5, device=device, attention="sdpa",
                        precision="bf16" if device == "cuda" else "auto")
    rendered = render_axolotl_yaml(cfg, base_model=base, dataset_path=data, output_dir=out_dir)
    if packing:
        # AxolotlConfig only allows packing with flash attention (true for Axolotl 0.19); Axolotl >= 0.20
        # packs with sdpa too (block-diagonal mask: packed rows do not see each other), so turn it on here.
        rendered.update(sample_packing=True, pad_to_sequence_len=True)
    return rendered


# ---------------------------------------------------------------- measuring


class GpuMemorySampler(threading.Thread):
    """Max of nvidia-smi's memory.used (MiB, whole GPU) every `period` s: the trainer runs in a child."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period, self.peak_mib, self.samples = period, 0, 0
        self._halt = threading.Event()

    def read(self) -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak_mib = max(self.peak_mib, self.read())
                self.samples += 1
            except (OSError, ValueError, subprocess.CalledProcessError):
                pass
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class LineCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logged_dicts(lines: list[str]) -> list[dict[str, Any]]:
    """The Trainer's printed log dicts ({'loss': ..}, the closing {'train_runtime': ..}) in the output."""
    found = []
    for line in lines:
        start = line.find("{'")
        if start < 0:
            continue
        try:
            value = ast.literal_eval(line[start:line.rfind("}") + 1])
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("axolotl", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets",
                 "tokenizers", "huggingface_hub", "pydantic", "pyarrow", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def summarize(result: Any, printed: list[dict[str, Any]], args: argparse.Namespace, train_wall_s: float,
              sampler: GpuMemorySampler | None, baseline_mib: int | None) -> dict[str, Any]:
    history = result.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    final = {k: _num(v) for k, v in next((d for d in reversed(printed) if "train_runtime" in d), {}).items()}
    rates = [h["tokens/train_per_sec_per_gpu"] for h in history if "tokens/train_per_sec_per_gpu" in h]
    trainable_tokens = result.metrics.get("tokens/trainable")
    total_tokens = result.metrics.get("tokens/total")
    runtime = final.get("train_runtime")
    seen = final.get("num_input_tokens_seen")
    return {
        "global_step": result.global_step,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "train_loss": final.get("train_loss"), "train_runtime_s": runtime,
        # tokens/s: Axolotl's per-window trainable-token rate (first window has none), and totals / runtime
        "tokens_per_s_axolotl_windows": rates,
        "tokens_per_s_axolotl_last": rates[-1] if rates else None,
        "trainable_tokens": trainable_tokens, "total_tokens": total_tokens,
        "trainable_tokens_per_s": round(trainable_tokens / runtime, 1) if trainable_tokens and runtime
        else None,
        "total_tokens_per_s": round(total_tokens / runtime, 1) if total_tokens and runtime else None,
        "train_tokens_per_second_hf": final.get("train_tokens_per_second"),
        "input_tokens_seen": seen,
        "input_tokens_per_s": round(seen / runtime, 1) if seen and runtime else None,
        "train_summary": final,
        "mem_max_allocated_gib": result.metrics.get("memory/max_allocated (GiB)"),
        "mem_max_active_gib": result.metrics.get("memory/max_active (GiB)"),
        "mem_reserved_gib": result.metrics.get("memory/device_reserved (GiB)"),
        "nvidia_smi_peak_mib": sampler.peak_mib if sampler else None,
        "nvidia_smi_baseline_mib": baseline_mib,
        "nvidia_smi_samples": sampler.samples if sampler else None,
        "train_cli_wall_s": round(train_wall_s, 1),
    }


# ---------------------------------------------------------------- main


def trainable_params(sizes: dict[str, int], r: int) -> int:
    """LoRA A+B parameters on q,k,v,o,gate,up,down of every layer (what lora_target_linear wraps)."""
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    kv = h * sizes["num_key_value_heads"] // sizes["num_attention_heads"]
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    return per_layer * sizes["num_hidden_layers"]


def run_once(args: argparse.Namespace, work: Path, base: Path, data: Path, device: str,
             tag: str) -> dict[str, Any]:
    from forge.modifiers.axolotl_config import write_axolotl_yaml
    from forge.modifiers.axolotl_runner import AxolotlError, run_axolotl

    rendered = render(args, base, data, work / f"axolotl-{tag}", device)
    yaml_path = write_axolotl_yaml(rendered, work / f"axolotl-{tag}.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"axolotl-{tag}.yaml").write_text(yaml_path.read_text())
    logger = logging.getLogger(f"forge.bench.axolotl.{tag}")
    collector = LineCollector()
    logger.addHandler(collector)
    sampler = GpuMemorySampler() if device == "cuda" else None
    baseline = sampler.read() if sampler else None
    if sampler:
        sampler.start()
    t0 = time.time()
    env = {"WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    try:
        result = run_axolotl(yaml_path, logger=logger, env=env)
        error = None
    except AxolotlError as e:
        result, error = None, str(e).splitlines()[0]
    wall = time.time() - t0
    if sampler:
        sampler.stop()
    (args.out / f"axolotl-{tag}.log").write_text("\n".join(collector.lines[-400:]) + "\n")
    out: dict[str, Any] = {"run": tag, "sample_packing": bool(rendered.get("sample_packing")),
                           "sequence_len": args.seq, "micro_batch": args.batch, "ok": error is None}
    if error:
        out["error"] = error
        out["log_tail"] = collector.lines[-15:]
        return out
    out.update(summarize(result, logged_dicts(collector.lines), args, wall, sampler, baseline))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    report: dict[str, Any] = {}
    if args.install_wheels:
        t0 = time.time()
        report["install"] = install_wheels(args.install_wheels)
        report["install"]["seconds"] = round(time.time() - t0, 1)
        scripts = str(Path(sysconfig.get_paths()["scripts"]))
        os.environ["PATH"] = os.pathsep.join([scripts, "/usr/local/bin", os.environ["PATH"]])
    import torch

    from forge.modifiers.axolotl_config import write_chat_jsonl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = TINY if args.tiny else FULL
    work = Path(tempfile.mkdtemp(prefix="forge-axolotl-bench-"))
    rows = suite_rows(args.rows)
    data = write_chat_jsonl(rows, work / "train.jsonl", source="suite rows")
    t0 = time.time()
    base = work / "base"
    n_params = build_base(base, rows, sizes, args.vocab, args.seq)
    report.update(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", params=n_params,
                  trainable_params_expected=trainable_params(sizes, 16), rows=len(rows), model=sizes,
                  build_s=round(time.time() - t0, 1), versions=versions())
    if args.dry_run:
        from forge.modifiers.axolotl_config import to_yaml

        rendered = render(args, base, data, work / "axolotl-dry", device)
        print(to_yaml(rendered))
        print(json.dumps(report), flush=True)
        return report

    runs = [run_once(args, work, base, data, device, "packed" if not args.no_packing else "unpacked")]
    if not runs[0]["ok"] and args.fallback_no_packing and not args.no_packing:
        args.no_packing = True
        runs.append(run_once(args, work, base, data, device, "unpacked"))
    report["runs"] = runs
    report["versions"] = versions()
    report["axolotl_requirements_unmet"] = unmet_requirements()
    # LoRA parameter count as PEFT reports it, from the saved adapter
    good = next((r for r in runs if r["ok"]), None)
    if good:
        from safetensors import safe_open

        adapter = work / f"axolotl-{good['run']}" / "adapter_model.safetensors"
        with safe_open(str(adapter), "pt") as f:
            report["trainable_params"] = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    return report


def _num(value: Any) -> Any:
    """The Trainer's closing summary prints numbers as strings ('3.662'): back to numbers."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
