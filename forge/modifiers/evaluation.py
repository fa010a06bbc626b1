"""Modifier subphase H: is the adapter better than the base on its own domain, and what ships.

  1. HF        2A's model alone vs 2A + G's adapter (peft) on A's heldout split: acc and reference log-prob
  2. judge     a domain with a judge teacher re-scores every output with it (the suite's check otherwise)
  3. GGUF      the adapter converted to a GGUF LoRA (against 2A's config) and 2C's GGUF scored in llama.cpp
               without and with it: what CPU serving will see
  4. compress  the GGUF LoRA with zstd, a dictionary trained on it kept only if it makes the total smaller;
               both the plain and the compressed file ship, the round trip checked
  5. record    modifier.json: domain, the base it fits (2C's GGUF, 2E's recovery LoRA, by cache key +
               sha256), the training data (E), every shipped file + sha256, the scores

The runner registers the output as `forge-modifier-<domain>` (challenger; champion too when it beats the
base), with lineage tags naming every input phase's run and cache key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.artifacts import sha256_file
from forge.data.records import DataError, read_jsonl
from forge.runner import JobContext, JobResult, input_file

log = logging.getLogger("forge.modifiers")

ADAPTER_DIR = "adapter"  # G's peft adapter, copied into the shipped bundle
GGUF_LORA = "adapter.gguf"
COMPRESSED = GGUF_LORA + ".fgz"  # forge.compress.codecs container (zstd); decompress_blob reads it
DICT_FILE = "adapter.zstd.dict"
RECORD = "modifier.json"
REPORTS = {"hf_base": "eval_base.jsonl", "hf": "eval.jsonl", "gguf_base": "eval_gguf_base.jsonl",
           "gguf": "eval_gguf.jsonl"}

Verify = Callable[[dict[str, Any], str], Any]  # (row, answer) -> CheckResult-like (.correct, .detail)


# ---- 1. HF: base vs base + adapter ---------------------------------------------------------------------

def evaluate_hf(model_dir: Path, adapter_dir: Path, rows: list[dict[str, Any]],
                ctx: JobContext) -> tuple[Any, Any]:
    """(base report, adapter report) on rows: the same model object, wrapped by peft after the first pass."""
    from peft import PeftModel

    from forge.evaluate.harness import evaluate
    from forge.modeling import compute_dtype, load_model, load_tokenizer, pick_device

    device = pick_device("auto")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(str(model_dir), device, dtype=compute_dtype(device))
    base = evaluate(model, tokenizer, rows, ctx.config.eval, device)
    tuned = PeftModel.from_pretrained(model, str(adapter_dir))
    after = evaluate(tuned, tokenizer, rows, ctx.config.eval, device)
    return base, after


# ---- 2. judge ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def judge_verifier(ctx: JobContext, domain: str, rows: list[dict[str, Any]]) -> Iterator[Verify | None]:
    """The domain's judge as a verifier (its teacher started for the task); None: the suite's check stands."""
    spec = ctx.config.modifiers.domains[domain]
    if not spec.judge:
        yield None
        return
    from forge.modifiers.endpoints import started_teachers
    from forge.modifiers.generation import judge_teachers
    from forge.modifiers.judge import verifier_for
    from forge.modifiers.teachers import CostTracker, ResponseCache

    cfg = ctx.config
    cost = CostTracker(cfg.teachers.cost_cap_usd)
    cache = ResponseCache(ctx.store) if cfg.teachers.cache else None
    with started_teachers(ctx, judge_teachers(cfg, domain), rows=rows) as ready, \
            verifier_for(cfg, domain, ready, cost, cache) as verify:
        yield verify
    log.info("judge %s spent $%.4f on %s", spec.judge, cost.spent_usd, domain)


def rejudge(report: Any, rows: Sequence[dict[str, Any]], verify: Verify) -> None:
    """Replace each record's correct/detail by the judge's verdict on its output."""
    by_id = {r["id"]: r for r in rows}
    for rec in report.records:
        verdict = verify(by_id[rec["id"]], rec["output"])
        rec["correct"] = bool(getattr(verdict, "correct", verdict))
        rec["detail"] = str(getattr(verdict, "detail", ""))


# ---- 3. GGUF -------------------------------------------------------------------------------------------

def evaluate_gguf_pair(gguf: Path, tokenizer_dir: Path, lora: Path, rows: list[dict[str, Any]],
                       ctx: JobContext) -> tuple[Any, Any]:
    from forge.evaluate.llama_cpp_backend import evaluate_gguf

    ecfg, gcfg = ctx.config.eval, ctx.config.gguf
    return (evaluate_gguf(gguf, tokenizer_dir, rows, ecfg, gcfg),
            evaluate_gguf(gguf, tokenizer_dir, rows, ecfg, gcfg, lora_path=lora))


# ---- 4. compress ---------------------------------------------------------------------------------------

@dataclass
class Compressed:
    bytes_in: int
    bytes_out: int  # the compressed file + its dictionary, when one is used
    plain_bytes: int  # zstd without a dictionary, for the report
    dictionary_bytes: int  # 0 when no dictionary is kept
    dictionary_note: str

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0

    def summary(self) -> dict[str, Any]:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "ratio": round(self.ratio, 5),
                "zstd_plain_bytes": self.plain_bytes, "dictionary_bytes": self.dictionary_bytes,
                "dictionary": self.dictionary_note}


def compress_file(src: Path, dest: Path, dict_path: Path, level: int, dict_size: int) -> Compressed:
    """zstd `src` into `dest` (a self-checking codecs container), with a dictionary trained on the file's own
    chunks only if file + dictionary come out smaller than plain zstd. Raises unless it round-trips."""
    from forge.compress.codecs import decompress_blob
    from forge.compress.lossless import SchemeResult, measure, train_dictionary

    data = src.read_bytes()
    plain = measure("zstd", data, level, None, SchemeResult("zstd"))  # raises if not bit-exact
    blob, dictionary = plain, None
    zdict, note = train_dictionary([data], dict_size)
    if zdict:
        with_dict = measure("zstd", data, level, zdict, SchemeResult("zstd+dict"))
        if len(with_dict) + len(zdict) < len(plain):
            blob, dictionary = with_dict, zdict
            note += f"; kept: {len(with_dict) + len(zdict)} < {len(plain)} bytes plain"
        else:
            note += f"; not kept: {len(with_dict)} + {len(zdict)} bytes >= {len(plain)} bytes plain"
    dest.write_bytes(blob)
    if dictionary:
        dict_path.write_bytes(dictionary)
    if decompress_blob(dest.read_bytes(), dictionary) != data:  # what is on disk decodes to the original
        raise DataError(f"{dest} does not decompress to {src}")
    return Compressed(len(data), len(blob) + len(dictionary or b""), len(plain), len(dictionary or b""), note)


# ---- 5. record -----------------------------------------------------------------------------------------

def file_entries(out: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: {"size": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in names}


def scores(reports: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: rep.summary() for name, rep in reports.items()}


def quality_row(s: dict[str, dict[str, float]], adapter_bytes: int, packed: Compressed) -> dict[str, float]:
    q = {"acc_base": s["hf_base"]["acc"], "acc": s["hf"]["acc"],
         "logprob_base": s["hf_base"]["logprob"], "logprob": s["hf"]["logprob"],
         "gguf_acc_base": s["gguf_base"]["acc"], "gguf_acc": s["gguf"]["acc"],
         "gguf_logprob_base": s["gguf_base"]["logprob"], "gguf_logprob": s["gguf"]["logprob"],
         "adapter_mb": adapter_bytes / 1e6, "compressed_mb": packed.bytes_out / 1e6,
         "compress_ratio": packed.ratio, "n": s["hf"]["n"]}
    q["delta_acc"] = q["acc"] - q["acc_base"]
    q["delta_logprob"] = q["logprob"] - q["logprob_base"]
    q["delta_gguf_acc"] = q["gguf_acc"] - q["gguf_acc_base"]
    return {k: float(v) for k, v in q.items()}


def verdict_notes(domain: str, q: dict[str, float], judged: bool) -> str:
    beats = q["acc"] > q["acc_base"]
    how = "judge" if judged else "suite checks"
    head = (f"{domain} adapter {'beats' if beats else 'does NOT beat'} the base on {int(q['n'])} heldout "
            f"rows ({how}): acc {q['acc_base']:.3f} -> {q['acc']:.3f} ({q['delta_acc']:+.3f}), logprob "
            f"{q['logprob_base']:.3f} -> {q['logprob']:.3f} ({q['delta_logprob']:+.3f})")
    return (f"{head}; GGUF acc {q['gguf_acc_base']:.3f} -> {q['gguf_acc']:.3f}; GGUF LoRA "
            f"{q['adapter_mb']:.2f} MB, zstd {q['compressed_mb']:.2f} MB (x{q['compress_ratio']:.2f})")


# ---- the job -------------------------------------------------------------------------------------------

def run(ctx: JobContext) -> JobResult:
    from forge.compress.llama_cpp_tools import convert_lora_to_gguf
    from forge.phases import modifier_input

    cfg, phase = ctx.config, ctx.phase
    domain = phase.domain
    if domain is None:
        raise DataError(f"phase {phase.id} is not a modifier subphase")
    a_id, e_id, g_id = (modifier_input(phase, s, cfg) for s in ("A", "E", "G"))
    heldout_file = input_file(ctx, a_id, "heldout")
    rows = read_jsonl(heldout_file.path)
    if not rows:
        raise DataError(f"{a_id}/{heldout_file.name} has no rows: nothing to evaluate the adapter on")
    model_dir = ctx.input_dir("2A")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{phase.id} needs 2A's pruned model at {model_dir} (config.json missing)")
    out = ctx.out_dir
    adapter_dir = out / ADAPTER_DIR
    shutil.copytree(ctx.input_dir(g_id) / ctx.input_info(g_id).get("adapter", ADAPTER_DIR), adapter_dir)
    adapter_files = sorted(f"{ADAPTER_DIR}/{p.name}" for p in adapter_dir.iterdir() if p.is_file())

    log.info("%s: scoring 2A without and with the %s adapter on %d heldout rows (HF)", phase.id, domain,
             len(rows))
    reports: dict[str, Any] = dict(zip(("hf_base", "hf"), evaluate_hf(model_dir, adapter_dir, rows, ctx),
                                       strict=True))
    lora = convert_lora_to_gguf(adapter_dir, model_dir, out / GGUF_LORA, cfg.gguf.outtype)
    gguf = input_file(ctx, "2C", "gguf")
    log.info("%s: scoring %s without and with the GGUF LoRA (llama.cpp)", phase.id, gguf.name)
    reports.update(zip(("gguf_base", "gguf"),
                       evaluate_gguf_pair(gguf.path, ctx.input_dir("2C"), lora, rows, ctx), strict=True))
    with judge_verifier(ctx, domain, rows) as verify:
        if verify is not None:
            for rep in reports.values():
                rejudge(rep, rows, verify)
    for name, rep in reports.items():
        rep.to_jsonl(out / REPORTS[name])

    lcfg = cfg.lossless
    packed = compress_file(lora, out / COMPRESSED, out / DICT_FILE, lcfg.level, lcfg.dict_size)
    s = scores(reports)
    quality = quality_row(s, lora.stat().st_size, packed)
    beats = quality["acc"] > quality["acc_base"]
    shipped = [*adapter_files, GGUF_LORA, COMPRESSED, *([DICT_FILE] if packed.dictionary_bytes else [])]
    record = {
        "domain": domain, "registered_name": cfg.modifiers.registered_name(domain),
        "base": {"gguf": gguf.describe(), "recovery_adapter": input_file(ctx, "2E", "adapter").describe(),
                 "pruned": {"phase": "2A", "cache_key": ctx.inputs["2A"].cache_key}},
        "data": {"phase": e_id, "cache_key": ctx.inputs[e_id].cache_key,
                 "heldout": heldout_file.describe(), "suite": cfg.modifiers.suite_of(domain)},
        "training": {"phase": g_id, "cache_key": ctx.inputs[g_id].cache_key,
                     "steps": ctx.input_info(g_id).get("global_step")},
        "files": file_entries(out, shipped),
        "compression": packed.summary(),
        "scores": s, "judged_by": cfg.modifiers.domains[domain].judge, "beats_base": beats,
    }
    (out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(out / RECORD)

    metrics = {**quality, "beats_base": float(beats), "compressed_bytes": float(packed.bytes_out),
               "zstd_plain_bytes": float(packed.plain_bytes),
               "dictionary_bytes": float(packed.dictionary_bytes),
               "eval_seconds": sum(rep.seconds for rep in reports.values())}
    return JobResult(metrics=metrics, quality=quality,
                     notes=verdict_notes(domain, quality, verify is not None),
                     info={"record": RECORD, "adapter": GGUF_LORA, "compressed": COMPRESSED,
                           "peft_dir": ADAPTER_DIR, "beats_base": beats, "reports": REPORTS},
                     register="", register_model=cfg.modifiers.registered_name(domain),
                     aliases=("champion",) if beats else ())
