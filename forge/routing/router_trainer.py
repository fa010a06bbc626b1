"""6A: train the router, measure it, and draw its quality-vs-cost curve.

  1. data      routing queries, every option's answers, labels (forge.routing.router_data) -> queries.jsonl
  2. features  each extractor in routing.router.measure embeds every query (minilm, base_hidden)
  3. train     one router per extractor on the train split (val: best epoch + temperature), scored on test,
               timed per query on one thread (embedding included); `features` picks the one that ships
  4. curve     the shipped router's threshold sweep on test (accuracy vs share sent to a modifier) beside
               the base alone, the domain tag, a perfect router and the oracle; the threshold that sends
               `target_share` of val queries to a modifier, and where it lands on test
  5. write     router/ (router.json + weights), features.npy (the shipped extractor's features, in
               queries.jsonl order: 13A fine-tunes from them), router_report.json, two plots
Timings stay out of the files (recovered runs stay byte-identical): they are metrics and manifest info.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np

from forge.routing.router import Examples, Router, TrainSettings, best_modifier, train_router
from forge.routing.router_data import (
    RoutingTable,
    label_queries,
    options_of,
    query_records,
    rejudge,
    routing_queries,
    score_option,
)
from forge.routing.thresholds import plot_cost_quality, reference_points, replay, sweep, threshold_for_share
from forge.routing.timing import summary, time_calls
from forge.runner import JobContext, JobResult, input_file

log = logging.getLogger("forge.routing")

ROUTER_DIR = "router"
QUERIES = "queries.jsonl"
FEATURES = "features.npy"
REPORT = "router_report.json"


def settings(rc: Any, epochs: int | None = None, learning_rate: float | None = None) -> TrainSettings:
    return TrainSettings(rc.hidden_dim, rc.dropout, epochs or rc.epochs, rc.batch_size,
                         learning_rate or rc.learning_rate, rc.weight_decay, rc.seed)


def open_measured_extractor(ctx: JobContext, kind: str) -> Any:
    from forge.routing.features import BaseHiddenFeatures, MiniLMFeatures

    if kind == "minilm":
        rc = ctx.config.routing.router
        return MiniLMFeatures(rc.max_seq_len, int8=rc.minilm_int8)
    gguf = input_file(ctx, "2C", "gguf")
    return BaseHiddenFeatures(gguf.path, gguf.describe(), ctx.config.gguf.n_ctx, ctx.config.gguf.n_threads)


def top1(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence of the top class, whether it is the label): what ECE and the reliability plot read."""
    return probs.max(axis=1), probs.argmax(axis=1) == labels


def train_one(table: RoutingTable, X: np.ndarray, features: dict[str, Any], ctx: JobContext,
              grid: np.ndarray) -> tuple[Router, dict[str, Any]]:
    from forge.compress.calibration import ece
    from forge.routing.router import softmax

    rc, n_bins = ctx.config.routing.router, ctx.config.calibration.n_bins
    tr, va, te = table.mask("train"), table.mask("val"), table.mask("test")
    router, history, _ = train_router(Examples.positives(X[tr], table.labels[tr]), X[va], table.labels[va],
                                      table.options, features, settings(rc), grid)
    logits = router.logits(X)
    raw, cal = softmax(logits[te]), router.probs(X[te])
    acc = {s: float((logits[m].argmax(1) == table.labels[m]).mean()) for s, m in
           (("train", tr), ("val", va), ("test", te))}
    result = {"acc": acc, "best_epoch": history.best_epoch, "temperature": router.temperature,
              "ece_before": ece(*top1(raw, table.labels[te]), n_bins),
              "ece_after": ece(*top1(cal, table.labels[te]), n_bins),
              "params": int(sum(p.numel() for p in router.net.parameters())), "size_bytes": router.size_bytes}
    log.info("6A: %s router: acc train %.3f val %.3f test %.3f, T=%.3g, ECE %.3f -> %.3f", features["kind"],
             acc["train"], acc["val"], acc["test"], router.temperature, result["ece_before"],
             result["ece_after"])
    return router, result


def time_router(extractor: Any, router: Router, queries: list[str], n: int) -> np.ndarray:
    """ms per single query: embedding + router probabilities (forge.routing.timing)."""
    return time_calls(lambda q: router.probs(extractor.embed([q])), queries, n)


def pick(results: dict[str, dict[str, Any]], wanted: str) -> str:
    """The configured extractor, or (auto) the best val accuracy; ties to the faster one."""
    if wanted != "auto":
        return wanted
    return max(results, key=lambda k: (results[k]["acc"]["val"], -results[k]["latency_ms"]["p99"]))


def domain_choice(table: RoutingTable) -> np.ndarray:
    col = {o: j for j, o in enumerate(table.options)}
    return np.array([col.get(d, 0) for d in table.domains], np.int64)


def plot_reliability_of(router_probs: np.ndarray, raw_probs: np.ndarray, labels: np.ndarray, n_bins: int,
                        path: Any) -> Any:
    from forge.compress.calibration import plot_reliability

    return plot_reliability({"before (T=1)": top1(raw_probs, labels), "temperature-scaled": top1(router_probs,
                                                                                                  labels)},
                            n_bins, path, f"6A router confidence, test queries (n={len(labels)})")


def run(ctx: JobContext) -> JobResult:
    from forge.compress.calibration import temperature_grid
    from forge.data.records import write_jsonl
    from forge.routing.router import softmax

    cfg = ctx.config
    rc = cfg.routing.router
    out = ctx.out_dir

    # 1. data
    options = options_of(ctx)
    names = [o.name for o in options]
    rows = routing_queries(cfg)
    log.info("6A: %d routing queries (%s) x %d options %s", len(rows),
             dict(Counter(r["domain"] for r in rows)), len(options), names)
    scores = {o.name: score_option(ctx, o, rows) for o in options}
    judged = rejudge(ctx, rows, scores)
    correct = np.stack([scores[o].correct for o in names], 1)
    logprob = np.stack([scores[o].logprob for o in names], 1)
    labels, reasons = label_queries(names, correct, logprob)
    records = query_records(rows, names, scores, labels, reasons)
    write_jsonl(out / QUERIES, records)
    table = RoutingTable.from_records(records)

    # 2-3. features and one router per extractor
    grid = temperature_grid(cfg.calibration)
    results: dict[str, dict[str, Any]] = {}
    routers: dict[str, Router] = {}
    feats: dict[str, np.ndarray] = {}
    for kind in rc.measure:
        extractor = open_measured_extractor(ctx, kind)
        try:
            feats[kind] = extractor.embed(table.queries)
            routers[kind], results[kind] = train_one(table, feats[kind], extractor.spec(), ctx, grid)
            lat = time_router(extractor, routers[kind], table.queries, rc.latency_queries)
            results[kind]["latency_ms"] = summary(lat)
        finally:
            extractor.close()
    chosen = pick(results, rc.features)
    router, X = routers[chosen], feats[chosen]
    router.info = {"options": [o.describe() for o in options],
                   "base_gguf": input_file(ctx, "2C", "gguf").describe(),
                   "trained_on": {"phase": "6A", "cache_key": ctx.cache_key},
                   "accuracy": results[chosen]["acc"]}
    router.save(out / ROUTER_DIR)
    np.save(out / FEATURES, X.astype(np.float32))

    # 4. the curve on test; the target-share threshold chosen on val
    te, va = table.mask("test"), table.mask("val")
    probs = router.probs(X)
    ms_per_token = np.array([scores[o].ms_per_token for o in names])
    latency = table.tokens * ms_per_token[None, :]
    curve = replay(probs[te], table.correct[te], table.logprob[te], sweep(cfg.routing.thresholds.sweep_step),
                   latency[te])
    refs = reference_points(table.correct[te], table.logprob[te], table.labels[te], domain_choice(table)[te],
                            latency[te])
    t_share = threshold_for_share(probs[va], rc.target_share)
    at_share = replay(probs[te], table.correct[te], table.logprob[te], [t_share], latency[te])[0]
    marks = {f"target share {rc.target_share:.2f}": at_share}
    png = plot_cost_quality(curve, refs, marks, out / "cost_quality.png",
                            f"6A router ({chosen}) on {int(te.sum())} test queries: quality vs cost")
    rel = plot_reliability_of(probs[te], softmax(router.logits(X[te])), table.labels[te],
                              cfg.calibration.n_bins, out / "reliability.png")
    for p in (png, rel):
        ctx.log_artifact(p)

    # 5. report
    test_labels = table.labels[te]
    pred = probs[te].argmax(1)
    confusion = {o: {p: int(((test_labels == i) & (pred == j)).sum()) for j, p in enumerate(names)}
                 for i, o in enumerate(names)}
    _, conf = best_modifier(probs[te])
    report = {
        "options": [o.describe() for o in options], "features": chosen,
        "queries": {s: int(table.mask(s).sum()) for s in ("train", "val", "test")},
        "labels": {s: dict(Counter(table.options[i] for i in table.labels[table.mask(s)])) for s in
                   ("train", "val", "test")},
        "label_reasons": dict(Counter(reasons)), "judged_answers": judged,
        "option_acc": {o: float(correct[:, j].mean()) for j, o in enumerate(names)},
        "extractors": {k: {kk: vv for kk, vv in r.items() if kk != "latency_ms"} for k, r in results.items()},
        "confusion_test": confusion,
        "curve_test": [{k: v for k, v in p.items() if not k.startswith("latency")} for p in curve],
        "reference_test": {k: {kk: vv for kk, vv in p.items() if not kk.startswith("latency")}
                           for k, p in refs.items()},
        "target_share": {"share": rc.target_share, "threshold": t_share, "val_share":
                         float((best_modifier(probs[va])[1] >= t_share).mean()),
                         "test": {k: v for k, v in at_share.items() if not k.startswith("latency")}},
        "mean_modifier_confidence_test": float(conf.mean()),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(out / REPORT)

    best = results[chosen]
    quality = {"router_acc": best["acc"]["test"], "router_acc_val": best["acc"]["val"],
               **{f"acc_{k}": r["acc"]["test"] for k, r in results.items()},
               **{f"p99_ms_{k}": r["latency_ms"]["p99"] for k, r in results.items()},
               "ece_before": best["ece_before"], "ece_after": best["ece_after"],
               "temperature": router.temperature,
               "target_threshold": t_share, "target_share_test": at_share["share"],
               "acc_at_target": at_share["acc"], "acc_always_base": refs["always_base"]["acc"],
               "acc_perfect_router": refs["perfect_router"]["acc"], "acc_oracle": refs["oracle"]["acc"],
               "n_queries": float(len(rows)), "n_test": float(te.sum())}
    metrics = {**quality, **{f"p50_ms_{k}": r["latency_ms"]["p50"] for k, r in results.items()},
               **{f"ms_per_token.{o}": float(v) for o, v in zip(names, ms_per_token, strict=True)},
               **{f"option_acc.{o}": float(correct[:, j].mean()) for j, o in enumerate(names)},
               "router_params": float(best["params"]), "router_bytes": float(best["size_bytes"])}
    others = ", ".join(f"{k} {r['acc']['test']:.3f} (p99 {r['latency_ms']['p99']:.1f} ms)"
                       for k, r in results.items())
    notes = (f"router over {names} on {chosen} features: test acc {best['acc']['test']:.3f} (plan: 0.97; "
             f"measured: {others}); ECE {best['ece_before']:.3f} -> {best['ece_after']:.3f} at "
             f"T={router.temperature:.3g}; threshold {t_share:.3f} sends {at_share['share']:.2f} of test "
             f"queries to a modifier (target {rc.target_share:.2f}) at acc {at_share['acc']:.3f} vs base "
             f"alone "
             f"{refs['always_base']['acc']:.3f}, oracle {refs['oracle']['acc']:.3f}")
    return JobResult(metrics={k: float(v) for k, v in metrics.items()}, quality=quality, notes=notes,
                     info={"router": ROUTER_DIR, "queries": QUERIES, "features": FEATURES, "report": REPORT,
                           "features_kind": chosen, "options": names, "target_threshold": t_share,
                           "latency": {"router_ms_p50": best["latency_ms"]["p50"],
                                       "router_ms_p99": best["latency_ms"]["p99"],
                                       "ms_per_token": dict(zip(names, map(float, ms_per_token),
                                                                strict=True))}})
