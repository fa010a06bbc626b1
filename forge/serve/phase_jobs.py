"""The serving phases that run the real server over 8A's release:

  8B  api_check               the OpenAI-compatible API on loopback, driven by the `openai` client: every
                              contract check (chat, stream, models, modes, auth, limits) passes; openapi.json
  8C  chat_check              the Gradio chat mounted on the same app: the page serves, one turn streams
                              through the service, a rating lands in a feedback store
  8D  monitoring              /metrics after real traffic holds every series the Grafana dashboard and the
                              alert rules query; the Prometheus + Grafana files ship in the output
  10A modes_eval              fast / accurate / auto on the suites' held-out rows: accuracy, latency,
                              tokens/s,
                              which option answered
  11A self_consistency_eval   accurate mode greedy vs N sampled paths + majority vote on the hard rows
  12B critique_eval           answers with and without generate -> critique -> regenerate (< threshold)

Evaluation jobs use their own session store and feedback store in the work dir: measuring must not write
into the feedback that 13A retrains from.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from forge.data.records import stable_int
from forge.runner import JobContext, JobResult, PhaseSkipped
from forge.serve.release import BASE

log = logging.getLogger("forge.serve")

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"


# ---- the service over 8A's release ----------------------------------------------------------------------


def release_dir(ctx: JobContext) -> Path:
    return ctx.input_dir("8A") / ctx.input_info("8A").get("release", "release")


def served_base(ctx: JobContext) -> tuple[tuple[Any, Any] | None, str]:
    """(2C's GGUF, 2E's LoRA or None) as InputFiles when the base can answer, else None; and why."""
    from forge.runner import input_file

    if ctx.input_skipped("2C") or not ctx.input_info("2C").get("gguf"):
        return None, "2C has no GGUF"
    adapter = None if ctx.input_skipped("2E") else input_file(ctx, "2E", "adapter")
    return (input_file(ctx, "2C", "gguf"), adapter), "2C's GGUF" + (" + 2E's LoRA" if adapter else "")


def eval_service(ctx: JobContext) -> Any:
    """A ChatService over the release, with a session store and feedback store of its own (work dir)."""
    from forge.serve.server import build_service

    cfg = ctx.config.model_copy(deep=True)
    # one worker: the requests run in a fixed order over one context (its prompt cache included), so a
    # recomputed phase answers exactly the same
    cfg.serving.workers = 1
    own = Path(tempfile.mkdtemp(dir=ctx.work_dir))  # empty: a retry's scratch may hold a past attempt's
    cfg.routing.sessions.url = f"sqlite:///{own / 'sessions.db'}"
    cfg.routing.retraining.feedback_root = f"file://{own / 'feedback'}"
    return build_service(release_dir(ctx), cfg)


def eval_rows(ctx: JobContext, domains: Sequence[str], n: int) -> list[dict[str, Any]]:
    from forge.data.suites import generate

    rows = []
    for d in domains:
        suite = ctx.config.modifiers.suite_of(d) if d in ctx.config.modifiers.domains else d
        rows += [{**r, "domain": d} for r in generate(suite, n, ctx.config.data.seed, "heldout")]
    return rows


def run_requests(
    service: Any, rows: Sequence[dict[str, Any]], make: Callable[[dict[str, Any]], Any], what: str,
    check: bool = True,
) -> list[dict[str, Any]]:
    """Each row through the service (as many at once as it has workers); correctness by the suites' checks
    (check=False: rows scored elsewhere, e.g. HumanEval's programs; correct is None)."""
    from forge.data.records import prompt_messages
    from forge.data.suites import check_answer

    def one(row: dict[str, Any]) -> dict[str, Any]:
        req = make(row)
        req.messages = prompt_messages(row)
        result = service.complete(req)
        verdict = check_answer(row, result.text) if check else None
        return {
            "id": row.get("id"),
            "domain": row["domain"],
            "correct": verdict.correct if verdict else None,
            "detail": verdict.detail if verdict else "",
            "output": result.text,
            "option": result.route.option,
            "latency_ms": result.latency_ms,
            "ttft_ms": result.usage.first_token_ms,
            "tokens": result.usage.completion_tokens,
            "tps": result.usage.tokens_per_s,
            "extras": result.extras,
        }

    started, out = time.perf_counter(), []
    with ThreadPoolExecutor(max_workers=len(service.engine.workers)) as pool:
        for i, rec in enumerate(pool.map(one, rows), 1):
            out.append(rec)
            if i % 50 == 0 or i == len(rows):
                log.info("%s: %d/%d requests (%.0f s)", what, i, len(rows), time.perf_counter() - started)
    return out


def paired_runs(service: Any, rows: Sequence[dict[str, Any]], tag: str, mode: str, max_tokens: int,
                **variant: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same rows without, then with, a request variant (self-consistency, critique): paired records."""
    from forge.serve.service import ChatRequest

    def make(kind: str, **extra: Any) -> Callable[[dict[str, Any]], Any]:
        # a seed per row: sampled paths (self-consistency, critique's regeneration) are the same on a re-run
        return lambda r: ChatRequest([], mode=mode, session_id=f"{tag}-{kind}-{r['id']}",
                                     max_tokens=max_tokens, seed=stable_int(f"{tag}|{r['id']}") % 2**31,
                                     **extra)

    return (run_requests(service, rows, make("plain"), f"{tag} without"),
            run_requests(service, rows, make("variant", **variant), f"{tag} with {', '.join(variant)}"))


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from forge.routing.timing import summary

    lat = np.array([r["latency_ms"] for r in records])
    tps = [r["tps"] for r in records if r["tps"]]
    return {
        "n": len(records),
        "accuracy": float(np.mean([r["correct"] for r in records])),
        "by_domain": {
            d: float(np.mean([r["correct"] for r in records if r["domain"] == d]))
            for d in sorted({r["domain"] for r in records})
        },
        "latency_ms": summary(lat),
        "ttft_ms": summary(np.array([r["ttft_ms"] for r in records])),
        "tokens_per_s_p50": float(np.median(tps)) if tps else 0.0,
        "options": dict(Counter(r["option"] for r in records)),
    }


# measured durations: in metrics and the manifest's info, never in a file (a recomputed phase writes the same
# bytes, the recovery drill checks it)
TIMING_KEYS = frozenset({"latency_ms", "ttft_ms", "tokens_per_s_p50", "latency_ratio", "added_latency_ms"})


def split_timing(obj: Any) -> tuple[Any, Any]:
    """(obj without timing keys, the timing keys alone), recursively through dicts."""
    if not isinstance(obj, dict):
        return obj, None
    kept, timing = {}, {}
    for k, v in obj.items():
        if k in TIMING_KEYS:
            timing[k] = v
            continue
        kept[k], t = split_timing(v)
        if t:
            timing[k] = t
    return kept, timing


def write_json(path: Path, obj: Any) -> dict[str, Any]:
    """The report without its timings; returns the timings (for the manifest's info)."""
    kept, timing = split_timing(obj)
    path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    return timing or {}


def bar_plot(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    keys = sorted({k for g in groups.values() for k in g})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * width, [groups[n].get(k, 0) for k in keys], width, label=n)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, keys)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- 8B ------------------------------------------------------------------------------------------


def api_check(ctx: JobContext) -> JobResult:
    import secrets

    import httpx
    from openai import OpenAI

    from forge.serve.api import create_app
    from forge.serve.server import BackgroundServer

    service = eval_service(ctx)
    key = secrets.token_urlsafe(24)  # this check's own key; never written anywhere
    name, sc = service.engine.release.name, ctx.config.serving
    checks: list[dict[str, Any]] = []

    def check(what: str, ok: bool, detail: str = "") -> None:
        checks.append({"check": what, "ok": bool(ok), "detail": detail})
        log.info("8B: %s %s %s", "ok  " if ok else "FAIL", what, detail)

    try:
        with BackgroundServer(create_app(service, sc, [key])) as srv:
            client = OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=120)
            ids = [m.id for m in client.models.list().data]
            check(
                "models list the routed model and every option",
                ids[0] == name and {f"{name}:{o}" for o in service.options} <= set(ids),
                str(ids),
            )
            msgs = [{"role": "user", "content": "What is 2 + 2?"}]
            t = time.perf_counter()
            whole = client.chat.completions.create(
                model=name, messages=msgs, max_tokens=16, extra_body={"mode": "fast"}
            )
            chat_ms = (time.perf_counter() - t) * 1000
            check(
                "chat completion",
                whole.choices[0].message.content is not None
                and whole.model_extra["forge"]["routing"]["option"] == BASE,
            )
            chunks = list(
                client.chat.completions.create(
                    model=name, messages=msgs, max_tokens=16, stream=True, extra_body={"mode": "fast"}
                )
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            check(
                "streaming equals the whole answer (greedy)",
                streamed == whole.choices[0].message.content,
                f"{len(chunks)} chunks",
            )
            for mode in ("fast", "accurate", "auto"):
                r = client.chat.completions.create(
                    model=name, messages=msgs, max_tokens=8, extra_body={"mode": mode}
                )
                f = r.model_extra["forge"]
                check(
                    f"mode {mode}: routing field",
                    f["mode"] == mode and f["routing"]["option"] in service.options,
                    f["routing"]["option"],
                )
            bad = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer wrong"})
            check("a wrong key is refused (401)", bad.status_code == 401)
            big = httpx.post(
                f"{srv.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                content=b"x" * (sc.max_request_bytes + 1),
            )
            check("an oversized body is refused (413)", big.status_code == 413)
            broken = httpx.post(
                f"{srv.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                content=b"{not json",
            )
            check(
                "malformed JSON is refused (400)",
                broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json",
            )
            spec = httpx.get(f"{srv.url}/openapi.json").json()
            write_json(ctx.out_dir / "openapi.json", spec)
    finally:
        service.close()
    write_json(
        ctx.out_dir / "api_report.json", {"checks": checks, "release": name, "options": service.options}
    )
    failed = [c["check"] for c in checks if not c["ok"]]
    if failed:
        raise RuntimeError(f"8B: the API failed {len(failed)} contract check(s): {failed} (api_report.json)")
    return JobResult(
        metrics={"api_checks_passed": float(len(checks)), "chat_latency_ms": chat_ms},
        notes=f"{len(checks)} contract checks passed on {name} ({len(service.options)} options); "
        f"a fast 16-token chat took {chat_ms:.0f} ms",
        info={"openapi": "openapi.json", "checks": len(checks)},
    )


# ---- 8C ------------------------------------------------------------------------------------------


def chat_check(ctx: JobContext) -> JobResult:
    import httpx
    from fastapi import FastAPI

    from forge.serve.chat_ui import mount_chat
    from forge.serve.server import BackgroundServer
    from forge.serve.service import ChatRequest

    service = eval_service(ctx)
    try:
        app = mount_chat(FastAPI(), service)
        with BackgroundServer(app) as srv:
            page = httpx.get(f"{srv.url}/chat/", follow_redirects=True, timeout=60)
            if page.status_code != 200 or "gradio" not in page.text.lower():
                raise RuntimeError(
                    f"8C: GET /chat/ answered {page.status_code}: the Gradio app is not served"
                )
        events = list(
            service.stream(
                ChatRequest(
                    [{"role": "user", "content": "Hello, who are you?"}], max_tokens=24, session_id="8c-check"
                )
            )
        )
        deltas = [e for e in events if e["type"] == "delta"]
        result = events[-1]["result"]
        # the raw part files the rating went into (a release without a router logs no decision, so 13A's
        # validated read would drop the rating as unreferenced: what is checked here is that it landed)
        written = service.rate("8c-check", result.request_id, -1, "8C check")
        landed = [e for uri in written for line in service.feedback.store.read_text(uri).splitlines()
                  if (e := json.loads(line))["kind"] == "rating" and e["request_id"] == result.request_id]
        if not landed:
            raise RuntimeError("8C: the rating did not land in the feedback store")
    finally:
        service.close()
    write_json(
        ctx.out_dir / "chat_report.json",
        {
            # tokens, not pieces: how many pieces carry them depends on timing (serving.stream_interval_ms),
            # and a recomputed phase writes the same bytes
            "streamed_tokens": result.usage.completion_tokens,
            "route": {k: v for k, v in result.route.as_dict().items() if k != "router_ms"},
            "rating_landed": True,
        },
    )
    return JobResult(
        metrics={"chat_streamed_pieces": float(len(deltas)), "chat_latency_ms": result.latency_ms},
        notes=f"/chat serves the Gradio app; one turn streamed in {len(deltas)} pieces via "
        f"{result.route.option}; a thumbs-down landed in the feedback store",
    )


# ---- 8D ------------------------------------------------------------------------------------------


def monitoring(ctx: JobContext) -> JobResult:
    import secrets
    import shutil

    import httpx

    from forge.serve.api import create_app
    from forge.serve.monitoring import dashboard_metric_names, family, rule_metric_names
    from forge.serve.server import BackgroundServer
    from forge.serve.service import ChatRequest

    service = eval_service(ctx)
    try:
        for mode in ("fast", "accurate", "auto"):
            service.complete(ChatRequest([{"role": "user", "content": "Say hi."}], mode=mode, max_tokens=8))
        with BackgroundServer(create_app(service, ctx.config.serving, [secrets.token_urlsafe(16)])) as srv:
            text = httpx.get(f"{srv.url}/metrics").text  # /metrics needs no key (Prometheus scrapes it)
    finally:
        service.close()
    exposed = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    if not DOCKER_DIR.is_dir():
        raise PhaseSkipped(
            f"no docker/ folder beside the forge package ({DOCKER_DIR}): the dashboard and "
            "Prometheus files ship with the repository"
        )
    dashboard = DOCKER_DIR / "grafana" / "dashboards" / "forge-serving.json"
    wanted = dashboard_metric_names(dashboard) | rule_metric_names(DOCKER_DIR / "prometheus" / "alerts.yml")
    # a labelled series with no traffic yet (say, no errors) has its family's TYPE line but no sample
    missing = sorted(
        n for n in wanted if n not in exposed and n not in families and family(n) not in families
    )
    for sub in ("prometheus", "grafana"):
        shutil.copytree(DOCKER_DIR / sub, ctx.out_dir / sub)
    write_json(
        ctx.out_dir / "monitoring_report.json",
        {"series_queried": sorted(wanted), "missing": missing, "families_exposed": sorted(families)},
    )
    if missing:
        raise RuntimeError(f"8D: the dashboard/alerts query series the server does not expose: {missing}")
    return JobResult(
        metrics={"metric_families": float(len(families)), "series_queried": float(len(wanted))},
        notes=f"/metrics exposes {len(families)} families; all {len(wanted)} series the Grafana "
        "dashboard and alert rules query are there",
    )


# ---- 10A -----------------------------------------------------------------------------------------


def modes_eval(ctx: JobContext) -> JobResult:
    from forge.serve.service import ChatRequest

    cfg = ctx.config
    domains = list(dict.fromkeys([*cfg.domains, *cfg.modifiers.enabled]))
    rows = eval_rows(ctx, domains, cfg.serving.modes_eval_rows)
    service = eval_service(ctx)
    report: dict[str, Any] = {"domains": domains, "rows": len(rows), "modes": {}}
    try:
        for mode in ("fast", "accurate", "auto"):
            recs = run_requests(
                service,
                rows,
                lambda r, m=mode: ChatRequest(
                    [], mode=m, session_id=f"10a-{m}-{r['id']}", max_tokens=cfg.eval.max_new_tokens
                ),
                f"10A {mode}",
            )
            report["modes"][mode] = summarize(recs)
    finally:
        service.close()
    m = report["modes"]
    timing = write_json(ctx.out_dir / "modes_report.json", report)
    plot = bar_plot(
        ctx.out_dir / "modes_accuracy.png",
        "10A: accuracy per domain and mode",
        {mode: m[mode]["by_domain"] for mode in m},
        "accuracy (suite checks)",
    )
    ctx.log_artifact(plot)
    metrics = {
        f"{mode}_{k}": v
        for mode in m
        for k, v in (
            ("accuracy", m[mode]["accuracy"]),
            ("latency_p50_ms", m[mode]["latency_ms"]["p50"]),
            ("ttft_p50_ms", m[mode]["ttft_ms"]["p50"]),
            ("tokens_per_s", m[mode]["tokens_per_s_p50"]),
        )
    }
    quality = {f"acc_{mode}": m[mode]["accuracy"] for mode in m}
    notes = "; ".join(
        f"{mode} acc {m[mode]['accuracy']:.3f}, p50 {m[mode]['latency_ms']['p50']:.0f} ms, "
        f"{m[mode]['tokens_per_s_p50']:.0f} tok/s"
        for mode in m
    )
    return JobResult(
        metrics=metrics,
        quality=quality,
        notes=f"{len(rows)} held-out rows: {notes}",
        info={"report": "modes_report.json", "timing": timing},
    )


# ---- 11A -----------------------------------------------------------------------------------------


def self_consistency_eval(ctx: JobContext) -> JobResult:

    sc, cfg = ctx.config.serving.self_consistency, ctx.config
    rows = eval_rows(ctx, sc.eval_domains, sc.eval_rows)
    service = eval_service(ctx)
    try:
        greedy, voted = paired_runs(service, rows, "11A", "accurate", cfg.eval.max_new_tokens,
                                    self_consistency=sc.samples)
    finally:
        service.close()
    g, v = summarize(greedy), summarize(voted)
    agreement = float(np.mean([r["extras"]["self_consistency"]["agreement"] for r in voted]))
    gain = v["accuracy"] - g["accuracy"]
    cost = v["latency_ms"]["mean"] / max(g["latency_ms"]["mean"], 1e-9)
    lo, hi = paired_ci([r["correct"] for r in voted], [r["correct"] for r in greedy], cfg.data.seed)
    report = {
        "samples": sc.samples,
        "temperature": sc.temperature,
        "domains": sc.eval_domains,
        "greedy": g,
        "self_consistency": v,
        "gain": gain,
        "gain_ci95": [lo, hi],
        "latency_ratio": cost,
        "mean_agreement": agreement,
    }
    timing = write_json(ctx.out_dir / "self_consistency_report.json", report)
    ctx.log_artifact(
        bar_plot(
            ctx.out_dir / "self_consistency.png",
            f"11A: greedy vs {sc.samples}-path vote",
            {"greedy": g["by_domain"], f"vote x{sc.samples}": v["by_domain"]},
            "accuracy",
        )
    )
    return JobResult(
        metrics={
            "acc_greedy": g["accuracy"],
            "acc_vote": v["accuracy"],
            "gain": gain,
            "latency_ratio": cost,
            "mean_agreement": agreement,
        },
        quality={"acc_greedy": g["accuracy"], "acc_vote": v["accuracy"], "gain": gain},
        notes=f"{len(rows)} hard held-out rows: greedy {g['accuracy']:.3f} -> {sc.samples}-path vote "
        f"{v['accuracy']:.3f} (gain {gain:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]) at "
        f"{cost:.2f}x the latency",
        info={"report": "self_consistency_report.json", "timing": timing},
    )


def paired_ci(a: Sequence[float], b: Sequence[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b) over paired rows."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---- 12B -----------------------------------------------------------------------------------------


def critique_eval(ctx: JobContext) -> JobResult:

    cc, cfg = ctx.config.serving.critique, ctx.config
    service = eval_service(ctx)
    try:
        if service.critic is None:
            raise PhaseSkipped("the release has no critic (12A was skipped or failed)")
        rows = eval_rows(ctx, cc.eval_domains, cc.eval_rows)
        plain, critiqued = paired_runs(service, rows, "12B", "auto", cfg.eval.max_new_tokens, critique=True)
    finally:
        service.close()
    p, c = summarize(plain), summarize(critiqued)
    err_before, err_after = 1 - p["accuracy"], 1 - c["accuracy"]
    reduction = (err_before - err_after) / err_before if err_before > 0 else 0.0
    regenerated = sum(bool(r["extras"]["critique"].get("regenerations")) for r in critiqued)
    added_ms = c["latency_ms"]["mean"] - p["latency_ms"]["mean"]
    lo, hi = paired_ci([r["correct"] for r in critiqued], [r["correct"] for r in plain], cfg.data.seed)
    report = {
        "threshold": cc.threshold,
        "domains": cc.eval_domains,
        "plain": p,
        "critiqued": c,
        "error_before": err_before,
        "error_after": err_after,
        "relative_error_reduction": reduction,
        "accuracy_change_ci95": [lo, hi],
        "regenerated": regenerated,
        "added_latency_ms": added_ms,
        "first_scores": [r["extras"]["critique"].get("first_score") for r in critiqued],
    }
    timing = write_json(ctx.out_dir / "critique_report.json", report)
    return JobResult(
        metrics={
            "error_before": err_before,
            "error_after": err_after,
            "error_reduction": reduction,
            "regenerated": float(regenerated),
            "added_latency_ms": added_ms,
        },
        quality={"error_before": err_before, "error_after": err_after, "error_reduction": reduction},
        notes=f"{len(rows)} rows: error {err_before:.3f} -> {err_after:.3f} (relative reduction "
        f"{reduction:+.1%}, accuracy change 95% CI [{lo:+.3f}, {hi:+.3f}]); {regenerated} answers "
        f"regenerated below {cc.threshold:g}; +{added_ms:.0f} ms mean latency",
        info={"report": "critique_report.json", "timing": timing},
    )
