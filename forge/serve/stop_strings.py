"""Stop strings over streamed text: a stop may span tokens ("\\n" then "\\nB" for "\\n\\n"), so text that
could be the start of a stop string is held back until the next piece says whether it is one. Nothing of a
stop string ever reaches the caller, streamed or whole."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything generated so far
        self.sent = 0  # text[:sent] has been released
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to release; sets `hit` when a stop string completed (the text before it
        is released, nothing after)."""
        searched = len(self.text)
        self.text += piece
        at = first_stop(self.text, self.stops, searched)
        if at is not None:
            self.hit = True
            return self._release(at)
        return self._release(len(self.text) - held_back(self.text, self.stops))

    def flush(self) -> str:
        """What was held back, when generation ended without completing a stop string."""
        return "" if self.hit else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def first_stop(text: str, stops: Sequence[str], searched: int) -> int | None:
    """Index where the earliest stop string starts, looking only at text new since `searched`."""
    best = None
    for s in stops:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest ending of text that is the start of a stop string (and not yet all of it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
