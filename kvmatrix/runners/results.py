"""Result schema, statistics and atomic writes.

One JSON per cell (schema below, ``SCHEMA_VERSION``), keeping the original
experiments' field names. Stdlib only. Analysis reads these files and never
imports a backend.

Cell document::

    schema_version, cell_id, run, phase, backend, experiment, model{},
    timestamp, status ("ok" | "failed"), error (one line or null),
    config{context_size_a, context_size_b, query_tokens, max_output_tokens,
           num_trials, warmup_trials, settle_ms},
    cache_hit{trials[], stats{}}, cache_miss{trials[], stats{}},
    ttft_degradation_pct,
    runtime{requested{}, effective{}, mismatches[]},
    provenance{}, timing{engine_start_s, cell_wall_s, engine_starts{group[], index,
    starts_in_group, reused, started_at, engine_pid, runner_pid, begin_cell{}}}, log_file, log_tail

Trial (one timed query and its companions)::

    trial, warmup (bool), ttft_ms, ttft_non_streaming_ms, overhead_ms,
    engine_prompt_ms, engine_predicted_ms, total_time_ms, throughput,
    warmup_time_ms, prompt_tokens, completion_tokens, cached_tokens,
    expected_cached_tokens, cache_granularity, cache_verified,
    device{} (NVML after the timed request), device_settle{} (NVML at the end of
    the settle before it), warmup_prompt_tokens, warmup_cached_tokens,
    id_slot, warmup_id_slot (llama-server slot that served the query / warm-up),
    rewarm_time_ms, rewarm_cached_tokens, rewarm_id_slot (the warm-up right after
    the timed query: what re-establishing [A,B] costs after it),
    reference_ttft_ms, reference_cached_tokens, reference_engine_prompt_ms,
    reference_verified (the same query through the reference client),
    tokenid_ttft_ms, tokenid_cached_tokens, tokenid_engine_prompt_ms, tokenid_verified
    (the same prompt as token ids), breakdown{ttft_ms, client_ms, first_byte_ms,
    engine_ms, interface_ms}

Trial-protocol cells also record ``calibration{enabled, reference_client,
token_id_path, method, conditions{cache_hit|cache_miss|warmup: {n,
harness_ttft_ms, reference_ttft_ms, difference_ms (median + bootstrap CI),
same_cached_tokens, reference_verified, tokenid_ttft_ms, template_cost_ms,
breakdown_ms{}}}}`` (runners/calibration.py).

Cells of trial-protocol experiments also record ``keep_warm{requested, active,
method | reason, settles, iterations, busy_s}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA_VERSION = 1

# Per-trial metrics that get summary statistics.
STAT_FIELDS = (
    "ttft_ms",
    "ttft_non_streaming_ms",
    "overhead_ms",
    "engine_prompt_ms",
    "total_time_ms",
    "throughput",
    "warmup_time_ms",
    "rewarm_time_ms",
    "reference_ttft_ms",
    "tokenid_ttft_ms",
)


@dataclass
class Trial:
    trial: int
    warmup: bool
    ttft_ms: float
    ttft_non_streaming_ms: float
    overhead_ms: float
    engine_prompt_ms: float | None
    engine_predicted_ms: float | None
    total_time_ms: float | None
    throughput: float | None
    warmup_time_ms: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    expected_cached_tokens: int
    cache_granularity: int
    cache_verified: bool
    device: dict | None = None  # NVML sample right after the timed request (GPU hosts)
    device_settle: dict | None = None  # NVML sample at the end of the settle before the timed request
    warmup_prompt_tokens: int | None = None  # the warm-up [A,B] before the timed request, as the engine counted it
    warmup_cached_tokens: int | None = None
    id_slot: int | None = None  # engine slot that served the timed request (llama-server), else None
    warmup_id_slot: int | None = None
    rewarm_time_ms: float | None = None  # the warm-up [A,B] right AFTER the timed query (after a miss: its cost)
    rewarm_cached_tokens: int | None = None
    rewarm_id_slot: int | None = None
    # the timing control (runners/calibration.py): the same query through the reference client,
    # and on the token-id path, from the same state
    reference_ttft_ms: float | None = None
    reference_cached_tokens: int | None = None
    reference_engine_prompt_ms: float | None = None
    reference_verified: bool | None = None
    tokenid_ttft_ms: float | None = None
    tokenid_cached_tokens: int | None = None
    tokenid_engine_prompt_ms: float | None = None
    tokenid_verified: bool | None = None
    breakdown: dict | None = None  # the timed query's TTFT split: client / first byte / engine / interface
    #: where the engine's cached-token count came from when the adapter says (e.g. ``timings.cache_n``, or an
    #: older llama-server's ``usage.prompt_tokens - metrics prompt_tokens_total``)
    cached_tokens_source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: list[float]) -> dict:
    """n, mean, median, stdev, p95, min, max of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "median": statistics.median(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "p95": percentile(xs, 95),
        "min": min(xs),
        "max": max(xs),
    }


def condition_block(trials: list[Trial]) -> dict:
    """{trials[], stats{}} for one condition; stats over measured trials only."""
    measured = [t for t in trials if not t.warmup]
    stats = {f: describe([getattr(t, f) for t in measured]) for f in STAT_FIELDS}
    stats["n_trials"] = len(measured)
    stats["verified_trials"] = sum(1 for t in measured if t.cache_verified)
    return {"trials": [t.to_dict() for t in trials], "stats": stats}


def degradation_pct(hit: dict, miss: dict) -> float | None:
    """(miss - hit) / hit * 100 on mean streaming TTFT, as the original experiments."""
    h = hit["stats"]["ttft_ms"].get("mean")
    m = miss["stats"]["ttft_ms"].get("mean")
    if not h or m is None:
        return None
    return (m - h) / h * 100.0


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp"):
    """Yield a temp path next to ``path``; on success rename it into place, on error remove it.

    Readers never see a half-written file, and an existing file survives a failed write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, doc: dict) -> Path:
    """Write JSON via a temp file in the same folder and rename it into place."""
    with atomic_target(path) as tmp, open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=False, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_target(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_cells(paths: list[str | Path]) -> list[dict]:
    """All cell documents under the given folders/files (report input)."""
    docs = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.glob("*.json"))
        for f in files:
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: read_checked names it
                continue
            if isinstance(doc, dict) and doc.get("schema_version") and "cell_id" in doc:
                doc["_path"] = str(f)
                docs.append(doc)
    return docs
