"""Modifier subphase A: the domain's prompts for the teacher cascade, and its dev / held-out rows.

Prompts come from three sources, in this order (a prompt seen earlier wins a duplicate):
- suite: the domain's task suite, "train" split (sizes.prompts rows);
- user:  rows of the user's datasets for this domain (prep_data's train.jsonl, source not "suite:...");
- 1b:    the 1A model's failures on held-out rows of this domain (1B), each with its failure cluster's label.
Every prompt keeps its reference answer and check, so the reference solver (tier 3) and the checkers know it.
dev.jsonl (Axolotl's eval loss) and heldout.jsonl (H scores base vs adapter on it) are the suite's dev and
heldout splits drawn with their own seed (prep_data's heldout, where 1B's failures come from, is another
stream of the same buckets); a collected prompt that also appears there is dropped, so the adapter never
trains on what H scores.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from forge.data.records import DataError, prompt_messages, read_jsonl, write_jsonl
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.modifiers")

SOURCES = ("suite", "user", "1b")  # id prefixes, in priority order
FIELDS = ("id", "domain", "messages", "check", "source", "task")


def prompt_key(row: Mapping[str, Any]) -> str:
    """A prompt, normalized (whitespace collapsed, case folded): two rows with the same key ask the same."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(dict(row)))
    return " ".join(text.split()).casefold()


def belongs(row: Mapping[str, Any], domain: str, suite: str) -> bool:
    """A row is the domain's when it is labelled with the domain or comes from the domain's suite."""
    return row.get("domain") == domain or row.get("source") == f"suite:{suite}"


def as_prompt(row: Mapping[str, Any], domain: str, prefix: str, source: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A records-schema row of the modifier's prompt set: id prefixed by its source kind."""
    out = {k: row.get(k) for k in FIELDS}
    out.update(id=f"{prefix}.{row['id']}", domain=domain, source=source or row.get("source"), **extra)
    return out


MODIFIER_EVAL_SEED_OFFSET = 1


def suite_rows(suite: str, n: int, seed: int, split: str, domain: str) -> list[dict[str, Any]]:
    """A split of the suite, labelled with the modifier's domain (the config checks the suite exists)."""
    from forge.data.suites import generate

    return [{**row, "domain": domain} for row in generate(suite, n, seed, split)]


def cluster_labels(clusters: Mapping[str, Any]) -> dict[str, str]:
    """Failure id -> its cluster's label ("<cluster id>: <top terms>") from 1B's clusters.json."""
    labels = {}
    for cl in clusters.get("clusters", []):
        label = f"{cl['id']}: {', '.join(cl.get('top_terms', [])[:3]) or '-'}"
        for member in cl.get("member_ids", []):
            labels[member] = label
    return labels


def failure_rows(records: Iterable[Mapping[str, Any]], heldout: Sequence[Mapping[str, Any]],
                 labels: Mapping[str, str]) -> list[tuple[dict[str, Any], str | None]]:
    """The rows 1A failed on (records with correct False, looked up in prep_data's heldout), with labels."""
    by_id = {r["id"]: r for r in heldout}
    out = []
    for rec in records:
        if rec.get("correct"):
            continue
        row = by_id.get(rec["id"])
        if row is None:
            raise DataError(f"1B's records.jsonl names {rec['id']!r}, which prep_data's heldout.jsonl lacks")
        out.append((dict(row), labels.get(rec["id"])))
    return out


def gather(candidates: Iterable[tuple[str, dict[str, Any]]], excluded: set[str],
           ) -> tuple[list[dict[str, Any]], Counter[str], Counter[str]]:
    """Candidates (source kind, prompt row) in order -> unique prompts not in `excluded` (eval prompt keys),
    the count kept per source kind, and what was dropped ("duplicate", "eval_overlap")."""
    kept: list[dict[str, Any]] = []
    counts: Counter[str] = Counter({s: 0 for s in SOURCES})
    dropped: Counter[str] = Counter()
    seen_keys: set[str] = set()
    seen_ids: set[str] = set()
    for kind, row in candidates:
        key = prompt_key(row)
        if key in excluded:
            dropped["eval_overlap"] += 1
        elif key in seen_keys:
            dropped["duplicate"] += 1
        elif row["id"] in seen_ids:
            raise DataError(f"two prompts of source {kind!r} share the id {row['id']!r}")
        else:
            seen_keys.add(key)
            seen_ids.add(row["id"])
            counts[kind] += 1
            kept.append(row)
    return kept, counts, dropped


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return rows


def run(ctx: JobContext) -> JobResult:
    """A: prompts.jsonl (suite + user + 1B failures of the domain), dev.jsonl, heldout.jsonl."""
    cfg, domain = ctx.config, ctx.phase.domain
    if domain is None:
        raise DataError(f"phase {ctx.phase.id} is not a modifier subphase (no domain)")
    suite, sizes, seed = cfg.modifiers.suite_of(domain), cfg.modifiers.sizes, cfg.data.seed
    # the modifier's own eval rows: same eval buckets, another stream than prep_data's heldout. 1B's failures
    # ARE prep_data's heldout rows, and training on them must not mean training on what H scores.
    eval_seed = seed + MODIFIER_EVAL_SEED_OFFSET
    dev = suite_rows(suite, sizes.dev, eval_seed, "dev", domain)
    heldout = suite_rows(suite, sizes.heldout, eval_seed, "heldout", domain)

    prep = ctx.input_dir("prep_data")
    user = [r for r in read_jsonl(prep / "train.jsonl")
            if not str(r.get("source", "")).startswith("suite:") and belongs(r, domain, suite)]
    fa = ctx.input_dir("1B")
    clusters = json.loads((fa / "clusters.json").read_text())
    failures = [(row, label) for row, label in failure_rows(_read_json_lines(fa / "records.jsonl"),
                                                            read_jsonl(prep / "heldout.jsonl"),
                                                            cluster_labels(clusters))
                if belongs(row, domain, suite)]

    train = suite_rows(suite, sizes.prompts, seed, "train", domain)
    candidates: list[tuple[str, dict[str, Any]]] = [
        *(("suite", as_prompt(r, domain, "suite")) for r in train),
        *(("user", as_prompt(r, domain, "user")) for r in user),
        *(("1b", as_prompt(r, domain, "1b", f"1B:{r.get('source')}", cluster=c)) for r, c in failures),
    ]
    excluded = {prompt_key(r) for r in (*dev, *heldout)}
    prompts, counts, dropped = gather(candidates, excluded)
    if not prompts:
        raise DataError(f"modifier {domain!r}: no prompts to collect (suite {suite!r} train rows: "
                        f"{sizes.prompts}, user rows of the domain: {len(user)}, 1B failures of the domain: "
                        f"{len(failures)}; "
                        f"dropped: {dict(dropped)})")

    write_jsonl(ctx.out_dir / "prompts.jsonl", prompts)
    write_jsonl(ctx.out_dir / "dev.jsonl", dev)
    write_jsonl(ctx.out_dir / "heldout.jsonl", heldout)
    n_clusters = len({r["cluster"] for r in prompts if r.get("cluster") is not None})
    log.info("%s: %d prompts %s, dropped %s; dev %d, heldout %d", ctx.phase.id, len(prompts), dict(counts),
             dict(dropped), len(dev), len(heldout))
    quality = {"prompts": len(prompts), **{f"from_{s}": counts[s] for s in SOURCES},
               "failure_clusters": n_clusters, "dropped_duplicates": dropped["duplicate"],
               "dropped_eval_overlap": dropped["eval_overlap"], "dev": len(dev), "heldout": len(heldout)}
    notes = (f"{domain}: {counts['suite']} suite + {counts['user']} user + {counts['1b']} 1B failures "
             f"({n_clusters} clusters) = {len(prompts)} prompts; dev {len(dev)}, heldout {len(heldout)}")
    if dropped:
        notes += f"; dropped {dropped['duplicate']} duplicates, {dropped['eval_overlap']} in dev/heldout"
    return JobResult(
        metrics={k: float(v) for k, v in quality.items()},
        quality=quality,
        notes=notes,
        info={"prompts": "prompts.jsonl", "dev": "dev.jsonl", "heldout": "heldout.jsonl", "suite": suite,
              "counts": {s: counts[s] for s in SOURCES}, "dropped": dict(dropped)},
    )
