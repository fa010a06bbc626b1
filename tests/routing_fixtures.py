"""Routing test scaffolding: a routing table whose truth we know, a champion policy registered from it, and a
week of serving feedback written the way serving writes it.

The table: task-suite queries of three domains whose right option is known by construction (general ->
base, code -> the code modifier, reasoning -> the reasoning modifier; every other option wrong). The
champion is trained by forge.routing's own code, but on a training split WITHOUT reasoning queries, so it
never routes to the reasoning modifier: feedback that says where reasoning queries belong can make a
challenger better, and feedback that lies can make one worse. The 6A- and 6C-shaped outputs are committed to
the store and indexed by cache key, exactly what the policy's bundle references resolve through.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from forge.artifacts import ArtifactStore, Manifest, digest_json
from forge.data.records import write_jsonl

OPTIONS = ["base", "code", "reasoning"]
TRUTH = {"general": "base", "code": "code", "reasoning": "reasoning"}


def synthetic_records(n_per_domain: int = 24, seed: int = 7) -> list[dict[str, Any]]:
    """queries.jsonl rows (forge.routing.router_data.query_records' shape) with known right options."""
    from forge.data.suites import generate
    from forge.routing.router_data import split_of, user_text

    rows = []
    for domain, right in TRUTH.items():
        for i, row in enumerate(generate(domain, n_per_domain, seed, "calib")):
            qid = f"route-{domain}-{i:05d}"
            rows.append({"id": qid, "domain": domain, "split": split_of(qid, 0, 0.25, 0.3),
                         "query": user_text(row), "messages": row["messages"], "check": row["check"],
                         "source": row["source"], "label": right, "label_reason": "synthetic truth",
                         "options": {o: {"correct": o == right, "logprob": 0.0 if o == right else -2.0,
                                         "tokens": 10 if o == "base" else 12, "output": "", "detail": ""}
                                     for o in OPTIONS}})
    return rows


def commit(store: ArtifactStore, scratch: Path, run_id: str, phase: str, write,
           info: dict[str, Any]) -> Manifest:
    """Commit what `write(folder)` puts in a folder as `phase`'s output of `run_id`, indexed by a cache key of
    its content (so content references resolve through the store's cache index)."""
    folder = scratch / run_id / phase
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write(folder)
    from forge.artifacts import sha256_file

    key = digest_json({phase: {p.name: sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}})
    manifest = store.commit(folder, store.run_dir(run_id, phase),
                            Manifest(phase=phase, cache_key=key, base_uri="", run_id=run_id, info=info))
    store.index(manifest)
    return manifest


def build_champion(cfg: Any, store: ArtifactStore, scratch: Path, register: bool = True,
                   drop_domain: str = "reasoning") -> dict[str, Any]:
    """6A + 6C outputs from the synthetic table (the router never trained on `drop_domain`), registered as
    <routing.router.registered_model>@champion when `register`."""
    from forge.compress.calibration import temperature_grid
    from forge.routing.bundle import RoutingPolicy
    from forge.routing.features import MiniLMFeatures
    from forge.routing.router import Examples, train_router
    from forge.routing.router_data import RoutingTable
    from forge.routing.router_trainer import settings
    from forge.routing.threshold_optimization import policy_bundle
    from forge.routing.thresholds import choose_threshold, resolve_arms

    records = synthetic_records()
    table = RoutingTable.from_records(records)
    extractor = MiniLMFeatures()
    X = extractor.embed(table.queries)
    m6a = commit(store, scratch, "synthetic", "6A", lambda d: (write_jsonl(d / "queries.jsonl", records),
                                                               np.save(d / "features.npy", X)), {})
    keep = table.mask("train") & (np.array(table.domains) != drop_domain)
    va = table.mask("val")
    router, _, _ = train_router(Examples.positives(X[keep], table.labels[keep]), X[va], table.labels[va],
                                OPTIONS, extractor.spec(), settings(cfg.routing.router, epochs=30),
                                temperature_grid(cfg.calibration))
    router.info = {"options": [{"name": o} for o in OPTIONS], "base_gguf": {"synthetic": True}}
    tc = cfg.routing.thresholds
    chosen, _ = choose_threshold(router.probs(X[va]), table.correct[va], table.logprob[va], tc.sweep_step,
                                 tc.share_penalty, tc.candidates)
    thresholds = {"chosen": {"threshold": chosen["threshold"], "chosen_on": "val",
                             "objective": chosen["objective"]}, "arms": resolve_arms([], chosen["threshold"])}
    bundle = policy_bundle(router, m6a, None)
    m6c = commit(store, scratch, "synthetic", "6C",
                 lambda d: RoutingPolicy(d, router, thresholds, bundle).save(d), {})
    version = None
    if register:
        from forge.tracking import Tracker

        tracker = Tracker(cfg.tracking, "synthetic")
        run = tracker.start_phase("6C", "6c_threshold_optimization", {})
        version = tracker.register_model(cfg.routing.router.registered_model, m6c.base_uri, run.id,
                                         extra_aliases=("champion",))
        run.finish()
    return {"table": table, "X": X, "records": records, "m6a": m6a, "m6c": m6c, "version": version,
            "router": router}


# ---- feedback -------------------------------------------------------------------------------------------

def week_feedback(records: list[dict[str, Any]], start: datetime, n: int, mode: str, seed: int,
                  bad: bool = True) -> list[Any]:
    """n sessions of serving feedback in the week starting at `start`: a decision (routed the way the champion
    would not know for reasoning: to the base), then the user's reaction.
      truthful  thumbs-up when the routed option is the right one; else thumbs-down (or a detected
                escalation), and the escalated re-route to the right option gets a thumbs-up
      inverted  the same sessions with every rating flipped (feedback that lies)
    With `bad`, malformed lines ride along: not JSON, a missing field, a wrong type, an unknown kind, a rating
    of a session that made no decision. Returns JSON-able events and raw strings (the bad lines)."""
    rng = random.Random(seed)
    pool = [r for r in records if r["domain"] in ("reasoning", "code", "general")]
    events: list[Any] = []
    for i in range(n):
        r = pool[rng.randrange(len(pool))]
        ts = (start + timedelta(hours=1 + i * (150 / max(n, 1)))).timestamp()
        sid, rid = f"s{seed}-{i}", f"s{seed}-{i}-r0"
        right = TRUTH[r["domain"]]
        routed = rng.choice(["base", right]) if r["domain"] != "reasoning" else "base"
        events.append({"kind": "decision", "ts": ts, "session_id": sid, "request_id": rid,
                       "query": r["query"], "option": routed, "confidence": 0.6, "threshold": 0.8,
                       "arm": "chosen", "escalated": False})
        good = routed == right
        flip = mode == "inverted"
        if good or rng.random() < 0.5:
            events.append({"kind": "rating", "ts": ts + 5, "session_id": sid, "request_id": rid,
                           "rating": ("down" if flip else "up") if good else ("up" if flip else "down")})
        else:
            events.append({"kind": "escalation", "ts": ts + 5, "session_id": sid, "request_id": rid,
                           "message": "that's wrong, try again", "score": 0.9})
        if not good:  # the re-route to the right option, and the user's verdict on it
            rid2 = f"{rid}-esc"
            events.append({"kind": "decision", "ts": ts + 6, "session_id": sid, "request_id": rid2,
                           "query": r["query"], "option": right, "confidence": 0.7, "threshold": 0.8,
                           "arm": "chosen", "escalated": True})
            events.append({"kind": "rating", "ts": ts + 9, "session_id": sid, "request_id": rid2,
                           "rating": -1 if flip else 1})
    if bad:
        t = (start + timedelta(hours=2)).timestamp()
        events += ["{not json", json.dumps({"kind": "rating", "ts": t, "session_id": "s0"}),
                   json.dumps({"kind": "decision", "ts": t, "session_id": "sx", "request_id": "rx",
                               "query": "q", "option": "base", "confidence": "high", "threshold": 0.8,
                               "arm": "a", "escalated": False}),
                   json.dumps({"kind": "thumbs", "ts": t}),
                   json.dumps({"kind": "rating", "ts": t, "session_id": "nobody", "request_id": "r",
                               "rating": 1})]
    return events


def write_feedback(store: ArtifactStore, root: str, events: list[Any], part: str) -> None:
    """Write events as serving does: one part file per UTC day (bad raw lines go with the first day)."""
    from forge.routing.feedback import partition

    by_day: dict[str, list[str]] = {}
    first = None
    for e in events:
        if isinstance(e, str):
            continue
        day = partition(e["ts"])
        first = first or day
        by_day.setdefault(day, []).append(json.dumps(e))
    by_day.setdefault(first, []).extend(e for e in events if isinstance(e, str))
    for day, lines in by_day.items():
        store.write_text(f"{root}/{day}/{part}.jsonl", "\n".join(lines) + "\n")
