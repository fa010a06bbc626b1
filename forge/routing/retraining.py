"""13A: the weekly router retraining from serving feedback (the forge_router_retraining DAG), three jobs.

collect  the week [interval_start, interval_end): serving's feedback events, validated (bad rows counted
         and skipped with a report: forge.routing.feedback), turned into labelled examples for the options
         of the champion (`forge-router@champion`); a stable hash of each request holds `eval_fraction` of
         them out. It also names the champion it starts from. A live-input phase: it always runs, and is
         keyed by what it read, so the same week with the same feedback and champion is a cache hit
         downstream (idempotent per interval). An interval already decided is pinned to the champion it
         was decided against, so a re-run does not retrain from its own result.
retrain  the challenger: the champion's router fine-tuned (warm start) on the champion's own training data
         (6A's routing table, the feedback of earlier weeks it carries) plus the week's examples, its
         temperature refitted and its threshold chosen again on 6A's val split, by 6C's objective.
promote  challenger vs champion on the fixed held-out set (6A's test split: routing accuracy) and the week's
         held-out examples (agreement: routed to a thumbs-up option, away from a thumbs-down one). The
         challenger is registered (challenger alias) and becomes champion only if its combined score (mean
         of the two) beats the champion's by more than min_improvement AND its held-out accuracy drops by
         no more than max_heldout_drop; the champion alias never moves if another run moved it meanwhile.
         decision.json, the ledger notes and the version's tags say why.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from forge.data.records import DataError, read_json_objects, write_jsonl
from forge.routing.bundle import RoutingPolicy, materialize_source, registered, resolve_ref
from forge.runner import JobContext, JobResult, PhaseSkipped

log = logging.getLogger("forge.routing")

CHAMPION = "champion.json"
TRAIN, EVAL = "feedback_train.jsonl", "feedback_eval.jsonl"
REPORT = "feedback_report.json"
FEATURES = "feedback_features.npy"
DECISION = "decision.json"
POLICY_DIR = "policy"
EXAMPLE_FIELDS = ("request_id", "query", "option", "target")


# ---- the interval and its pin ----------------------------------------------------------------------

def interval(cfg: Any) -> tuple[datetime, datetime]:
    rr = cfg.routing.retraining
    if not rr.interval_start or not rr.interval_end:
        raise DataError("routing.retraining.interval_start / interval_end are not set: the "
                        "forge_router_retraining DAG sets them from its data interval; for a manual run set "
                        "both (ISO-8601 with a timezone)")
    from forge.routing.feedback import aware_datetime

    out = []
    for name, value in (("interval_start", rr.interval_start), ("interval_end", rr.interval_end)):
        try:
            out.append(aware_datetime(value))
        except ValueError as exc:
            raise DataError(f"routing.retraining.{name}: {exc}") from None
    if out[0] >= out[1]:
        raise DataError(f"routing.retraining: interval_start {rr.interval_start} is not before "
                        f"{rr.interval_end}")
    return out[0], out[1]


def pin_uri(ctx: JobContext, start: datetime, end: datetime) -> str:
    name = f"{start.strftime('%Y%m%dT%H%M%S')}_{end.strftime('%Y%m%dT%H%M%S')}.json"
    return ctx.store.uri("retraining", ctx.config.routing.router.registered_model, name)


def feedback_store(ctx: JobContext) -> tuple[Any, str]:
    from forge.artifacts import ArtifactStore

    root = ctx.config.routing.retraining.feedback_root
    if root is None:
        return ctx.store, ctx.store.uri("feedback")
    return ArtifactStore(root, ctx.store.storage_options), root


def baseline(ctx: JobContext, start: datetime, end: datetime) -> Any:
    """The champion this interval is measured against: the one it was decided against before, if it was."""
    from mlflow.tracking import MlflowClient

    name = ctx.config.routing.router.registered_model
    text = ctx.store.read_text(pin_uri(ctx, start, end))
    if text:
        pinned = json.loads(text)
        client = MlflowClient(tracking_uri=ctx.config.tracking.tracking_uri,
                              registry_uri=ctx.config.tracking.tracking_uri)
        try:
            mv = client.get_model_version(name, pinned["champion_version"])
            from forge.routing.bundle import RegisteredVersion

            log.info("13A: interval pinned to champion v%s (decided before: %s)", mv.version,
                     pinned["decision"])
            return RegisteredVersion(name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))
        except Exception as exc:  # the pinned version was deleted: measure against today's champion
            log.warning("13A: pinned champion v%s not found (%s): using the current champion",
                        pinned["champion_version"], exc)
    return registered(ctx.config.tracking, name, "champion")


# ---- collect ---------------------------------------------------------------------------------------

def collect(ctx: JobContext) -> JobResult:
    from forge.routing.feedback import holdout_unit, labelled_examples, read_interval

    cfg = ctx.config
    rr = cfg.routing.retraining
    start, end = interval(cfg)
    champion = baseline(ctx, start, end)
    name = cfg.routing.router.registered_model
    if champion is None:
        raise PhaseSkipped(f"no {name}@champion in the MLflow registry: run forge_pipeline through 6C first")
    policy = RoutingPolicy.load(materialize_source(ctx.store, champion.source))
    store, root = feedback_store(ctx)
    batch = read_interval(store, root, start, end)
    report = batch.report()
    examples, counts = labelled_examples(batch.events, policy.router.classes)
    train = [e for e in examples if holdout_unit(e["request_id"]) >= rr.eval_fraction]
    held = [e for e in examples if holdout_unit(e["request_id"]) < rr.eval_fraction]
    report.update(interval={"start": start.isoformat(), "end": end.isoformat()}, labels=dict(counts),
                  examples={"train": len(train), "eval": len(held)},
                  champion={"name": name, "version": champion.version})
    out = ctx.out_dir
    (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(out / REPORT)
    bad = f"{report['bad']} bad rows skipped {report['bad_by_reason']}" if report["bad"] else "no bad rows"
    log.info("13A: %d feedback files, %d valid events, %s; %d labelled examples (%d train, %d eval)",
             report["files"], report["valid"], bad, len(examples), len(train), len(held))
    if len(examples) < rr.min_feedback_rows or not train or not held:
        raise PhaseSkipped(f"{len(examples)} labelled feedback examples in [{start.isoformat()}, "
                           f"{end.isoformat()}) ({len(train)} train, {len(held)} eval; need "
                           f"routing.retraining.min_feedback_rows={rr.min_feedback_rows} and both sides); "
                           f"{report['valid']} valid events, {bad}: {name} v{champion.version} stays "
                           "champion")
    write_jsonl(out / TRAIN, train)
    write_jsonl(out / EVAL, held)
    (out / CHAMPION).write_text(json.dumps({"name": name, "version": champion.version,
                                            "source": champion.source}, indent=2, sort_keys=True) + "\n")
    quality = {"events": float(report["valid"]), "bad_rows": float(report["bad"]),
               "examples": float(len(examples)), "train": float(len(train)), "eval": float(len(held)),
               **{f"label.{k}": float(v) for k, v in counts.items()}}
    notes = (f"week {start.date()}..{end.date()}: {report['valid']} valid feedback events in "
             f"{report['files']} files, {bad}; {len(examples)} labelled ({len(train)} train / {len(held)} "
             f"eval) for "
             f"{name} v{champion.version}")
    bad_counts = {f"bad.{k}": float(v) for k, v in report["bad_by_reason"].items()}
    return JobResult(metrics={**quality, **bad_counts},
                     quality=quality, notes=notes,
                     info={"champion": {"name": name, "version": champion.version}, "report": REPORT,
                           "interval": [start.isoformat(), end.isoformat()]})


# ---- data the policies were trained on -------------------------------------------------------------

def load_examples(path: Path) -> list[dict[str, Any]]:
    return read_json_objects(path, EXAMPLE_FIELDS, "a feedback example")


def policy_data(ctx: JobContext, policy: RoutingPolicy,
                ) -> tuple[Any, np.ndarray, list[tuple[list, np.ndarray]]]:
    """6A's routing table and features, and every earlier week's (examples, features) the policy carries."""
    from forge.routing.threshold_optimization import load_table

    (data,) = policy.bundle["data"]
    queries = resolve_ref(ctx.store, {"phase": data["phase"], "cache_key": data["cache_key"],
                                      **data["queries"]})
    X = np.load(resolve_ref(ctx.store, {"phase": data["phase"], "cache_key": data["cache_key"],
                                        **data["features"]}))
    table = load_table(queries.parent)
    weeks = []
    for fb in policy.bundle.get("feedback", []):
        ref = {"phase": fb["phase"], "cache_key": fb["cache_key"]}
        weeks.append((load_examples(resolve_ref(ctx.store, {**ref, **fb["examples"]})),
                      np.load(resolve_ref(ctx.store, {**ref, **fb["features"]}))))
    return table, X, weeks


def feedback_examples(rows: list[dict[str, Any]], X: np.ndarray, classes: list[str], weight: float) -> Any:
    from forge.routing.router import Examples

    col = {c: j for j, c in enumerate(classes)}
    return Examples(np.asarray(X, np.float32), np.array([col[r["option"]] for r in rows], np.int64),
                    np.array([1 if r["target"] > 0 else -1 for r in rows], np.int64),
                    np.full(len(rows), weight, np.float32))


def champion_of(ctx: JobContext) -> tuple[dict[str, Any], RoutingPolicy]:
    champ = json.loads((ctx.input_dir("13A.collect") / CHAMPION).read_text())
    return champ, RoutingPolicy.load(materialize_source(ctx.store, champ["source"]))


# ---- retrain ---------------------------------------------------------------------------------------

def retrain(ctx: JobContext) -> JobResult:
    from forge.compress.calibration import temperature_grid
    from forge.routing.router import Examples, train_router
    from forge.routing.router_trainer import settings
    from forge.routing.thresholds import choose_threshold, resolve_arms

    cfg = ctx.config
    rr, tc = cfg.routing.retraining, cfg.routing.thresholds
    champ, policy = champion_of(ctx)
    classes = policy.router.classes
    table, X, weeks = policy_data(ctx, policy)
    rows = load_examples(ctx.input_dir("13A.collect") / TRAIN)
    Xf = policy.embed(ctx.store, [r["query"] for r in rows])
    tr, va = table.mask("train"), table.mask("val")
    train = Examples.positives(X[tr], table.labels[tr])
    for old_rows, old_X in weeks:
        train = train + feedback_examples(old_rows, old_X, classes, rr.feedback_weight)
    train = train + feedback_examples(rows, Xf, classes, rr.feedback_weight)
    log.info("13A: fine-tuning %s v%s on %d rows (6A %d, earlier weeks %d, this week %d)", champ["name"],
             champ["version"], len(train), int(tr.sum()), sum(len(r) for r, _ in weeks), len(rows))
    router, history, _ = train_router(train, X[va], table.labels[va], classes, policy.router.features,
                                      settings(cfg.routing.router, rr.epochs, rr.learning_rate),
                                      temperature_grid(cfg.calibration), init=policy.router)
    chosen, _ = choose_threshold(router.probs(X[va]), table.correct[va], table.logprob[va], tc.sweep_step,
                                 tc.share_penalty, tc.candidates)
    router.info = {**policy.router.info,
                   "fine_tuned_from": {"name": champ["name"], "version": champ["version"]},
                   "retrained_on": {"phase": "13A.retrain", "cache_key": ctx.cache_key}}
    out = ctx.out_dir
    write_jsonl(out / TRAIN, rows)
    np.save(out / FEATURES, Xf.astype(np.float32))
    files = {name: {"file": name, "sha256": _sha(out / name)} for name in (TRAIN, FEATURES)}
    week = {"phase": "13A.retrain", "cache_key": ctx.cache_key, "examples": files[TRAIN],
            "features": files[FEATURES], "interval": list(interval(cfg)[i].isoformat() for i in (0, 1))}
    bundle = {**policy.bundle, "feedback": [*policy.bundle.get("feedback", []), week]}
    thresholds = {**policy.thresholds, "chosen": {"threshold": chosen["threshold"], "chosen_on": "val",
                                                  "objective": chosen["objective"]},
                  "arms": resolve_arms(tc.ab_arms, chosen["threshold"])}
    RoutingPolicy(out / POLICY_DIR, router, thresholds, bundle).save(out / POLICY_DIR)
    va_acc = float((router.probs(X[va]).argmax(1) == table.labels[va]).mean())
    quality = {"train_rows": float(len(train)), "week_rows": float(len(rows)), "val_acc": va_acc,
               "threshold": float(chosen["threshold"]), "temperature": router.temperature,
               "best_epoch": float(history.best_epoch)}
    return JobResult(metrics=quality, quality=quality,
                     notes=(f"challenger: {champ['name']} v{champ['version']} fine-tuned on {len(train)} "
                            f"rows ({len(rows)} from this week); val acc {va_acc:.3f}, threshold "
                            f"{chosen['threshold']:.2f}, T={router.temperature:.3g}"),
                     info={"policy": POLICY_DIR})


def _sha(path: Path) -> str:
    from forge.artifacts import sha256_file

    return sha256_file(path)


# ---- promote ---------------------------------------------------------------------------------------

def agreement(policy: RoutingPolicy, X: np.ndarray, rows: list[dict[str, Any]]) -> float:
    """Share of feedback examples the policy's routing agrees with: it sends a thumbs-up query to that option,
    and a thumbs-down / escalated query elsewhere."""
    from forge.routing.router import decide

    choice = decide(policy.router.probs(X), policy.threshold)
    col = {c: j for j, c in enumerate(policy.router.classes)}
    hits = [(choice[i] == col[r["option"]]) == (r["target"] > 0) for i, r in enumerate(rows)]
    return float(np.mean(hits))


def score(policy: RoutingPolicy, table: Any, X: np.ndarray, Xe: np.ndarray, rows: list[dict[str, Any]],
          share_penalty: float) -> dict[str, float]:
    from forge.routing.thresholds import objective, replay

    te = table.mask("test")
    probs = policy.router.probs(X[te])
    point = replay(probs, table.correct[te], table.logprob[te], [policy.threshold])[0]
    s = {"heldout_acc": float((probs.argmax(1) == table.labels[te]).mean()),
         "heldout_policy_acc": point["acc"],
         "heldout_share": point["share"], "heldout_objective": objective(point, share_penalty),
         "week_agreement": agreement(policy, Xe, rows), "threshold": policy.threshold}
    s["combined"] = (s["heldout_acc"] + s["week_agreement"]) / 2
    return s


def verdict(champ: dict[str, float], chall: dict[str, float], rr: Any) -> tuple[bool, str]:
    gain = chall["combined"] - champ["combined"]
    drop = champ["heldout_acc"] - chall["heldout_acc"]
    if drop > rr.max_heldout_drop:
        return False, (f"held-out routing accuracy would drop {drop:.3f} ({champ['heldout_acc']:.3f} -> "
                       f"{chall['heldout_acc']:.3f}) > max_heldout_drop {rr.max_heldout_drop}")
    if gain <= rr.min_improvement:
        return False, (f"combined score {chall['combined']:.4f} vs champion {champ['combined']:.4f}: gain "
                       f"{gain:+.4f} is not above min_improvement {rr.min_improvement}")
    return True, (f"combined score {champ['combined']:.4f} -> {chall['combined']:.4f} ({gain:+.4f}); "
                  f"held-out acc {champ['heldout_acc']:.3f} -> {chall['heldout_acc']:.3f}, week agreement "
                  f"{champ['week_agreement']:.3f} -> {chall['week_agreement']:.3f}")


def promote(ctx: JobContext) -> JobResult:
    import shutil

    cfg = ctx.config
    rr, tc = cfg.routing.retraining, cfg.routing.thresholds
    champ, champion = champion_of(ctx)
    challenger = RoutingPolicy.load(ctx.input_dir("13A.retrain") / POLICY_DIR)
    table, X, _ = policy_data(ctx, champion)
    rows = load_examples(ctx.input_dir("13A.collect") / EVAL)
    Xe = champion.embed(ctx.store, [r["query"] for r in rows])
    scores = {"champion": score(champion, table, X, Xe, rows, tc.share_penalty),
              "challenger": score(challenger, table, X, Xe, rows, tc.share_penalty)}
    better, why = verdict(scores["champion"], scores["challenger"], rr)
    current = registered(cfg.tracking, champ["name"], "champion")
    if better and current is not None and current.version != champ["version"]:
        better, why = False, (f"better than v{champ['version']} ({why}), but the champion moved to "
                              f"v{current.version} since: not moved back")
    start, end = interval(cfg)
    decision = {"interval": [start.isoformat(), end.isoformat()], "champion_version": champ["version"],
                "promote": better, "reason": why, "scores": scores,
                "rule": {"combined": "mean(held-out routing accuracy, week agreement)",
                         "min_improvement": rr.min_improvement, "max_heldout_drop": rr.max_heldout_drop}}
    out = ctx.out_dir
    shutil.copytree(challenger.folder, out / POLICY_DIR)
    (out / DECISION).write_text(json.dumps(decision, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(out / DECISION)
    if ctx.mlflow is not None:  # the pin: a re-run of this interval is measured against the same champion
        ctx.store.write_text(pin_uri(ctx, start, end), json.dumps(
            {"champion_version": champ["version"], "decision": "promoted" if better else "kept"}))
    log.info("13A: %s: %s", "PROMOTE" if better else "keep the champion", why)
    quality = {f"{who}.{k}": v for who, s in scores.items() for k, v in s.items()}
    quality["promoted"] = float(better)
    notes = (f"{'challenger promoted to champion' if better else 'champion v' + champ['version'] + ' kept'}: "
             f"{why}")
    return JobResult(metrics=quality, quality=quality, notes=notes,
                     info={"decision": DECISION, "policy": POLICY_DIR, "promoted": better},
                     register=POLICY_DIR, register_model=champ["name"],
                     aliases=("champion",) if better else (),
                     tags={"forge.router.system": str(challenger.bundle.get("system")),
                           "forge.router.threshold": f"{challenger.threshold:.4f}",
                           "forge.router.baseline_version": champ["version"],
                           "forge.router.promotion": why[:4500],
                           "forge.router.interval": f"{start.isoformat()}/{end.isoformat()}"})
