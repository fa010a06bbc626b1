"""Modifier subphase E: from the tiers' answers to the adapter's training set.

1. collect: each prompt's final outcome across the tier files (a later tier's record replaces an earlier one);
   what no tier accepted is reported (failed, or unsent when the cost cap stopped it);
2. filter: empty answers, answers over modifiers.max_answer_chars (runaway generations), refusals;
3. re-verify: the domain's checker once more (tests run in the sandbox for code, numeric match for reasoning,
   tool-call schema + arguments for automation, the judge for judged domains);
4. dedup: a prompt already kept (normalized: whitespace, case) or the identical prompt + answer;
5. split: val by a stable hash of the id (modifiers.val_fraction, at least one val row from two rows on).
Outputs: train.jsonl, val.jsonl (chat rows), rejected.jsonl (what was dropped and why), cascade.json (what
each tier handled and cost). Fewer than modifiers.min_train_rows training rows: a DataError with the counts.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.data.records import DataError, prompt_messages, read_jsonl, stable_unit, write_jsonl
from forge.modifiers.collect import prompt_key
from forge.modifiers.generation import (
    STEP_OF_TIER,
    portable,
    read_results,
    read_stats,
    results_name,
    stats_name,
)
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.modifiers")

Verify = Callable[[Mapping[str, Any], str], Any]  # -> bool or an object with .correct / .detail
ANSWER_SNIPPET = 500  # chars of a rejected answer kept in rejected.jsonl
# a refusal opens the answer ("I'm sorry, but I can't ...", "As an AI language model ...")
REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|i apologi[sz]e|sorry, (?:but )?i|as an ai\b|"
    r"i (?:can(?:no|')t|cannot|won'?t|will not|am unable to|am not able to|'m unable to|'m not able to) "
    r"(?:help|assist|comply|provide|answer|do that|fulfil))",
    re.IGNORECASE)


@dataclass
class Curation:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)


def final_results(prompts: Sequence[Mapping[str, Any]],
                  tiers: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Mapping[str, Any]]:
    """Each prompt id's last record across the tier files, lowest tier first."""
    known = {str(p["id"]) for p in prompts}
    final: dict[str, Mapping[str, Any]] = {}
    for tier in sorted(tiers):
        for res in tiers[tier]:
            if res["id"] not in known:
                raise DataError(f"tier {tier}'s results name {res['id']!r}, which is not among A's prompts")
            final[res["id"]] = res
    return final


def answer_problem(answer: str, max_chars: int) -> str | None:
    """Why an answer is unfit to train on (empty, too long, a refusal), or None."""
    if not answer.strip():
        return "empty answer"
    if len(answer) > max_chars:
        return f"answer has {len(answer)} chars, over max_answer_chars {max_chars}"
    if REFUSAL.match(answer.strip()):
        return "refusal"
    return None


def val_score(row_id: str) -> float:
    """A stable number in [0, 1) per id: the same row always lands in the same split."""
    return stable_unit(f"forge-val|{row_id}")


Rows = list[dict[str, Any]]


def split_val(rows: Sequence[dict[str, Any]], fraction: float) -> tuple[Rows, Rows]:
    """(train, val): val = rows whose id scores under `fraction`; with a fraction > 0 and two rows or more,
    val gets at least one row and train keeps at least one."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    in_val = {r["id"] for r in rows if val_score(r["id"]) < fraction}
    by_score = sorted(rows, key=lambda r: val_score(r["id"]))
    if not in_val:
        in_val.add(by_score[0]["id"])
    if len(in_val) == len(rows):
        in_val.discard(by_score[-1]["id"])
    return [r for r in rows if r["id"] not in in_val], [r for r in rows if r["id"] in in_val]


def _verdict(result: Any) -> tuple[bool, str]:
    if isinstance(result, bool):
        return result, ""
    return bool(result.correct), str(getattr(result, "detail", ""))


def _clean(text: str) -> str:
    """Details without run-dependent bits (loopback ports, temp dirs)."""
    return portable(text).replace(tempfile.gettempdir(), "<tmp>")


def not_accepted_reason(res: Mapping[str, Any] | None) -> str:
    if res is None:
        return "no tier handled it"
    if res["status"] == "unsent":
        return "not sent: the cost cap stopped the cascade"
    last = (res.get("attempts") or [{}])[-1]
    return (f"no tier accepted an answer (last: {last.get('outcome', '?')} at tier {last.get('tier', '?')}: "
            f"{last.get('detail', '')})")


def chat_row(prompt: Mapping[str, Any], res: Mapping[str, Any], answer: str) -> dict[str, Any]:
    return {"id": prompt["id"], "domain": prompt["domain"],
            "messages": [*prompt_messages(dict(prompt)), {"role": "assistant", "content": answer}],
            "source": prompt.get("source"), "teacher": res.get("teacher"), "tier": res.get("tier"),
            "check": prompt.get("check")}


def curate(prompts: Sequence[Mapping[str, Any]], tiers: Mapping[int, Sequence[Mapping[str, Any]]],
           verify: Verify, *, max_answer_chars: int, val_fraction: float) -> Curation:
    """Steps 1-5 of the module docstring over A's prompts and the tiers' item results."""
    final = final_results(prompts, tiers)
    rejected: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    counts = dict.fromkeys(("items", "accepted", "failed", "unsent", "filtered", "reverify_failed",
                            "duplicates"), 0)
    counts["items"] = len(prompts)
    by_prompt: dict[str, str] = {}  # normalized prompt -> id kept
    pairs: dict[tuple[str, str], str] = {}  # (exact prompt, answer) -> id kept

    def drop(prompt: Mapping[str, Any], res: Mapping[str, Any] | None, stage: str, reason: str) -> None:
        answer = (res or {}).get("answer")
        rejected.append({"id": prompt["id"], "stage": stage, "reason": _clean(reason),
                         "status": (res or {}).get("status", "missing"), "tier": (res or {}).get("tier"),
                         "teacher": (res or {}).get("teacher"),
                         "answer": answer[:ANSWER_SNIPPET] if isinstance(answer, str) else None})

    for prompt in prompts:
        res = final.get(str(prompt["id"]))
        status = res["status"] if res else "missing"
        if status != "accepted":
            counts["unsent" if status == "unsent" else "failed"] += 1
            drop(prompt, res, "cascade", not_accepted_reason(res))
            continue
        counts["accepted"] += 1
        answer = str(res.get("answer") or "")
        problem = answer_problem(answer, max_answer_chars)
        if problem:
            counts["filtered"] += 1
            drop(prompt, res, "filter", problem)
            continue
        ok, detail = _verdict(verify(prompt, answer))
        if not ok:
            counts["reverify_failed"] += 1
            drop(prompt, res, "verify", f"failed re-verification: {detail}")
            continue
        exact = json.dumps(prompt_messages(dict(prompt)), sort_keys=True)
        key = prompt_key(prompt)
        if (exact, answer) in pairs:
            counts["duplicates"] += 1
            drop(prompt, res, "dedup", f"identical prompt and answer as {pairs[(exact, answer)]}")
            continue
        if key in by_prompt:
            counts["duplicates"] += 1
            drop(prompt, res, "dedup", f"same prompt (normalized) as {by_prompt[key]}")
            continue
        pairs[(exact, answer)] = by_prompt[key] = str(prompt["id"])
        kept.append(chat_row(prompt, res, answer))

    train, val = split_val(kept, val_fraction)
    counts.update(train=len(train), val=len(val))
    return Curation(train, val, rejected, counts)


def tier_summaries(ctx: JobContext) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The tier files of B, C, D that ran (C and D are skipped for domains with fewer tiers) and, per tier,
    what cascade.json reports."""
    from forge.phases import modifier_input

    results: dict[int, list[dict[str, Any]]] = {}
    summary: list[dict[str, Any]] = []
    for tier, step in sorted(STEP_OF_TIER.items()):
        phase_id = modifier_input(ctx.phase, step, ctx.config)
        if ctx.input_skipped(phase_id):
            summary.append({"tier": tier, "skipped": ctx.inputs[phase_id].skip_reason})
            continue
        folder = ctx.input_dir(phase_id)
        results[tier] = read_results(folder / results_name(tier))
        data = read_stats(folder / stats_name(tier))
        stats = data["stats"]
        summary.append({"tier": tier, "teacher": stats["teacher"], "model": stats["model"],
                        "sent": stats["sent"], "accepted": data["status"]["accepted"],
                        "rejected": stats["rejected"], "errors": stats["errors"],
                        "unsent": data["status"]["unsent"], "cached": stats["cached"],
                        "cost_usd": data["cost_usd"], "spent_usd": data["cost"]["spent_usd"]})
    if 1 not in results:
        raise DataError(f"{ctx.phase.id}: tier 1 ({modifier_input(ctx.phase, 'B', ctx.config)}) was skipped; "
                        "there are no answers to curate")
    return results, summary


def run(ctx: JobContext) -> JobResult:
    """E: verify, filter, dedup and split the accepted answers of the domain's cascade."""
    from forge.modifiers.endpoints import started_teachers
    from forge.modifiers.generation import judge_teachers
    from forge.modifiers.judge import verifier_for  # written beside this module; imported when needed
    from forge.modifiers.teachers import CostTracker, ResponseCache
    from forge.phases import modifier_input

    cfg, domain = ctx.config, ctx.phase.domain
    if domain is None:
        raise DataError(f"phase {ctx.phase.id} is not a modifier subphase (no domain)")
    mods = cfg.modifiers
    prompts = read_jsonl(ctx.input_dir(modifier_input(ctx.phase, "A", cfg)) / "prompts.jsonl")
    results, summary = tier_summaries(ctx)
    ran = [s for s in summary if "skipped" not in s]
    tiers_cost = sum(s["cost_usd"] for s in ran)
    cost = CostTracker(cfg.teachers.cost_cap_usd, spent_usd=ran[-1]["spent_usd"])
    cache = ResponseCache(ctx.store) if cfg.teachers.cache else None
    with started_teachers(ctx, judge_teachers(cfg, domain), rows=prompts) as ready, \
            verifier_for(cfg, domain, ready, cost, cache) as verify:
        cur = curate(prompts, results, verify, max_answer_chars=mods.max_answer_chars,
                     val_fraction=mods.val_fraction)
    verify_cost = cost.spent_usd - ran[-1]["spent_usd"]
    c = cur.counts

    write_jsonl(ctx.out_dir / "train.jsonl", cur.train)
    write_jsonl(ctx.out_dir / "val.jsonl", cur.val)
    write_jsonl(ctx.out_dir / "rejected.jsonl", cur.rejected)
    (ctx.out_dir / "cascade.json").write_text(json.dumps({
        "domain": domain, "tiers": summary,
        "totals": {**c, "cost_usd": tiers_cost + verify_cost, "tiers_cost_usd": tiers_cost,
                   "reverify_cost_usd": verify_cost}}, indent=2, sort_keys=True) + "\n")

    if c["train"] < mods.min_train_rows:
        raise DataError(
            f"modifier {domain!r} ({ctx.phase.id}): only {c['train']} training rows remain, fewer than "
            f"modifiers.min_train_rows {mods.min_train_rows}: {c['items']} prompts, {c['accepted']} "
            f"accepted by the tiers ({c['failed']} failed, {c['unsent']} unsent), {c['filtered']} filtered, "
            f"{c['reverify_failed']} failed re-verification, {c['duplicates']} duplicates, {c['val']} to val")

    quality: dict[str, float] = {k: c[k] for k in ("items", "accepted", "failed", "unsent")}
    for s in ran:
        for stat in ("sent", "accepted", "cost_usd"):
            quality[f"tier{s['tier']}.{stat}"] = s[stat]
    quality.update(cost_usd=tiers_cost + verify_cost, filtered=c["filtered"],
                   reverify_failed=c["reverify_failed"], duplicates=c["duplicates"], train=c["train"],
                   val=c["val"])
    handled = ", ".join(f"t{s['tier']} {s['teacher']} {s['accepted']}/{s['sent']}" for s in ran)
    notes = (f"{c['train']} train + {c['val']} val from {c['accepted']}/{c['items']} accepted ({handled}); "
             f"dropped {c['filtered']} filtered, {c['reverify_failed']} re-verify, {c['duplicates']} "
             f"duplicates; ${tiers_cost + verify_cost:.4f}")
    log.info("%s: %s", ctx.phase.id, notes)
    return JobResult(metrics={k: float(v) for k, v in quality.items()}, quality=quality, notes=notes,
                     info={"train": "train.jsonl", "val": "val.jsonl", "rejected": "rejected.jsonl",
                           "cascade": "cascade.json", "counts": c})
