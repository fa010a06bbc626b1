"""Stop strings over streamed text (forge.serve.stop_strings): what the engine releases piece by piece."""

from __future__ import annotations

import pytest

from forge.serve.stop_strings import StopScanner, held_back


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    scanner = StopScanner(stops)
    out = []
    for piece in pieces:
        out.append(scanner.feed(piece))
        if scanner.hit:
            break
    out.append(scanner.flush())
    return out, scanner.hit


@pytest.mark.parametrize(
    ("pieces", "stops", "released", "hit"),
    [
        (["A", "\n", "\nB"], ["\n\n"], ["A", "", "", ""], True),  # the stop spans two tokens
        (["A\n", "B"], ["\n\n"], ["A", "\nB", ""], False),  # held back, then released: not a stop
        (["x", "<|e", "nd|>tail"], ["<|end|>"], ["x", "", "", ""], True),
        (["x<|e", "nding"], ["<|end|>"], ["x", "<|ending", ""], False),
        (["one END two"], ["END"], ["one ", ""], True),  # inside one piece
        (["ab", "c"], ["abcd", "bc"], ["", "a", ""], True),  # the earliest-starting stop wins ("bc" at 1)
        (["a", "b"], ["abc"], ["", "", "ab"], False),  # generation ended mid-stop: flushed whole
        (["plain", " text"], [], ["plain", " text", ""], False),
    ],
)
def test_released_text_never_contains_a_stop_string(pieces, stops, released, hit) -> None:
    out, was_hit = stream(pieces, stops)
    assert (out, was_hit) == (released, hit)
    whole = "".join(pieces)
    cut = min((i for i in (whole.find(s) for s in stops if s) if i >= 0), default=len(whole))
    assert "".join(out) == whole[:cut]  # streamed or joined: the same text, up to the stop


def test_held_back_is_the_longest_stop_prefix_at_the_end() -> None:
    assert held_back("abc<|en", ["<|end|>", "<|e"]) == 4
    assert held_back("abc", ["<|end|>"]) == 0
    assert held_back("x\n", ["\n\n"]) == 1 and held_back("x\n\n", ["\n\n"]) == 1  # a whole stop is a hit
