"""Labelled follow-up pairs for 6B's escalation detector: (the user's previous message, their follow-up).

Serving escalates (a stronger modifier, a teacher, a human) when a user is unhappy with an answer. Nobody
labels that in production traffic up front, so the detector is trained on synthetic follow-ups to real
prompts (the task suites' user messages that prep_data wrote). The input is a PAIR because the most common
sign of dissatisfaction, asking the same thing again in other words, is only visible next to the previous
message; "Write a function bigger(a, b) ..." after "Write a function smaller(a, b) ..." is a new question,
after "Write a function bigger(a, b) ..." it is a re-ask.

Kinds (label 1 = dissatisfied):
  1  wrong         "that's wrong", "no, the answer is not right"
  1  retry         "try again", "please redo it"
  1  complaint     "you ignored what I asked", "this is useless"
  1  error_report  "this doesn't work, it throws a TypeError"
  1  rephrase      the previous message reworded: synonym swaps, sentence reordering, only the question
                   kept, politeness added or dropped, articles dropped, wrapped ("I mean, ...", "let me put
                   it another way: ...")
  0  thanks        "thanks!", and hard negatives such as "no problem, thanks", "no errors this time"
  0  follow_on     builds on the answer: "great, now also ...", "that's right, and what about 12?"
  0  new_question  another prompt of the pool; half of them hard: a prompt of the same template (same first
                   words, different numbers or names), optionally prefixed ("next one: ...")
  0  clarify       questions about the answer that are not complaints: "how did you get that?"
Hard positives ride in the same lists: "thanks, but that's wrong", "close, but not quite", rephrasings that
only change punctuation and case.

Held-out phrasings: every list of phrasings below (each kind's templates, openers, closers, the rephrase
wrappers and politeness forms, the synonym pairs, the slot phrases) gives every third entry (index % 3 ==
2) to the "test" split only; "train" and "val" draw from the other two thirds. Test accuracy therefore
measures how the detector does on wordings it never saw, not on memorised templates. The bare forms (a
follow-up with no opener, a re-ask with no wrapper, a new question with no prefix) occur in every split.
The caller gives each split its own `previous` prompts (6B's job does), so test prompts are new too.

`make_pairs` is deterministic for the same (n, seed, split, previous) and exactly balanced (n // 2
positives). Pure Python, cheap to import.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from forge.data.records import stable_int

SPLITS = ("train", "val", "test")
TEST_EVERY = 3  # entry i of every phrasing list is test-only when i % TEST_EVERY == TEST_EVERY - 1

POSITIVE_KINDS: dict[str, float] = {"wrong": 0.2, "retry": 0.15, "complaint": 0.15, "error_report": 0.12,
                                    "rephrase": 0.38}
NEGATIVE_KINDS: dict[str, float] = {"thanks": 0.2, "follow_on": 0.25, "new_question": 0.35, "clarify": 0.2}
KINDS = (*POSITIVE_KINDS, *NEGATIVE_KINDS)

# ---- phrasing lists (split by index: see the module docstring) -----------------------------------------

TEMPLATES: dict[str, tuple[str, ...]] = {
    "wrong": (
        "that's wrong", "no, the answer is not right", "that is false", "incorrect",
        "that's not correct", "your answer is off", "wrong answer", "nope, that's not it",
        "not right at all", "the result is wrong", "you got it wrong", "you made an error there",
        "this answer is incorrect", "that's not the right answer", "that's inaccurate",
        "no, that's a mistake", "the numbers don't add up", "this is not the correct result",
        "close, but not quite", "I don't think that's right", "that can't be right",
        "hmm, no", "that's not what the answer should be", "the answer is still wrong",
        "that's a wrong result", "your math is off", "that is not true", "the calculation is wrong",
        "you're wrong", "this is not accurate", "that's totally wrong", "no, you made a mistake",
        "that's not it at all", "the answer doesn't match", "you got the numbers wrong", "that's false",
    ),
    "retry": (
        "try again", "please redo it", "one more time, and get it right", "again please",
        "give it another shot", "have another go", "do it again, properly this time", "one more try",
        "redo that", "please answer again", "can you try once more", "take another pass at it",
        "let's try that again", "regenerate the answer", "start over", "retry",
        "do that again", "go again", "try it again from scratch", "another attempt please",
        "please rework it", "give it one more go", "try that one more time", "begin again",
        "redo the whole thing", "answer it again, carefully", "have another try", "one more attempt",
        "repeat that, but correctly", "do it over", "please try again", "start from scratch",
        "take another shot at it", "let's do that over", "once more, please", "another go please",
    ),
    "complaint": (
        "you ignored what I asked", "that's not what I asked for", "you didn't follow my instructions",
        "you didn't answer my question", "this is useless", "that has nothing to do with my question",
        "you misunderstood me", "that doesn't answer the question", "you are not listening",
        "read my question again", "why did you ignore the instructions?", "that misses the point entirely",
        "that's not even close to what I wanted", "you missed the point", "you answered a different question",
        "this is not helpful at all", "you skipped part of my request", "this is garbage",
        "stop making things up", "you changed my question", "I asked something else",
        "that's not what I meant", "you left out half of it", "did you even read my message?",
        "you didn't do what I said", "that's irrelevant", "this is a terrible answer",
        "you're not helping", "that's off-topic", "you got my request wrong",
        "I'm not happy with this", "this is not what I wanted", "you missed my question completely",
    ),
    "error_report": (
        "this doesn't work, it throws {err}", "I get {err} when I run it", "running it raises {err}",
        "it crashes with {err}", "the code fails: {err}", "it blows up with {err}",
        "it doesn't even compile", "the function returns None", "the tool call is broken",
        "it gives {err} on line 3", "the output is wrong when I test it", "it fails the tests",
        "I ran it and got {err}", "it still throws {err}", "executing it I see {err}",
        "that call fails with {err}", "your code errors out", "nothing works, {err}",
        "it doesn't run", "this raises {err} for empty input", "the tests fail with {err}",
        "I get an error", "it hangs forever", "the script dies with {err}",
        "the result is empty when I run it", "it errors: {err}", "it throws an exception",
    ),
    "thanks": (
        "thanks!", "thank you, that's perfect", "much appreciated", "great, that works",
        "no problem, thanks", "lovely, cheers", "perfect", "that's right, thanks", "spot on",
        "awesome, exactly what I needed", "cool, thanks a lot", "wonderful, no complaints",
        "got it, thank you", "nice, that's correct", "that's exactly right", "that works for me",
        "no, that's all, thanks", "brilliant", "thanks, that solved it", "ok great",
        "not bad at all, thanks", "no errors this time, thanks", "looks good to me",
        "that is the right answer, thank you", "correct, thanks", "great job", "that's it, thanks",
        "works perfectly", "thank you so much", "yes, that's right", "all good, thanks",
        "excellent", "that's what I was looking for", "super, thanks", "right, got it",
        "ok, makes sense", "fine, thank you", "this is great",
    ),
    "follow_on": (
        "great, now also {action}", "that's right, and what about {num2}?", "nice, could you also {action}?",
        "perfect. can you also {action}?", "ok, now do the same for {num2}", "good. next, {action}",
        "thanks. next one: {other}", "nice! and if it were {num2} instead?", "right, and now {action}",
        "good, that works. now {action}", "cool, and {other}", "great. one more: {other}",
        "correct. could you also {action}?", "ok, and how would it change with {num2}?",
        "that's what I needed. also, {action}", "exactly. now {action}, please",
        "thanks! what about {num2}?", "fine. and then {action}", "ok. after that, {action}",
        "good. also {action}", "that works. next {action}", "nice. could you {action} as well?",
        "and with {num2}?", "great, and {other}", "thanks, now {action}", "perfect, then {action}",
        "ok, now {action}", "yes. additionally, {action}", "now try it with {num2}",
        "good, what if I use {num2}?",
    ),
    "new_question": (
        "next one: {other}", "another question: {other}", "new task. {other}", "different question: {other}",
        "ok, moving on. {other}", "next: {other}", "here's another one: {other}",
        "and now something else: {other}", "separate question: {other}", "unrelated, but {other}",
        "now this one: {other}", "also, {other}", "new question: {other}", "something different: {other}",
        "ok. {other}", "next task: {other}", "another one: {other}", "moving on: {other}",
    ),
    "clarify": (
        "what do you mean by {word}?", "can you explain the second step?", "which formula did you use?",
        "why is that?", "how did you get that?", "could you say more about {word}?",
        "does that include the {word}?", "is that rounded?", "how would I check this myself?",
        "so the answer is the last number, right?", "where does the {num} come from?",
        "is there a simpler way to do it?", "what does that line do?", "what is the unit of the result?",
        "just to check, is {num} the input you used?", "can you walk me through it?",
        "why did you use {word} there?", "what is {word} here?", "how does that work?",
        "what does {word} refer to?", "could you explain your reasoning?", "is that the final answer?",
        "what happens with {num}?", "how did you handle the {word}?", "can you elaborate?",
        "which step uses {num}?", "why that approach?", "is {word} required here?",
    ),
    # re-asks: {prev} is the previous message, reworded by REPHRASE_OPS
    "rephrase": (
        "I mean, {prev}", "let me put it another way: {prev}", "in other words: {prev}",
        "let me rephrase. {prev}", "what I'm asking is: {prev}", "put differently, {prev}",
        "to be clear: {prev}", "again: {prev}", "I'll ask differently. {prev}", "my question was: {prev}",
        "I asked: {prev}", "once more: {prev}", "{prev} that is what I need", "ok so {prev}",
        "{prev} (that's my question)", "let me try again: {prev}", "simply: {prev}", "I said {prev}",
        "my request: {prev}", "what I want is this: {prev}", "to rephrase: {prev}",
        "the question is: {prev}", "once again, {prev}", "reworded: {prev}",
        "I need this: {prev}", "let me be clearer: {prev}", "here it is again: {prev}",
    ),
}
# decoration of the explicit complaints (wrong, retry, complaint, error_report)
OPENERS = ("hmm, ", "no. ", "wait, ", "sorry, but ", "ugh, ", "actually, ", "thanks, but ", "well, ",
           "uh, ", "honestly, ", "I appreciate it, but ", "look, ")
CLOSERS = (".", "!", ". Please fix it.", ", check again.", "...", ". Can you fix that?", ". Look again.",
           ". Fix it.", ", again.", ", please.", ". Come on.", ". Seriously?")
ERRORS = ("a TypeError", "NameError: name 'x' is not defined", "ZeroDivisionError", "a SyntaxError",
          "KeyError: 'room'", "an AttributeError", "IndexError: list index out of range", "a timeout",
          "ValueError", "RecursionError", "a JSON decode error", "an assertion error")
ACTIONS = ("explain each step", "make it shorter", "write a test for it", "add a short explanation",
           "show the working", "give me an example", "format it as a table", "handle negative numbers too",
           "translate the answer into French", "summarize it in one line", "add comments",
           "round it to one decimal", "do it for a longer list", "write the docstring", "make it a list")
POLITE = ("please, ", "could you help: ", "kindly: ", "can you please do this: ", "if you could, ",
          "please help: ")
# (a, b): either is swapped for the other, whole words, case-insensitive
SYNONYMS: tuple[tuple[str, str], ...] = (
    ("what is", "what's"), ("how many", "what number of"), ("write", "create"),
    ("returns", "gives back"), ("function", "method"), ("sort", "order"), ("reverse", "flip"),
    ("count", "tally"), ("join", "combine"), ("words", "terms"), ("larger", "bigger"), ("sum", "total"),
    ("together", "in total"), ("buys", "purchases"), ("costs", "is priced at"), ("how much", "what amount"),
    ("turn on", "switch on"), ("turn off", "switch off"), ("timer", "countdown"), ("email", "mail"),
    ("divided by", "over"), ("as a decimal", "in decimal form"), ("round to", "rounded to"),
    ("average", "mean"), ("speed", "velocity"), ("object", "item"), ("earns", "makes"),
    ("invest", "put in"), ("get back", "receive"), ("story", "tale"), ("sentence", "line"),
    ("exactly", "precisely"), ("at most", "no more than"), ("different", "distinct"), ("uses", "contains"),
    ("free", "available"), ("taken", "occupied"), ("has", "holds"), ("more than", "above"),
    ("request", "ask"), ("smallest", "minimum"), ("greatest", "largest"), ("number", "value"),
    ("percent", "%"), ("that", "which"), ("give", "provide"),
    ("list", "enumerate"), ("answer", "reply"), ("each", "every"),
    ("capitalize", "title-case"), ("uppercase", "upper case"), ("letters", "characters"),
    ("lowercase", "lower case"), ("repeat", "duplicate"), ("first", "initial"), ("with", "using"),
    ("tools", "functions"), ("items", "elements"), ("years", "yrs"), ("reversed", "backwards"),
)
STOPWORDS = frozenset(
    "a an the of to in on for and or is are was be with that this it its by as at from what how many much "
    "which who does do did you your me my i we our they them their there then than into out up".split())


def split_items(items: Sequence[Any], split: str) -> list[Any]:
    """The entries of a phrasing list that `split` may use: test gets every third, train/val the rest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    held = [i % TEST_EVERY == TEST_EVERY - 1 for i in range(len(items))]
    return [x for x, h in zip(items, held, strict=True) if h == (split == "test")]


def templates(kind: str, split: str) -> list[tuple[int, str]]:
    """(index, template) pairs of `kind` that `split` uses; the index names the template in a row."""
    if kind not in TEMPLATES:
        raise ValueError(f"kind must be one of {sorted(TEMPLATES)} (got {kind!r})")
    return split_items(list(enumerate(TEMPLATES[kind])), split)


# ---- small text helpers ---------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z'_-]*|\d+(?:\.\d+)?")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SENTENCE = re.compile(r"(?<=[.?!])\s+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> list[str]:
    """Words that carry the question (no stopwords, no 1-2 letter names), numbers included, in order."""
    return [w for w in words(text) if w not in STOPWORDS and (len(w) > 2 or w.isdigit())]


def signature(text: str) -> tuple[str, ...]:
    """What tells two prompts apart as questions: their content words and numbers, in order."""
    return tuple(content_words(text))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---- rephrasing ------------------------------------------------------------------------------------------

def _swap_synonyms(text: str, rng: random.Random, split: str) -> str:
    pairs = split_items(SYNONYMS, split)
    found = []
    for a, b in pairs:
        for src, dst in ((a, b), (b, a)):
            if re.search(rf"(?<![\w']){re.escape(src)}(?![\w'])", text, flags=re.IGNORECASE):
                found.append((src, dst))
    rng.shuffle(found)
    for src, dst in found[:rng.randint(1, 3)]:
        text = re.sub(rf"(?<![\w']){re.escape(src)}(?![\w'])", dst, text, count=1, flags=re.IGNORECASE)
    return text


def _reorder(text: str, rng: random.Random, split: str) -> str:
    """The question first, then its context ("How many are free? There are 6 rows ...")."""
    sentences = _SENTENCE.split(text.strip())
    if len(sentences) < 2:
        if "(" in text:  # a comma inside a signature is not a clause boundary
            return text
        parts = re.split(r",\s+", text.strip(), maxsplit=1)  # "X, Y" -> "Y, X"
        return f"{parts[1].rstrip('.?!')}, {_lower_first(parts[0])}" if len(parts) == 2 else text
    return " ".join([sentences[-1], *sentences[:-1]])


def _question_only(text: str, rng: random.Random, split: str) -> str:
    """Only the last sentence (the actual ask), when it says enough on its own."""
    sentences = _SENTENCE.split(text.strip())
    last = sentences[-1]
    return last if len(sentences) > 1 and len(content_words(last)) >= 2 else text


def _polite(text: str, rng: random.Random, split: str) -> str:
    if re.search(r"\bplease\b", text, flags=re.IGNORECASE):
        return re.sub(r"\s*\bplease\b,?\s*", " ", text, flags=re.IGNORECASE).strip()
    return rng.choice(split_items(POLITE, split)) + _lower_first(text)


def _drop_articles(text: str, rng: random.Random, split: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\b(?:the|a|an)\b", "", text, flags=re.IGNORECASE)).strip()


def _casual(text: str, rng: random.Random, split: str) -> str:
    return text.lower().rstrip(".?!")


REPHRASE_OPS: dict[str, Callable[[str, random.Random, str], str]] = {
    "synonyms": _swap_synonyms, "reorder": _reorder, "question_only": _question_only,
    "polite": _polite, "drop_articles": _drop_articles, "casual": _casual,
}


def rephrase(previous: str, rng: random.Random, split: str) -> str:
    """`previous` reworded by one to three operations (the same question, asked again); never identical."""
    ops = list(REPHRASE_OPS)
    chosen = rng.sample(ops, rng.randint(1, 3))
    if "synonyms" not in chosen and rng.random() < 0.5:
        chosen.insert(0, "synonyms")
    text = previous.strip()
    for op in chosen:
        text = REPHRASE_OPS[op](text, rng, split)
    if words(text) == words(previous):  # only case or punctuation changed: not yet a rewording
        text = _polite(text, rng, split)
    return text.strip()


# ---- slots -----------------------------------------------------------------------------------------------

def _slot_values(previous: str, other: str, rng: random.Random, split: str) -> dict[str, str]:
    cws = [w for w in content_words(previous) if not w.isdigit()] or ["that"]
    numbers = _NUMBER.findall(previous)
    num = rng.choice(numbers) if numbers else rng.choice(cws)
    num2 = str(rng.randint(2, 99))
    while num2 in numbers:
        num2 = str(int(num2) + 1)
    return {"word": rng.choice(cws), "num": num, "num2": num2, "other": _lower_first(other),
            "err": rng.choice(split_items(ERRORS, split)), "action": rng.choice(split_items(ACTIONS, split))}


def _decorate(core: str, rng: random.Random, split: str) -> str:
    """Explicit complaints get an opener and a closer half of the time each (the bare form in every split)."""
    text = core
    if rng.random() < 0.5:
        text = rng.choice(split_items(OPENERS, split)) + _lower_first(text)
    if rng.random() < 0.5 and not text.endswith(("?", "!", ".")):
        text += rng.choice(split_items(CLOSERS, split))
    return text


# ---- pairs -----------------------------------------------------------------------------------------------

class PromptPool:
    """Deduplicated previous prompts, grouped by template (their first two words): the hard negatives of
    new_question come from the previous prompt's own group."""

    def __init__(self, previous: Sequence[str]) -> None:
        self.prompts = list(dict.fromkeys(p.strip() for p in previous if isinstance(p, str) and p.strip()))
        if len(self.prompts) < 2:
            raise ValueError(f"previous: need at least 2 distinct non-empty prompts "
                             f"(got {len(self.prompts)})")
        self.groups: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            self.groups.setdefault(self.group(p), []).append(i)

    @staticmethod
    def group(prompt: str) -> str:
        return " ".join(words(prompt)[:2])

    def other(self, previous: str, rng: random.Random, similar: bool) -> str:
        """A different question: of the same template when `similar` and one exists, else any other."""
        sig = signature(previous)
        pools: list[Sequence[int]] = [range(len(self.prompts))]
        if similar:
            pools.insert(0, self.groups.get(self.group(previous), []))
        for pool in pools:
            for _ in range(20 if pool else 0):
                cand = self.prompts[pool[rng.randrange(len(pool))]]
                if signature(cand) != sig:
                    return cand
        for cand in self.prompts:  # tiny pools: the first that differs
            if signature(cand) != sig:
                return cand
        raise ValueError("previous: every prompt asks the same thing; need at least 2 different questions")


def make_message(kind: str, previous: str, pool: PromptPool, rng: random.Random,
                 split: str) -> tuple[str, str]:
    """(follow-up message, template id "kind:index" or "kind:bare") of `kind` after `previous`."""
    if kind == "rephrase":
        text = rephrase(previous, rng, split)
        if rng.random() < 0.4:
            return _upper_first(text), "rephrase:bare"
        index, template = rng.choice(templates(kind, split))
        return _upper_first(template.format(prev=_lower_first(text))), f"rephrase:{index}"
    if kind == "new_question":
        other = pool.other(previous, rng, similar=rng.random() < 0.5)
        if rng.random() < 0.5:
            return other, "new_question:bare"
        index, template = rng.choice(templates(kind, split))
        return _upper_first(template.format(other=_lower_first(other))), f"new_question:{index}"
    index, template = rng.choice(templates(kind, split))
    slots = _slot_values(previous, pool.other(previous, rng, similar=False), rng, split)
    text = template.format(**slots)
    if kind in ("wrong", "retry", "complaint", "error_report"):
        text = _decorate(text, rng, split)
    if rng.random() < 0.5:
        text = _upper_first(text)
    return text, f"{kind}:{index}"


def make_pairs(n: int, seed: int, split: str, previous: Sequence[str]) -> list[dict[str, Any]]:
    """n labelled (previous, follow-up) pairs, exactly n // 2 dissatisfied, in a seeded random order.

    Rows: {"id", "previous", "message", "label" (1 dissatisfied, 0 not), "kind", "template"}; `template`
    ("kind:index", or "kind:bare") names the phrasing, so a split's phrasings can be audited."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    pool = PromptPool(previous)
    rng = random.Random(stable_int(f"forge-escalation|{split}|{seed}|{n}|{len(pool.prompts)}"))
    labels = [1] * (n // 2) + [0] * (n - n // 2)
    rng.shuffle(labels)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for label in labels:
        weights = POSITIVE_KINDS if label else NEGATIVE_KINDS
        for _attempt in range(20):  # a repeated pair is redrawn (small template spaces)
            kind = rng.choices(list(weights), weights=list(weights.values()), k=1)[0]
            prev = pool.prompts[rng.randrange(len(pool.prompts))]
            message, template = make_message(kind, prev, pool, rng, split)
            if (prev, message) not in seen:
                break
        seen.add((prev, message))
        rows.append({"id": f"esc-{split}-{len(rows):05d}", "previous": prev, "message": message,
                     "label": label, "kind": kind, "template": template})
    return rows
