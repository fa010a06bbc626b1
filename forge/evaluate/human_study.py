"""9B human evaluation, the two phase jobs around the people:

  9B.prepare  `tasks` held-out suite rows across `domains`, answered by 8A's release through the real engine
              in the serving default mode; published as a blind campaign in the ratings database;
              campaign.json + items.json (the campaign can be re-published from them, idempotently)
  (between them the Airflow sensor waits, deferred in the triggerer, until enough ratings are in)
  9B.gate     the ratings' summary (mean, 95% CI, per domain, per rater) as a report; fails below min_mean

Both are skipped, with the config's reason, unless validation.human.enabled: a study needs people.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forge.data.records import stable_int
from forge.evaluate.human_ratings import (
    campaign_id,
    mask_url,
    needed_ratings,
    progress,
    publish,
    rater_id,
    summary,
)
from forge.evaluate.validation_config import HumanEvalStudyConfig
from forge.runner import JobContext, JobResult, PhaseSkipped

log = logging.getLogger("forge.evaluate")

PREPARE = "9B.prepare"
CAMPAIGN_FILE, ITEMS_FILE = "campaign.json", "items.json"
REPORT_MD, REPORT_JSON = "human_eval_report.md", "human_eval_report.json"


class HumanGateFailed(RuntimeError):
    """The raters' mean score is below validation.human.min_mean; the message is the report."""


def study_config(ctx: JobContext) -> HumanEvalStudyConfig:
    h = ctx.config.validation.human
    if not h.enabled:
        raise PhaseSkipped(h.skip_reason)
    return h


# ---- 9B.prepare ------------------------------------------------------------------------------------------


def split_tasks(tasks: int, domains: Sequence[str]) -> dict[str, int]:
    """`tasks` over the domains as evenly as possible (the first ones get the remainder)."""
    if not domains:
        raise ValueError("validation.human.domains is empty: no suite to draw the study's prompts from")
    base, extra = divmod(tasks, len(domains))
    return {d: base + (i < extra) for i, d in enumerate(dict.fromkeys(domains))}


def prompt_text(row: dict[str, Any]) -> str:
    """What the rater sees as the question: the conversation before the answer (system prompts aside)."""
    from forge.data.records import prompt_messages

    turns = [m for m in prompt_messages(row) if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


def build_items(campaign: str, rows: Sequence[dict[str, Any]],
                outputs: Sequence[str]) -> list[dict[str, str]]:
    """The campaign's items: an opaque id (a hash, so it says nothing about domain or order), the task id and
    domain (for the report only, never shown), the prompt and the release's answer."""
    if len(rows) != len(outputs):
        raise ValueError(f"{len(rows)} rows but {len(outputs)} answers")
    def item_id(row: dict[str, Any]) -> str:
        return f"{stable_int(campaign + '|item|' + str(row['id'])):016x}"

    return [
        {"item_id": item_id(row), "task_id": str(row["id"]), "domain": str(row["domain"]),
         "prompt": prompt_text(row), "output": out}
        for row, out in zip(rows, outputs, strict=True)
    ]


def publish_campaign(h: HumanEvalStudyConfig, campaign: str, items: list[dict[str, str]],
                     out_dir: Path) -> dict[str, Any]:
    """The part of 9B.prepare after the model: publish (idempotent) and write campaign.json + items.json.
    Returns campaign.json's content."""
    needed = needed_ratings(h.raters, h.tasks_per_rater, h.min_fraction)
    fresh = publish(h.db_url, campaign, items, raters=h.raters, tasks_per_rater=h.tasks_per_rater,
                    needed=needed)
    domains: dict[str, int] = {}
    for it in items:
        domains[it["domain"]] = domains.get(it["domain"], 0) + 1
    info = {
        "campaign": campaign,
        "db_url": mask_url(h.db_url),  # never a password (the URL as connected, password hidden)
        "db_url_configured": h.db_url if h.db_url and h.db_url.startswith("env:") else None,
        "raters": h.raters,
        "rater_ids": [rater_id(1), rater_id(h.raters)],
        "tasks_per_rater": h.tasks_per_rater,
        "items": len(items),
        "domains": domains,
        "needed": needed,
        "min_fraction": h.min_fraction,
        "min_mean": h.min_mean,
    }
    (out_dir / CAMPAIGN_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out_dir / ITEMS_FILE).write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    log.info("9B: campaign %s %s in %s (%d items, %d ratings needed)", campaign,
             "published" if fresh else "was already published", info["db_url"], len(items), needed)
    return info


def republish(h: HumanEvalStudyConfig, prepare_dir: Path) -> dict[str, Any]:
    """Publish 9B.prepare's campaign again from its output (campaign.json + items.json): for the rating app's
    launcher, or a ratings database that was replaced after 9B.prepare ran (a cache hit does not publish).
    Idempotent; refuses a study config that no longer matches the campaign. Returns campaign.json."""
    info = json.loads((prepare_dir / CAMPAIGN_FILE).read_text())
    rows = json.loads((prepare_dir / ITEMS_FILE).read_text())
    publish(h.db_url, info["campaign"], rows, raters=info["raters"], tasks_per_rater=info["tasks_per_rater"],
            needed=info["needed"])
    return info


def answer_rows(ctx: JobContext, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The release's answers, as a user gets them: serving's default mode and max tokens."""
    from forge.data.records import prompt_messages
    from forge.serve.phase_jobs import eval_service
    from forge.serve.service import ChatRequest

    sc = ctx.config.serving
    service = eval_service(ctx)
    out: list[str] = []
    try:
        for i, row in enumerate(rows, 1):
            req = ChatRequest(prompt_messages(row), mode=sc.default_mode, session_id=f"9b-{row['id']}",
                              max_tokens=sc.default_max_tokens)
            out.append(service.complete(req).text)
            if i % 20 == 0 or i == len(rows):
                log.info("9B: %d/%d answers", i, len(rows))
    finally:
        service.close()
    return out


def prepare(ctx: JobContext) -> JobResult:
    from forge.serve.phase_jobs import eval_rows

    h = study_config(ctx)
    rows: list[dict[str, Any]] = []
    for domain, n in split_tasks(h.tasks, h.domains).items():
        if n:
            rows += eval_rows(ctx, [domain], n)
    campaign = campaign_id(ctx.cache_key)
    info = publish_campaign(h, campaign, build_items(campaign, rows, answer_rows(ctx, rows)), ctx.out_dir)
    per_domain = ", ".join(f"{d} {k}" for d, k in info["domains"].items())
    return JobResult(
        metrics={"items": float(len(rows)), "needed": float(info["needed"])},
        info={"campaign": campaign, "needed": info["needed"], "campaign_file": CAMPAIGN_FILE,
              "items_file": ITEMS_FILE},
        notes=f"campaign {campaign}: {len(rows)} blind answers ({per_domain}) in {info['db_url']}; "
        f"serve the rating app (`python -m forge rate`) and send each rater their link "
        f"(<app>/rate/{rater_id(1)}?key=.. to {rater_id(h.raters)}: the links file it names); "
        f"the gate waits for "
        f"{info['needed']} ratings, then needs a mean >= {h.min_mean:g}",
    )


# ---- 9B.gate ---------------------------------------------------------------------------------------------


def render_report(h: HumanEvalStudyConfig, prog: dict[str, Any], s: dict[str, Any], passed: bool) -> str:
    lines = [
        f"# 9B human evaluation: {'PASS' if passed else 'FAIL'}",
        "",
        f"Campaign `{s['campaign']}`: {s['n']} ratings from {len(s['by_rater'])} raters "
        f"({prog['raters_finished']} of {prog['raters']} finished; {prog['needed']} needed).",
        "",
        f"**Mean {s['mean']:.2f} / 10** (95% CI {s['ci_low']:.2f} to {s['ci_high']:.2f}, {s['ci_method']}); "
        f"the gate needs a mean >= {h.min_mean:g}.",
        "",
        "| domain | ratings | mean |",
        "|---|---:|---:|",
        *(f"| {d} | {v['n']} | {v['mean']:.2f} |" for d, v in s["by_domain"].items()),
        "",
        "| score | " + " | ".join(s["histogram"]) + " |",
        "|---|" + "---:|" * len(s["histogram"]),
        "| ratings | " + " | ".join(str(c) for c in s["histogram"].values()) + " |",
        "",
    ]
    return "\n".join(lines)


def gate(ctx: JobContext) -> JobResult:
    h = study_config(ctx)
    upstream = ctx.input_info(PREPARE)
    campaign, needed = upstream.get("campaign"), upstream.get("needed")
    if not campaign or not isinstance(needed, int):
        raise RuntimeError(f"9B.gate: the {PREPARE} manifest has no campaign/needed in its info ({upstream})")
    prog = progress(h.db_url, campaign)
    if prog["ratings"] < needed:
        raise RuntimeError(
            f"9B.gate: campaign {campaign} has {prog['ratings']} of the {needed} ratings needed "
            f"({prog['raters_finished']} of {prog['raters']} raters finished): wait for the raters (the "
            "sensor before this task does), or lower validation.human.min_fraction")
    s = summary(h.db_url, campaign)
    passed = s["mean"] >= h.min_mean
    report = render_report(h, prog, s, passed)
    md = ctx.out_dir / REPORT_MD
    md.write_text(report)
    body = json.dumps({"passed": passed, "min_mean": h.min_mean, "progress": prog, "summary": s},
                      indent=2, sort_keys=True) + "\n"
    (ctx.out_dir / REPORT_JSON).write_text(body)
    ctx.log_artifact(md)
    if not passed:
        from forge.evaluate.quality_gates import keep_failure_report

        where = keep_failure_report(ctx, {REPORT_MD: report, REPORT_JSON: body})
        raise HumanGateFailed(f"9B.gate failed: mean {s['mean']:.2f} < {h.min_mean:g}. Report: "
                              f"{where}/{REPORT_MD}\n\n{report}")
    return JobResult(
        metrics={"mean": s["mean"], "n": float(s["n"]), "ci_low": s["ci_low"], "ci_high": s["ci_high"]},
        quality={"human_mean": s["mean"]},
        info={"campaign": campaign, "report": REPORT_MD},
        notes=f"mean {s['mean']:.2f} / 10 (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}) over {s['n']} "
        f"ratings from {len(s['by_rater'])} raters >= {h.min_mean:g}",
    )
