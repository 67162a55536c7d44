"""Seeded long-context tasks for the accuracy harness (``benchmarks/accuracy.py``).

Every sample is generated from a seed, so a figure can be re-measured on other
prompts by changing the seed. Natural text comes from Debian packages that the
install script provides, never from a hub:

- ``fortunes`` (``/usr/share/games/fortunes``): quotes and short stories, the
  natural filler of ``passkey-natural``;
- ``base-files`` (``/usr/share/common-licenses/GPL-3``): a long, coherent
  document, the text of the teacher-forced ``loss`` and ``generation`` tasks.

Retrieval prompts are plain text ending in a cue ("The pass key is"), which is
how the default (135M) model answers most reliably; a sample is correct when
its answer appears in the greedy continuation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("literature", "wisdom", "people", "humorists", "fortunes", "science")
LONG_TEXT = Path("/usr/share/common-licenses/GPL-3")

# The loss task's continuation: an eighth of the context, at most this many tokens
# (each is one decode step).
MAX_FORCED_TOKENS = 256

# Long generation: a short prompt, then the rest of the context teacher-forced
# through decode steps, so the cache grows (and is compacted) while decoding.
GENERATION_PROMPT_TOKENS = 128
# Greedy agreement with the full cache is taken over this many generated tokens.
GENERATION_AGREEMENT_TOKENS = 256

RETRIEVAL_TASKS = (
    "passkey-repeat", "passkey-natural", "passkey-long", "multikey", "kv-retrieval", "variables",
)
# Tasks scored on teacher-forced decode steps (loss and KL), not on an answer.
FORCED_TASKS = ("loss", "generation")
# The long-prompt tasks: the standard grid's.
TASKS = RETRIEVAL_TASKS + ("loss",)
ALL_TASKS = TASKS + ("generation",)

_REPEAT_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
_NAMES = ("ALPHA", "BRAVO", "DELTA", "ECHO", "GOLF", "HOTEL", "KILO", "LIMA", "OSCAR", "TANGO")


@dataclass(frozen=True)
class Sample:
    task: str
    prompt_ids: list[int]
    context: int
    """The context length the sample was built for (its prompt is about as long)."""
    answer: str
    """Text the continuation must contain; for ``loss``, empty."""
    forced_ids: tuple[int, ...] = ()
    """For ``FORCED_TASKS``: the text's continuation after the prompt,
    teacher-forced through decode steps (``harness.teacher_forcing``); the loss
    is taken over it."""


class MissingTextError(RuntimeError):
    pass


def _read(path: Path, package: str) -> str:
    if not path.exists():
        raise MissingTextError(
            f"{path} is missing: install the Debian package {package!r} "
            f"(apt-get install -y {package}); scripts/install.sh does"
        )
    return path.read_text(encoding="utf-8", errors="replace")


def fortunes() -> list[str]:
    """Every fortune of ``FORTUNE_FILES``, whitespace collapsed, in file order."""
    out = []
    for name in FORTUNE_FILES:
        text = _read(FORTUNES_DIR / name, "fortunes")
        out += [" ".join(f.split()) for f in text.split("\n%\n") if f.strip()]
    return out


def long_text() -> str:
    return " ".join(_read(LONG_TEXT, "base-files").split())


class TaskGenerator:
    """Builds samples of about ``context_tokens`` tokens with the model's tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._fortunes: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def samples(self, task: str, context_tokens: int, count: int, seed: int) -> list[Sample]:
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}: allowed tasks are {', '.join(ALL_TASKS)}")
        make = getattr(self, "_" + task.replace("-", "_"))
        # One random stream per sample; needle depths spread evenly over `count`.
        return [
            make(random.Random(f"{seed}/{task}/{context_tokens}/{i}"), context_tokens, i, count)
            for i in range(count)
        ]

    # -- building blocks ------------------------------------------------------
    def _filler(self, rng: random.Random, style: str, num_tokens: int) -> list[str]:
        """Sentences (kept whole, so needles land between them) of about ``num_tokens``."""
        if style == "repeat":
            unit = _REPEAT_FILLER
            per = len(self.encode(unit))
            return [unit] * max(1, num_tokens // per)
        if self._fortunes is None:
            self._fortunes = fortunes()
        out: list[str] = []
        total = 0
        while total < num_tokens:
            text = rng.choice(self._fortunes) + " "
            out.append(text)
            total += len(self.encode(text))
        return out

    def _with_needles(
        self, rng: random.Random, context_tokens: int, head: str, needles: list[str],
        question: str, style: str, depths: list[float],
    ) -> list[int]:
        """``head`` + filler with ``needles`` inserted at relative ``depths`` + ``question``."""
        fixed = len(self.encode(head + " ".join(needles) + question))
        pieces = self._filler(rng, style, max(0, context_tokens - fixed))
        for needle, depth in sorted(zip(needles, depths), key=lambda nd: -nd[1]):
            pieces.insert(round(depth * len(pieces)), needle + " ")
        return self.encode(head + "".join(pieces).rstrip() + question)

    @staticmethod
    def _depth(index: int, count: int) -> float:
        # Needles spread evenly over the context, never in the last 10% (which the
        # recent window would keep exact anyway).
        return 0.05 + 0.85 * (index + 0.5) / count

    @staticmethod
    def _number(rng: random.Random) -> str:
        return str(rng.randint(10000, 99999))

    # -- tasks --------------------------------------------------------------
    def _passkey(self, rng, context_tokens, index, count, style, key=None,
                 task=None) -> Sample:
        """One needle holding ``key`` (a 5-digit number unless given) in ``style`` filler."""
        key = key or self._number(rng)
        head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        ids = self._with_needles(
            rng, context_tokens, head, [needle], "\nWhat is the pass key? The pass key is",
            style, [self._depth(index, count)],
        )
        return Sample(task or f"passkey-{style}", ids, context_tokens, key)

    def _passkey_repeat(self, rng, context_tokens, index, count) -> Sample:
        return self._passkey(rng, context_tokens, index, count, "repeat")

    def _passkey_natural(self, rng, context_tokens, index, count) -> Sample:
        return self._passkey(rng, context_tokens, index, count, "natural")

    def _passkey_long(self, rng, context_tokens, index, count) -> Sample:
        """A 20-digit key (four groups of five) in natural filler. The question's
        observation window scores where the key starts; the digits after it are
        needed only while the answer is decoded."""
        key = "-".join(self._number(rng) for _ in range(4))
        return self._passkey(rng, context_tokens, index, count, "natural", key, "passkey-long")

    def _multikey(self, rng, context_tokens, index, count) -> Sample:
        """Four similar needles (one per colour); the question asks for one."""
        colours = rng.sample(_COLOURS, 4)
        keys = [self._number(rng) for _ in colours]
        target = rng.randrange(len(colours))
        head = "There are several pass keys hidden inside a lot of irrelevant text. Memorize them.\n"
        needles = [f"The pass key of the {c} door is {k}. Remember it." for c, k in zip(colours, keys)]
        depths = sorted(rng.uniform(0.05, 0.9) for _ in colours)
        ids = self._with_needles(
            rng, context_tokens, head, needles,
            f"\nWhat is the pass key of the {colours[target]} door? "
            f"The pass key of the {colours[target]} door is",
            "repeat", depths,
        )
        return Sample("multikey", ids, context_tokens, keys[target])

    def _kv_retrieval(self, rng, context_tokens, index, count) -> Sample:
        """A JSON-like list of random hex keys and numbers filling the context."""
        head = "Here is a list of keys and their values. Remember them.\n"
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        text = head
        while len(self.encode(text)) < context_tokens - 40:
            batch = []
            for _ in range(8):
                k = f"{rng.getrandbits(32):08x}"
                if k not in seen:
                    seen.add(k)
                    batch.append((k, self._number(rng)))
            pairs += batch
            text = head + "".join(f'"{k}": {v},\n' for k, v in pairs)
        # Query a pair in the body: never among the last 10%, kept exact anyway.
        depth = self._depth(index, count)
        key, value = pairs[min(len(pairs) - 1, int(depth * len(pairs)))]
        question = f'\nWhat is the value of key "{key}"? The value of key "{key}" is'
        return Sample("kv-retrieval", self.encode(text.rstrip(",\n") + question), context_tokens, value)

    def _variables(self, rng, context_tokens, index, count) -> Sample:
        """A chain of assignments (X = 12345, then Y = X, Z = Y) spread through filler."""
        names = rng.sample(_NAMES, 3)
        value = self._number(rng)
        head = "Remember the variable assignments hidden in the text.\n"
        needles = [f"VAR {names[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])
        ]
        start = self._depth(index, count) * 0.6
        depths = [start, start + 0.15, start + 0.3]
        ids = self._with_needles(
            rng, context_tokens, head, needles,
            f"\nQuestion: what is the value of VAR {names[-1]}? Answer: VAR {names[-1]} =",
            "repeat", depths,
        )
        return Sample("variables", ids, context_tokens, value)

    def _text_window(self, rng: random.Random, context_tokens: int) -> list[int]:
        """``context_tokens`` consecutive tokens of the long text, from a seeded start."""
        ids = self.encode(long_text())
        if len(ids) < context_tokens:
            # Shorter than the context: repeat it (the second pass is then predictable
            # from far back, which is exactly what a compressed cache must preserve).
            ids = (ids * (context_tokens // len(ids) + 1))
        start = rng.randrange(0, len(ids) - context_tokens + 1)
        return ids[start : start + context_tokens]

    def _loss(self, rng, context_tokens, index, count) -> Sample:
        """A window of the long text: the prompt, then its last
        ``forced_tokens(context)`` tokens as the forced continuation."""
        window = self._text_window(rng, context_tokens)
        split = context_tokens - forced_tokens(context_tokens)
        return Sample("loss", window[:split], context_tokens, "", tuple(window[split:]))

    def _generation(self, rng, context_tokens, index, count) -> Sample:
        """A window of the long text: its first ``GENERATION_PROMPT_TOKENS`` tokens
        are the prompt, the rest is forced, one decode step each."""
        window = self._text_window(rng, context_tokens)
        split = GENERATION_PROMPT_TOKENS
        return Sample("generation", window[:split], context_tokens, "", tuple(window[split:]))


def forced_tokens(context_tokens: int) -> int:
    """Length of the ``loss`` task's teacher-forced continuation."""
    return min(context_tokens // 8, MAX_FORCED_TOKENS)


def is_correct(sample: Sample, text: str) -> bool:
    return re.search(rf"(?<!\d){re.escape(sample.answer)}(?!\d)", text) is not None
