"""Verifiable task suites, one per domain, generated deterministically from a seed: general (1A's data) and
the modifiers' domains, the MVP's (code, reasoning, automation) and the post-MVP ones (math, hard_math,
science, finance, creative; creative's rubric checks are what a judge teacher scores: forge.modifiers.judge).

`generate(domain, n, seed, split)` returns rows in the forge.data.records schema whose
reference answers pass `check_answer`. Splits never share a prompt: each prompt hashes into a
bucket, "dev", "heldout" and "calib" own disjoint buckets, and every other split ("train", "pretrain",
or any new name) draws from the remaining ones, each split from its own random stream.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

from forge.data.records import stable_int
from forge.data.suites import (
    automation,
    code,
    creative,
    finance,
    general,
    hard_math,
    math,
    reasoning,
    science,
)
from forge.data.suites.checks import CheckResult, check_answer, validate_check

__all__ = ["SUITES", "CheckResult", "check_answer", "generate", "validate_check"]

SUITES: dict[str, ModuleType] = {
    "general": general,
    "code": code,
    "reasoning": reasoning,
    "automation": automation,
    "math": math,
    "hard_math": hard_math,
    "science": science,
    "finance": finance,
    "creative": creative,
}

N_BUCKETS = 20
# calib (2F's confidence calibration) is an eval split too: a model never trains on its prompts
EVAL_BUCKETS = {"dev": frozenset({0}), "heldout": frozenset({1, 2, 3}), "calib": frozenset({4, 5})}
TRAIN_BUCKETS = frozenset(range(6, N_BUCKETS))
# After this many draws in a row that only repeat prompts already in the split, accept repeats:
# a production-sized split may ask for more rows than a template space holds.
MAX_REPEAT_STREAK = 2000


def prompt_bucket(domain: str, prompt: str) -> int:
    return stable_int(f"{domain}|{prompt}") % N_BUCKETS


def split_buckets(split: str) -> frozenset[int]:
    return EVAL_BUCKETS.get(split, TRAIN_BUCKETS)


def generate(domain: str, n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """n rows of `domain` for `split`, the same for the same (domain, n, seed, split)."""
    if domain not in SUITES:
        raise ValueError(f"unknown suite domain {domain!r}; known: {sorted(SUITES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    rng = random.Random(stable_int(f"forge-suite|{domain}|{split}|{seed}"))
    buckets = split_buckets(split)
    make_task = SUITES[domain].make_task
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeat_streak, allow_repeats = 0, False
    while len(rows) < n:
        task = make_task(rng)
        if prompt_bucket(domain, task.prompt) not in buckets:
            continue
        if task.prompt in seen and not allow_repeats:
            repeat_streak += 1
            allow_repeats = repeat_streak >= MAX_REPEAT_STREAK  # the split's share of prompts is used up
            continue
        repeat_streak = 0
        seen.add(task.prompt)
        rows.append({
            "id": f"{domain}-{split}-{len(rows):05d}",
            "domain": domain,
            "messages": [{"role": "user", "content": task.prompt},
                         {"role": "assistant", "content": task.answer}],
            "check": task.check,
            "source": f"suite:{domain}",
            "task": task.task,
        })
    return rows
