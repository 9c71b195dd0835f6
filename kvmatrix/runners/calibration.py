"""The timing control: what kvmatrix itself adds to a TTFT, and where a TTFT goes.

Every trial-protocol cell (``ExperimentSpec.calibration``, on by default)
sends, beside each timed harness query, the SAME request through the
backend's reference client (``Backend.reference_client``: the stdlib
``http.client`` client for servers, the bare engine call in process), on
the same engine, slot and cache state (re-warmed and settled the same way),
alternating which of the two goes first. Where the backend has a token-id
path beside its chat path (``Backend.token_id_path``: the catalogue's
``token_control`` capability) the same prompt is also sent as token ids,
so the chat template + tokenization cost is a measured difference. The
token-id interfaces (phases 1t, 3t) have no such control: every request of
theirs is on the token-id path (``token_id_path`` False in their block).

Pure arithmetic here (stdlib only, runs in every engine environment):

* ``breakdown``  one timed request -> client (before the request left),
  first byte, engine (the engine's own prompt time), interface (the rest:
  HTTP, tokenization, chat template, scheduling);
* ``block``      the cell's ``calibration`` block: per condition (hit, miss,
  warm-up) the harness and reference TTFT medians, their paired difference
  with a bootstrap CI, whether both clients saw the same cached tokens, and
  the token-id TTFT / template cost where measured.
"""

from __future__ import annotations

import random
import statistics

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261201
CI_LEVEL = 0.95


def breakdown(ttft_ms: float | None, send_ms: float | None, first_byte_ms: float | None,
              engine_ms: float | None) -> dict:
    """Split a TTFT: ``client_ms`` + ``engine_ms`` + ``interface_ms`` = ``ttft_ms`` (None parts count 0)."""
    if ttft_ms is None:
        return {}
    client = send_ms or 0.0
    engine = engine_ms or 0.0
    return {"ttft_ms": ttft_ms, "client_ms": send_ms, "first_byte_ms": first_byte_ms, "engine_ms": engine_ms,
            "interface_ms": ttft_ms - client - engine}


def median_ci(values: list[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> dict:
    """Median with a percentile-bootstrap CI (seeded, so a cell's block is reproducible)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0, "median": None, "ci_low": None, "ci_high": None}
    rng = random.Random(seed)
    n = len(xs)
    meds = sorted(statistics.median(rng.choices(xs, k=n)) for _ in range(resamples if n > 1 else 1))
    lo = meds[int((1 - level) / 2 * (len(meds) - 1))]
    hi = meds[int((1 + level) / 2 * (len(meds) - 1))]
    return {"n": n, "median": statistics.median(xs), "ci_low": lo, "ci_high": hi}


def _condition(trials: list[dict]) -> dict:
    pairs = [(t["ttft_ms"], t["reference_ttft_ms"]) for t in trials
             if t.get("ttft_ms") is not None and t.get("reference_ttft_ms") is not None]
    out = {
        "n": len(pairs),
        "harness_ttft_ms": median_ci([h for h, _ in pairs]),
        "reference_ttft_ms": median_ci([r for _, r in pairs]),
        "difference_ms": median_ci([h - r for h, r in pairs]),
        "same_cached_tokens": sum(1 for t in trials if t.get("reference_cached_tokens") is not None
                                  and t.get("reference_cached_tokens") == t.get("cached_tokens")),
        "reference_verified": sum(1 for t in trials if t.get("reference_verified")),
    }
    tok = [(t["ttft_ms"], t["tokenid_ttft_ms"]) for t in trials
           if t.get("ttft_ms") is not None and t.get("tokenid_ttft_ms") is not None]
    if tok:
        out["tokenid_ttft_ms"] = median_ci([k for _, k in tok])
        out["template_cost_ms"] = median_ci([h - k for h, k in tok])  # chat path minus token-id path
        out["tokenid_verified"] = sum(1 for t in trials if t.get("tokenid_verified"))
    parts = [t.get("breakdown") or {} for t in trials]
    for key in ("client_ms", "first_byte_ms", "engine_ms", "interface_ms"):
        vals = [p[key] for p in parts if p.get(key) is not None]
        if vals:
            out.setdefault("breakdown_ms", {})[key] = statistics.median(vals)
    return out


def block(trials_by_condition: dict[str, list[dict]], reference: str, token_id_path: bool) -> dict:
    """The cell's calibration block from its trials (``Trial.to_dict()``): measured trials per condition,
    the discarded warm-up trials of every condition pooled as ``warmup``."""
    groups: dict[str, list[dict]] = {}
    for cond, trials in trials_by_condition.items():
        groups[cond] = [t for t in trials if not t.get("warmup")]
        groups.setdefault("warmup", []).extend(t for t in trials if t.get("warmup"))
    return {
        "enabled": True,
        "reference_client": reference,
        "token_id_path": token_id_path,
        "method": "paired per trial (same engine, slot and cache state; order alternates); "
                  f"median difference, {BOOTSTRAP_RESAMPLES}-resample percentile bootstrap "
                  f"{int(CI_LEVEL * 100)}% CI (seed {BOOTSTRAP_SEED})",
        "conditions": {c: _condition(ts) for c, ts in groups.items() if ts},
    }
