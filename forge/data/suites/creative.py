"""Creative domain: constrained writing (acrostics, sentences with given words, slogans, rhyme lists,
lipograms, titles), checked by a rubric.

The check is {"kind": "rubric", "rubric": <what a judge model reads>, "constraints": {...}}: the constraints
are the prompt's machine-checkable demands (forge.data.suites.checks.RUBRIC_CONSTRAINTS), the rubric says them
in words and adds what only a judge can weigh (does it read well, is it on topic). The reference is built from
small phrase banks so it meets every constraint. A row has at most 3 constraints: the local judge scores the
fraction met (checks.rubric_score), so one missed demand scores <= 6.7, below the default pass mark of 7.
"""

from __future__ import annotations

import random
from typing import Any

from forge.data.suites.base import Task, pick, pick_weighted
from forge.data.suites.checks import describe_constraints

DOMAIN = "creative"

ACROSTIC_WORDS = ("SUN", "MOON", "STAR", "RAIN", "TREE", "LAKE", "BIRD", "FIRE", "SNOW", "WIND", "ROSE",
                  "HOPE", "SONG", "GOLD", "SEA", "SKY", "LEAF", "HOME", "BOOK", "CAT", "OWL", "FROG", "SHIP",
                  "BEAR", "CLOUD", "DREAM", "LIGHT", "RIVER", "STORM", "SMILE", "OCEAN", "WAVE", "PEACE",
                  "NIGHT")
LINES_BY_LETTER = {  # at least as many lines as a letter appears in any acrostic word
    "a": ("All is calm", "Across the hills", "Always near"),
    "b": ("Bright and bold", "Blue above", "Bells ring"),
    "c": ("Calm and clear", "Close to home", "Cool breeze"),
    "d": ("Deep and wide", "Dancing light", "Drifting"),
    "e": ("Every day", "Evening falls", "Ever free"),
    "f": ("Far away", "Floating high", "Full of joy"),
    "g": ("Gentle glow", "Green fields", "Growing strong"),
    "h": ("High above", "Held close", "Happy hearts"),
    "i": ("In the night", "Ice and snow", "Into the blue"),
    "k": ("Kind and warm", "Keeps us safe"),
    "l": ("Lovely light", "Long ago", "Look up"),
    "m": ("Many dreams", "Morning comes", "Makes us smile"),
    "n": ("Night is near", "Never alone", "New and bright"),
    "o": ("Over the hills", "Open skies", "Only you"),
    "p": ("Peace and rest", "Pure and true", "Painted skies"),
    "r": ("Rising high", "Rest now", "Round we go"),
    "s": ("Soft and slow", "Shining bright", "Sweet song"),
    "t": ("Through the trees", "Time stands still"),
    "u": ("Under the sky", "Up so high"),
    "v": ("Valleys deep", "Very still"),
    "w": ("Warm and wild", "Waves roll in", "Whispering"),
    "y": ("Yellow glow", "Years go by"),
}
# topic -> (the reference's opening, the words that show the sentence is about the topic)
TOPICS = {"the sea": ("By the sea", "sea"), "a forest": ("In a forest", "forest"),
          "the city": ("In the city", "city"), "winter": ("In winter", "winter"),
          "a garden": ("In a garden", "garden"), "the night sky": ("Under the night sky", "night sky"),
          "a rainy day": ("On a rainy day", "rainy day"), "the mountains": ("In the mountains", "mountains")}
ADJECTIVES = ("happy", "tiny", "brave", "sleepy", "curious", "gentle", "quiet", "lucky")
CHARACTERS = ("cat", "robot", "child", "dog", "bird", "sailor", "farmer", "fox")
OBJECTS = ("lamp", "key", "map", "shell", "coin", "box", "hat", "letter")
VERBS = ("finds", "carries", "paints", "hides", "drops", "keeps")
PRODUCTS = ("coffee", "tea", "bikes", "shoes", "soap", "bread", "lamps", "books", "socks", "juice", "pizza",
            "phones")
SLOGAN_WORDS = ("fresh", "bright", "happy", "smart", "bold", "easy", "pure", "fast", "better", "warm")
SLOGANS = ("{Y} {p} for everyone!", "Simply {y} {p}.", "{P}: always {y}!", "Stay {y} with {p}.")
RHYMES = {"ing": ("sing", "ring", "king", "wing", "spring", "thing", "swing", "bring"),
          "ight": ("light", "night", "bright", "sight", "might", "tight", "flight"),
          "ake": ("cake", "lake", "make", "bake", "take", "wake", "snake"),
          "ay": ("day", "play", "stay", "way", "say", "gray", "bay"),
          "ell": ("bell", "tell", "well", "shell", "sell", "smell"),
          "ound": ("sound", "round", "ground", "found", "pound", "hound"),
          "ain": ("rain", "train", "main", "gain", "chain", "brain", "plain"),
          "ine": ("line", "mine", "fine", "pine", "shine", "nine", "vine")}
# lipograms: each sentence holds its word and lacks at least one vowel
LIPOGRAMS = {"cat": ("A cat naps in the sun.", "My cat purrs at night."),
             "rain": ("Rain falls all day.", "Cold rain hits the roof."),
             "moon": ("The moon glows so bright.", "A full moon lights our path."),
             "snow": ("Snow falls on cold hills.", "Soft snow covers our town."),
             "dog": ("A dog sat by the door.", "My dog loves long walks."),
             "song": ("A song plays on the radio.", "Sing a song of joy."),
             "tree": ("A tall tree stands by the road.", "The old tree grew slowly."),
             "sun": ("The sun warms our backs.", "Sun warms a cat.")}
STORY_SUBJECTS = ("dragon", "robot", "river", "garden", "pirate", "wizard", "island", "castle", "fox",
                  "whale")
TITLE_ADJECTIVES = ("Silent", "Lost", "Golden", "Brave", "Little", "Hidden", "Sleepy", "Clever")
TITLES = {2: "{A} {X}", 3: "The {A} {X}", 4: "The {A} {X} Returns", 5: "The {A} {X} Comes Home"}


def _rubric_task(prompt: str, answer: str, goal: str, quality: str, constraints: dict[str, Any],
                 task: str) -> Task:
    rubric = f"{goal} Requirements: {'; '.join(describe_constraints(constraints))}. {quality}"
    return Task(prompt, answer, {"kind": "rubric", "rubric": rubric, "constraints": constraints}, task)


def acrostic(rng: random.Random) -> Task:
    word, per_line = pick(rng, ACROSTIC_WORDS), rng.randint(3, 4)
    banks = {c: rng.sample(LINES_BY_LETTER[c], len(LINES_BY_LETTER[c])) for c in dict.fromkeys(word.lower())}
    lines = [banks[c].pop() for c in word.lower()]  # a repeated letter takes a different line
    prompt = (f"Write an acrostic poem for the word {word}: one line per letter, "
              f"at most {per_line} words per line.")
    return _rubric_task(prompt, "\n".join(lines), f"An acrostic poem on {word}.",
                        "Better scores for lines that read as one small poem.",
                        {"line_initials": word, "max_words_per_line": per_line}, "acrostic")


def sentence_with_words(rng: random.Random) -> Task:
    topic = pick(rng, sorted(TOPICS))
    opening, topic_words = TOPICS[topic]
    adjective, character, thing = pick(rng, ADJECTIVES), pick(rng, CHARACTERS), pick(rng, OBJECTS)
    words = sorted([adjective, character, thing])  # one prompt per task: the order is not part of it
    prompt = f"Write one sentence about {topic} that uses the words {words[0]}, {words[1]} and {words[2]}."
    answer = f"{opening}, a {adjective} {character} {pick(rng, VERBS)} a {thing}."
    # naming the topic is the checkable part of "about the topic"; the judge weighs the rest
    return _rubric_task(prompt, answer, f"One sentence about {topic}.",
                        "It must make sense and be about the topic.",
                        {"include_words": [topic_words, *words], "max_sentences": 1}, "sentence_with_words")


def slogan(rng: random.Random) -> Task:
    product, word, limit = pick(rng, PRODUCTS), pick(rng, SLOGAN_WORDS), rng.randint(4, 8)
    prompt = f'Write a slogan for {product} in at most {limit} words that contains the word "{word}".'
    answer = pick(rng, SLOGANS).format(y=word, Y=word.capitalize(), p=product, P=product.capitalize())
    return _rubric_task(prompt, answer, f"A catchy slogan for {product}.",
                        "Better scores for a catchy, clear line.",
                        {"include_words": [product, word], "max_words": limit}, "slogan")


def rhyme_list(rng: random.Random) -> Task:
    suffix, count = pick(rng, sorted(RHYMES)), rng.randint(3, 6)
    prompt = f"List {count} different words that end in -{suffix}, one word per line."
    constraints = {"lines": count, "line_suffix": suffix, "distinct_lines": True}
    return _rubric_task(prompt, "\n".join(rng.sample(RHYMES[suffix], count)),
                        f"A list of words rhyming on -{suffix}.", "Only real English words count.",
                        constraints, "rhyme_list")


def lipogram(rng: random.Random) -> Task:
    word = pick(rng, sorted(LIPOGRAMS))
    sentence = pick(rng, LIPOGRAMS[word])
    letter = pick(rng, [v for v in "aeiou" if v not in sentence.lower()])
    limit = len(sentence.split()) + rng.randint(0, 3)
    prompt = (f'Write one sentence of at most {limit} words that uses the word "{word}" '
              f'but never the letter "{letter}".')
    constraints = {"include_words": [word], "max_words": limit, "exclude_letters": [letter]}
    return _rubric_task(prompt, sentence, f'One sentence without the letter "{letter}".',
                        "It must read naturally.", constraints, "lipogram")


def title(rng: random.Random) -> Task:
    subject, count = pick(rng, STORY_SUBJECTS), rng.randint(2, 5)
    prompt = f"Write a title for a story about a {subject} in exactly {count} words, each word capitalized."
    answer = TITLES[count].format(A=pick(rng, TITLE_ADJECTIVES), X=subject.capitalize())
    return _rubric_task(prompt, answer, f"A story title about a {subject}.",
                        "Better scores for an intriguing title.",
                        {"include_words": [subject], "exact_words": count, "title_case": True}, "title")


TEMPLATES = [(acrostic, 1.0), (sentence_with_words, 1.0), (slogan, 1.0), (rhyme_list, 0.8), (lipogram, 0.8),
             (title, 0.8)]


def make_task(rng: random.Random) -> Task:
    return pick_weighted(rng, TEMPLATES)(rng)
