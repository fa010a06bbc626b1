"""12A: train the critique classifier (forge.serve.critique) and measure it.

Inputs: prep_data (its train.jsonl: the user datasets' checkable rows join the suites' questions), 2C (the
GGUF and its tokenizer) and 2E (the recovery LoRA; may be skipped): the served base answers up to
serving.critique.model_answers of the questions itself, so the critic also sees the mistakes it will judge.

Outputs (the phase's dir):
  critic/                   the model: critic.json + critic.safetensors (Critic.load)
  examples_{train,val,test}.jsonl   the labelled examples, to audit or retrain
  critique_report.json      counts per domain and label source, test accuracy / AUC / ECE before and after
                            the temperature, per-domain and per-source figures, the score histogram, size,
                            single-pair latency (p50 / p99, one thread), the training history and the config
  critique_scores.png       test score distributions of correct vs wrong answers
The runner registers critic/ as a model version (serving.critique.registered_model).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forge.data.records import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from forge.runner import InputFile, JobContext, JobResult
    from forge.serve.critique import Critic
    from forge.serve.serve_config import CritiqueConfig

log = logging.getLogger("forge.serve")

REPORT_FORMAT = "forge-critique-report/v1"
PLAN_SIZE_BYTES = 10 * 1024 * 1024  # the plan: "~10 MB"
LATENCY_PAIRS = 64
FEATURE_CHUNK = 2000  # examples per progress line while embedding
N_BINS = 10  # ECE bins, and score histogram bins (one per score point)


# ---- inputs ----------------------------------------------------------------------------------------------

def base_model(ctx: JobContext) -> tuple[tuple[InputFile, InputFile | None] | None, str]:
    """(2C's GGUF, 2E's LoRA or None) when the base can answer, else None; and why."""
    from forge.serve.phase_jobs import served_base

    if ctx.config.serving.critique.model_answers == 0:
        return None, "serving.critique.model_answers is 0"
    return served_base(ctx)


def model_answers(ctx: JobContext, rows: Sequence[dict[str, Any]], n: int) -> dict[int, str]:
    """The served base's greedy answers to n of the rows (round-robin over domains), by row index."""
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend
    from forge.serve.critique_data import generate_answers, model_rows

    base, _ = base_model(ctx)
    if base is None or n == 0:
        return {}
    gguf, adapter = base
    picked = model_rows(rows, n)
    g, e = ctx.config.gguf, ctx.config.eval
    with LlamaCppBackend(gguf.path, ctx.input_dir("2C"), adapter.path if adapter else None,
                         n_ctx=g.n_ctx, n_threads=g.n_threads, n_batch=g.n_batch,
                         max_new_tokens=e.max_new_tokens) as backend:
        outputs = generate_answers(backend, [rows[i] for i in picked], e.batch_size)
    return dict(zip(picked, outputs, strict=True))


# ---- measuring -------------------------------------------------------------------------------------------

def split_metrics(critic: Critic, X: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy (P >= 0.5), AUC, ECE / log loss / Brier before (T=1) and after the temperature, and what
    12B's threshold does: the share of wrong answers it flags, and of correct ones."""
    from forge.compress.calibration import brier, ece
    from forge.serve.critique import SCALE, binary_nll, roc_auc, sigmoid

    logits = critic.logits(X)
    raw, cal = sigmoid(logits), sigmoid(logits / critic.temperature)
    correct = y.astype(bool)
    flagged = SCALE * cal < threshold
    return {"n": float(len(y)), "correct_share": float(correct.mean()),
            "accuracy": float(((cal >= 0.5) == correct).mean()), "auc": roc_auc(cal, correct),
            "ece_before": ece(raw, correct, N_BINS), "ece_after": ece(cal, correct, N_BINS),
            "nll_before": binary_nll(logits, y), "nll_after": binary_nll(logits, y, critic.temperature),
            "brier_before": brier(raw, correct), "brier_after": brier(cal, correct),
            "wrong_flagged": float(flagged[~correct].mean()) if (~correct).any() else float("nan"),
            "correct_flagged": float(flagged[correct].mean()) if correct.any() else float("nan")}


def group_metrics(scores: np.ndarray, examples: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Per value of examples[key]: n, share correct, accuracy at 5, AUC (nan with one class), mean scores."""
    from forge.serve.critique import roc_auc

    out: dict[str, Any] = {}
    for value in sorted({str(ex[key]) for ex in examples}):
        idx = np.array([str(ex[key]) == value for ex in examples])
        y = np.array([ex["correct"] for ex in examples])[idx]
        s = scores[idx]
        out[value] = {"n": int(idx.sum()), "correct_share": float(y.mean()),
                      "accuracy": float(((s >= 5.0) == y).mean()), "auc": roc_auc(s, y),
                      "mean_score_correct": float(s[y].mean()) if y.any() else None,
                      "mean_score_wrong": float(s[~y].mean()) if (~y).any() else None}
    return out


def counts(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """domain -> source -> {"correct", "wrong"}; variant -> how many; perturbations labelled correct."""
    table: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"correct": 0,
                                                                                           "wrong": 0}))
    for ex in examples:
        table[ex["domain"]][ex["source"]]["correct" if ex["correct"] else "wrong"] += 1
    flips = Counter(f"{ex['kind']}:{ex['variant']}" for ex in examples
                    if ex["intended"] is not None and ex["intended"] != ex["correct"])
    return {"per_domain": {d: dict(v) for d, v in sorted(table.items())},
            "per_source": dict(Counter(ex["source"] for ex in examples)),
            "per_variant": dict(sorted(Counter(f"{ex['kind']}:{ex['variant']}" for ex in examples).items())),
            "label_differs_from_intent": dict(sorted(flips.items()))}


def histogram(scores: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    edges = np.linspace(0.0, 10.0, N_BINS + 1)
    return {"edges": [float(e) for e in edges],
            "correct": np.histogram(scores[correct], edges)[0].tolist(),
            "wrong": np.histogram(scores[~correct], edges)[0].tolist()}


def plot_scores(scores: np.ndarray, correct: np.ndarray, threshold: float, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 10.0, 21)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for mask, name, color in ((correct, "correct", "tab:green"), (~correct, "wrong", "tab:red")):
        ax.hist(scores[mask], edges, alpha=0.6, label=f"{name} answers ({int(mask.sum())})", color=color)
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1, label=f"12B threshold {threshold:g}")
    ax.set(xlim=(0, 10), xlabel="critic score (10 x calibrated P(correct))", ylabel="test answers",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def no_nan(value: Any) -> Any:
    """The report with nan (an AUC over one class) as null: strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- the job ---------------------------------------------------------------------------------------------

def pairs_of(examples: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(ex["question"], ex["answer"]) for ex in examples]


def collect_examples(ctx: JobContext, cfg: CritiqueConfig, seconds: dict[str, float]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """The questions, their labelled examples and where the base's answers came from. Base answers are at
    most half of train_examples: the rest are references, rewrites and perturbations."""
    from forge.serve.critique_data import build_examples, question_rows, user_dataset_rows

    t0 = time.time()
    train_path = ctx.input_dir("prep_data") / "train.jsonl"
    users = user_dataset_rows(read_jsonl(train_path), cfg.domains) if train_path.exists() else []
    base, base_why = base_model(ctx)
    n_model = min(cfg.model_answers, cfg.train_examples // 2) if base else 0
    rows = question_rows(cfg, cfg.train_examples - n_model, users)
    log.info("12A: %d questions over %s (%d from user datasets); base answers: %s", len(rows), cfg.domains,
             sum(1 for r in rows if not str(r.get("source", "")).startswith("suite:")),
             f"{n_model} ({base_why})" if n_model else f"none ({base_why})")
    answers = model_answers(ctx, rows, n_model)
    seconds["base_answers"] = time.time() - t0
    t0 = time.time()
    examples = build_examples(rows, cfg.seed, ctx.config.eval.code_timeout_s, answers)
    seconds["examples"] = time.time() - t0
    return rows, examples, base_why


def featurize(extractor: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from forge.serve.critique import feature_matrix

    X, y = {}, {}
    for name, exs in splits.items():
        t0, parts = time.time(), []
        for start in range(0, len(exs), FEATURE_CHUNK):
            parts.append(feature_matrix(extractor, pairs_of(exs[start:start + FEATURE_CHUNK])))
            log.info("12A: features of %d/%d %s examples (%.1fs)", min(start + FEATURE_CHUNK, len(exs)),
                     len(exs), name, time.time() - t0)
        X[name] = np.concatenate(parts)
        y[name] = np.array([ex["correct"] for ex in exs], dtype=np.float32)
    return X, y


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """MLflow's view of the report: every split's figures, test AUC per domain, latency, size."""
    out = {f"{s}_{k}": float(v) for s, m in report["metrics"].items() for k, v in m.items()}
    out.update({f"test_auc.{d}": float(v["auc"]) for d, v in report["test_per_domain"].items()})
    out.update({f"latency_{k}_ms": float(v) for k, v in report["latency_ms"].items() if k != "n"})
    out.update({"temperature": report["temperature"], "size_bytes": float(report["size"]["head_bytes"]),
                "n_examples": float(report["examples"]["total"]),
                "n_base_answers": float(report["base_answers"]["n"]),
                "train_seconds": report["seconds"]["train"],
                "best_epoch": float(report["history"]["best_epoch"])})
    return {k: v for k, v in out.items() if np.isfinite(v)}  # an AUC over one class is nan


def run(ctx: JobContext) -> JobResult:
    from forge.compress.calibration import temperature_grid
    from forge.compress.calibration_config import CalibrationConfig
    from forge.routing.features import MiniLMFeatures
    from forge.routing.timing import summary, time_calls
    from forge.runner import JobResult
    from forge.serve.critique import MAX_SEQ_LEN, SCALE, TrainSettings, train_critic
    from forge.serve.critique_data import by_split

    cfg: CritiqueConfig = ctx.config.serving.critique
    started, seconds = time.time(), {}
    rows, examples, base_why = collect_examples(ctx, cfg, seconds)
    splits = by_split(examples)
    out = ctx.out_dir
    for name, exs in splits.items():
        write_jsonl(out / f"examples_{name}.jsonl", exs)
    log.info("12A: %d examples %s, %.0f%% correct, in %.1fs", len(examples),
             {s: len(v) for s, v in splits.items()}, 100 * np.mean([ex["correct"] for ex in examples]),
             time.time() - started)

    t0 = time.time()
    extractor = MiniLMFeatures(MAX_SEQ_LEN)
    X, y = featurize(extractor, splits)
    seconds["features"] = time.time() - t0
    t0 = time.time()
    grid = temperature_grid(CalibrationConfig())  # 2F's grid
    settings = TrainSettings(cfg.hidden_dim, cfg.epochs, cfg.learning_rate, cfg.seed)
    critic, history = train_critic(X["train"], y["train"], X["val"], y["val"], settings, grid,
                                   extractor.spec(), extractor)
    seconds["train"] = time.time() - t0
    for row in history.epochs:
        ctx.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    per_split = {s: split_metrics(critic, X[s], y[s], cfg.threshold) for s in splits}
    test, t = splits["test"], per_split["test"]
    scores, correct = SCALE * critic.probs(X["test"]), y["test"].astype(bool)
    t0 = time.time()
    latency = summary(time_calls(lambda pair: critic.score(*pair), pairs_of(test)[:LATENCY_PAIRS]))
    seconds["latency"] = time.time() - t0
    # no run id in the file: a recomputed 12A writes the same bytes (the manifest says which run made it)
    critic.info = {"metrics": {f"test_{k}": v for k, v in t.items()}, "phase": "12A",
                   "cache_key": ctx.cache_key, "examples": {s: len(v) for s, v in splits.items()},
                   "domains": list(cfg.domains)}
    critic.save(out / "critic")
    size = folder_bytes(out / "critic")

    model_exs = [ex for ex in examples if ex["source"] == "model"]
    report = {
        "format": REPORT_FORMAT,
        "critic_dir": "critic",
        "examples": {"total": len(examples), "per_split": {s: len(v) for s, v in splits.items()},
                     "questions": len(rows), **counts(examples)},
        "base_answers": {"source": base_why, "n": len(model_exs),
                         "correct_share": float(np.mean([ex["correct"] for ex in model_exs])) if model_exs
                         else None},
        "metrics": per_split,
        "test_per_domain": group_metrics(scores, test, "domain"),
        "test_per_source": group_metrics(scores, test, "source"),
        "temperature": critic.temperature,
        "temperature_search": {"grid": [float(v) for v in grid], "val_nll": history.temperature_nll},
        "score_histogram_test": histogram(scores, correct),
        "size": {"head_bytes": size, "head_params": critic.n_params, "plan_bytes": PLAN_SIZE_BYTES,
                 "encoder": "all-MiniLM-L6-v2 int8 (ONNX Runtime), shared with the router, not counted"},
        "history": {"epochs": history.epochs, "best_epoch": history.best_epoch},
        "config": cfg.model_dump(mode="json"),
    }
    (out / "critique_report.json").write_text(json.dumps(no_nan(report), indent=1, sort_keys=True) + "\n")
    ctx.log_artifact(out / "critique_report.json")
    title = f"12A critic on held-out questions: AUC {t['auc']:.3f}, acc {t['accuracy']:.3f}"
    ctx.log_artifact(plot_scores(scores, correct, cfg.threshold, title, out / "critique_scores.png"))

    notes = (f"{len(examples)} examples ({len(model_exs)} written by the base) on {len(rows)} questions; "
             f"test ({len(test)}, held-out questions): AUC {t['auc']:.3f}, acc {t['accuracy']:.3f}, ECE "
             f"{t['ece_before']:.3f} -> {t['ece_after']:.3f} (T={critic.temperature:.3g}); below "
             f"{cfg.threshold:g} flags {t['wrong_flagged']:.0%} of wrong and {t['correct_flagged']:.0%} of "
             f"correct answers; head {size / 1e6:.2f} MB, p50/p99 {latency['p50']:.1f}/"
             f"{latency['p99']:.1f} ms")
    quality = {"critic_auc": t["auc"], "critic_accuracy": t["accuracy"]}
    # timings stay out of the files (a recomputed 12A is byte-identical): metrics and the manifest's info
    timing = {"latency_ms": latency, "seconds": {**seconds, "total": time.time() - started},
              "latency": "one (question, answer) per call: both MiniLM embeddings + cheap features + the "
                         "head, one thread, after one untimed pass, gc off while timing "
                         "(forge.routing.timing)"}
    return JobResult(metrics=flat_metrics({**report, **timing}), quality=quality, notes=notes,
                     info={"critic_dir": "critic", "report": "critique_report.json", "timing": timing,
                           "temperature": critic.temperature, "examples": report["examples"]["per_split"]},
                     register="critic", register_model=cfg.registered_model)
