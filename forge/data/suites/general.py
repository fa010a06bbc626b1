"""General domain: short format/transform tasks over a small word list (exact-match checked).

Words are few and common so that a tiny model sees each one often: the skill to learn is the
transformation (reverse, sort, join...), not the vocabulary.
"""

from __future__ import annotations

import random

from forge.data.suites.base import Task, pick, pick_weighted

DOMAIN = "general"

WORDS = (
    "red", "blue", "green", "pink", "gold", "gray", "cat", "dog", "fox", "owl", "bee", "cow",
    "apple", "pear", "plum", "lime", "fig", "kiwi", "sun", "moon", "star", "rain", "snow", "wind",
    "book", "pen", "cup", "door", "lamp", "hat", "car", "boat", "tree", "rock", "milk", "bread",
)
DELIMITERS = ("-", "+", ",", "_", "/", ";")


def _words(rng: random.Random, lo: int = 2, hi: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _exact(prompt: str, answer: str, task: str) -> Task:
    return Task(prompt, answer, {"kind": "exact", "answer": answer}, task)


def reverse_words(rng: random.Random) -> Task:
    words = _words(rng)
    return _exact(f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)), "reverse_words")


def uppercase(rng: random.Random) -> Task:
    words = _words(rng, 1, 4)
    return _exact(f"Uppercase: {' '.join(words)}", " ".join(words).upper(), "uppercase")


def lowercase(rng: random.Random) -> Task:
    words = _words(rng, 1, 4)
    return _exact(f"Lowercase: {' '.join(words).upper()}", " ".join(words), "lowercase")


def sort_words(rng: random.Random) -> Task:
    words = _words(rng)
    return _exact(f"Sort the words: {' '.join(words)}", " ".join(sorted(words)), "sort_words")


def sort_letters(rng: random.Random) -> Task:
    word = pick(rng, [w for w in WORDS if len(w) <= 5])
    return _exact(f"Sort the letters: {word}", "".join(sorted(word)), "sort_letters")


def count_words(rng: random.Random) -> Task:
    words = [pick(rng, WORDS) for _ in range(rng.randint(1, 7))]
    return _exact(f"Count the words: {' '.join(words)}", str(len(words)), "count_words")


def join_words(rng: random.Random) -> Task:
    words, delim = _words(rng), pick(rng, DELIMITERS)
    return _exact(f"Join with '{delim}': {' '.join(words)}", delim.join(words), "join_words")


def first_or_last(rng: random.Random) -> Task:
    words = _words(rng, 2, 6)
    which = pick(rng, ("First", "Last"))
    answer = words[0] if which == "First" else words[-1]
    return _exact(f"{which} word: {' '.join(words)}", answer, f"{which.lower()}_word")


def repeat_word(rng: random.Random) -> Task:
    word, times = pick(rng, WORDS), rng.randint(2, 4)
    return _exact(f"Repeat {times} times: {word}", " ".join([word] * times), "repeat_word")


def capitalize(rng: random.Random) -> Task:
    words = _words(rng, 1, 4)
    return _exact(f"Capitalize: {' '.join(words)}", " ".join(w.capitalize() for w in words), "capitalize")


TEMPLATES = [
    (reverse_words, 1.0), (uppercase, 1.0), (lowercase, 0.5), (sort_words, 1.0), (sort_letters, 0.5),
    (count_words, 1.0), (join_words, 1.0), (first_or_last, 1.0), (repeat_word, 0.7), (capitalize, 0.7),
]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
