"""Seeded prompts of chosen token lengths for engine tests.

Filler is built from short generated sentences (the kind the default model
reads well), closed by a question so greedy continuations are not trivial loops.
"""

from __future__ import annotations

import random

_SUBJECTS = ["The farmer", "A teacher", "The old dog", "My neighbour", "The pilot",
             "A small child", "The baker", "Our captain", "The painter", "A student"]
_VERBS = ["walked to", "looked at", "talked about", "cleaned", "found", "painted",
          "visited", "remembered", "carried", "described"]
_OBJECTS = ["the river", "a red house", "the market", "an old book", "the garden",
            "a blue boat", "the mountain", "the city library", "a quiet street", "the harbour"]
_QUESTIONS = ["Who walked to the river?", "Summarize the story in one sentence.",
              "What did the baker find?", "Write a short poem about the garden.",
              "List three things the pilot did.", "Which place was visited most?"]


def make_prompt(tokenizer, num_tokens: int, seed: int) -> list[int]:
    """Token ids of a prompt close to ``num_tokens`` long (exact after truncation)."""
    rng = random.Random(seed)
    question = " Question: " + rng.choice(_QUESTIONS) + " Answer:"
    tail = tokenizer.encode(question, add_special_tokens=False)
    sentences: list[str] = []
    ids: list[int] = []
    while len(ids) < num_tokens - len(tail):
        sentences.append(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            f" on day {rng.randint(1, 999)}."
        )
        if len(sentences) % 16 == 0:
            ids = tokenizer.encode(" ".join(sentences), add_special_tokens=False)
    ids = tokenizer.encode(" ".join(sentences), add_special_tokens=False)
    body = ids[: max(1, num_tokens - len(tail))]
    return body + tail
