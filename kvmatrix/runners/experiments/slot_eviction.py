"""slot_eviction: what a llama-server with N slots (``--parallel N``) does to a cached prefix.

With N slots and a non-unified KV cache (llama-server's default when N is
given) each slot gets its share of the context: n_ctx / N tokens (current
builds round it up to a multiple of 256; the cell asks for a total that splits
exactly). Each slot keeps only the last prompt it evaluated, and a request
reuses only what the slot it lands on holds. So at a fixed total context,
more slots mean

- a prompt longer than a slot's share does not fit: current llama-server
  refuses it (HTTP 400 ``exceed_context_size_error``); older builds shifted or
  truncated it, which reads as an unexplained miss;
- a prefix cached in one slot is invisible to a request that lands on another
  slot (pinned elsewhere, or chosen by the server);
- but two prefixes can stay cached side by side, where one slot evicts one
  with the other.

Per cell (one N, the total ``n_ctx`` fixed) every condition runs the
invalidation trial (``measure_trial``: warm-up, settle, timed streaming query,
re-warm, settle, non-streaming 1-token companion), conditions interleaved
round by round:

=============  =============================  ============================  ====================================
condition      warm-up                        timed query                   shows
=============  =============================  ============================  ====================================
cache_hit      [A,B] on slot 0                [A,B,Q] on slot 0             reuse, if [A,B,Q] fits the slot
cache_miss     [A,B] on slot 0                [B,Q] on slot 0               the prefix changed: recompute, and
                                                                            the re-warm recomputes [A,B]
other_slot     [A',B'] on slot 1, then        [A,B,Q] on slot 1 (mod N)     the prefix sits in ANOTHER slot
               [A,B] on slot 0
server_hit     [A,B], server's choice         [A,B,Q], server's choice      where the server routes a repeat
server_miss    [A,B], server's choice         [B,Q], server's choice        does a miss evict [A,B]? (re-warm)
alternate      [A,B], then [A',B'], both      [A,B,Q], server's choice      two clients' prefixes alternate:
               server's choice                                              does the other one evict [A,B]?
=============  =============================  ============================  ====================================

The first request of other_slot and alternate is untimed and repeated before
every warm-up (``measure_trial``'s ``prepare``), so each condition starts from
the state it names whatever ran before it.

"Server's choice" sends no ``id_slot``: llama-server takes the idle slot whose
prompt shares the largest fraction with the new one (above its
``--slot-prompt-similarity``, 0.1 by default), else the least recently used.
[A',B'] is a second prefix of the same sizes that shares nothing with [A,B]
past the chat template (another client's prefix). With one slot, "slot 1" is
slot 0, so other_slot puts [A,B] back before the query and hits; with N >= 2
the server sends [A',B'] to another slot than the [A,B] it just served (least
recently used), so alternate tells whether the two prefixes coexist.

The slot that served every request is read back from the engine (``/slots``)
and recorded (trial fields ``id_slot``, ``warmup_id_slot``, ``rewarm_id_slot``);
what each slot holds is tracked per slot, so every hit, miss and eviction is
checked against the engine's own ``timings.cache_n`` as in the other
experiments. A trial one of whose requests the server refuses is recorded
under ``refused`` (which prompt, its tokens, the slot's context, the engine's
message) instead of being timed; a refusal leaves the slots' contents unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmatrix import catalog
from kvmatrix.runners.backends.base import Backend, ContextExceeded, Request
from kvmatrix.runners.experiments.invalidation import Tracker, calibration_block, measure_trial, order_labels, schedule
from kvmatrix.runners.spec import ExperimentSpec, SpecError
from kvmatrix.runners.workload import Contexts, Vocabulary


@dataclass(frozen=True)
class Condition:
    warm: str  # the warm-up: "[A,B]" or "[A',B']" (a key of PROMPTS)
    warm_slot: int | None  # None: the server chooses
    query: str  # the timed query (a key of PROMPTS)
    slot: int | None
    meaning: str
    prepare: tuple[str, int | None] | None = None  # (prompt, slot) sent untimed before every warm-up


CONDITIONS: dict[str, Condition] = {
    "cache_hit": Condition("[A,B]", 0, "[A,B,Q]", 0, "warm [A,B] on slot 0, query [A,B,Q] on slot 0"),
    "cache_miss": Condition("[A,B]", 0, "[B,Q]", 0, "warm [A,B] on slot 0, query [B,Q] on slot 0"),
    "other_slot": Condition("[A,B]", 0, "[A,B,Q]", 1,
                            "another prefix [A',B'] on slot 1 and [A,B] on slot 0, query [A,B,Q] pinned to slot 1 "
                            "(mod N: with one slot, slot 0 holds [A,B] again)", prepare=("[A',B']", 1)),
    "server_hit": Condition("[A,B]", None, "[A,B,Q]", None,
                            "warm [A,B] and query [A,B,Q], the server chooses both slots"),
    "server_miss": Condition("[A,B]", None, "[B,Q]", None,
                             "warm [A,B] and query [B,Q], the server chooses both slots"),
    "alternate": Condition("[A',B']", None, "[A,B,Q]", None,
                           "[A,B], then another prefix [A',B'], then query [A,B,Q]; the server chooses every slot",
                           prepare=("[A,B]", None)),
}
#: the prompts, as (contexts, parts): "ab" = A, B, Q; "alt" = A', B', the same Q
PROMPTS = {"[A,B]": ("ab", ("a", "b")), "[A,B,Q]": ("ab", ("a", "b", "q")), "[B,Q]": ("ab", ("b", "q")),
           "[A',B']": ("alt", ("a", "b"))}


def alternate_prefix(vocab: Vocabulary, ctx: Contexts, spec: ExperimentSpec) -> Contexts:
    """[A',B'] of the sizes of [A,B], starting with another word (so only the template is shared), same Q."""
    rng = random.Random(spec.seed + 1)
    cfg = spec.config
    return Contexts(vocab.span(cfg.a, rng, avoid_first={ctx.a.split()[0]}), vocab.span(cfg.b, rng), ctx.q)


def fits(prompt_tokens: int, slot_ctx: int) -> bool:
    """llama-server serves a prompt only if it is shorter than the slot's context."""
    return prompt_tokens < slot_ctx


def run(backend: Backend, spec: ExperimentSpec, progress=None) -> dict:
    needs = catalog.experiment("slot_eviction").requires
    if not needs <= backend.capabilities:  # declared in the catalogue, not probed
        raise SpecError(f"slot_eviction needs an interface with {', '.join(sorted(needs))} (phases "
                        f"{', '.join(catalog.phases_for('slot_eviction'))}), not {backend.name}")
    vocab = Vocabulary.from_engine(backend.tokenize)
    cfg = spec.config
    contexts = {"ab": vocab.contexts(cfg.a, cfg.b, cfg.q, seed=spec.seed)}
    contexts["alt"] = alternate_prefix(vocab, contexts["ab"], spec)
    msgs = {name: contexts[which].messages(*parts) for name, (which, parts) in PROMPTS.items()}
    slots = backend.slot_readout()
    slot_ctx = min(s["n_ctx"] for s in slots)
    prompts = {name: len(backend.prompt_tokens(m)) for name, m in msgs.items()}
    tracker = Tracker(backend, spec.keep_warm)

    def preparer(c: Condition):
        if c.prepare is None:
            return None
        name, slot = c.prepare
        return lambda: tracker.run(Request(msgs[name], max_tokens=1, stream=False, slot=slot))

    trials: dict[str, list] = {c: [] for c in CONDITIONS}
    refused: list[dict] = []
    plan = schedule(spec, tuple(CONDITIONS))
    try:
        for step, (cond, idx, is_warmup) in enumerate(plan, 1):
            c = CONDITIONS[cond]
            try:
                trial = measure_trial(tracker, msgs[c.warm], msgs[c.query], spec, idx, is_warmup, throughput=False,
                                      warm_slot=c.warm_slot, slot=c.slot, prepare=preparer(c))
            except ContextExceeded as exc:
                sent = ([c.prepare[0]] if c.prepare else []) + [c.warm, c.query]  # in request order
                which = next((n for n in sent if prompts[n] == exc.prompt_tokens), None)
                refused.append({"condition": cond, "trial": idx, "warmup": is_warmup, "prompt": which,
                                "prompt_tokens": exc.prompt_tokens, "n_ctx": exc.n_ctx, "id_slot": exc.id_slot,
                                "message": str(exc)})
                if progress:
                    progress(f"{cond} trial {idx}: refused, {which or 'a prompt'} of {exc.prompt_tokens} tokens "
                             f"does not fit the slot's {exc.n_ctx}", step, len(plan))
                continue
            trials[cond].append(trial)
            if progress:
                progress(f"{cond} trial {idx}{' (warm-up)' if is_warmup else ''}: slot {trial.warmup_id_slot}->"
                         f"{trial.id_slot}, ttft {trial.ttft_ms:.1f} ms, cached {trial.cached_tokens}/"
                         f"{trial.prompt_tokens} (expected {trial.expected_cached_tokens}); re-warm "
                         f"{trial.rewarm_time_ms:.1f} ms, cached {trial.rewarm_cached_tokens}", step, len(plan))
    finally:
        keep_warm = tracker.close()
    return {
        "trials": trials,
        "order": order_labels(plan),
        "slot_eviction": {
            "n_parallel": len(slots),
            "slot_ctx": [s["n_ctx"] for s in slots],
            "prompts": prompts,
            "fits": {name: fits(n, slot_ctx) for name, n in prompts.items()},
            "conditions": {name: c.meaning for name, c in CONDITIONS.items()},
            "refused": refused,
            "slots_at_end": [{k: s[k] for k in ("id", "n_ctx", "n_tokens")} for s in backend.slot_readout()],
        },
        "workload": {"a_tokens": cfg.a, "b_tokens": cfg.b, "q_tokens": cfg.q, "seed": spec.seed,
                     "words": len(vocab.words), "q_text": contexts["ab"].q.strip()},
        "keep_warm": keep_warm,
        "calibration": calibration_block(backend, spec, trials),
    }
