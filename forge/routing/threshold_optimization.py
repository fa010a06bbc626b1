"""6C: choose the routing threshold by offline replay, and package the routing policy that serving loads.

  1. replay   6A's router over 6A's routing table (every option already ran every query): the plan's
              candidates (75/80/85%), a sweep, and 6A's target-share threshold, on val and on test; latency
              per query = router + detector (their measured p50) + the routed option's tokens x its ms/token
  2. choose   on val, by the stated objective (forge.routing.thresholds); the test split reports it
  3. A/B      the arms serving splits sessions into (config; default: one arm, the chosen threshold)
  4. policy   router/ + thresholds.json + bundle.json (options, the system it routes, the data it was
              trained on, by content), registered as `forge-router` (challenger; champion when the registry
              has none for this system, or this one scores at least as well as the champion on this run's
              test queries)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from forge.routing.bundle import BUNDLE, POLICY_FORMAT, ROUTER_DIR, THRESHOLDS, RoutingPolicy
from forge.routing.router import Router
from forge.routing.thresholds import choose_threshold, objective, plot_cost_quality, replay, resolve_arms
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.routing")

REPORT = "thresholds_report.json"


def load_table(folder: Path) -> Any:
    from forge.data.records import read_json_objects
    from forge.routing.router_data import RoutingTable

    return RoutingTable.from_records(read_json_objects(folder / "queries.jsonl",
                                                       ("id", "split", "query", "label", "options"),
                                                       "a routing query"))


def untimed(point: dict[str, Any]) -> dict[str, Any]:
    """A replay point without its latencies: files stay byte-identical across runs; timings go to metrics."""
    return {k: v for k, v in point.items() if not k.startswith("latency")}


def latency_matrix(table: Any, info_6a: dict[str, Any], detector_ms: float) -> tuple[np.ndarray, float]:
    """ms per (query, option): the per-request overhead plus the option's generation at its measured speed."""
    lat = info_6a["latency"]
    overhead = float(lat["router_ms_p50"]) + detector_ms
    per_token = np.array([float(lat["ms_per_token"][o]) for o in table.options])
    return overhead + table.tokens * per_token[None, :], overhead


def system_of(router: Router) -> str:
    """What a router routes between: its options' adapters and the base GGUF, as one digest."""
    from forge.artifacts import digest_json

    return digest_json({"options": router.info.get("options"), "base": router.info.get("base_gguf")})[:16]


def policy_bundle(router: Router, m6a: Any, detector_key: str | None) -> dict[str, Any]:
    """bundle.json of a policy trained on 6A's output (its manifest `m6a`): what it routes, on which data."""
    files = m6a.files
    data = {"phase": "6A", "cache_key": m6a.cache_key,
            "queries": {"file": "queries.jsonl", "sha256": files["queries.jsonl"].sha256},
            "features": {"file": "features.npy", "sha256": files["features.npy"].sha256}}
    return {"format": POLICY_FORMAT, "router": ROUTER_DIR, "thresholds": THRESHOLDS,
            "options": router.classes, "features": router.features, "system": system_of(router),
            "heldout": {"phase": "6A", "cache_key": m6a.cache_key, "split": "test"},
            "data": [data], "feedback": [],
            "detector": {"phase": "6B", "cache_key": detector_key} if detector_key else None}


def champion_verdict(ctx: JobContext, name: str, system: str, ours: float, table: Any) -> tuple[bool, str]:
    """Should this run's policy become the champion? Only a champion routing the same system is comparable."""
    from forge.routing.bundle import load_policy

    if ctx.mlflow is None:
        return False, "not tracked: nothing registered"
    found = load_policy(ctx.store, ctx.config.tracking, name)
    if found is None:
        return True, "no champion yet"
    version, champ = found
    if champ.bundle.get("system") != system:
        return True, f"champion v{version.version} routes another system (other adapters or base)"
    te = table.mask("test")
    queries = [q for q, t in zip(table.queries, te, strict=True) if t]
    probs = champ.router.probs(champ.embed(ctx.store, queries))
    theirs = objective(replay(probs, table.correct[te], table.logprob[te], [champ.threshold])[0],
                       ctx.config.routing.thresholds.share_penalty)
    if ours >= theirs:
        return True, (f"objective {ours:.4f} >= champion v{version.version}'s {theirs:.4f} on these test "
                      "queries")
    return False, f"objective {ours:.4f} < champion v{version.version}'s {theirs:.4f}: champion kept"


def run(ctx: JobContext) -> JobResult:
    cfg = ctx.config
    tc = cfg.routing.thresholds
    src = ctx.input_dir("6A")
    info = ctx.input_info("6A")
    table = load_table(src)
    router = Router.load(src / ROUTER_DIR)
    X = np.load(src / "features.npy")
    if len(X) != len(table.ids):
        raise ValueError(f"6A's features.npy has {len(X)} rows for {len(table.ids)} queries")
    probs = router.probs(X)
    detector_ms = float(ctx.inputs["6B"].metrics.get("student_p50_ms", 0.0))
    latency, overhead = latency_matrix(table, info, detector_ms)

    # 1-2. replay on val (choose) and test (report)
    va, te = table.mask("val"), table.mask("test")
    extra = [*tc.candidates, float(info["target_threshold"])]
    chosen, on_val = choose_threshold(probs[va], table.correct[va], table.logprob[va], tc.sweep_step,
                                      tc.share_penalty, extra, latency[va])
    on_test = replay(probs[te], table.correct[te], table.logprob[te], [p["threshold"] for p in on_val],
                     latency[te])
    t = chosen["threshold"]
    test_at = {p["threshold"]: p for p in on_test}
    named = {**{f"candidate {c:.2f}": c for c in tc.candidates},
             "target share (6A)": float(info["target_threshold"]), "chosen": t}
    table_rows = {name: {"threshold": th, "val": next(p for p in on_val if p["threshold"] == th),
                         "test": test_at[th]} for name, th in named.items()}
    for name, row in table_rows.items():
        log.info("6C: %-20s t=%.3f  val acc %.3f share %.2f | test acc %.3f share %.2f latency %.1f ms", name,
                 row["threshold"], row["val"]["acc"], row["val"]["share"], row["test"]["acc"],
                 row["test"]["share"], row["test"]["latency_ms_mean"])

    # 3-4. the policy
    out = ctx.out_dir
    arms = resolve_arms(tc.ab_arms, t)
    thresholds = {"chosen": {"threshold": t, "chosen_on": "val", "objective": chosen["objective"]},
                  "objective": f"acc - {tc.share_penalty} * modifier share (ties: higher threshold)",
                  "share_penalty": tc.share_penalty, "arms": arms,
                  "candidates": {n: {"threshold": r["threshold"], "val": untimed(r["val"]),
                                     "test": untimed(r["test"])} for n, r in table_rows.items()}}
    bundle = policy_bundle(router, ctx.inputs["6A"], ctx.inputs["6B"].cache_key)
    RoutingPolicy(out, router, thresholds, bundle).save(out)
    (out / REPORT).write_text(json.dumps({"val": [untimed(p) for p in on_val],
                                          "test": [untimed(p) for p in on_test]}, indent=2) + "\n")
    png = plot_cost_quality(on_test, {}, {n: test_at[r["threshold"]] for n, r in table_rows.items()},
                            ctx.work_dir / "thresholds.png", f"6C thresholds on {int(te.sum())} test queries")
    ctx.log_artifact(png)
    ctx.log_artifact(out / THRESHOLDS)

    chosen_test = test_at[t]
    ours = objective(chosen_test, tc.share_penalty)
    promote, why = champion_verdict(ctx, cfg.routing.router.registered_model, bundle["system"], ours, table)
    quality = {"threshold": t, "acc": chosen_test["acc"], "share": chosen_test["share"],
               "latency_ms": chosen_test["latency_ms_mean"], "latency_ms_p95": chosen_test["latency_ms_p95"],
               "objective": ours, "overhead_ms": overhead, "arms": float(len(arms)),
               **{f"acc_at_{c:.2f}": test_at[c]["acc"] for c in tc.candidates},
               **{f"share_at_{c:.2f}": test_at[c]["share"] for c in tc.candidates}}
    cands = "; ".join(f"{c:.2f}: acc {test_at[c]['acc']:.3f} share {test_at[c]['share']:.2f} "
                      f"{test_at[c]['latency_ms_mean']:.0f} ms" for c in tc.candidates)
    notes = (f"chosen threshold {t:.2f} on val by {thresholds['objective']}: test acc "
             f"{chosen_test['acc']:.3f}, modifier share {chosen_test['share']:.2f}, "
             f"{chosen_test['latency_ms_mean']:.0f} ms/query "
             f"(overhead {overhead:.1f} ms); candidates on test: {cands}; arms "
             f"{[a['name'] for a in arms]}; champion: {why}")
    return JobResult(metrics={k: float(v) for k, v in quality.items()}, quality=quality, notes=notes,
                     info={"bundle": BUNDLE, "thresholds": THRESHOLDS, "router": ROUTER_DIR, "threshold": t,
                           "system": bundle["system"], "champion_reason": why},
                     register="", register_model=cfg.routing.router.registered_model,
                     aliases=("champion",) if promote else (),
                     tags={"forge.router.system": bundle["system"], "forge.router.threshold": f"{t:.4f}",
                           "forge.router.promotion": why})
