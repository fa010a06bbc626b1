"""Thresholds (6C, and the curve of 6A): replay routing decisions offline, choose, and split traffic online.

The replay takes a router's calibrated probabilities for queries whose every option was already run (6A's
routing table): for a threshold t each query goes where `forge.routing.router.decide` sends it, and the
table says whether that option answered correctly, its reference log-prob, and how many tokens it generated.
So a threshold's quality, modifier share and latency are measured, not estimated from a model of them.

The objective that picks the threshold is stated in config: maximise accuracy - share_penalty x modifier share
(a modifier call has to buy `share_penalty` points of accuracy per 100% of traffic); ties go to the higher
threshold. 6C chooses on the val split and reports the test split.

Online, serving can A/B thresholds: a session's arm is a stable hash of its id into the configured weights,
so every request of a session sees the same arm, and the arm is logged with each decision
(forge.routing.feedback).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forge.data.records import stable_unit
from forge.routing.router import best_modifier, decide


def sweep(step: float) -> list[float]:
    n = int(round(1.0 / step))
    return [round(i * step, 6) for i in range(n + 1)]


def policy_point(choice: np.ndarray, correct: np.ndarray, logprob: np.ndarray,
                 latency_ms: np.ndarray | None = None) -> dict[str, float]:
    """What routing each query to `choice` (option index per row) gives."""
    rows = np.arange(len(choice))
    point = {"acc": float(correct[rows, choice].mean()), "logprob": float(logprob[rows, choice].mean()),
             "share": float((choice != 0).mean()), "n": float(len(choice))}
    if latency_ms is not None:
        lat = latency_ms[rows, choice]
        point.update(latency_ms_mean=float(lat.mean()), latency_ms_p95=float(np.percentile(lat, 95)))
    return point


def replay(probs: np.ndarray, correct: np.ndarray, logprob: np.ndarray, thresholds: Sequence[float],
           latency_ms: np.ndarray | None = None) -> list[dict[str, float]]:
    """One point per threshold: acc, logprob, share (of queries sent to a modifier), latency."""
    return [{"threshold": float(t), **policy_point(decide(probs, t), correct, logprob, latency_ms)}
            for t in thresholds]


def reference_points(correct: np.ndarray, logprob: np.ndarray, labels: np.ndarray, domain_choice: np.ndarray,
                     latency_ms: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Policies to read a router against: the base alone, route by the domain tag, a perfect router (its
    labels), and the oracle (any option right counts)."""
    n = len(labels)
    oracle = {"acc": float(correct.any(axis=1).mean()), "share": float("nan"), "n": float(n)}
    return {"always_base": policy_point(np.zeros(n, np.int64), correct, logprob, latency_ms),
            "domain_tag": policy_point(domain_choice, correct, logprob, latency_ms),
            "perfect_router": policy_point(labels, correct, logprob, latency_ms),
            "oracle": oracle}


def threshold_for_share(probs: np.ndarray, share: float) -> float:
    """The threshold at which about `share` of these queries go to a modifier (RouteLLM's calibration)."""
    _, conf = best_modifier(probs)
    ordered = np.sort(conf)[::-1]
    k = int(round(share * len(ordered)))
    if k <= 0:
        return float(np.nextafter(ordered[0], np.inf)) if ordered[0] < 1.0 else 1.0
    return float(ordered[min(k, len(ordered)) - 1])


def objective(point: Mapping[str, float], share_penalty: float) -> float:
    return float(point["acc"] - share_penalty * point["share"])


def choose(points: Sequence[Mapping[str, float]], share_penalty: float) -> dict[str, Any]:
    """The point with the best objective; ties to the higher threshold."""
    best = max(points, key=lambda p: (round(objective(p, share_penalty), 12), p["threshold"]))
    return {**best, "objective": objective(best, share_penalty)}


def choose_threshold(probs: np.ndarray, correct: np.ndarray, logprob: np.ndarray, step: float,
                     share_penalty: float, extra: Sequence[float] = (),
                     latency_ms: np.ndarray | None = None) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Replay the sweep (+ extra thresholds) on these queries and choose by the objective:
    (the chosen point with its objective, every point)."""
    grid = sorted({*sweep(step), *(float(t) for t in extra)})
    points = replay(probs, correct, logprob, grid, latency_ms)
    return choose(points, share_penalty), points


def resolve_arms(arms: Sequence[Any], chosen: float) -> list[dict[str, Any]]:
    """The A/B arms serving splits sessions into (an arm without a threshold gets the chosen one); none
    configured = a single arm, the chosen threshold."""
    if not arms:
        return [{"name": "chosen", "threshold": chosen, "weight": 1.0}]
    return [{"name": a.name, "threshold": chosen if a.threshold is None else a.threshold, "weight": a.weight}
            for a in arms]


# ---- online A/B -------------------------------------------------------------------------------------

def ab_arm(session_id: str, arms: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The arm of a session: a stable hash of its id into the arms' cumulative weights."""
    if not arms:
        raise ValueError("ab_arm: no arms")
    u = stable_unit(f"forge-ab|{session_id}")
    total = sum(float(a["weight"]) for a in arms)
    edge = 0.0
    for arm in arms:
        edge += float(arm["weight"]) / total
        if u < edge:
            return arm
    return arms[-1]


# ---- plot -------------------------------------------------------------------------------------------

def plot_cost_quality(curve: Sequence[Mapping[str, float]], refs: Mapping[str, Mapping[str, float]],
                      marks: Mapping[str, Mapping[str, float]], path: Path, title: str) -> Path:
    """Accuracy vs share of queries sent to a modifier (RouteLLM's quality-vs-cost curve), with the reference
    policies and the marked thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = sorted(curve, key=lambda p: p["share"])
    ax.plot([p["share"] for p in pts], [p["acc"] for p in pts], "-", color="tab:blue", label="router (sweep)")
    for name, ref in refs.items():
        if np.isfinite(ref.get("share", np.nan)):
            ax.scatter([ref["share"]], [ref["acc"]], marker="s", label=f"{name} ({ref['acc']:.3f})")
        else:
            ax.axhline(ref["acc"], linestyle=":", color="grey", label=f"{name} ({ref['acc']:.3f})")
    for name, p in marks.items():
        ax.scatter([p["share"]], [p["acc"]], marker="*", s=140, zorder=5,
                   label=f"{name}: t={p['threshold']:.2f} (acc {p['acc']:.3f}, share {p['share']:.2f})")
    ax.set(xlabel="share of queries sent to a modifier (cost)", ylabel="accuracy of the routed answer",
           xlim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
