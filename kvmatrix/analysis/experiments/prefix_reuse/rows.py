"""prefix_reuse: the request rows of the cells, one summary row per (engine, mode, prefix regime,
concurrency, reuse mix), the hit-rate model and the memory rows. Standard library only."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from kvmatrix.analysis.labels import interface_title
from kvmatrix.analysis.load import load_dirs
from kvmatrix.runners.document import CellDoc, Memory
from kvmatrix.runners.results import percentile

NAME = "prefix_reuse"
MODES = ("no_prefix_cache", "with_prefix_cache")
#: where the write-up names an engine differently from the catalogue (kept as the committed write-ups have it)
ENGINE_TITLES = {"vllm_http": "vLLM OpenAI server"}
REQUEST_COLUMNS = (
    "engine", "mode", "workload", "regime", "prefix_len_tokens", "concurrency", "reuse_pct", "index",
    "shares_prefix", "ok", "ttft_s", "e2e_s", "prompt_tokens", "completion_tokens", "cached_tokens",
    "hit_threshold_tokens", "cache_hit", "expected_hit", "cache_granularity", "start_offset_s", "connect_s",
    "batch_wall_s", "question", "cell_id", "error",
)
SUMMARY_COLUMNS = (
    "engine", "mode", "workload", "prefix_len_tokens", "concurrency", "reuse_pct", "n", "failed",
    "mean_ttft_s", "p50_ttft_s", "p95_ttft_s", "p99_ttft_s", "mean_e2e_s", "p50_e2e_s", "p95_e2e_s", "p99_e2e_s",
    "prompt_tokens", "completion_tokens", "total_tokens", "wall_s", "tok_s", "total_tok_s", "req_s",
    "mean_cached_tokens", "verified_hits", "verified_hit_ratio", "expected_hit_ratio", "reuse_requests",
    "reuse_hit_ratio",
)
TABLE_COLUMNS = ("mode", "prefix_len_tokens", "concurrency", "mean_ttft_s", "mean_e2e_s", "p95_e2e_s", "tok_s", "notes")




# ---------------------------------------------------------------- aggregation


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def aggregate(rows: list[dict]) -> list[dict]:
    """One summary row per (engine, mode, workload, prefix length, concurrency, reuse mix)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        key = (r["engine"], r["mode"], r["workload"], r["prefix_len_tokens"], r["concurrency"], r["reuse_pct"])
        groups[key].append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
        e2e = [r["e2e_s"] for r in ok if r.get("e2e_s") is not None]
        prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
        completion = sum(r.get("completion_tokens") or 0 for r in ok)
        wall = max((r.get("batch_wall_s") or 0.0) for r in rs) or (sum(e2e) if e2e else 0.0)
        cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
        hits = sum(1 for r in ok if r.get("cache_hit"))
        reuse = [r for r in rs if r.get("shares_prefix")]
        mode = key[1]
        row = dict(zip(("engine", "mode", "workload", "prefix_len_tokens", "concurrency", "reuse_pct"), key,
                       strict=True))
        row.update(
            n=len(rs), failed=len(rs) - len(ok),
            mean_ttft_s=_mean(ttft), p50_ttft_s=percentile(ttft, 50), p95_ttft_s=percentile(ttft, 95),
            p99_ttft_s=percentile(ttft, 99),
            mean_e2e_s=_mean(e2e), p50_e2e_s=percentile(e2e, 50), p95_e2e_s=percentile(e2e, 95),
            p99_e2e_s=percentile(e2e, 99),
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            wall_s=wall, tok_s=completion / wall if wall else math.nan,
            total_tok_s=(prompt + completion) / wall if wall else math.nan,
            req_s=len(ok) / wall if wall else math.nan,
            mean_cached_tokens=_mean(cached), verified_hits=hits,
            verified_hit_ratio=hits / len(rs) if rs else math.nan,
            expected_hit_ratio=(len(reuse) / len(rs) if rs else math.nan) if mode == "with_prefix_cache" else 0.0,
            reuse_requests=len(reuse),
            reuse_hit_ratio=(sum(1 for r in reuse if r.get("cache_hit")) / len(reuse)) if reuse else math.nan,
        )
        out.append(row)
    out.sort(key=lambda g: (g["engine"], MODES.index(g["mode"]) if g["mode"] in MODES else 9,
                            g["prefix_len_tokens"], g["concurrency"], -g["reuse_pct"]))
    return out


def find(groups: list[dict], **match) -> dict | None:
    for g in groups:
        if all(g.get(k) == v for k, v in match.items()):
            return g
    return None


def note(g: dict) -> str:
    n = g["n"]
    if g["mode"] == "with_prefix_cache":
        text = (f"verified hits {g['verified_hits']}/{n} (>= {g.get('threshold', g['prefix_len_tokens'])} cached); "
                f"mean cached {g['mean_cached_tokens']:.0f} tok")
    else:
        nonzero = g.get("nonzero_cached", 0)
        text = f"cached tokens reported: {nonzero}/{n} requests" + ("" if nonzero == 0 else " (UNEXPECTED)")
    if g["failed"]:
        text += f"; {g['failed']} failed"
    return text


def ratio(a: float | None, b: float | None) -> float:
    """a / b; NaN when either is missing or not finite, or b is 0."""
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return math.nan
    return a / b


# ---------------------------------------------------------------- hit-rate model, memory


def hit_rate_model(groups: list[dict]) -> tuple[list[list], list[str]]:
    """TTFT(h) ~ h * TTFT(100% reuse) + (1 - h) * TTFT(0% reuse), checked against every measured mix."""
    rows, errors = [], []
    for g in groups:
        if g["mode"] != "with_prefix_cache":
            continue
        key = {k: g[k] for k in ("engine", "mode", "prefix_len_tokens", "concurrency")}
        full, none = find(groups, **key, reuse_pct=100), find(groups, **key, reuse_pct=0)
        if full is None or none is None:
            continue
        h = g["verified_hit_ratio"]
        predicted = h * full["mean_ttft_s"] + (1 - h) * none["mean_ttft_s"]
        err = (g["mean_ttft_s"] - predicted) / predicted * 100 if predicted else math.nan
        off = find(groups, **{**key, "mode": "no_prefix_cache"}, reuse_pct=g["reuse_pct"])
        rows.append([engine_title(g["engine"]), g["prefix_len_tokens"], g["concurrency"],
                     f"{g['reuse_pct']}%", f"{h:.0%}", g["mean_ttft_s"], predicted, f"{err:+.0f}%",
                     off["mean_ttft_s"] if off else None])
        if g["reuse_pct"] not in (0, 100) and math.isfinite(err):
            errors.append(abs(err))
    return rows, [f"{e:.0f}" for e in errors]


def memory_rows(cells: list[CellDoc]) -> list[list]:
    rows = []
    for doc in cells:
        mem = doc.memory or Memory()
        start, end = mem.after_start, mem.after_runs
        peaks: dict[str, float] = {}
        for grp in doc.groups or []:
            for k, v in (grp.get("memory") or {}).items():
                if k.startswith("peak_") and isinstance(v, (int, float)):
                    peaks[k] = max(peaks.get(k, v), v)
        kv_peak = peaks.get("peak_kv_cache_usage_perc")
        if doc.backend == "vllm_http":
            kv = (f"peak KV usage {kv_peak * 100:.1f}% of {end.get('kv_blocks', '?')} blocks"
                  if kv_peak is not None else "n/a")
            counters = end.get("prefix_cache_hits"), end.get("prefix_cache_queries")
            cache = (f"prefix cache hits/queries {counters[0]:.0f}/{counters[1]:.0f}"
                     if None not in counters else "n/a")
        else:
            kv = (f"KV buffer {end.get('kv_buffer_mib', start.get('kv_buffer_mib', 'n/a'))} MiB, "
                  f"{end.get('slots', '?')} slots x {end.get('slot_n_ctx', '?')}, peak busy slots "
                  f"{peaks.get('peak_slots_busy', 'n/a')}")
            c, t = end.get("prompt_tokens_cached_total"), end.get("prompt_tokens_total")
            cache = (f"prompt tokens cached {c:.0f} / evaluated {t:.0f} (reused {c / (c + t):.0%})"
                     if None not in (c, t) and c + t > 0 else "n/a")
        rows.append([engine_title(doc.backend), mode_of(doc),
                     start.get("rss_mib"), peaks.get("peak_rss_mib"), end.get("hwm_mib"), kv, cache])
    return rows


def pick(groups, engine, mode, n, c, reuse=100):
    """The summary row of one engine, mode, prefix length, concurrency and reuse mix."""
    return find(groups, engine=engine, mode=mode, prefix_len_tokens=n, concurrency=c, reuse_pct=reuse)


# ---------------------------------------------------------------- the cells


def collect(dirs: list[Path]) -> tuple[list[CellDoc], list[CellDoc], list[dict]]:
    """(every prefix_reuse cell, the ok ones, their request rows)."""
    cells = [d for d in load_dirs(dirs) if d.experiment == NAME]
    cells.sort(key=lambda d: d.cell_id)
    ok = [d for d in cells if d.ok]
    rows = [r for d in ok for r in d.requests or []]
    return cells, ok, rows


def enrich(groups: list[dict], rows: list[dict]) -> None:
    """Fields the notes need that are not summary columns (threshold, granularity, nonzero cached counts)."""
    for g in groups:
        rs = [r for r in rows if all(r[k] == g[k] for k in ("engine", "mode", "workload", "prefix_len_tokens",
                                                          "concurrency", "reuse_pct"))]
        g["threshold"] = rs[0].get("hit_threshold_tokens") if rs else None
        g["granularity"] = rs[0].get("cache_granularity") if rs else None
        g["nonzero_cached"] = sum(1 for r in rs if (r.get("cached_tokens") or 0) > 0)


def engine_title(backend) -> str:
    """How the write-up names an engine (the catalogue's title, unless ``ENGINE_TITLES`` says otherwise)."""
    return interface_title(backend, ENGINE_TITLES)


def mode_of(doc: CellDoc) -> str | None:
    """The cell's caching mode ("no_prefix_cache" | "with_prefix_cache")."""
    return doc.prefix.mode if doc.prefix is not None else None


def after_runs(doc: CellDoc) -> dict:
    """The server's memory read-outs after the timed batches."""
    return doc.memory.after_runs if doc.memory is not None else {}
