"""Finance domain: simple and compound interest, percent change, profit margin, a loan's monthly interest and
return on investment.

Every prompt says how to round ("Round to cents." for money, "Round to 2 decimals." for percents); the
reference writes the formula with the numbers, the result with exactly 2 decimals (half up, in Decimal), and
"Answer: N". The check's tolerance is half a cent, so only the correctly rounded value passes.
"""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal

from forge.data.suites.base import Task, pick, pick_weighted
from forge.data.suites.math import fmt, numeric_task

DOMAIN = "finance"

TOLERANCE = 0.005
CENTS = " Round to cents."
PERCENT = " Round to 2 decimals."
RATES = tuple(Decimal(k) / 2 for k in range(3, 25))  # 1.5% .. 12%
GOODS = ("a bike", "a phone", "a desk", "a lamp", "a coat", "a chair", "a watch", "a kettle")


def _cents(x: Decimal) -> str:
    return str(x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _task(prompt: str, formula: str, value: Decimal, task: str) -> Task:
    shown = _cents(value)
    return numeric_task(prompt, [f"{formula} = {shown}."], shown, task, tolerance=TOLERANCE)


def simple_interest(rng: random.Random) -> Task:
    principal, rate, years = rng.randint(5, 200) * 100, pick(rng, RATES), rng.randint(1, 6)
    prompt = (f"${principal} earns {fmt(rate)}% simple interest per year. How much interest does it earn in "
              f"{years} years?{CENTS}")
    return _task(prompt, f"{principal} * {fmt(rate / 100)} * {years}", principal * rate / 100 * years,
                 "simple_interest")


def compound_interest(rng: random.Random) -> Task:
    principal, rate, years = rng.randint(5, 100) * 100, pick(rng, RATES), rng.randint(2, 5)
    growth = 1 + rate / 100
    prompt = (f"${principal} is invested at {fmt(rate)}% interest compounded yearly. What is it worth after "
              f"{years} years?{CENTS}")
    return _task(prompt, f"{principal} * {fmt(growth)}^{years}", principal * growth ** years,
                 "compound_interest")


def percent_change(rng: random.Random) -> Task:
    old = rng.randint(20, 500)
    new = pick(rng, [v for v in range(old // 2, old * 3 // 2 + 1) if v != old])
    goods = pick(rng, GOODS)
    prompt = f"The price of {goods} goes from ${old} to ${new}. What is the percent change?{PERCENT}"
    return _task(prompt, f"({new} - {old}) / {old} * 100", Decimal(new - old) / old * 100, "percent_change")


def profit_margin(rng: random.Random) -> Task:
    revenue = rng.randint(100, 5000)
    cost = rng.randint(revenue // 4, revenue - 1)
    prompt = (f"A shop's revenue is ${revenue} and its costs are ${cost}. What is the profit margin in "
              f"percent?{PERCENT}")
    return _task(prompt, f"({revenue} - {cost}) / {revenue} * 100", Decimal(revenue - cost) / revenue * 100,
                 "profit_margin")


def monthly_interest(rng: random.Random) -> Task:
    loan, rate = rng.randint(2, 100) * 500, pick(rng, RATES)
    prompt = (f"A loan of ${loan} has an annual interest rate of {fmt(rate)}%. What is one month's "
              f"interest?{CENTS}")
    return _task(prompt, f"{loan} * {fmt(rate / 100)} / 12", loan * rate / 100 / 12, "monthly_interest")


def roi(rng: random.Random) -> Task:
    invested = rng.randint(1, 100) * 100
    returned = invested * rng.randint(50, 250) // 100 + rng.randint(0, 99)
    prompt = (f"You invest ${invested} and get back ${returned}. What is the return on investment in "
              f"percent?{PERCENT}")
    return _task(prompt, f"({returned} - {invested}) / {invested} * 100",
                 Decimal(returned - invested) / invested * 100, "roi")


TEMPLATES = [(simple_interest, 1.0), (compound_interest, 1.0), (percent_change, 1.0), (profit_margin, 1.0),
             (monthly_interest, 1.0), (roi, 1.0)]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
