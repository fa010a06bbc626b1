"""prep_data: the run's datasets. Generated task suites per domain and split, plus the user's
datasets (mostly train, a deterministic ~5% held out), written as JSONL + a pretraining corpus.

Outputs (in the phase's dir): train.jsonl, dev.jsonl, heldout.jsonl, calib.jsonl (rows with a `check`),
pretrain.txt (plain "prompt\\nanswer\\n\\n" text, no chat tokens), stats.json.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from typing import Any

from forge.data.records import DataError, prompt_messages, reference, stable_int, write_jsonl
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.data")

SPLITS = ("train", "dev", "heldout", "calib", "pretrain")
EVAL_SPLITS = ("train", "dev", "heldout", "calib")
USER_HELDOUT_PERCENT = 5
# References are verified against their own checker on a sample: a failure means a broken suite
# or a user dataset whose check does not accept its own answer, and must not reach evaluation.
SELF_CHECK_PER_GROUP = 32


def user_row_split(row_id: str) -> str:
    """train or heldout, by a stable hash of the id (the same row always lands in the same split)."""
    bucket = stable_int(row_id) % 100
    return "heldout" if bucket < USER_HELDOUT_PERCENT else "train"


def pretrain_text(rows: list[dict[str, Any]]) -> str:
    parts = []
    for row in rows:
        prompt = "\n".join(m["content"] for m in prompt_messages(row))
        parts.append(f"{prompt}\n{reference(row)}\n\n")
    return "".join(parts)


def load_user_rows(specs: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All configured datasets' rows (ids made unique across datasets) and a summary per dataset."""
    from forge.data.datasets import load_rows

    rows: list[dict[str, Any]] = []
    summaries = []
    seen_ids: set[str] = set()
    for index, spec in enumerate(specs):
        loaded = load_rows(spec, storage_options=None)  # S3 credentials come from the environment
        if any(r["id"] in seen_ids for r in loaded):
            log.warning("dataset %s: its name clashes with an earlier dataset; ids get prefix d%d-",
                        spec.uri, index)
            for r in loaded:
                r["id"] = f"d{index}-{r['id']}"
        seen_ids.update(r["id"] for r in loaded)
        splits = Counter(user_row_split(r["id"]) for r in loaded)
        summaries.append({"uri": spec.uri, "format": spec.format, "domain": spec.domain, "rows": len(loaded),
                          "train": splits["train"], "heldout": splits["heldout"]})
        rows.extend(loaded)
    return rows, summaries


def self_check(splits: dict[str, list[dict[str, Any]]], timeout_s: float) -> tuple[int, list[str]]:
    """Check a sample of reference answers with their own checker: (checked, failures)."""
    from forge.data.suites import check_answer

    checked, failures = 0, []
    for split in EVAL_SPLITS:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in splits[split]:
            groups[f"{row['domain']}|{row['source']}"].append(row)
        for rows in groups.values():
            for row in rows[:SELF_CHECK_PER_GROUP]:
                result = check_answer(row, reference(row), timeout_s=timeout_s)
                checked += 1
                if not result.correct:
                    failures.append(f"{split}/{row['id']} ({row['source']}): {result.detail}")
    return checked, failures


def run(ctx: JobContext) -> JobResult:
    from forge.data.suites import generate

    cfg = ctx.config
    seed = cfg.data.seed
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for domain in cfg.domains:
        for split in SPLITS:
            splits[split].extend(generate(domain, getattr(cfg.data.suites, split), seed, split))
    log.info("generated suites for %s: %s", cfg.domains, {s: len(r) for s, r in splits.items()})

    user_rows, dataset_summaries = load_user_rows(cfg.data.datasets)
    for row in user_rows:
        splits[user_row_split(row["id"])].append(row)

    # Mix domains in the training streams (a trainer reading in order sees every domain early);
    # dev and heldout keep their generated order.
    for split in ("train", "pretrain"):
        random.Random(f"{seed}|{split}").shuffle(splits[split])

    checked, failures = self_check(splits, cfg.eval.code_timeout_s)
    if failures:
        raise DataError(f"{len(failures)} of {checked} sampled reference answers fail their own check: "
                        + "; ".join(failures[:5]))

    out = ctx.out_dir
    for split in EVAL_SPLITS:
        write_jsonl(out / f"{split}.jsonl", splits[split])
    corpus = pretrain_text(splits["pretrain"])
    (out / "pretrain.txt").write_text(corpus)

    counts = {s: len(rows) for s, rows in splits.items()}
    by_domain = {s: dict(sorted(Counter(r["domain"] for r in rows).items())) for s, rows in splits.items()}
    by_source = {s: dict(sorted(Counter(r["source"] for r in rows).items())) for s, rows in splits.items()}
    stats = {
        "seed": seed,
        "domains": list(cfg.domains),
        "splits": counts,
        "by_domain": by_domain,
        "by_source": by_source,
        "datasets": dataset_summaries,
        "pretrain_chars": len(corpus),
        "reference_self_check": {"checked": checked, "passed": checked - len(failures)},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    ctx.log_artifact(out / "stats.json")

    metrics = {f"rows.{s}": float(n) for s, n in counts.items()}
    metrics.update({"user_rows": float(len(user_rows)), "pretrain_chars": float(len(corpus)),
                    "reference_checked": float(checked)})
    notes = f"{len(cfg.domains)} domains, seed {seed}: " + ", ".join(f"{s} {n}" for s, n in counts.items())
    if user_rows:
        notes += f"; {len(user_rows)} rows from {len(dataset_summaries)} user dataset(s)"
    return JobResult(
        metrics=metrics,
        quality={f"rows.{s}": float(counts[s]) for s in EVAL_SPLITS},
        notes=notes,
        info={"splits": counts, "by_domain": by_domain},
    )
