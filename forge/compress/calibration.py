"""2F: confidence calibration of the served compressed base (2C's GGUF + 2E's recovery LoRA, llama.cpp).

The router needs the probability that an answer is right. The served model's raw confidence in its
own greedy answer is exp(mean token log-prob of that answer + end-of-turn). On the calib split
(checkable rows no phase trains on) every answer is checked by the task suites; one deterministic
part of the rows fits two classic calibrators, the rest measures them:
- temperature scaling: one T dividing the logits, the grid point with the lowest log loss;
- Platt scaling: sigmoid(a * mean_logprob + b), a logistic regression fitted by Newton's method.
ECE (equal-width bins) and Brier before/after go to the ledger; calibration.json is what the router
applies (through `apply_calibration`); bundle.json describes the shippable compressed base (GGUF +
adapter + calibration, with sha256s and the 1A lineage), which the runner registers in MLflow.

Read top to bottom: 1. features  2. split  3. temperature scaling  4. Platt scaling  5. ECE / Brier
6. reliability diagram  7. calibration.json + apply_calibration  8. the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forge.artifacts import sha256_file
from forge.compress.calibration_config import CalibrationConfig
from forge.config import EvalConfig
from forge.data.records import DataError, prompt_messages, read_jsonl, stable_unit, write_jsonl

if TYPE_CHECKING:
    from forge.evaluate.harness import Backend
    from forge.runner import InputFile, JobContext, JobResult

log = logging.getLogger("forge.compress")

FORMAT = "forge-calibration/v1"
FEATURE = "mean token log-prob of the model's greedy answer followed by end-of-turn"
EPS = 1e-12  # confidences are clipped to [EPS, 1 - EPS] inside log losses


class CalibrationError(ValueError):
    """Calibration cannot be fitted or measured as configured; the message names the field to change."""


# ---- 1. features -----------------------------------------------------------------------------

def temperature_grid(cfg: CalibrationConfig) -> np.ndarray:
    """cfg.t_points log-spaced temperatures from t_min to t_max, always holding T=1 exactly (the raw
    confidence is read there): a grid point within 1e-9 of 1 is snapped to it, else 1 is added."""
    grid = np.geomspace(cfg.t_min, cfg.t_max, cfg.t_points)
    near = np.isclose(grid, 1.0, rtol=1e-9, atol=0.0)
    if near.any():
        grid[np.argmax(near)] = 1.0
    else:
        grid = np.sort(np.append(grid, 1.0))
    return grid


@dataclass
class Features:
    """Per calib row: the served model's greedy answer, its check, its mean log-prob at every temperature."""

    ids: list[str]
    domains: list[str]
    outputs: list[str]
    details: list[str]
    correct: np.ndarray  # bool [n]
    temperatures: np.ndarray  # [k], holds 1.0
    logprob_at: np.ndarray  # [n, k]: mean token log-prob of outputs[i] with the logits divided by T_j

    @property
    def t1(self) -> int:
        return int(np.flatnonzero(self.temperatures == 1.0)[0])

    @property
    def logprob(self) -> np.ndarray:
        """The Platt feature and the raw confidence's log: mean token log-prob at T=1."""
        return self.logprob_at[:, self.t1]

    def subset(self, mask: np.ndarray) -> Features:
        pick = np.flatnonzero(mask)
        return Features([self.ids[i] for i in pick], [self.domains[i] for i in pick],
                        [self.outputs[i] for i in pick], [self.details[i] for i in pick],
                        self.correct[pick], self.temperatures, self.logprob_at[pick])


def confidence(mean_logprob: np.ndarray) -> np.ndarray:
    """exp(mean token log-prob): the geometric-mean token probability, in [0, 1]."""
    return np.minimum(np.exp(mean_logprob), 1.0)  # a float round-off may put a log-prob a hair above 0


def compute_features(backend: Backend, rows: Sequence[dict[str, Any]],
                     build_prompt: Callable[[list[dict]], str], temperatures: np.ndarray,
                     eval_cfg: EvalConfig) -> Features:
    """Greedy answers (backend.generate), suite checks, and one teacher-forced pass per batch scoring each
    answer at every temperature (backend.answer_logprobs_at). Only the Backend protocol is used."""
    from forge.data.suites import check_answer

    if 1.0 not in temperatures:
        raise ValueError(f"the temperature grid must hold T=1 (raw confidence), got {list(temperatures)}")
    temps = [float(t) for t in temperatures]
    outputs: list[str] = []
    details: list[str] = []
    correct: list[bool] = []
    logprob_at: list[list[float]] = []
    started = time.time()
    name = type(backend).__name__
    for start in range(0, len(rows), eval_cfg.batch_size):
        batch = rows[start:start + eval_cfg.batch_size]
        prompts = [build_prompt(prompt_messages(r)) for r in batch]
        outs = backend.generate(prompts)
        lps = backend.answer_logprobs_at(prompts, outs, temps)
        if len(outs) != len(batch) or len(lps) != len(batch) or any(len(r) != len(temps) for r in lps):
            raise RuntimeError(f"backend {name} returned {len(outs)} outputs and {len(lps)} log-prob rows "
                               f"for {len(batch)} prompts x {len(temps)} temperatures")
        for row, out, lp in zip(batch, outs, lps, strict=True):
            if not all(math.isfinite(v) for v in lp):
                raise RuntimeError(f"backend {name} gave a non-finite log-prob for row {row['id']!r}: {lp}")
            check = check_answer(row, out, eval_cfg.code_timeout_s)
            outputs.append(out)
            details.append(check.detail)
            correct.append(bool(check.correct))
            logprob_at.append([float(v) for v in lp])
        log.info("calibration features: %d/%d rows, acc so far %.3f, %.1f rows/s", len(outputs), len(rows),
                 sum(correct) / len(correct), len(outputs) / max(time.time() - started, 1e-9))
    return Features([r["id"] for r in rows], [r["domain"] for r in rows], outputs, details,
                    np.array(correct, dtype=bool), np.asarray(temperatures, dtype=float),
                    np.array(logprob_at, dtype=float).reshape(len(rows), len(temps)))


# ---- 2. split --------------------------------------------------------------------------------

def split_unit(row_id: str, seed: int) -> float:
    """A stable uniform number in [0, 1) from the row id: the same row lands on the same side every run."""
    return stable_unit(f"forge-calibration|{seed}|{row_id}")


def fit_mask(ids: Sequence[str], cfg: CalibrationConfig) -> np.ndarray:
    """True = fit split, False = held-out split; about cfg.fit_fraction of the rows fit."""
    return np.array([split_unit(i, cfg.seed) < cfg.fit_fraction for i in ids], dtype=bool)


def check_split_sizes(n_fit: int, n_heldout: int, cfg: CalibrationConfig) -> None:
    for split, n in (("fit", n_fit), ("held-out", n_heldout)):
        if n < cfg.min_split_rows:
            raise CalibrationError(
                f"2F: the {split} split has {n} rows, below calibration.min_split_rows={cfg.min_split_rows} "
                f"({n_fit + n_heldout} calib rows cut by calibration.fit_fraction={cfg.fit_fraction}); raise "
                f"data.suites.calib, adjust calibration.fit_fraction or lower calibration.min_split_rows")


# ---- 3. temperature scaling ------------------------------------------------------------------

def log_loss(conf: np.ndarray, correct: np.ndarray) -> float:
    """Mean binary negative log-likelihood of `correct` under the confidences."""
    p = np.clip(conf, EPS, 1 - EPS)
    return float(-np.mean(np.where(correct, np.log(p), np.log1p(-p))))


@dataclass
class TemperatureFit:
    temperature: float
    index: int  # into the grid
    nll: np.ndarray  # log loss at every grid temperature
    at_edge: bool  # the optimum may lie outside [t_min, t_max]


def fit_temperature(logprob_at: np.ndarray, temperatures: np.ndarray, correct: np.ndarray) -> TemperatureFit:
    """The grid temperature whose confidences exp(mean log-prob at T) have the lowest log loss."""
    nll = np.array([log_loss(confidence(logprob_at[:, j]), correct) for j in range(len(temperatures))])
    j = int(np.argmin(nll))
    return TemperatureFit(float(temperatures[j]), j, nll, j in (0, len(temperatures) - 1))


# ---- 4. Platt scaling ------------------------------------------------------------------------

def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))  # no overflow for large |z|


@dataclass
class PlattFit:
    a: float  # slope on the mean log-prob at T=1
    b: float  # intercept
    degenerate: bool  # one class only in the fit split: a = 0, b = logit(smoothed base rate)
    iterations: int


def fit_platt(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int = 100) -> PlattFit:
    """Logistic regression of y on x by Newton's method with step halving; `l2` penalises the slope
    only (sum-of-losses scale), so a perfectly separable fit split still gives finite coefficients.
    With one class only there is nothing to separate: the fit is the base rate, smoothed to
    (k + 0.5) / (n + 1) so that it stays strictly inside (0, 1)."""
    y = y.astype(float)
    n, k = len(y), float(y.sum())
    if k in (0.0, float(n)):
        rate = (k + 0.5) / (n + 1)
        return PlattFit(0.0, math.log(rate / (1 - rate)), True, 0)
    X = np.stack([x, np.ones_like(x)], axis=1)
    penalty = np.array([l2, 0.0])

    def loss(w: np.ndarray) -> float:
        z = X @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w[0] ** 2)

    w = np.array([0.0, math.log(k / (n - k))])  # start at the base rate
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + penalty * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + np.diag(penalty) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t, current = 1.0, loss(w)
        while loss(w - t * step) > current and t > 1e-10:
            t /= 2
        w = w - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return PlattFit(float(w[0]), float(w[1]), False, iterations)


def platt_confidence(fit: PlattFit | Mapping[str, float], mean_logprob: np.ndarray) -> np.ndarray:
    a, b = (fit.a, fit.b) if isinstance(fit, PlattFit) else (fit["a"], fit["b"])
    return sigmoid(a * np.asarray(mean_logprob, dtype=float) + b)


# ---- 5. ECE / Brier --------------------------------------------------------------------------

def bin_stats(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1] (the last one closed): count, mean confidence, accuracy per bin."""
    idx = np.minimum((np.asarray(conf) * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        members = idx == b
        count = int(members.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count,
                    "confidence": float(conf[members].mean()) if count else float("nan"),
                    "accuracy": float(correct[members].mean()) if count else float("nan")})
    return out


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Expected calibration error: sum over bins of (bin share) x |bin accuracy - bin mean confidence|."""
    n = len(conf)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in bin_stats(conf, correct, n_bins) if b["count"]))


def brier(conf: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean((np.asarray(conf, dtype=float) - correct.astype(float)) ** 2))


# ---- 6. reliability diagram ------------------------------------------------------------------

def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int, path: Path,
                     title: str) -> Path:
    """Top: bin accuracy vs bin mean confidence per curve (the diagonal is perfect calibration).
    Bottom: how many rows each curve puts in each confidence bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    width = 1.0 / n_bins / (len(curves) + 1)
    for i, (name, (conf, correct)) in enumerate(curves.items()):
        bins = [b for b in bin_stats(conf, correct, n_bins) if b["count"]]
        top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                 label=f"{name} (ECE {ece(conf, correct, n_bins):.3f}, Brier {brier(conf, correct):.3f})")
        counts = [b["count"] for b in bin_stats(conf, correct, n_bins)]
        bottom.bar([b / n_bins + (i + 0.5) * width for b in range(n_bins)], counts, width=width, label=name)
    top.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence", ylabel="rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- 7. calibration.json + apply_calibration -------------------------------------------------

@dataclass
class Calibration:
    """Both fits, and every row's confidence before / after, on the whole calib split."""

    features: Features
    fit: np.ndarray  # bool mask of the fit split
    temperature: TemperatureFit
    platt: PlattFit
    conf_raw: np.ndarray
    conf_temperature: np.ndarray
    conf_platt: np.ndarray
    metrics: dict[str, float]  # held-out ECE / Brier per curve
    warnings: list[str] = field(default_factory=list)


def calibrate(features: Features, cfg: CalibrationConfig) -> Calibration:
    """Split, fit both calibrators on the fit rows, measure raw / temperature / Platt on the held-out rows."""
    fit = fit_mask(features.ids, cfg)
    check_split_sizes(int(fit.sum()), int((~fit).sum()), cfg)
    y_fit, warnings = features.correct[fit], []
    temp = fit_temperature(features.logprob_at[fit], features.temperatures, y_fit)
    platt = fit_platt(features.logprob[fit], y_fit, cfg.platt_l2)
    if platt.degenerate:
        warnings.append(f"fit split is all {'correct' if y_fit.all() else 'wrong'} ({len(y_fit)} rows): "
                        f"Platt reduces to the smoothed base rate {sigmoid(platt.b):.3f} for every answer")
    if temp.at_edge:
        warnings.append(f"best temperature {temp.temperature:.3g} is at the edge of the grid "
                        f"[calibration.t_min={cfg.t_min}, calibration.t_max={cfg.t_max}]: widen it")
    conf_raw = confidence(features.logprob)
    conf_temp = confidence(features.logprob_at[:, temp.index])
    conf_platt = platt_confidence(platt, features.logprob)
    held, y = ~fit, features.correct[~fit]
    metrics: dict[str, float] = {}
    for name, conf in (("raw", conf_raw), ("temperature", conf_temp), ("platt", conf_platt)):
        metrics[f"ece_{name}"] = ece(conf[held], y, cfg.n_bins)
        metrics[f"brier_{name}"] = brier(conf[held], y)
        metrics[f"nll_{name}"] = log_loss(conf[held], y)
    for w in warnings:
        log.warning("2F: %s", w)
    return Calibration(features, fit, temp, platt, conf_raw, conf_temp, conf_platt, metrics, warnings)


def calibration_params(cal: Calibration, cfg: CalibrationConfig) -> dict[str, Any]:
    """calibration.json: everything the router needs to apply the chosen method, and how it was measured."""
    m, held = cal.metrics, ~cal.fit
    return {
        "format": FORMAT,
        "method": cfg.method,
        "temperature": cal.temperature.temperature,
        "platt": {"a": cal.platt.a, "b": cal.platt.b, "degenerate": cal.platt.degenerate,
                  "iterations": cal.platt.iterations, "l2": cfg.platt_l2},
        "feature": {
            "definition": FEATURE,
            "platt": f"{FEATURE} at T=1; probability = sigmoid(a * feature + b)",
            "temperature": f"{FEATURE} with the logits divided by `temperature`; probability = exp(feature)",
            "raw": f"exp({FEATURE} at T=1)",
        },
        "metrics": {
            "split": "held-out",
            "ece_before": m["ece_raw"], "ece_after": m[f"ece_{cfg.method}"],
            "brier_before": m["brier_raw"], "brier_after": m[f"brier_{cfg.method}"],
            **m,
        },
        "n": {"rows": len(cal.features.ids), "fit": int(cal.fit.sum()), "heldout": int(held.sum()),
              "correct": int(cal.features.correct.sum()),
              "correct_fit": int(cal.features.correct[cal.fit].sum()),
              "correct_heldout": int(cal.features.correct[held].sum())},
        "n_bins": cfg.n_bins,
        "bins_heldout": {name: bin_stats(conf[held], cal.features.correct[held], cfg.n_bins)
                         for name, conf in (("raw", cal.conf_raw), ("temperature", cal.conf_temperature),
                                            ("platt", cal.conf_platt))},
        "temperature_search": {"grid": [float(t) for t in cal.features.temperatures],
                               "fit_nll": [float(v) for v in cal.temperature.nll]},
        "config": cfg.model_dump(mode="json"),
        "warnings": cal.warnings,
    }


def apply_calibration(params: Mapping[str, Any], mean_logprob: float) -> float:
    """The calibrated probability that an answer is correct, for the router.

    `mean_logprob` is the answer's mean token log-prob (followed by end-of-turn), read as the
    method in `params` (a loaded calibration.json) defines it: for "platt" at T=1, for
    "temperature" with the logits divided by params["temperature"] (llama.cpp / HF backends give it
    through answer_logprobs_at)."""
    method = params.get("method")
    if not math.isfinite(mean_logprob):
        raise ValueError(f"apply_calibration: mean_logprob must be finite, got {mean_logprob}")
    if method == "platt":
        return float(sigmoid(params["platt"]["a"] * mean_logprob + params["platt"]["b"]))
    if method == "temperature":
        return min(1.0, math.exp(mean_logprob))
    raise ValueError(f"calibration.json: unknown method {method!r} (expected 'platt' or 'temperature')")


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read calibration.json and check the fields apply_calibration relies on."""
    params = json.loads(Path(path).read_text())
    if params.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {params.get('format')!r}, expected {FORMAT!r}")
    for key in ("method", "temperature", "platt"):
        if key not in params:
            raise ValueError(f"{path}: missing field {key!r}")
    for key in ("a", "b"):
        if not isinstance(params["platt"].get(key), int | float):
            raise ValueError(f"{path}: platt.{key} must be a number")
    return params


def feature_records(cal: Calibration) -> list[dict[str, Any]]:
    """calibration_features.jsonl: one line per calib row, enough to refit or audit the calibration."""
    f, j = cal.features, cal.temperature.index
    return [{"id": f.ids[i], "domain": f.domains[i], "split": "fit" if cal.fit[i] else "heldout",
             "output": f.outputs[i], "correct": bool(f.correct[i]), "detail": f.details[i],
             "logprob": float(f.logprob[i]), "logprob_at_temperature": float(f.logprob_at[i, j]),
             "confidence_raw": float(cal.conf_raw[i]),
             "confidence_temperature": float(cal.conf_temperature[i]),
             "confidence_platt": float(cal.conf_platt[i]), "logprob_at": [float(v) for v in f.logprob_at[i]]}
            for i in range(len(f.ids))]


# ---- 8. the job ------------------------------------------------------------------------------

def shipped_files(ctx: JobContext) -> tuple[InputFile, InputFile | None, dict[str, Any]]:
    """2C's GGUF and 2E's recovery adapter (None when 2E was skipped: the GGUF is then served alone), and
    the bundle's description of what ships: store URIs and sha256s from the input manifests."""
    from forge.runner import input_file

    gguf = input_file(ctx, "2C", "gguf")
    adapter = None if ctx.input_skipped("2E") else input_file(ctx, "2E", "adapter")
    manifest, g = ctx.inputs["2C"], ctx.config.gguf
    parts = {
        "runtime": "llama.cpp",
        "gguf": {**gguf.describe(), "quant_type": manifest.info.get("quant_type", g.quant_type)},
        # the tokenizer + chat template (and config.json) ship beside the GGUF in 2C's output
        "tokenizer": {"phase": "2C", "cache_key": manifest.cache_key,
                      "files": {k: v.sha256 for k, v in sorted(manifest.files.items()) if k != gguf.name}},
        "adapter": adapter.describe() if adapter else None,
        "serving": {"n_ctx": g.n_ctx, "n_threads": g.n_threads, "n_batch": g.n_batch},
    }
    return gguf, adapter, parts


@contextlib.contextmanager
def served_backend(ctx: JobContext, gguf: InputFile,
                   adapter: InputFile | None) -> Iterator[tuple[Backend, Callable[[list[dict]], str]]]:
    """The model as it ships: the GGUF (+ adapter) on llama.cpp, and its prompt builder (2C's chat
    template); llama.cpp's model and context are freed on exit."""
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend

    g, e = ctx.config.gguf, ctx.config.eval
    with LlamaCppBackend(gguf.path, ctx.input_dir("2C"), lora_path=adapter.path if adapter else None,
                         n_ctx=g.n_ctx, n_threads=g.n_threads, n_batch=g.n_batch,
                         max_new_tokens=e.max_new_tokens) as backend:
        yield backend, backend.prompt


def run(ctx: JobContext) -> JobResult:
    from forge.runner import JobResult

    cfg: CalibrationConfig = ctx.config.calibration
    calib_path = ctx.input_dir("prep_data") / "calib.jsonl"
    if not calib_path.exists():
        raise DataError(f"2F needs prep_data's calib split at {calib_path} (missing: rerun prep_data)")
    rows = read_jsonl(calib_path)
    if not rows:
        raise DataError(f"2F: {calib_path} has no rows (data.suites.calib is 0?)")

    gguf, adapter, bundle_parts = shipped_files(ctx)
    started = time.time()
    with served_backend(ctx, gguf, adapter) as (backend, build_prompt):
        features = compute_features(backend, rows, build_prompt, temperature_grid(cfg), ctx.config.eval)
    feature_seconds = time.time() - started
    cal = calibrate(features, cfg)
    params = calibration_params(cal, cfg)

    out = ctx.out_dir
    calib_json = out / "calibration.json"
    calib_json.write_text(json.dumps(params, indent=2))
    write_jsonl(out / "calibration_features.jsonl", feature_records(cal))
    held, y = ~cal.fit, features.correct[~cal.fit]
    m = params["metrics"]
    t = cal.temperature.temperature
    png = plot_reliability({"before (raw)": (cal.conf_raw[held], y),
                            f"temperature T={t:.3g}": (cal.conf_temperature[held], y),
                            "Platt": (cal.conf_platt[held], y)},
                           cfg.n_bins, out / "reliability.png",
                           f"2F reliability, held-out calib rows (n={int(held.sum())}, acc {y.mean():.3f})")
    ctx.log_artifact(png)
    ctx.log_artifact(calib_json)

    # bundle.json is content-addressed (cache keys, sha256): where each input lives (run, URI, MLflow run)
    # is this run's fact, kept in the manifest's info and the model version's lineage tags
    lineage = {p: {"cache_key": mf.cache_key} for p, mf in sorted(ctx.inputs.items())}
    locations = {p: {"mlflow_run_id": mf.mlflow_run_id, "run_id": mf.run_id, "base_uri": mf.base_uri}
                 for p, mf in sorted(ctx.inputs.items())}
    bundle = {
        "name": ctx.config.tracking.compressed_model,
        **bundle_parts,
        "calibration": {"file": calib_json.name, "sha256": sha256_file(calib_json), "method": cfg.method,
                        "temperature": cal.temperature.temperature, "platt": params["platt"]},
        "base_training_run": {"phase": "1A", **lineage["1A"]},
        "lineage": lineage,
        "cache_key": ctx.cache_key,
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2))

    acc = float(features.correct.mean())
    quality: dict[str, Any] = {"ece_before": m["ece_before"], "ece_after": m["ece_after"],
                               "brier_before": m["brier_before"], "brier_after": m["brier_after"],
                               "method": cfg.method, "temperature": cal.temperature.temperature,
                               "calib_acc": acc, "n": float(len(rows))}
    metrics = {**cal.metrics, "temperature": cal.temperature.temperature, "platt_a": cal.platt.a,
               "platt_b": cal.platt.b, "calib_acc": acc, "n_fit": float(cal.fit.sum()),
               "n_heldout": float(held.sum()), "feature_seconds": feature_seconds}
    improved = m["ece_after"] < m["ece_before"]
    notes = (f"{cfg.method} calibration on {len(rows)} calib rows (acc {acc:.3f}, {int(held.sum())} held "
             f"out): ECE {m['ece_before']:.3f} -> {m['ece_after']:.3f}, Brier {m['brier_before']:.3f} -> "
             f"{m['brier_after']:.3f}, T={t:.3g}"
             + ("" if improved else "; ECE did NOT improve") + "".join(f"; {w}" for w in cal.warnings))
    return JobResult(metrics={k: float(v) for k, v in metrics.items()}, quality=quality, notes=notes,
                     info={"calibration": calib_json.name, "bundle": "bundle.json", "method": cfg.method,
                           "temperature": t, "platt": {"a": cal.platt.a, "b": cal.platt.b},
                           "ece_improved": improved, "adapter": bundle_parts["adapter"] is not None,
                           "locations": locations},
                     register="", register_model=ctx.config.tracking.compressed_model)
