"""Repeated-prefix prompt sets (the prefix_reuse experiment), as JSONL.

One object a line::

    {"prompt": "<SHARED_PREFIX>\\nQ: <question>\\nA:", "prefix_len_tokens": N, "workload": "chat_policy"}

Prefix strategy (token-exact for the ENGINE's tokenizer, as workload.py):

* readable text: corpus sentences (kvmatrix/models/corpus) in a seeded order,
  appended while they fit, then padded to EXACTLY ``N`` tokens with words the
  tokenizer maps to one token each (" word"); the whole prefix is tokenized
  once more and adjusted until it is N tokens;
* the question comes after a newline, which byte-level BPE pre-tokenizers
  split off, so the prompt's first N tokens ARE the prefix's tokens (checked
  by ``check_prompt``);
* ``chat_policy`` (a system prompt / policy, regimes up to 512 tokens) and
  ``rag_prefix`` (retrieved documents, longer regimes);
* the same seed gives the same set; unique prefixes of the same length (the
  hit-rate mixes' non-reusing requests) come from other seeds and start with
  another sentence than the shared one.

Stdlib only: the host validates ``--prompts FILE`` with it before any work.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmatrix.runners.workload import CORPUS_DIR, Vocabulary, corpus_words

WORKLOADS = ("chat_policy", "rag_prefix")
#: named prefix regimes (tokens)
REGIMES = {"medium": 384, "large": 1024}
QUESTION_MARK = "\nQ: "
HEADERS = {
    "chat_policy": ("Policy", "What does the policy say about {}?"),
    "rag_prefix": ("Context", "What do the documents say about {}?"),
}


class PromptSetError(ValueError):
    """A malformed prompt set; str(e) is one line naming the line and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    prefix_len_tokens: int
    workload: str

    @property
    def prefix(self) -> str:
        return self.prompt[: self.prompt.rindex(QUESTION_MARK)]

    @property
    def question_part(self) -> str:
        """"\\nQ: ...\\nA:" (everything after the prefix)."""
        return self.prompt[self.prompt.rindex(QUESTION_MARK):]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "prefix_len_tokens": self.prefix_len_tokens, "workload": self.workload}


def workload_for(n_tokens: int) -> str:
    return "chat_policy" if n_tokens <= 512 else "rag_prefix"


def parse_regimes(text: str) -> list[int]:
    """``medium,large`` or token counts such as ``384,1024``; raises PromptSetError."""
    out = []
    for item in (x.strip().lower() for x in text.split(",")):
        if not item:
            continue
        if item in REGIMES:
            out.append(REGIMES[item])
        elif item.isdigit() and int(item) >= 16:
            out.append(int(item))
        else:
            raise PromptSetError(f"prefix regime {item!r}: use medium ({REGIMES['medium']}), large "
                                 f"({REGIMES['large']}) or a token count >= 16")
    if not out:
        raise PromptSetError("no prefix regime given; use medium,large or token counts such as 384,1024")
    return list(dict.fromkeys(out))


def regime_name(n_tokens: int) -> str:
    for name, n in REGIMES.items():
        if n == n_tokens:
            return name
    return f"{n_tokens}"


# ---------------------------------------------------------------- JSONL
def parse_jsonl(text: str, source: str = "prompts") -> list[PromptRecord]:
    """Validate a prompt set; raises PromptSetError naming the first bad line."""
    records = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{source} line {no}: not JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise PromptSetError(f"{source} line {no}: expected a JSON object with prompt, prefix_len_tokens, workload")
        missing = [k for k in ("prompt", "prefix_len_tokens", "workload") if k not in obj]
        if missing:
            raise PromptSetError(f"{source} line {no}: missing {', '.join(missing)}; each line needs prompt, "
                                 "prefix_len_tokens, workload")
        prompt, n, wl = obj["prompt"], obj["prefix_len_tokens"], obj["workload"]
        if not isinstance(prompt, str) or QUESTION_MARK not in prompt or not prompt[: prompt.rindex(QUESTION_MARK)]:
            raise PromptSetError(f"{source} line {no}: prompt must be '<PREFIX>\\nQ: <question>\\nA:' "
                                 "(a non-empty prefix, then a newline and 'Q: ')")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PromptSetError(f"{source} line {no}: prefix_len_tokens must be a positive integer, not {n!r}")
        if wl not in WORKLOADS:
            raise PromptSetError(f"{source} line {no}: workload {wl!r}; use one of {', '.join(WORKLOADS)}")
        records.append(PromptRecord(prompt, n, wl))
    if not records:
        raise PromptSetError(f"{source} has no prompts; write one JSON object per line")
    groups: dict[int, set[str]] = {}
    for r in records:
        groups.setdefault(r.prefix_len_tokens, set()).add(r.prefix)
    for n, prefixes in groups.items():
        if len(prefixes) != 1:
            raise PromptSetError(f"{source}: the prompts with prefix_len_tokens={n} have {len(prefixes)} different "
                                 "prefixes; a regime shares ONE prefix (give other lengths to other prefixes)")
    return records


def read_jsonl(path: str | Path) -> list[PromptRecord]:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"cannot read prompt set {p}: {exc}") from None
    return parse_jsonl(text, str(p))


def to_jsonl(records: list[PromptRecord]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def digest(records: list[PromptRecord]) -> str:
    return hashlib.sha256(to_jsonl(records).encode()).hexdigest()


# ---------------------------------------------------------------- building
def corpus_sentences(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """Sentences of the bundled corpus, whitespace-normalised, in file order."""
    out = []
    for path in sorted(corpus_dir.glob("*.txt")) if corpus_dir.is_dir() else []:
        text = re.sub(r"\s+", " ", path.read_text(errors="replace"))
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 60]
    return out or ["The cache keeps the work that was already done so the next request is cheaper."]


class PromptBuilder:
    """Token-exact prefixes and questions for one engine's tokenizer."""

    def __init__(self, tokenize: Callable[[str], list[int]], sentences: list[str] | None = None,
                 vocab: Vocabulary | None = None):
        self.tokenize = tokenize
        self.sentences = sentences if sentences is not None else corpus_sentences()
        self.vocab = vocab or Vocabulary.from_engine(tokenize)
        self._len: dict[str, int] = {}

    def _n(self, piece: str) -> int:
        if piece not in self._len:
            self._len[piece] = len(self.tokenize(piece))
        return self._len[piece]

    def prefix(self, n_tokens: int, seed: int, avoid_first: str | None = None) -> str:
        """A readable prefix of exactly ``n_tokens`` tokens (corpus sentences, then single-token words)."""
        rng = random.Random(seed)
        order = list(range(len(self.sentences)))
        rng.shuffle(order)
        if avoid_first is not None and len(order) > 1 and self.sentences[order[0]] == avoid_first:
            order.append(order.pop(0))
        parts: list[str] = []
        used = skipped = 0
        for i in order:
            piece = (" " if parts else "") + self.sentences[i]
            k = self._n(piece)
            if used + k > n_tokens - 4:  # leave room for at least a few pad words
                skipped += 1
                if not parts or skipped > 12:
                    break
                continue
            parts.append(piece)
            used += k
        text = "".join(parts)
        words = self.vocab.words
        for _ in range(8):  # the sum of parts is an estimate; the whole text decides
            have = len(self.tokenize(text)) if text else 0
            if have == n_tokens:
                return text
            if have < n_tokens:
                pad = [rng.choice(words) for _ in range(n_tokens - have)]
                text = (text + " " + " ".join(pad)) if text else " ".join(pad)
            else:
                cut = text.rsplit(" ", have - n_tokens)[0] if " " in text else ""
                text = cut
        raise PromptSetError(f"could not build a prefix of exactly {n_tokens} tokens for this tokenizer")

    def questions(self, count: int, seed: int) -> list[str]:
        """``count`` distinct readable topics (corpus words, seeded order)."""
        words = [w for w in corpus_words() if len(w) >= 4]
        rng = random.Random(seed)
        rng.shuffle(words)
        if count > len(words):
            raise PromptSetError(f"--variants {count}: the corpus offers only {len(words)} distinct topics")
        return words[:count]

    def prompt_set(self, regimes: list[int], variants: int, seed: int) -> list[PromptRecord]:
        """Per regime: ONE shared prefix and ``variants`` distinct questions."""
        out = []
        topics = self.questions(variants, seed)
        for n in regimes:
            wl = workload_for(n)
            prefix = self.prefix(n, seed * 7919 + n)
            q = HEADERS[wl][1]
            out += [PromptRecord(f"{prefix}{QUESTION_MARK}{q.format(t)}\nA:", n, wl) for t in topics]
        for r in out:
            self.check(r)
        return out

    def check(self, record: PromptRecord) -> None:
        """The prefix is exactly prefix_len_tokens tokens and the prompt starts with those tokens."""
        pre = self.tokenize(record.prefix)
        if len(pre) != record.prefix_len_tokens:
            raise PromptSetError(f"a prompt's prefix is {len(pre)} tokens for this model's tokenizer but "
                                 f"prefix_len_tokens says {record.prefix_len_tokens}; regenerate the prompt set "
                                 "for this model")
        full = self.tokenize(record.prompt)
        if full[: len(pre)] != pre:
            raise PromptSetError("a prompt's tokens do not start with its prefix's tokens (the question merges "
                                 "into the prefix); end the prefix with a word and start the question on a new line")

    def with_unique_prefix(self, record: PromptRecord, seed: int) -> PromptRecord:
        """The same question after a unique prefix of the same token length."""
        first = next((s for s in self.sentences if record.prefix.startswith(s)), None)
        prefix = self.prefix(record.prefix_len_tokens, seed, avoid_first=first)
        return PromptRecord(prefix + record.question_part, record.prefix_len_tokens, record.workload)


def reuse_plan(variants: int, reuse: float, seed: int) -> list[bool]:
    """Which of ``variants`` requests reuse the shared prefix (True) at fraction ``reuse``; seeded order."""
    k = round(variants * reuse)
    flags = [True] * k + [False] * (variants - k)
    random.Random(seed).shuffle(flags)
    return flags
