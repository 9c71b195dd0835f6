"""Token-exact synthetic contexts, built with the engine's OWN tokenizer.

A context of N tokens is N words each of which the engine's tokenizer maps
to exactly one token when preceded by a space (" word"). Byte-level BPE
pre-tokenizers split text at those boundaries, so a string of N such words is
exactly N tokens, and concatenating contexts concatenates their tokens: the
prefix structure [A,B] / [A,B,Q] / [B,Q] holds at the token level.

Words come from the corpus bundled with the models (kvmatrix/models/corpus),
so every engine that shares the model's tokenizer gets the same text.
Deterministic from a seed. Stdlib only.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "models" / "corpus"

# Words used when no corpus is present (e.g. a foreign model); ordinary English.
FALLBACK_WORDS = (
    "the of and to in is was that for on with as by at from this be are or it an have not which "
    "one all were when we there can more if no out so what up its about into than them only other "
    "time new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
).split()


class WorkloadError(ValueError):
    pass


def corpus_words(corpus_dir: Path = CORPUS_DIR, limit: int = 1500) -> list[str]:
    """The corpus's most frequent lowercase words, most frequent first (ties alphabetical)."""
    counts: Counter[str] = Counter()
    for path in sorted(corpus_dir.glob("*.txt")) if corpus_dir.is_dir() else []:
        counts.update(re.findall(r"[a-z]+", path.read_text(errors="replace").lower()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [w for w, _ in ranked if len(w) > 1][:limit]
    return words or list(FALLBACK_WORDS)


def single_token_words(tokenize: Callable[[str], list[int]], candidates: list[str], need: int = 64) -> list[str]:
    """Candidates that the tokenizer maps to one token as " word", each with a distinct id."""
    out: list[str] = []
    seen: set[int] = set()
    for word in candidates:
        ids = tokenize(" " + word)
        if len(ids) == 1 and ids[0] not in seen:
            out.append(word)
            seen.add(ids[0])
    if len(out) < need:
        raise WorkloadError(
            f"only {len(out)} single-token words found in this model's vocabulary (need {need}); "
            "use a model whose tokenizer has ordinary English words"
        )
    return out


@dataclass(frozen=True)
class Contexts:
    """Texts of exactly a, b, q tokens (when each is preceded by its neighbour)."""

    a: str
    b: str
    q: str

    def messages(self, *parts: str) -> list[dict]:
        """One user message whose content is the concatenation of the named parts."""
        return [{"role": "user", "content": "".join(getattr(self, p) for p in parts)}]


class Vocabulary:
    """Single-token words of one engine's tokenizer, ready to build contexts."""

    def __init__(self, words: list[str]):
        self.words = words

    @classmethod
    def from_engine(cls, tokenize: Callable[[str], list[int]]) -> Vocabulary:
        return cls(single_token_words(tokenize, corpus_words()))

    def span(self, n: int, rng: random.Random, avoid_first: set[str] = frozenset()) -> str:
        """n single-token words as ' w1 w2 ... wn' (the leading space is part of w1's token)."""
        if n <= 0:
            return ""
        first = rng.choice([w for w in self.words if w not in avoid_first] or self.words)
        rest = [rng.choice(self.words) for _ in range(n - 1)]
        return " " + " ".join([first, *rest])

    def contexts(self, a: int, b: int, q: int, seed: int) -> Contexts:
        """A, B, Q whose first words differ, so [B,Q] shares no token with [A,B] past the template."""
        rng = random.Random(seed)
        a_text = self.span(a, rng)
        b_text = self.span(b, rng, avoid_first={a_text.split()[0]})
        q_text = self.span(q, rng, avoid_first={a_text.split()[0], b_text.split()[0]})
        return Contexts(a_text, b_text, q_text)


def common_prefix(x: list[int], y: list[int]) -> int:
    n = 0
    for u, v in zip(x, y, strict=False):
        if u != v:
            break
        n += 1
    return n


def expected_cached(held: list[int] | None, prompt: list[int], granularity: int = 1) -> int:
    """Prompt tokens an engine should reuse given what it held before the request.

    The longest common token prefix, at most len(prompt) - 1 (every engine
    recomputes at least the last prompt token to get logits), rounded down to
    the engine's cache granularity (vLLM caches whole blocks).
    """
    if not held or not prompt:
        return 0
    lcp = min(common_prefix(held, prompt), len(prompt) - 1)
    return (lcp // granularity) * granularity


def verify(cached: int | None, expected: int, granularity: int = 1) -> bool:
    """Engine-reported cached tokens agree with the expectation at the engine's granularity."""
    if cached is None:
        return False
    return cached // granularity == expected // granularity and cached <= expected + granularity - 1
