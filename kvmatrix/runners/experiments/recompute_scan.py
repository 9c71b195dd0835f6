"""recompute_scan: TTFT as a function of how many prompt tokens the engine must recompute.

Warm [A,B]; then query [first k tokens of A,B | different tokens to the same
length | Q] for k across the range (``scan_points`` fractions of |A|+|B|).
Every query has the same length, so the only thing that changes with k is
how much of it the engine can reuse: recomputed = prompt - cached, with the
cached count taken from the engine and verified against the expectation.
Points are visited in a rotated order per trial so drift spreads evenly.
"""

from __future__ import annotations

import random

from kvmatrix.runners.backends.base import Backend
from kvmatrix.runners.experiments.invalidation import WARM, Tracker, calibration_block, measure_trial
from kvmatrix.runners.results import condition_block
from kvmatrix.runners.spec import ExperimentSpec
from kvmatrix.runners.workload import Vocabulary

DEFAULT_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def kept_counts(total: int, points: tuple[float, ...]) -> list[int]:
    return sorted({max(0, min(total, round(total * p))) for p in points})


def run(backend: Backend, spec: ExperimentSpec, progress=None) -> dict:
    vocab = Vocabulary.from_engine(backend.tokenize)
    cfg = spec.config
    ctx = vocab.contexts(cfg.a, cfg.b, cfg.q, seed=spec.seed)
    ab = (ctx.a + ctx.b).split()
    rng = random.Random(spec.seed + 1)
    replacement = [rng.choice([w for w in vocab.words if w != orig]) for orig in ab]
    counts = kept_counts(len(ab), tuple(spec.scan_points or DEFAULT_POINTS))
    tracker = Tracker(backend, spec.keep_warm)
    warm_msgs = ctx.messages(*WARM)

    def query(k: int) -> list[dict]:
        return [{"role": "user", "content": " " + " ".join(ab[:k] + replacement[k:]) + ctx.q}]

    per_k: dict[int, list] = {k: [] for k in counts}
    plan = [(i, True) for i in range(spec.warmup_trials)] + [(i, False) for i in range(spec.num_trials)]
    total_steps = len(plan) * len(counts)
    step = 0
    try:
        for n, (idx, is_warmup) in enumerate(plan):
            order = counts[n % len(counts):] + counts[: n % len(counts)]
            for k in order:
                step += 1
                trial = measure_trial(tracker, warm_msgs, query(k), spec, idx, is_warmup, throughput=False)
                per_k[k].append(trial)
                if progress:
                    progress(f"kept {k}: ttft {trial.ttft_ms:.1f} ms, cached {trial.cached_tokens}/"
                             f"{trial.prompt_tokens} (expected {trial.expected_cached_tokens})", step, total_steps)
    finally:
        keep_warm = tracker.close()
    scan = []
    for k in counts:
        block = condition_block(per_k[k])
        first = per_k[k][-1]
        scan.append({"kept_tokens": k, "recomputed_tokens": first.prompt_tokens - first.expected_cached_tokens, **block})
    return {"trials": {}, "scan": scan,
            "workload": {"a_tokens": cfg.a, "b_tokens": cfg.b, "q_tokens": cfg.q, "seed": spec.seed,
                         "kept_counts": counts},
            "keep_warm": keep_warm,
            "calibration": calibration_block(backend, spec, {f"kept_{k}": ts for k, ts in per_k.items()})}
