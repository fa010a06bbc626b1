"""Hard math domain: multi-step problems with integer answers: linear equations ax + b = c, modular
arithmetic, gcd (Euclid's steps) and lcm, sums of arithmetic sequences, and small combinations nCk.

The reference shows each step briefly and ends with "Answer: N" (numeric check), as in math and reasoning.
"""

from __future__ import annotations

import math
import random

from forge.data.suites.base import Task, pick, pick_weighted
from forge.data.suites.math import numeric_task

DOMAIN = "hard_math"

ITEMS = ("books", "cards", "shirts", "songs", "toys", "colors", "players", "fruits")


def linear(rng: random.Random) -> Task:
    a, x, b = rng.randint(2, 12), rng.randint(-10, 20), pick(rng, [k for k in range(-30, 31) if k])
    c = a * x + b
    sign, undo = ("+", "-") if b > 0 else ("-", "+")
    steps = [f"{a}x = {c} {undo} {abs(b)} = {c - b}.", f"x = {c - b} / {a} = {x}."]
    return numeric_task(f"Solve for x: {a}x {sign} {abs(b)} = {c}.", steps, str(x), "linear")


def modular(rng: random.Random) -> Task:
    m = rng.randint(3, 13)
    if rng.random() < 0.5:
        base = rng.randint(2, 9)
        exp = rng.randint(2, int(math.log(99999, base)))
        value, prompt, first = base ** exp, f"What is {base}^{exp} mod {m}?", f"{base}^{exp} = {base ** exp}."
    else:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        value, prompt, first = a * b, f"What is ({a} * {b}) mod {m}?", f"{a} * {b} = {a * b}."
    steps = [first, f"{value} = {m} * {value // m} + {value % m}."]
    return numeric_task(prompt, steps, str(value % m), "modular")


def _coprime_multiples(rng: random.Random) -> tuple[int, int, int]:
    """(a, b, gcd) with Euclid's algorithm on a, b taking at most 4 steps."""
    while True:
        g = rng.randint(2, 15)
        p, q = rng.sample(range(2, 13), 2)
        if math.gcd(p, q) == 1 and len(_euclid(g * p, g * q)) <= 4:
            return g * p, g * q, g


def _euclid(a: int, b: int) -> list[str]:
    a, b = max(a, b), min(a, b)
    steps = []
    while b:
        steps.append(f"{a} = {a // b} * {b} + {a % b}.")
        a, b = b, a % b
    return steps


def gcd(rng: random.Random) -> Task:
    a, b, g = _coprime_multiples(rng)
    return numeric_task(f"What is the greatest common divisor of {a} and {b}?", _euclid(a, b), str(g), "gcd")


def lcm(rng: random.Random) -> Task:
    a, b, g = _coprime_multiples(rng)
    steps = [f"gcd({a}, {b}) = {g}.", f"lcm = {a} * {b} / {g} = {a * b // g}."]
    return numeric_task(f"What is the least common multiple of {a} and {b}?", steps, str(a * b // g), "lcm")


def series_sum(rng: random.Random) -> Task:
    first, step, n = rng.randint(1, 20), rng.randint(2, 9), rng.randint(5, 15)
    last = first + (n - 1) * step
    total = n * (first + last) // 2
    prompt = f"What is the sum {first} + {first + step} + {first + 2 * step} + ... + {last}?"
    steps = [f"n = ({last} - {first}) / {step} + 1 = {n}.", f"sum = {n} * ({first} + {last}) / 2 = {total}."]
    return numeric_task(prompt, steps, str(total), "series_sum")


def choose(rng: random.Random) -> Task:
    n, k = rng.randint(5, 12), rng.randint(2, 4)
    top, bottom = math.perm(n, k), math.factorial(k)
    falling = " * ".join(str(n - i) for i in range(k))
    k_down = " * ".join(str(k - i) for i in range(k))
    steps = [f"C({n}, {k}) = {falling} / ({k_down}) = {top} / {bottom} = {top // bottom}."]
    prompt = f"In how many ways can you choose {k} of {n} different {pick(rng, ITEMS)}?"
    return numeric_task(prompt, steps, str(math.comb(n, k)), "choose")


TEMPLATES = [(linear, 1.0), (modular, 1.0), (gcd, 0.8), (lcm, 0.8), (series_sum, 1.0), (choose, 1.0)]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
