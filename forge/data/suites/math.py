"""Math domain: multi-digit arithmetic (+, -, *), integer division with remainder, percentages and fractions
written as decimals.

The reference shows the computation in one or two short steps and ends with "Answer: N", the format the
numeric checker reads (as in reasoning). Numbers are exact (Decimal), shown without trailing zeros.
`numeric_task` and `fmt` are shared with the other numeric post-MVP suites (hard_math, science, finance).
"""

from __future__ import annotations

import random
from decimal import Decimal

from forge.data.suites.base import Task, pick, pick_weighted

DOMAIN = "math"

TERMINATING_DENOMINATORS = (2, 4, 5, 8, 10, 16, 20, 25, 40, 50)


def fmt(x: Decimal | int) -> str:
    """A number as a person writes it: no exponent, no trailing zeros."""
    text = format(x, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def numeric_task(prompt: str, steps: list[str], answer: str, task: str,
                 tolerance: float | None = None) -> Task:
    """A task whose reference is `steps` then "Answer: <answer>", checked numerically (within `tolerance`)."""
    value: int | float = int(answer) if answer.lstrip("-").isdigit() else float(answer)
    check: dict[str, object] = {"kind": "numeric", "answer": value}
    if tolerance is not None:
        check["tolerance"] = tolerance
    return Task(prompt, " ".join([*steps, f"Answer: {answer}"]), check, task)


def add(rng: random.Random) -> Task:
    a, b = rng.randint(100, 99999), rng.randint(100, 99999)
    return numeric_task(f"What is {a} + {b}?", [f"{a} + {b} = {a + b}."], str(a + b), "add")


def subtract(rng: random.Random) -> Task:
    a, b = sorted(rng.sample(range(100, 99999), 2), reverse=True)
    return numeric_task(f"What is {a} - {b}?", [f"{a} - {b} = {a - b}."], str(a - b), "subtract")


def multiply(rng: random.Random) -> Task:
    a, b = rng.randint(12, 999), rng.randint(2, 99)
    return numeric_task(f"What is {a} * {b}?", [f"{a} * {b} = {a * b}."], str(a * b), "multiply")


def _division(rng: random.Random) -> tuple[int, int, int, int]:
    b = rng.randint(3, 25)
    a = rng.randint(b * 4, 999)
    if a % b == 0:  # a remainder of 0 would make quotient and remainder questions trivially alike
        a += rng.randint(1, b - 1)
    return a, b, a // b, a % b


def quotient(rng: random.Random) -> Task:
    a, b, q, r = _division(rng)
    prompt = f"What is {a} divided by {b}, as a whole number (drop the remainder)?"
    return numeric_task(prompt, [f"{a} = {b} * {q} + {r}."], str(q), "quotient")


def remainder(rng: random.Random) -> Task:
    a, b, q, r = _division(rng)
    return numeric_task(f"What is the remainder when {a} is divided by {b}?", [f"{a} = {b} * {q} + {r}."],
                        str(r), "remainder")


def percent(rng: random.Random) -> Task:
    p, base = rng.randint(1, 99), rng.randint(2, 90) * 10
    value = Decimal(base) * p / 100
    return numeric_task(f"What is {p}% of {base}?", [f"{base} * {p} / 100 = {fmt(value)}."], fmt(value),
                        "percent")


def fraction(rng: random.Random) -> Task:
    d = pick(rng, TERMINATING_DENOMINATORS)
    n = pick(rng, [k for k in range(1, 2 * d) if k % d])
    value = Decimal(n) / d
    return numeric_task(f"Write {n}/{d} as a decimal.", [f"{n} / {d} = {fmt(value)}."], fmt(value),
                        "fraction")


TEMPLATES = [
    (add, 1.0), (subtract, 1.0), (multiply, 1.0), (quotient, 0.8), (remainder, 0.8), (percent, 1.0),
    (fraction, 1.0),
]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
