"""7B job: build the few-shot template set (forge.serve.few_shot) from train-split suite rows, and measure it:
the served base (2C's GGUF + 2E's recovery LoRA, greedy, llama.cpp) on held-out rows zero-shot vs with the
retrieved demonstrations, per domain, with a paired 95% interval. 8A ships the set in the release; serving
applies it when a request asks (`few_shot: true`) or serving's default says so.
"""

from __future__ import annotations

import logging
from typing import Any

from forge.runner import JobContext, JobResult, PhaseSkipped

log = logging.getLogger("forge.serve")


def run(ctx: JobContext) -> JobResult:
    from forge.data.suites import generate
    from forge.evaluate.llama_cpp_backend import evaluate_gguf
    from forge.serve.few_shot import FEW_SHOT_DIR, FewShot, build
    from forge.serve.phase_jobs import bar_plot, paired_ci, served_base, write_json

    cfg, fs = ctx.config, ctx.config.meta.few_shot
    suite = {d: cfg.modifiers.suite_of(d) if d in cfg.modifiers.domains else d for d in fs.domains}
    pools = {d: generate(suite[d], fs.pool_rows, cfg.data.seed, "train") for d in fs.domains}
    body = build(ctx.out_dir / FEW_SHOT_DIR, pools, fs.k, fs.max_demo_chars)
    templates = FewShot.load(ctx.out_dir / FEW_SHOT_DIR)
    log.info(
        "7B: template set %s, %d demonstrations over %s",
        templates.version,
        len(templates.entries),
        templates.domains,
    )

    base, what = served_base(ctx)
    if base is None:
        raise PhaseSkipped(f"nothing to measure the templates with: {what}")
    rows = [
        {**r, "domain": d}
        for d in fs.domains
        for r in generate(suite[d], fs.eval_rows, cfg.data.seed, "heldout")
    ]
    # few-shot rows: the demonstrations (nearest within the row's own domain) before the question
    shot_rows = [
        {**r, "messages": [*templates.apply(r["messages"][:-1], r["domain"]), r["messages"][-1]]}
        for r in rows
    ]
    gguf, adapter = base
    lora = adapter.path if adapter else None
    zero = evaluate_gguf(gguf.path, ctx.input_dir("2C"), rows, cfg.eval, cfg.gguf, lora)
    few = evaluate_gguf(gguf.path, ctx.input_dir("2C"), shot_rows, cfg.eval, cfg.gguf, lora)
    z, f = zero.summary(), few.summary()
    by_domain: dict[str, Any] = {}
    for d in fs.domains:
        zc = [r["correct"] for r in zero.records if r["domain"] == d]
        fc = [r["correct"] for r in few.records if r["domain"] == d]
        zl = [r["logprob"] for r in zero.records if r["domain"] == d]
        fl = [r["logprob"] for r in few.records if r["domain"] == d]
        by_domain[d] = {
            "zero_shot": sum(zc) / len(zc),
            "few_shot": sum(fc) / len(fc),
            "gain": (sum(fc) - sum(zc)) / len(zc),
            "logprob_zero_shot": sum(zl) / len(zl),
            "logprob_few_shot": sum(fl) / len(fl),
        }
    lo, hi = paired_ci(
        [r["correct"] for r in few.records], [r["correct"] for r in zero.records], cfg.data.seed
    )
    llo, lhi = paired_ci(
        [r["logprob"] for r in few.records], [r["logprob"] for r in zero.records], cfg.data.seed
    )
    gain, lp_gain = f["acc"] - z["acc"], f["logprob"] - z["logprob"]
    report = {
        "version": body["version"],
        "k": fs.k,
        "model": what,
        "rows": len(rows),
        "by_domain": by_domain,
        "acc_zero_shot": z["acc"],
        "acc_few_shot": f["acc"],
        "gain": gain,
        "gain_ci95": [lo, hi],
        "logprob_zero_shot": z["logprob"],
        "logprob_few_shot": f["logprob"],
        "logprob_gain": lp_gain,
        "logprob_gain_ci95": [llo, lhi],
    }
    write_json(ctx.out_dir / "few_shot_report.json", report)
    plot = bar_plot(
        ctx.out_dir / "few_shot_accuracy.png",
        f"7B: zero-shot vs {fs.k}-shot (retrieved)",
        {
            "zero-shot": {d: v["zero_shot"] for d, v in by_domain.items()},
            f"{fs.k}-shot": {d: v["few_shot"] for d, v in by_domain.items()},
        },
        "accuracy (suite checks)",
    )
    ctx.log_artifact(plot)
    return JobResult(
        metrics={
            "acc_zero_shot": z["acc"],
            "acc_few_shot": f["acc"],
            "gain": gain,
            "gain_ci_low": lo,
            "gain_ci_high": hi,
            "logprob_gain": lp_gain,
            **{f"gain.{d}": v["gain"] for d, v in by_domain.items()},
        },
        quality={"acc_zero_shot": z["acc"], "acc_few_shot": f["acc"], "few_shot_gain": gain},
        notes=(
            f"template set {body['version']} ({len(templates.entries)} demonstrations, k={fs.k}); {what} on "
            f"{len(rows)} held-out rows: accuracy {z['acc']:.3f} zero-shot -> {f['acc']:.3f} few-shot (gain "
            f"{gain:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]); reference log-prob {lp_gain:+.3f} "
            f"[{llo:+.3f}, {lhi:+.3f}]"
        ),
        info={"few_shot": FEW_SHOT_DIR, "version": body["version"], "report": "few_shot_report.json"},
    )
