"""6B: train the escalation detector (MiniLM teacher -> distilled BiLSTM student) and measure both.

Input: prep_data's train.jsonl. Its user messages are the "previous" prompts the follow-ups answer; each
prompt is hashed into one of train (70%), val (10%) or test (20%), so test pairs are built on prompts
and (see forge.routing.escalation_data) phrasings that training never saw.

Outputs (the phase's dir):
  detector/              the shipped student: detector.json + student.safetensors (EscalationDetector.load)
  pairs_{train,val,test}.jsonl   the labelled pairs, to audit or retrain
  detector_report.json   accuracy per split and per kind, confusion counts, sizes, single-pair latency
                         (p50/p99 on one thread) for teacher and student, student-teacher agreement,
                         the training histories and the config
  detector_accuracy.png  test accuracy per kind, teacher vs student
The runner registers detector/ as a model version (routing.detector.registered_model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.data.records import DataError, read_jsonl, stable_int, write_jsonl

if TYPE_CHECKING:
    from forge.routing.escalation import DetectorTraining
    from forge.routing.routing_config import DetectorConfig
    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.routing")

REPORT_FORMAT = "forge-escalation-report/v1"
PLAN_ACCURACY = 0.94  # the plan: "BERT -> distilled LSTM, 94%"
POOL_SPLITS = (("val", 1), ("test", 2), ("train", 7))  # tenths of the prompt pool, by a stable hash
MODELS = ("teacher", "student")


def user_prompts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every user message of the rows, deduplicated, in order."""
    texts = (m["content"].strip() for r in rows for m in r["messages"] if m["role"] == "user")
    return list(dict.fromkeys(t for t in texts if t))


def split_pool(prompts: Sequence[str], where: str) -> dict[str, list[str]]:
    """Prompts into disjoint train / val / test pools by a stable hash of their text."""
    edges, lo = {}, 0
    for name, tenths in POOL_SPLITS:
        edges[name] = (lo, lo + tenths)
        lo += tenths
    pools: dict[str, list[str]] = {name: [] for name, _ in POOL_SPLITS}
    for p in prompts:
        bucket = stable_int(f"forge-6b|{p}") % 10
        pools[next(n for n, (a, b) in edges.items() if a <= bucket < b)].append(p)
    small = {n: len(v) for n, v in pools.items() if len(v) < 2}
    if small:
        raise DataError(f"6B: {where} has {len(prompts)} distinct user prompts; the {sorted(small)} pool(s) "
                        f"got {small} (need >= 2 each): give prep_data more training rows")
    return {n: pools[n] for n in ("train", "val", "test")}


def make_splits(pools: Mapping[str, Sequence[str]], cfg: DetectorConfig) -> dict[str, list[dict[str, Any]]]:
    from forge.routing.escalation_data import make_pairs

    sizes = {"train": cfg.train_pairs, "val": cfg.val_pairs, "test": cfg.test_pairs}
    return {s: make_pairs(sizes[s], cfg.seed, s, pools[s]) for s in ("train", "val", "test")}


# ---- the report ----------------------------------------------------------------------------------

def model_section(tr: DetectorTraining, model: str, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                  latency: Mapping[str, float], n_params: int) -> dict[str, Any]:
    from forge.routing.escalation import confusion, per_kind_accuracy

    th = tr.detector.threshold
    return {
        "accuracy": {s: tr.accuracy(model, s) for s in splits},
        "per_kind": {s: per_kind_accuracy(tr.probs[model][s], rows, th) for s, rows in splits.items()},
        "confusion": {s: confusion(tr.probs[model][s], tr.labels[s], th) for s in splits},
        "n_params": n_params,
        "bytes": n_params * 4,
        "latency_ms": dict(latency),
        "history": tr.history[model],
    }


def build_report(tr: DetectorTraining, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                 pools: Mapping[str, Sequence[str]], latency: Mapping[str, Mapping[str, float]],
                 cfg: DetectorConfig) -> dict[str, Any]:
    from forge.routing.escalation import FORMAT

    teacher_params = sum(p.numel() for p in tr.teacher.parameters())
    student_acc = tr.accuracy("student", "test")
    return {
        "format": REPORT_FORMAT,
        "detector_format": FORMAT,
        "threshold": tr.detector.threshold,
        "n_pairs": {s: len(rows) for s, rows in splits.items()},
        "n_previous_prompts": {s: len(p) for s, p in pools.items()},
        "dissatisfied_share": {s: float(tr.labels[s].mean()) for s in splits},
        "test_phrasings": "held out: every third template / opener / closer / synonym pair of each kind is "
                          "used only by the test split (forge.routing.escalation_data)",
        "teacher": {"model": f"all-MiniLM-L6-v2 cross-encoder, mean pool + linear; top "
                             f"{cfg.teacher_train_layers} layers + head fine-tuned",
                    **model_section(tr, "teacher", splits, latency["teacher"], teacher_params)},
        "student": {"model": f"BiLSTM pair classifier (embed {cfg.student_embed_dim}, hidden "
                             f"{cfg.student_hidden}, vocab {len(tr.detector.vocab)} + PAD/UNK)",
                    **model_section(tr, "student", splits, latency["student"], tr.detector.n_params),
                    "vocab_from_train_pairs": tr.vocab_from_train,
                    "unk_rate": tr.unk_rate},
        "agreement": {s: tr.agreement(s) for s in splits},
        "latency": "single pair per call (tokenize + forward), torch.set_num_threads(1), after one untimed "
                   "pass over the same pairs, gc off while timing",
        "plan": {"target_accuracy": PLAN_ACCURACY, "student_test_accuracy": student_acc,
                 "reached": student_acc >= PLAN_ACCURACY},
        "config": cfg.model_dump(mode="json"),
    }


def plot_per_kind(report: Mapping[str, Any], path: Path) -> Path:
    """Test accuracy per kind, teacher vs student (dissatisfied kinds first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forge.routing.escalation_data import KINDS

    per = {m: report[m]["per_kind"]["test"] for m in MODELS}
    kinds = [k for k in KINDS if k in per["student"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for i, m in enumerate(MODELS):
        acc = report[m]["accuracy"]["test"]
        ax.bar([x + (i - 0.5) * width for x in range(len(kinds))], [per[m][k] for k in kinds], width,
               label=f"{m} (test acc {acc:.3f})")
    ax.axhline(PLAN_ACCURACY, color="grey", linestyle="--", linewidth=1, label=f"plan {PLAN_ACCURACY:.0%}")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set(ylim=(0, 1.22), ylabel="accuracy", title="6B escalation detector: test accuracy per kind")
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in MODELS:
        sec = report[m]
        out.update({f"{m}_acc_{s}": v for s, v in sec["accuracy"].items()})
        out.update({f"{m}_acc_test.{k}": v for k, v in sec["per_kind"]["test"].items()})
        out.update({f"{m}_{k}_ms": v for k, v in sec["latency_ms"].items() if k != "n"})
        out[f"{m}_mb"] = sec["bytes"] / 1e6
        out[f"{m}_params"] = float(sec["n_params"])
    out.update({f"agreement_{s}": v for s, v in report["agreement"].items()})
    out.update({f"student_unk_rate_{s}": v for s, v in report["student"]["unk_rate"].items()})
    out.update({f"n_{s}": float(v) for s, v in report["n_pairs"].items()})
    return out


# ---- the job -------------------------------------------------------------------------------------

def latencies(tr: DetectorTraining, rows: Sequence[Mapping[str, Any]], n: int,
              max_len: int) -> dict[str, dict[str, float]]:
    from forge.routing.escalation import latency_ms, teacher_scorer

    pairs = [(r["previous"], r["message"]) for r in rows]
    pairs = (pairs * (n // len(pairs) + 1))[:n]
    return {"teacher": latency_ms(teacher_scorer(tr.teacher, max_len), pairs),
            "student": latency_ms(tr.detector.score, pairs)}


def champion_verdict(ctx: JobContext, detector: Any, test: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    """Should this detector become `champion`? When the registry has none, or when it is at least as
    accurate as the champion on this run's test pairs (both scored here, on the same pairs)."""
    import numpy as np

    from forge.routing.bundle import materialize_source, registered
    from forge.routing.escalation import EscalationDetector, accuracy

    if ctx.mlflow is None:
        return False, "not tracked: nothing registered"
    name = ctx.config.routing.detector.registered_model
    current = registered(ctx.config.tracking, name, "champion")
    if current is None:
        return True, "no champion yet"
    champion = EscalationDetector.load(materialize_source(ctx.store, current.source))
    labels = np.array([int(r["label"]) for r in test])
    pairs = [(r["previous"], r["message"]) for r in test]

    def acc(d: Any) -> float:
        return accuracy(np.array(d.score_batch(pairs)), labels, d.threshold)

    ours, theirs = acc(detector), acc(champion)
    if ours >= theirs:
        return True, f"test acc {ours:.3f} >= champion v{current.version}'s {theirs:.3f} on these pairs"
    return False, f"test acc {ours:.3f} < champion v{current.version}'s {theirs:.3f}: champion kept"


def run(ctx: JobContext) -> JobResult:
    from forge.routing.escalation import train_detector
    from forge.runner import JobResult

    cfg: DetectorConfig = ctx.config.routing.detector
    train_path = ctx.input_dir("prep_data") / "train.jsonl"
    if not train_path.exists():
        raise DataError(f"6B needs prep_data's train split at {train_path} (missing: rerun prep_data)")
    pools = split_pool(user_prompts(read_jsonl(train_path)), "prep_data's train.jsonl")
    splits = make_splits(pools, cfg)
    out = ctx.out_dir
    for name, rows in splits.items():
        write_jsonl(out / f"pairs_{name}.jsonl", rows)
    log.info("6B: %s pairs on %s distinct previous prompts", {s: len(r) for s, r in splits.items()},
             {s: len(p) for s, p in pools.items()})

    tr = train_detector(splits, cfg)
    for model in MODELS:
        for row in tr.history[model]:
            ctx.log_metrics({f"{model}_{k}": v for k, v in row.items() if k != "epoch"},
                            step=int(row["epoch"]))
    latency = latencies(tr, splits["test"], cfg.latency_pairs, cfg.max_len)
    report = build_report(tr, splits, pools, latency, cfg)
    tr.detector.save(out / "detector")
    report["student"]["file_bytes"] = (out / "detector" / "student.safetensors").stat().st_size
    (out / "detector_report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    ctx.log_artifact(out / "detector_report.json")
    ctx.log_artifact(plot_per_kind(report, out / "detector_accuracy.png"))

    metrics = flat_metrics(report)
    quality = {"teacher_acc": metrics["teacher_acc_test"], "student_acc": metrics["student_acc_test"],
               "agreement": metrics["agreement_test"], "teacher_mb": metrics["teacher_mb"],
               "student_mb": metrics["student_mb"], "teacher_p99_ms": metrics["teacher_p99_ms"],
               "student_p99_ms": metrics["student_p99_ms"], "student_p50_ms": metrics["student_p50_ms"],
               "n_test": float(len(splits["test"]))}
    metrics.update(quality)
    reached = report["plan"]["reached"]
    notes = (f"test (held-out phrasings, {len(splits['test'])} pairs): teacher MiniLM "
             f"{quality['teacher_acc']:.3f} "
             f"({quality['teacher_mb']:.1f} MB, p99 {quality['teacher_p99_ms']:.1f} ms), student BiLSTM "
             f"{quality['student_acc']:.3f} ({quality['student_mb']:.2f} MB, p50/p99 "
             f"{quality['student_p50_ms']:.2f}/{quality['student_p99_ms']:.2f} ms, 1 thread), agreement "
             f"{quality['agreement']:.3f}; plan's {PLAN_ACCURACY:.0%} "
             + ("reached" if reached else "NOT reached"))
    promote, why = champion_verdict(ctx, tr.detector, splits["test"])
    notes += f"; champion: {why}"
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"detector_dir": "detector", "report": "detector_report.json",
                           "threshold": tr.detector.threshold, "plan_reached": reached,
                           "n_pairs": report["n_pairs"]},
                     register="detector", register_model=cfg.registered_model,
                     aliases=("champion",) if promote else (), tags={"forge.detector.promotion": why})
