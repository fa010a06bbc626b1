"""What a domain module produces: one task (prompt, reference answer, how to check it)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str  # the reference assistant answer; it always passes `check`
    check: dict[str, Any]  # {"kind": ..., ...}: see forge.data.suites.checks
    task: str  # the template's name: lets analysis group rows by what was asked


def pick(rng: random.Random, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[rng.randrange(len(items))]


def pick_weighted(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    items = [item for item, _ in weighted]
    weights = [w for _, w in weighted]
    return rng.choices(items, weights=weights, k=1)[0]
