"""Modifier subphases B, C, D: one tier of the domain's teacher cascade each.

Tier 1 (B) answers every prompt A collected; tier i > 1 gets only the items tier i-1 marked "escalate"
(rejected by verification, low confidence or errors), with their earlier attempts carried along. The top tier
runs with final=True: what it does not accept is "failed", unless an earlier tier's verified low-confidence
answer can stand in (the cascade's fallback, here across tasks).

Outputs: tier<i>.jsonl (one ItemResult per item this tier handled) and tier<i>.json (its TierStats, what this
task spent and the domain's spending so far, which the next tier starts its cost cap from). Both are
run-independent: no timings, no loopback ports.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from forge.data.records import DataError, read_json_objects, read_jsonl, write_jsonl
from forge.modifiers.cascade import Attempt, CascadeResult, ItemResult, Tier, TierStats, run_cascade
from forge.modifiers.modifier_config import TIER_STEPS
from forge.modifiers.teacher_config import TeacherConfig, TierConfig
from forge.modifiers.teachers import CostTracker, ResponseCache
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.modifiers")

STEP_OF_TIER = {tier: step for step, tier in TIER_STEPS.items()}
# transport noise, not facts about the data: kept out of the output files (they go to metrics)
RUN_DEPENDENT_STATS = ("seconds", "http_attempts", "retries", "timeouts")
_LOOPBACK_PORT = re.compile(r"(https?://(?:127\.0\.0\.1|localhost|\[::1\])):\d+")


def results_name(tier: int) -> str:
    return f"tier{tier}.jsonl"


def stats_name(tier: int) -> str:
    return f"tier{tier}.json"


def read_results(path: Path) -> list[dict[str, Any]]:
    """A tier<i>.jsonl: ItemResult dicts."""
    return read_json_objects(path, ("id", "status"), "an item result")


def read_stats(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable tier stats ({exc})") from exc
    if not isinstance(data, dict) or "stats" not in data or "cost" not in data:
        raise DataError(f"{path}: tier stats need 'stats' and 'cost'")
    return data


def portable(text: str) -> str:
    """A loopback server's port changes every run: keep it out of output files."""
    return _LOOPBACK_PORT.sub(r"\1:<port>", text)


def attempt_from(d: Mapping[str, Any]) -> Attempt:
    known = {f.name for f in fields(Attempt)}
    return Attempt(**{k: v for k, v in d.items() if k in known})


def result_dict(res: ItemResult) -> dict[str, Any]:
    d = asdict(res)
    for att in d["attempts"]:
        att.pop("http_attempts", None)
        att["detail"] = portable(att["detail"])
    return d


def stats_dict(ts: TierStats) -> dict[str, Any]:
    return {k: v for k, v in asdict(ts).items() if k not in RUN_DEPENDENT_STATS}


def judge_teachers(cfg: Any, domain: str) -> list[TeacherConfig]:
    """The judge the domain's verifier calls (none for program-checked domains)."""
    judge = cfg.modifiers.domains[domain].judge
    return [cfg.teachers.teachers[judge]] if judge and judge in cfg.teachers.teachers else []


def renumber(result: CascadeResult, tier: int) -> None:
    """run_cascade numbers the tiers it was given from 1; this task ran the domain's tier `tier`."""
    for ts in result.tiers:
        ts.tier = tier
    for res in result.items:
        if res.tier is not None:
            res.tier = tier
        for att in res.attempts:
            att.tier = tier


def carry_forward(result: CascadeResult, earlier: Mapping[str, Mapping[str, Any]], final: bool) -> int:
    """Put each item's earlier attempts before this tier's. At the top tier an item still not accepted takes
    its latest verified low-confidence answer from an earlier tier (as run_cascade does within one call);
    returns how many did."""
    fallbacks = 0
    for res in result.items:
        before = [attempt_from(a) for a in earlier.get(res.id, {}).get("attempts", [])]
        res.attempts = [*before, *res.attempts]
        if not final or res.status == "accepted":
            continue
        kept = [a for a in before if a.outcome == "low_confidence"]
        if kept:
            att = kept[-1]
            res.status, res.answer, res.tier, res.teacher = "accepted", att.answer, att.tier, att.teacher
            res.verified, res.confidence = att.verified, att.confidence
            fallbacks += 1
    return fallbacks


def earlier_tier(ctx: JobContext, tier: int) -> tuple[dict[str, dict[str, Any]], float]:
    """Tier i-1's items marked "escalate" (by id) and the domain's spending through tier i-1."""
    if tier == 1:
        return {}, 0.0
    from forge.phases import modifier_input

    prev = modifier_input(ctx.phase, STEP_OF_TIER[tier - 1], ctx.config)
    folder = ctx.input_dir(prev)
    results = read_results(folder / results_name(tier - 1))
    escalate = {r["id"]: r for r in results if r["status"] == "escalate"}
    spent = float(read_stats(folder / stats_name(tier - 1))["cost"].get("spent_usd") or 0.0)
    return escalate, spent


def send(ctx: JobContext, domain: str, tier_cfg: TierConfig, teacher: TeacherConfig,
         items: Sequence[Mapping[str, Any]], prompts: Sequence[Mapping[str, Any]], cost: CostTracker,
         cache: ResponseCache | None, final: bool) -> CascadeResult:
    """Start the tier's teacher (and the domain's judge) and run the items through it."""
    from forge.modifiers.endpoints import started_teachers
    from forge.modifiers.judge import verifier_for  # written beside this module; imported when needed

    with started_teachers(ctx, [teacher, *judge_teachers(ctx.config, domain)], rows=prompts) as ready, \
            verifier_for(ctx.config, domain, ready, cost, cache) as verify:
        tier = Tier(ready[teacher.name], tier_cfg.concurrency, tier_cfg.min_confidence)
        return run_cascade(items, [tier], verify, cost, cache, final=final)


def run(ctx: JobContext) -> JobResult:
    """B/C/D: tier TIER_STEPS[step] of the domain's cascade over what reached it."""
    cfg, phase = ctx.config, ctx.phase
    domain, step = phase.domain, phase.step
    if domain is None or step not in TIER_STEPS:
        raise DataError(f"phase {phase.id} is not a modifier's generation subphase (B, C or D)")
    tier = TIER_STEPS[step]
    pairs = cfg.teachers.tiers_for(domain)
    if tier > len(pairs):
        raise DataError(f"{phase.id}: teachers.domains.{domain} has {len(pairs)} tier(s), no tier {tier}")
    tier_cfg, teacher = pairs[tier - 1]
    final = tier == len(pairs)

    from forge.phases import modifier_input

    prompts = read_jsonl(ctx.input_dir(modifier_input(phase, "A", cfg)) / "prompts.jsonl")
    earlier, spent_before = earlier_tier(ctx, tier)
    unknown = sorted(set(earlier) - {p["id"] for p in prompts})
    if unknown:
        raise DataError(f"{phase.id}: tier {tier - 1} escalated ids A's prompts.jsonl lacks: {unknown[:5]}")
    items = prompts if tier == 1 else [p for p in prompts if p["id"] in earlier]

    cost = CostTracker(cfg.teachers.cost_cap_usd, spent_usd=spent_before)
    cache = ResponseCache(ctx.store) if cfg.teachers.cache else None
    started = time.perf_counter()
    if items:
        result = send(ctx, domain, tier_cfg, teacher, items, prompts, cost, cache, final)
    else:  # the tiers below accepted everything: no server to start, nothing to send
        result = CascadeResult([], [TierStats(tier, teacher.name, teacher.model)], cost.summary())
    seconds = time.perf_counter() - started
    renumber(result, tier)
    fallbacks = carry_forward(result, earlier, final)
    ts = result.tiers[0]
    ts.fallback_accepted += fallbacks
    task_cost = cost.spent_usd - spent_before
    statuses = {s: sum(r.status == s for r in result.items)
                for s in ("accepted", "escalate", "failed", "unsent")}

    write_jsonl(ctx.out_dir / results_name(tier), [result_dict(r) for r in result.items])
    (ctx.out_dir / stats_name(tier)).write_text(json.dumps({
        "domain": domain, "tier": tier, "final": final, "teacher": teacher.name, "items": len(result.items),
        "status": statuses, "stats": stats_dict(ts), "cost_usd": task_cost,
        "cost": {**cost.summary(), "spent_before_usd": spent_before}, "stopped": result.stopped,
    }, indent=2, sort_keys=True) + "\n")

    quality: dict[str, float] = {
        "items": len(result.items), "sent": ts.sent, "accepted": statuses["accepted"],
        "rejected": ts.rejected, "low_confidence": ts.low_confidence, "errors": ts.errors,
        "unsent": statuses["unsent"], "escalated": statuses["escalate"], "failed": statuses["failed"],
        "cached": ts.cached, "cost_usd": task_cost, "seconds": seconds}
    metrics = {**{k: float(v) for k, v in quality.items()}, "http_attempts": float(ts.http_attempts),
               "retries": float(ts.retries), "timeouts": float(ts.timeouts),
               "prompt_tokens": float(ts.prompt_tokens), "completion_tokens": float(ts.completion_tokens),
               "fallback_accepted": float(ts.fallback_accepted), "spent_usd": cost.spent_usd}
    notes = (f"tier {tier} {teacher.name}: {statuses['accepted']}/{len(result.items)} accepted, "
             f"${task_cost:.4f}")
    if ts.cached:
        notes += f", {ts.cached} cached"
    if statuses["escalate"]:
        notes += f", {statuses['escalate']} escalate to tier {tier + 1}"
    if statuses["failed"]:
        notes += f", {statuses['failed']} failed"
    if statuses["unsent"]:
        notes += f", {statuses['unsent']} unsent (cost cap)"
    log.info("%s: %s", phase.id, notes)
    return JobResult(metrics=metrics, quality=quality, notes=notes,
                     info={"results": results_name(tier), "stats": stats_name(tier), "tier": tier,
                           "teacher": teacher.name, "final": final, "spent_usd": cost.spent_usd})
