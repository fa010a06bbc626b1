"""Code domain: small Python functions from regular templates, checked by running assert tests.

Each template varies the function name, argument name and constants; tests are computed from
a Python reference of the same operation, with inputs chosen so that near-miss solutions
(wrong operator, constant, comparison or edge) fail.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from forge.data.suites.base import Task, pick, pick_weighted

DOMAIN = "code"

NUM_ARGS = ("x", "n", "v", "num", "k")
LIST_ARGS = ("xs", "nums", "items", "values")
STR_ARGS = ("s", "text", "word")
PAIR_ARGS = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"))
TEST_WORDS = ("hello", "banana", "abc", "level", "data", "python", "apple", "mississippi")
TEST_LISTS = ([3, 1, 4], [2, 7, 5, 9], [6], [8, 2, 6, 3, 5], [-1, 4, 0, 2])


def _run(prompt: str, name: str, args: str, body: str, fn: Callable[..., Any],
         inputs: list[tuple[Any, ...]], task: str) -> Task:
    code = f"def {name}({args}):\n    return {body}"
    tests = [f"assert {name}({', '.join(repr(v) for v in inp)}) == {fn(*inp)!r}" for inp in inputs]
    return Task(prompt, code, {"kind": "python_tests", "entry_point": name, "tests": tests}, task)


def const_arith(rng: random.Random) -> Task:
    a, k = pick(rng, NUM_ARGS), rng.randint(2, 49)
    op, word, names, fn = pick(rng, [
        ("+", "plus", ("add_{k}", "plus_{k}", "inc_by_{k}"), lambda x: x + k),
        ("-", "minus", ("sub_{k}", "minus_{k}", "dec_by_{k}"), lambda x: x - k),
        ("*", "times", ("times_{k}", "mul_{k}", "scale_{k}"), lambda x: x * k),
    ])
    name = pick(rng, names).format(k=k)
    return _run(f"Write a Python function {name}({a}) that returns {a} {word} {k}.", name, a,
                f"{a} {op} {k}", fn, [(1,), (7,), (-3,)], "const_arith")


def pair_op(rng: random.Random) -> Task:
    a, b = pick(rng, PAIR_ARGS)
    what, body, names, fn = pick(rng, [
        ("sum", f"{a} + {b}", ("add", "total", "plus"), lambda x, y: x + y),
        ("difference", f"{a} - {b}", ("diff", "subtract", "minus"), lambda x, y: x - y),
        ("product", f"{a} * {b}", ("product", "multiply", "mul"), lambda x, y: x * y),
        ("larger", f"max({a}, {b})", ("larger", "bigger", "max2"), max),
        ("smaller", f"min({a}, {b})", ("smaller", "lesser", "min2"), min),
        ("absolute difference", f"abs({a} - {b})", ("abs_diff", "distance", "gap"), lambda x, y: abs(x - y)),
    ])
    name = pick(rng, names)
    return _run(f"Write a Python function {name}({a}, {b}) that returns the {what} of {a} and {b}.", name,
                f"{a}, {b}", body, fn, [(2, 3), (9, 4), (-5, 1)], "pair_op")


def divisible(rng: random.Random) -> Task:
    a, k = pick(rng, NUM_ARGS), rng.randint(2, 20)
    name = pick(rng, ("div_by_{k}", "is_multiple_of_{k}", "divisible_{k}")).format(k=k)
    inputs = [(k * 3,), (k * 3 + 1,), (k + k // 2 + 1,), (0,), (k * 7,)]
    return _run(f"Write a Python function {name}({a}) that returns True if {a} is divisible by {k}.", name, a,
                f"{a} % {k} == 0", lambda x: x % k == 0, inputs, "divisible")


def parity(rng: random.Random) -> Task:
    a = pick(rng, NUM_ARGS)
    which = pick(rng, ("even", "odd"))
    name = pick(rng, (f"is_{which}", f"check_{which}", f"{which}"))
    body = f"{a} % 2 == 0" if which == "even" else f"{a} % 2 == 1"
    fn = (lambda x: x % 2 == 0) if which == "even" else (lambda x: x % 2 == 1)
    return _run(f"Write a Python function {name}({a}) that returns True if {a} is {which}.", name, a, body,
                fn, [(4,), (7,), (0,), (13,)], "parity")


def list_reduce(rng: random.Random) -> Task:
    xs = pick(rng, LIST_ARGS)
    what, body, names, fn = pick(rng, [
        ("sum", f"sum({xs})", ("list_sum", "total_of", "add_all"), sum),
        ("largest item", f"max({xs})", ("largest", "biggest", "top"), max),
        ("smallest item", f"min({xs})", ("smallest", "lowest", "bottom"), min),
        ("length", f"len({xs})", ("count_items", "size_of", "length"), len),
        ("first item", f"{xs}[0]", ("first", "head", "first_item"), lambda v: v[0]),
        ("last item", f"{xs}[-1]", ("last", "tail_item", "last_item"), lambda v: v[-1]),
    ])
    name = pick(rng, names)
    inputs = [(list(v),) for v in TEST_LISTS]
    return _run(f"Write a Python function {name}({xs}) that returns the {what} of the list {xs}.", name, xs,
                body, fn, inputs, "list_reduce")


def list_filter(rng: random.Random) -> Task:
    xs, k = pick(rng, LIST_ARGS), rng.randint(1, 20)
    word, op, names, fn = pick(rng, [
        ("greater than", ">", ("above_{k}", "bigger_than_{k}", "keep_gt_{k}"),
         lambda v: [x for x in v if x > k]),
        ("less than", "<", ("below_{k}", "smaller_than_{k}", "keep_lt_{k}"),
         lambda v: [x for x in v if x < k]),
    ])
    name = pick(rng, names).format(k=k)
    inputs = [([k - 1, k, k + 1, k + 5],), ([k + 2, 0, k],), ([],)]
    return _run(f"Write a Python function {name}({xs}) that returns the items of {xs} {word} {k}.", name, xs,
                f"[x for x in {xs} if x {op} {k}]", fn, inputs, "list_filter")


def list_map(rng: random.Random) -> Task:
    xs, k = pick(rng, LIST_ARGS), rng.randint(2, 20)
    word, op, names, fn = pick(rng, [
        ("times", "*", ("scale_all_{k}", "times_each_{k}", "mul_all_{k}"), lambda v: [x * k for x in v]),
        ("plus", "+", ("add_all_{k}", "plus_each_{k}", "shift_{k}"), lambda v: [x + k for x in v]),
    ])
    name = pick(rng, names).format(k=k)
    inputs = [([1, 2, 3],), ([0, -4],), ([],)]
    return _run(f"Write a Python function {name}({xs}) that returns each item of {xs} {word} {k}.", name, xs,
                f"[x {op} {k} for x in {xs}]", fn, inputs, "list_map")


def string_op(rng: random.Random) -> Task:
    s = pick(rng, STR_ARGS)
    what, body, names, fn = pick(rng, [
        ("in upper case", f"{s}.upper()", ("shout", "to_upper", "upper"), str.upper),
        ("in title case", f"{s}.title()", ("to_title", "titled", "title"), str.title),
        ("reversed", f"{s}[::-1]", ("reverse", "backwards", "flip"), lambda t: t[::-1]),
        ("repeated twice", f"{s} * 2", ("twice", "double", "repeat2"), lambda t: t * 2),
        ("without spaces", f"{s}.replace(' ', '')", ("no_spaces", "squash", "strip_spaces"),
         lambda t: t.replace(" ", "")),
    ])
    name = pick(rng, names)
    inputs = [("hello world",), ("abc",), ("",)]
    return _run(f"Write a Python function {name}({s}) that returns {s} {what}.", name, s, body, fn, inputs,
                "string_op")


def count_char(rng: random.Random) -> Task:
    s, c = pick(rng, STR_ARGS), pick(rng, "aeiost")
    name = pick(rng, ("count_{c}", "num_{c}", "how_many_{c}")).format(c=c)
    inputs = [(w,) for w in rng.sample(TEST_WORDS, 3)] + [(c * 3 + "x",)]
    prompt = f"Write a Python function {name}({s}) that returns how many times '{c}' appears in {s}."
    return _run(prompt, name, s, f"{s}.count('{c}')", lambda t: t.count(c), inputs, "count_char")


def starts_with(rng: random.Random) -> Task:
    s, c = pick(rng, STR_ARGS), pick(rng, "abdhlmps")
    which = pick(rng, ("starts", "ends"))
    name = pick(rng, (f"{which}_with_{c}", f"{which}_{c}", f"check_{c}"))
    method = "startswith" if which == "starts" else "endswith"
    inputs = [(c + "ox",), ("ox" + c,), (c,), ("",)]
    return _run(f"Write a Python function {name}({s}) that returns True if {s} {which} with '{c}'.", name, s,
                f"{s}.{method}('{c}')", lambda t: getattr(t, method)(c), inputs, "starts_with")


def clamp(rng: random.Random) -> Task:
    a, lo = pick(rng, NUM_ARGS), rng.randint(0, 10)
    hi = lo + rng.randint(3, 20)
    name = pick(rng, ("clamp", "limit", "bound")) + f"_{lo}_{hi}"
    inputs = [(lo - 2,), (lo + 1,), (hi + 4,), (hi,)]
    prompt = f"Write a Python function {name}({a}) that returns {a} limited to between {lo} and {hi}."
    return _run(prompt, name, a, f"min(max({a}, {lo}), {hi})", lambda x: min(max(x, lo), hi), inputs, "clamp")


def power(rng: random.Random) -> Task:
    a, k = pick(rng, NUM_ARGS), rng.randint(2, 5)
    name = pick(rng, ("power_{k}", "pow_{k}", "raise_{k}")).format(k=k)
    return _run(f"Write a Python function {name}({a}) that returns {a} to the power {k}.", name, a,
                f"{a} ** {k}", lambda x: x**k, [(2,), (3,), (-1,), (0,)], "power")


TEMPLATES = [
    (const_arith, 1.5), (pair_op, 1.5), (divisible, 0.7), (parity, 0.5), (list_reduce, 1.2),
    (list_filter, 1.0), (list_map, 1.0), (string_op, 1.0), (count_char, 0.7), (starts_with, 0.7),
    (clamp, 0.6), (power, 0.6),
]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
