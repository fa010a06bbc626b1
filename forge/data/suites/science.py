"""Science domain: formula calculations (speed = d/t, density = m/V, Ohm's law V = IR, F = ma, Celsius <->
Fahrenheit) and unit conversions.

Values are drawn so every answer is exact with at most 2 decimals; the reference writes the formula with the
numbers and ends with "Answer: N" (the unit is in the step before). Every check carries a tolerance of half a
hundredth, so 12.5 and 12.50 both pass and a neighbouring value (12.51) does not.
"""

from __future__ import annotations

import random
from decimal import Decimal

from forge.data.suites.base import Task, pick, pick_weighted
from forge.data.suites.math import fmt, numeric_task

DOMAIN = "science"

TOLERANCE = 0.005
VEHICLES = ("car", "train", "truck", "ship", "boat", "bus")


def _task(prompt: str, step: str, value: Decimal | int, task: str) -> Task:
    return numeric_task(prompt, [step], fmt(value), task, tolerance=TOLERANCE)


def _tenths(rng: random.Random, lo: int, hi: int) -> Decimal:
    return Decimal(rng.randint(lo, hi)) / 10


def speed(rng: random.Random) -> Task:
    v, t = rng.randint(5, 120), rng.randint(2, 9)
    prompt = f"A {pick(rng, VEHICLES)} travels {v * t} km in {t} hours. What is its average speed in km/h?"
    return _task(prompt, f"speed = distance / time = {v * t} / {t} = {v} km/h.", v, "speed")


def density(rng: random.Random) -> Task:
    rho, volume = _tenths(rng, 5, 200), rng.randint(2, 50)
    mass = rho * volume
    prompt = (f"An object has a mass of {fmt(mass)} g and a volume of {volume} cm^3. "
              "What is its density in g/cm^3?")
    step = f"density = mass / volume = {fmt(mass)} / {volume} = {fmt(rho)} g/cm^3."
    return _task(prompt, step, rho, "density")


def ohms_law(rng: random.Random) -> Task:
    current, resistance = _tenths(rng, 1, 50), rng.randint(2, 100)
    volts = current * resistance
    i, r, v = fmt(current), resistance, fmt(volts)
    prompt, step, value = pick(rng, [
        (f"A current of {i} A flows through a {r} ohm resistor. What is the voltage in volts?",
         f"V = I * R = {i} * {r} = {v} V.", volts),
        (f"A {r} ohm resistor has {v} V across it. What current flows, in amperes?",
         f"I = V / R = {v} / {r} = {i} A.", current),
    ])
    return _task(prompt, step, value, "ohms_law")


def force(rng: random.Random) -> Task:
    mass, accel = rng.randint(1, 50), Decimal(rng.randint(1, 20)) / 2
    newtons = mass * accel
    m, a, f = mass, fmt(accel), fmt(newtons)
    prompt, step, value = pick(rng, [
        (f"A {m} kg cart accelerates at {a} m/s^2. What is the net force on it in newtons?",
         f"F = m * a = {m} * {a} = {f} N.", newtons),
        (f"A net force of {f} N acts on a {m} kg cart. What is its acceleration in m/s^2?",
         f"a = F / m = {f} / {m} = {a} m/s^2.", accel),
    ])
    return _task(prompt, step, value, "force")


def temperature(rng: random.Random) -> Task:
    celsius = rng.randint(-8, 20) * 5  # a multiple of 5: both directions stay whole numbers
    fahrenheit = celsius * 9 // 5 + 32
    if rng.random() < 0.5:
        return _task(f"Convert {celsius} degrees Celsius to Fahrenheit.",
                     f"F = C * 9 / 5 + 32 = {celsius} * 9 / 5 + 32 = {fahrenheit}.", fahrenheit,
                     "temperature")
    return _task(f"Convert {fahrenheit} degrees Fahrenheit to Celsius.",
                 f"C = (F - 32) * 5 / 9 = ({fahrenheit} - 32) * 5 / 9 = {celsius}.", celsius, "temperature")


def convert_units(rng: random.Random) -> Task:
    source, target, op, factor, amount = pick(rng, [
        ("km", "m", "*", 1000, _tenths(rng, 1, 99)),
        ("m", "cm", "*", 100, _tenths(rng, 1, 99)),
        ("g", "kg", "/", 1000, Decimal(rng.randint(1, 99) * 50)),
        ("minutes", "hours", "/", 60, Decimal(rng.randint(1, 20) * 15)),
        ("km/h", "m/s", "/", Decimal("3.6"), Decimal(rng.randint(1, 10) * 18)),
    ])
    value = amount * factor if op == "*" else amount / factor
    prompt = f"Convert {fmt(amount)} {source} to {target}."
    return _task(prompt, f"{fmt(amount)} {op} {fmt(factor)} = {fmt(value)} {target}.", value, "convert_units")


TEMPLATES = [(speed, 1.0), (density, 1.0), (ohms_law, 1.0), (force, 1.0), (temperature, 1.0),
             (convert_units, 1.0)]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
