"""6A's data: routing queries, the options to route between, what each option actually answers, and labels.

Queries: every task suite the system serves (the base's domains + each enabled modifier's suite), drawn from
the suites' calib buckets with a seed of their own: no phase trains on those prompts (1A, 1C, 2E and the
modifiers train on train buckets; 2F only measures on calib), so each option's answers show how it
generalises. A stable hash of the query id puts it in train / val / test.

Options: "base" = 2C's GGUF with 2E's recovery LoRA (the served base, as 2F calibrated it), and one per
enabled modifier = the GGUF with that modifier's GGUF LoRA (as its H phase scored it). Each option answers
every query in llama.cpp (greedy), the suites check the answers (a judge teacher for judged domains), and
the reference answer's mean token log-prob is recorded.

Label (which option to route to), from what the options did, not from the domain tag:
  1. the base answers correctly                -> "base" (the cheapest option that works)
  2. else some modifiers answer correctly      -> the one among them with the best reference log-prob
  3. else nobody is right                      -> the option with the best reference log-prob (the closest)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from forge.data.records import DataError, prompt_messages, stable_unit
from forge.routing.router import BASE

if TYPE_CHECKING:
    from forge.config import PipelineConfig
    from forge.runner import InputFile, JobContext

log = logging.getLogger("forge.routing")

ROUTER_SEED_OFFSET = 2  # the modifiers' own eval rows use +1 (forge.modifiers.collect)
QUERY_SPLIT = "calib"  # the suites' buckets no phase trains on
SPLITS = ("train", "val", "test")
MAX_OUTPUT_CHARS = 400  # an option's answer as kept in queries.jsonl (the check ran on all of it)


# ---- queries -----------------------------------------------------------------------------------------

def routing_suites(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(domain, suite) of every query family: the base's domains, then each enabled modifier's."""
    out: dict[str, str] = {d: d for d in cfg.domains}
    for d in cfg.modifiers.enabled:
        out.setdefault(d, cfg.modifiers.suite_of(d))
    return list(out.items())


def split_of(query_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = stable_unit(f"forge-router|{seed}|{query_id}")
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def user_text(row: dict[str, Any]) -> str:
    """What the router reads: the user's turns of the prompt (the system prompt is the same for all)."""
    return "\n".join(m["content"] for m in prompt_messages(row) if m["role"] == "user")


def routing_queries(cfg: PipelineConfig) -> list[dict[str, Any]]:
    from forge.data.suites import generate

    rc = cfg.routing.router
    rows = []
    for domain, suite in routing_suites(cfg):
        for i, row in enumerate(generate(suite, rc.queries_per_domain, cfg.data.seed + ROUTER_SEED_OFFSET,
                                         QUERY_SPLIT)):
            qid = f"route-{domain}-{i:05d}"
            rows.append({**row, "id": qid, "domain": domain, "query": user_text(row),
                         "split": split_of(qid, rc.seed, rc.val_fraction, rc.test_fraction)})
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    if min(counts.values()) == 0:
        raise DataError(f"6A: a split is empty {counts} with routing.router.queries_per_domain="
                        f"{rc.queries_per_domain}: raise it (or the val/test fractions)")
    return rows


# ---- options -----------------------------------------------------------------------------------------

@dataclass
class Option:
    name: str
    lora: InputFile | None  # the GGUF LoRA applied on top of 2C's GGUF (None: the GGUF alone)
    domain: str | None = None  # the modifier's domain (None for the base)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain,
                "adapter": self.lora.describe() if self.lora else None}


def modifier_h_phase(cfg: PipelineConfig, domain: str) -> str:
    from forge.phases import modifier_phase_id

    return modifier_phase_id(cfg.modifiers.domains[domain], "H")


def options_of(ctx: JobContext) -> list[Option]:
    """The base, then every enabled modifier whose H phase completed (in modifiers.enabled order)."""
    from forge.runner import input_file

    cfg = ctx.config
    recovery = None if ctx.input_skipped("2E") else input_file(ctx, "2E", "adapter")
    options = [Option(BASE, recovery)]
    for domain in cfg.modifiers.enabled:
        h = modifier_h_phase(cfg, domain)
        if h in ctx.inputs and not ctx.input_skipped(h):
            options.append(Option(domain, input_file(ctx, h, "adapter"), domain))
    return options


# ---- what each option answers ------------------------------------------------------------------------

@dataclass
class OptionScores:
    correct: np.ndarray  # [n] bool
    logprob: np.ndarray  # [n] mean token log-prob of the reference answer
    tokens: np.ndarray  # [n] generated tokens
    outputs: list[str]
    details: list[str]
    seconds: float  # generation wall time, all queries
    token_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.token_count = int(self.tokens.sum())

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.seconds / max(self.token_count, 1)


class _CountingBackend:
    """A harness backend that also times generation and counts generated tokens per prompt."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens, self.seconds = inner, [], 0.0

    def generate(self, prompts: list[str]) -> list[str]:
        started = time.perf_counter()
        out = self.inner.generate(prompts)
        self.seconds += time.perf_counter() - started
        self.tokens += [len(self.inner.tokenize(o)) for o in out]
        return out

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> list[float]:
        return self.inner.answer_logprobs(prompts, answers)


def score_option(ctx: JobContext, option: Option, rows: Sequence[dict[str, Any]]) -> OptionScores:
    """Every query answered by one option in llama.cpp, checked by the suites (judged domains: rejudge)."""
    from forge.evaluate.harness import run_eval
    from forge.evaluate.llama_cpp_backend import LlamaCppBackend
    from forge.runner import input_file

    g, e = ctx.config.gguf, ctx.config.eval
    gguf = input_file(ctx, "2C", "gguf")
    with LlamaCppBackend(gguf.path, ctx.input_dir("2C"), option.lora.path if option.lora else None,
                         n_ctx=g.n_ctx, n_threads=g.n_threads, n_batch=g.n_batch,
                         max_new_tokens=e.max_new_tokens) as backend:
        counting = _CountingBackend(backend)
        report = run_eval(counting, rows, e, backend.prompt)
    recs = report.records
    log.info("6A: option %s answered %d queries, acc %.3f, %.1f ms/token", option.name, len(recs),
             sum(r["correct"] for r in recs) / len(recs),
             1000 * counting.seconds / max(sum(counting.tokens), 1))
    return OptionScores(np.array([r["correct"] for r in recs], bool), np.array([r["logprob"] for r in recs]),
                        np.array(counting.tokens, np.int64), [r["output"] for r in recs],
                        [r["detail"] for r in recs], counting.seconds)


def rejudge(ctx: JobContext, rows: Sequence[dict[str, Any]], scores: dict[str, OptionScores]) -> int:
    """Queries of a judged domain (creative): the domain's judge teacher re-scores every option's answer."""
    from forge.modifiers.evaluation import judge_verifier

    judged = 0
    for domain in {r["domain"] for r in rows}:
        spec = ctx.config.modifiers.domains.get(domain)
        if spec is None or not spec.judge:
            continue
        idx = [i for i, r in enumerate(rows) if r["domain"] == domain]
        with judge_verifier(ctx, domain, [rows[i] for i in idx]) as verify:
            for s in scores.values():
                for i in idx:
                    verdict = verify(rows[i], s.outputs[i])
                    s.correct[i] = bool(getattr(verdict, "correct", verdict))
                    s.details[i] = str(getattr(verdict, "detail", ""))
                    judged += 1
    return judged


# ---- labels ------------------------------------------------------------------------------------------

def label_queries(options: Sequence[str], correct: np.ndarray, logprob: np.ndarray,
                  ) -> tuple[np.ndarray, list[str]]:
    """correct, logprob: [n, k] with column 0 the base. Returns the label index per query and why."""
    labels, reasons = [], []
    for c, lp in zip(correct, logprob, strict=True):
        if c[0]:
            labels.append(0)
            reasons.append("base correct")
        elif c.any():
            right = np.flatnonzero(c)
            labels.append(int(right[np.argmax(lp[right])]))
            reasons.append("modifier correct" if len(right) == 1 else "modifiers correct: best log-prob")
        else:
            labels.append(int(np.argmax(lp)))
            reasons.append("none correct: best log-prob")
    return np.asarray(labels, np.int64), reasons


def query_records(rows: Sequence[dict[str, Any]], options: Sequence[str], scores: dict[str, OptionScores],
                  labels: np.ndarray, reasons: Sequence[str]) -> list[dict[str, Any]]:
    """queries.jsonl: one line per routing query, with every option's outcome (no timings: files stay
    reproducible; latency lives in the manifest)."""
    out = []
    for i, row in enumerate(rows):
        out.append({
            "id": row["id"], "domain": row["domain"], "split": row["split"], "query": row["query"],
            "messages": row["messages"], "check": row["check"], "source": row["source"],
            "label": options[int(labels[i])], "label_reason": reasons[i],
            "options": {o: {"correct": bool(scores[o].correct[i]),
                            "logprob": round(float(scores[o].logprob[i]), 6),
                            "tokens": int(scores[o].tokens[i]),
                            "output": scores[o].outputs[i][:MAX_OUTPUT_CHARS],
                            "detail": scores[o].details[i][:200]}
                        for o in options},
        })
    return out


@dataclass
class RoutingTable:
    """queries.jsonl as arrays: what the replay (6A's curve, 6C, 13A's held-out set) needs."""

    ids: list[str]
    domains: list[str]
    splits: np.ndarray  # [n] str
    queries: list[str]
    options: list[str]
    labels: np.ndarray  # [n] int
    correct: np.ndarray  # [n, k] bool
    logprob: np.ndarray  # [n, k]
    tokens: np.ndarray  # [n, k]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> RoutingTable:
        if not records:
            raise DataError("routing table: no queries")
        options = list(records[0]["options"])
        for n, r in enumerate(records):
            if list(r["options"]) != options:
                raise DataError(f"routing table: query {n} ({r.get('id')}) has options {list(r['options'])}, "
                                f"the first has {options}")
        col = {o: j for j, o in enumerate(options)}
        return cls([r["id"] for r in records], [r["domain"] for r in records],
                   np.array([r["split"] for r in records]), [r["query"] for r in records], options,
                   np.array([col[r["label"]] for r in records], np.int64),
                   np.array([[r["options"][o]["correct"] for o in options] for r in records], bool),
                   np.array([[r["options"][o]["logprob"] for o in options] for r in records], float),
                   np.array([[r["options"][o]["tokens"] for o in options] for r in records], np.int64))

    def mask(self, split: str) -> np.ndarray:
        return self.splits == split
