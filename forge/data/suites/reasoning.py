"""Reasoning domain: two- and three-step arithmetic word problems with small numbers.

The reference shows each step as "a op b = c." and ends with "Answer: N", the format the
numeric checker reads; intermediate results stay below ~100 so a tiny model can learn them.
"""

from __future__ import annotations

import random

from forge.data.suites.base import Task, pick, pick_weighted

DOMAIN = "reasoning"

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Eva", "Kim", "Raj")
ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs", "stickers", "marbles", "cookies", "shells")
THINGS = ("ticket", "pencil", "sandwich", "toy", "notebook", "ball")


def _solve(prompt: str, steps: list[tuple[int, str, int, int]], task: str) -> Task:
    lines = [f"{a} {op} {b} = {c}." for a, op, b, c in steps]
    answer = steps[-1][3]
    return Task(prompt, " ".join(lines) + f" Answer: {answer}", {"kind": "numeric", "answer": answer}, task)


def _two_names(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


def buy_and_give(rng: random.Random) -> Task:
    name, item = pick(rng, NAMES), pick(rng, ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a + b - 1)
    prompt = (f"{name} has {a} {item}. {name} buys {b} more and gives away {c}. "
              f"How many {item} does {name} have now?")
    return _solve(prompt, [(a, "+", b, a + b), (a + b, "-", c, a + b - c)], "buy_and_give")


def boxes(rng: random.Random) -> Task:
    name, item = pick(rng, NAMES), pick(rng, ITEMS)
    per, n, loose = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    prompt = (f"A box holds {per} {item}. {name} has {n} boxes and {loose} loose {item}. "
              f"How many {item} does {name} have?")
    return _solve(prompt, [(n, "*", per, n * per), (n * per, "+", loose, n * per + loose)], "boxes")


def change(rng: random.Random) -> Task:
    name, thing = pick(rng, NAMES), pick(rng, THINGS)
    price, count = rng.randint(2, 9), rng.randint(2, 5)
    paid = pick(rng, [p for p in (10, 20, 50) if p >= price * count] or [price * count + 10])
    prompt = (f"A {thing} costs {price} dollars. {name} buys {count} and pays with {paid} dollars. "
              f"How much change does {name} get?")
    cost = price * count
    return _solve(prompt, [(count, "*", price, cost), (paid, "-", cost, paid - cost)], "change")


def ages(rng: random.Random) -> Task:
    older, younger = _two_names(rng)
    gap, age, years = rng.randint(2, 9), rng.randint(3, 12), rng.randint(2, 9)
    prompt = (f"{older} is {gap} years older than {younger}. {younger} is {age}. "
              f"How old will {older} be in {years} years?")
    return _solve(prompt, [(age, "+", gap, age + gap), (age + gap, "+", years, age + gap + years)], "ages")


def reading(rng: random.Random) -> Task:
    name = pick(rng, NAMES)
    per_day, days, extra = rng.randint(2, 9), rng.randint(2, 7), rng.randint(1, 9)
    prompt = (f"{name} reads {per_day} pages a day for {days} days, then {extra} more pages. "
              f"How many pages does {name} read in total?")
    total = per_day * days
    return _solve(prompt, [(per_day, "*", days, total), (total, "+", extra, total + extra)], "reading")


def legs(rng: random.Random) -> Task:
    cows, hens = rng.randint(1, 9), rng.randint(1, 9)
    prompt = f"A farm has {cows} cows and {hens} hens. How many legs do they have in total?"
    cow_legs, hen_legs = cows * 4, hens * 2
    steps = [(cows, "*", 4, cow_legs), (hens, "*", 2, hen_legs),
             (cow_legs, "+", hen_legs, cow_legs + hen_legs)]
    return _solve(prompt, steps, "legs")


def share(rng: random.Random) -> Task:
    name, item = pick(rng, NAMES), pick(rng, ITEMS)
    each, friends = rng.randint(2, 9), rng.randint(2, 6)
    eaten = rng.randint(1, each - 1)
    total = each * friends
    prompt = (f"{name} shares {total} {item} equally among {friends} friends. Each friend uses {eaten}. "
              f"How many {item} does each friend have left?")
    return _solve(prompt, [(total, "/", friends, each), (each, "-", eaten, each - eaten)], "share")


def together(rng: random.Random) -> Task:
    first, second = _two_names(rng)
    item = pick(rng, ITEMS)
    a, more = rng.randint(2, 9), rng.randint(1, 9)
    prompt = (f"{first} has {a} {item}. {second} has {more} more than {first}. "
              f"How many {item} do they have together?")
    return _solve(prompt, [(a, "+", more, a + more), (a, "+", a + more, 2 * a + more)], "together")


def spending(rng: random.Random) -> Task:
    name = pick(rng, NAMES)
    lunch, book = rng.randint(2, 9), rng.randint(2, 9)
    money = lunch + book + rng.randint(0, 20)
    prompt = (f"{name} has {money} dollars, spends {lunch} on lunch and {book} on a book. "
              f"How many dollars are left?")
    rest = money - lunch
    return _solve(prompt, [(money, "-", lunch, rest), (rest, "-", book, rest - book)], "spending")


def chairs(rng: random.Random) -> Task:
    rows, per_row = rng.randint(2, 9), rng.randint(2, 9)
    taken = rng.randint(2, rows * per_row - 1)
    prompt = f"There are {rows} rows of {per_row} chairs. {taken} chairs are taken. How many chairs are free?"
    total = rows * per_row
    return _solve(prompt, [(rows, "*", per_row, total), (total, "-", taken, total - taken)], "chairs")


TEMPLATES = [
    (buy_and_give, 1.0), (boxes, 1.0), (change, 1.0), (ages, 1.0), (reading, 1.0),
    (legs, 0.8), (share, 0.8), (together, 1.0), (spending, 1.0), (chairs, 1.0),
]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
