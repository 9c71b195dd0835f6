"""Write-up of the prefix_reuse experiment, from result JSON only.

``python -m kvmatrix.analysis.prefix_report DIR [DIR ...]`` (also called by
``kvmatrix prefix`` at the end) writes into the first DIR:

* ``prefix_requests.csv`` / ``prefix_requests.json``: one row per timed request;
* ``prefix_summary.csv`` / ``prefix_summary.json``: one row per (engine, mode,
  prefix regime, concurrency, reuse mix): mean/p50/p95/p99 TTFT and end to
  end, tokens, tokens/s, requests/s, verified hit ratio;
* ``prompts.jsonl``: the prompt set the cells ran (the first cell's; the
  write-up says whether every cell's set was identical);
* ``prefix_caching_results.md``: prefix strategy, the server command lines,
  the summary tables, the hit-rate mental model, memory, conclusions: every
  number is computed from the data;
* ``figures/prefix_ttft_vs_concurrency.png``, ``figures/prefix_p95_e2e_vs_concurrency.png``.

Never imports a backend: only kvmatrix.runners.results (and the stdlib;
matplotlib for the figures).
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.runners.results import atomic_target, load_cells, percentile, write_json_atomic, write_text_atomic

MODES = ("no_prefix_cache", "with_prefix_cache")
ENGINE_NAMES = {"llamacpp_http": "llama-server", "vllm_http": "vLLM OpenAI server"}
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


# ---------------------------------------------------------------- formatting
def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: tuple[str, ...] | list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def _finite(d: dict) -> dict:
    """NaN / inf -> None, so the JSON is standard."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return math.nan
    return a / b


# ---------------------------------------------------------------- sections
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
        rows.append([ENGINE_NAMES.get(g["engine"], g["engine"]), g["prefix_len_tokens"], g["concurrency"],
                     f"{g['reuse_pct']}%", f"{h:.0%}", g["mean_ttft_s"], predicted, f"{err:+.0f}%",
                     off["mean_ttft_s"] if off else None])
        if g["reuse_pct"] not in (0, 100) and math.isfinite(err):
            errors.append(abs(err))
    return rows, [f"{e:.0f}" for e in errors]


def memory_rows(cells: list[dict]) -> list[list]:
    rows = []
    for doc in cells:
        mem = doc.get("memory") or {}
        start, end = mem.get("after_start") or {}, mem.get("after_runs") or {}
        peaks: dict[str, float] = {}
        for grp in doc.get("groups") or []:
            for k, v in (grp.get("memory") or {}).items():
                if k.startswith("peak_") and isinstance(v, (int, float)):
                    peaks[k] = max(peaks.get(k, v), v)
        kv_peak = peaks.get("peak_kv_cache_usage_perc")
        if doc["backend"] == "vllm_http":
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
        rows.append([ENGINE_NAMES.get(doc["backend"], doc["backend"]), (doc.get("prefix") or {}).get("mode"),
                     start.get("rss_mib"), peaks.get("peak_rss_mib"), end.get("hwm_mib"), kv, cache])
    return rows


def _best(groups, engine, mode, n, c, reuse=100):
    return find(groups, engine=engine, mode=mode, prefix_len_tokens=n, concurrency=c, reuse_pct=reuse)


def conclusions(groups: list[dict], cells: list[dict], warmups: dict[str, list[dict]]) -> list[str]:
    out = []
    engines = sorted({g["engine"] for g in groups})
    regimes = sorted({g["prefix_len_tokens"] for g in groups})
    concs = sorted({g["concurrency"] for g in groups})
    c_lo, c_hi = concs[0], concs[-1]
    # 1. when to enable
    parts = []
    for e in engines:
        speeds = []
        for n in regimes:
            off, on = _best(groups, e, MODES[0], n, c_lo), _best(groups, e, MODES[1], n, c_lo)
            if off and on:
                speeds.append((n, off["mean_ttft_s"], on["mean_ttft_s"], ratio(off["mean_ttft_s"], on["mean_ttft_s"])))
        if not speeds:
            continue
        text = ", ".join(f"{n}-token prefix {a * 1000:.1f} -> {b * 1000:.1f} ms ({s:.2f}x)" for n, a, b, s in speeds)
        hi_off, hi_on = _best(groups, e, MODES[0], regimes[-1], c_hi), _best(groups, e, MODES[1], regimes[-1], c_hi)
        if hi_off and hi_on and c_hi != c_lo:
            text += (f"; at concurrency {c_hi} ({regimes[-1]} tokens) {hi_off['mean_ttft_s'] * 1000:.1f} -> "
                     f"{hi_on['mean_ttft_s'] * 1000:.1f} ms ({ratio(hi_off['mean_ttft_s'], hi_on['mean_ttft_s']):.2f}x)")
        trend = ""
        if len(speeds) > 1:
            trend = (" (the gain grows with the prefix length)" if speeds[-1][3] > speeds[0][3]
                     else " (the gain did not grow with the prefix length here)")
        parts.append(f"{ENGINE_NAMES.get(e, e)}: mean TTFT at 100% reuse, concurrency {c_lo}, off -> on: {text}{trend}")
    if parts:
        out.append("**When to enable.** Enable prefix caching when requests share a long, byte-identical prefix "
                   "(system prompt, policy, retrieved context). " + "; ".join(parts) + ".")
    # 2. which metrics show it working
    on_reuse = [g for g in groups if g["mode"] == MODES[1]]
    exp_hits = sum(g["reuse_requests"] for g in on_reuse)
    got_hits = sum(round(g["reuse_hit_ratio"] * g["reuse_requests"]) for g in on_reuse if g["reuse_requests"])
    off_groups = [g for g in groups if g["mode"] == MODES[0]]
    off_n = sum(g["n"] for g in off_groups)
    off_nonzero = sum(g.get("nonzero_cached", 0) for g in off_groups)
    counters = []
    for doc in cells:
        end = (doc.get("memory") or {}).get("after_runs") or {}
        mode = (doc.get("prefix") or {}).get("mode")
        if doc["backend"] == "vllm_http" and end.get("prefix_cache_queries"):
            counters.append(f"vLLM {mode}: vllm:prefix_cache_hits/queries = "
                            f"{end['prefix_cache_hits'] / end['prefix_cache_queries']:.0%}")
        elif doc["backend"] == "llamacpp_http" and end.get("prompt_tokens_total") is not None:
            c, t = end.get("prompt_tokens_cached_total") or 0, end["prompt_tokens_total"]
            if c + t:
                counters.append(f"llama-server {mode}: llamacpp:prompt_tokens_cached_total / (cached + "
                                f"prompt_tokens_total) = {c / (c + t):.0%}")
    out.append(
        "**Which metrics show it is working.** Per request, the engine's own reused-token count: llama-server "
        "`timings.cache_n` (also `usage.prompt_tokens_details.cached_tokens`), vLLM "
        "`usage.prompt_tokens_details.cached_tokens` (`--enable-prompt-tokens-details`, `stream_options.include_usage`). "
        f"In this run {got_hits}/{exp_hits} prefix-reusing requests with caching on reported at least the shared "
        f"prefix as cached, and {off_nonzero}/{off_n} requests with caching off reported any cached token. "
        "Server-wide counters: " + ("; ".join(counters) if counters else "n/a") + ". A TTFT that stays at the "
        "uncached level while these counters stay flat means the prefix is not being reused.")
    # 3. a failure mode, measured
    worst = max(on_reuse, key=lambda g: g["expected_hit_ratio"] - g["verified_hit_ratio"], default=None)
    fm = []
    if worst and worst["expected_hit_ratio"] - worst["verified_hit_ratio"] >= 0.05:
        why = ("each llama-server slot caches only the prompt it ran last (non-unified KV, no host-RAM cache), so a "
               "reusing request that lands on a slot last used by a unique prefix recomputes everything"
               if worst["engine"] == "llamacpp_http" else
               "blocks of the shared prefix were not found in the block pool when the request was scheduled")
        fm.append(f"{ENGINE_NAMES.get(worst['engine'], worst['engine'])}, {worst['prefix_len_tokens']} tokens, "
                  f"concurrency {worst['concurrency']}, {worst['reuse_pct']}% reuse: expected "
                  f"{worst['expected_hit_ratio']:.0%} hits, the engine verified {worst['verified_hit_ratio']:.0%} "
                  f"({why})")
    for cid, ws in warmups.items():
        if "cache_on" not in cid:
            continue
        first = [w for w in ws if w["concurrency"] == c_hi]
        if first and c_hi > 1:
            grp = [w for w in first if (w["prefix_len_tokens"], w["reuse_pct"]) ==
                   (first[0]["prefix_len_tokens"], first[0]["reuse_pct"])]
            warm_hits = sum(1 for w in grp if (w.get("cached_tokens") or 0) >= w["prefix_len_tokens"] // 2)
            fm.append(f"cold start on {cid.split('-')[1]}: of the first {len(grp)} concurrent requests carrying the "
                      f"shared prefix at concurrency {c_hi}, {warm_hits} reused at least half of it")
    for e in engines:
        for n in regimes[:1]:
            off0, on0 = _best(groups, e, MODES[0], n, c_lo, 0), _best(groups, e, MODES[1], n, c_lo, 0)
            if off0 and on0:
                fm.append(f"{ENGINE_NAMES.get(e, e)} with 0% reuse ({n} tokens, concurrency {c_lo}): caching on "
                          f"{on0['mean_ttft_s'] * 1000:.1f} ms vs off {off0['mean_ttft_s'] * 1000:.1f} ms "
                          f"({(ratio(on0['mean_ttft_s'], off0['mean_ttft_s']) - 1) * 100:+.0f}%): no reuse, no gain")
    vg = [g for g in on_reuse if g["engine"] == "vllm_http" and g["reuse_pct"] == 100]
    if vg:
        g = vg[0]
        fm.append(f"vLLM caches whole blocks of {g.get('granularity', '?')} tokens: a {g['prefix_len_tokens']}-token "
                  f"prefix was reported as {g['mean_cached_tokens']:.0f} cached tokens on average (a prefix shorter "
                  "than one block is never reused)")
    if fm:
        out.append("**Failure modes observed.** " + "; ".join(fm) + ".")
    # 4. for a product / SRE audience
    best = None
    for e in engines:
        off, on = _best(groups, e, MODES[0], regimes[-1], c_lo), _best(groups, e, MODES[1], regimes[-1], c_lo)
        if off and on:
            s = ratio(off["mean_ttft_s"], on["mean_ttft_s"])
            if best is None or s > best[0]:
                best = (s, e, off, on)
    if best:
        s, e, off, on = best
        out.append(
            f"**For product and SRE.** When many requests start with the same long text, the server can keep the "
            f"work it already did on that text and skip it next time: in this run the first token of a request "
            f"with a {regimes[-1]}-token shared prefix arrived {s:.1f}x sooner on {ENGINE_NAMES.get(e, e)} "
            f"({off['mean_ttft_s'] * 1000:.0f} -> {on['mean_ttft_s'] * 1000:.0f} ms). It only helps while the "
            f"prefix is byte-for-byte identical and still cached, so alert on the cached-token counters: when they "
            f"drop, latency falls back to the uncached level.")
    return out


# ---------------------------------------------------------------- figures
def write_figures(groups: list[dict], fig_dir: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("kvmatrix: matplotlib is not installed; figures skipped (pip install kvmatrix[analysis])",
              file=sys.stderr)
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    engines = sorted({g["engine"] for g in groups})
    regimes = sorted({g["prefix_len_tokens"] for g in groups})
    written = []
    for metric, label, name in (("mean_ttft_s", "mean TTFT (ms)", "prefix_ttft_vs_concurrency"),
                                ("p95_e2e_s", "p95 end-to-end (ms)", "prefix_p95_e2e_vs_concurrency")):
        fig, axes = plt.subplots(len(engines), len(regimes), figsize=(4.2 * len(regimes), 3.2 * len(engines)),
                                 squeeze=False)
        for i, e in enumerate(engines):
            for j, n in enumerate(regimes):
                ax = axes[i][j]
                for mode, style in zip(MODES, ("--o", "-s"), strict=True):
                    pts = sorted((g["concurrency"], g[metric] * 1000) for g in groups
                                 if g["engine"] == e and g["mode"] == mode and g["prefix_len_tokens"] == n
                                 and g["reuse_pct"] == 100 and math.isfinite(g[metric]))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                                label="off" if mode == MODES[0] else "on")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{ENGINE_NAMES.get(e, e)}, {n}-token prefix", fontsize=9)
                ax.set_xlabel("concurrency")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
                ax.legend(title="prefix cache", fontsize=8)
        fig.suptitle(f"{label} vs concurrency, 100% prefix reuse", fontsize=10)
        fig.tight_layout()
        path = fig_dir / f"{name}.png"
        with atomic_target(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- the write-up
def collect(dirs: list[Path]) -> tuple[list[dict], list[dict], list[dict]]:
    """(every prefix_reuse cell, the ok ones, their request rows)."""
    cells = [d for d in load_cells(dirs) if d.get("experiment") == "prefix_reuse"]
    cells.sort(key=lambda d: d["cell_id"])
    ok = [d for d in cells if d.get("status") == "ok"]
    rows = [r for d in ok for r in d.get("requests") or []]
    return cells, ok, rows


def enrich(groups: list[dict], rows: list[dict]) -> None:
    """Fields the notes need that are not summary columns (threshold, granularity, nonzero cached counts)."""
    for g in groups:
        rs = [r for r in rows if all(r[k] == g[k] for k in ("engine", "mode", "workload", "prefix_len_tokens",
                                                          "concurrency", "reuse_pct"))]
        g["threshold"] = rs[0].get("hit_threshold_tokens") if rs else None
        g["granularity"] = rs[0].get("cache_granularity") if rs else None
        g["nonzero_cached"] = sum(1 for r in rs if (r.get("cached_tokens") or 0) > 0)


def render(cells: list[dict], ok: list[dict], rows: list[dict], groups: list[dict], figures: list[Path],
           out_dir: Path, prompt_note: str) -> str:
    lines = ["# Prefix caching: repeated-prefix benchmark", ""]
    failed = [d for d in cells if d.get("status") != "ok"]
    if ok:
        p = ok[0].get("prefix") or {}
        model = ok[0].get("model") or {}
        lines += [f"Model `{model.get('name')}` ({model.get('params')} parameters); run `{ok[0].get('run')}`; "
                  f"{p.get('variants')} questions per prefix regime; concurrency {', '.join(map(str, p.get('concurrency', [])))}; "
                  f"reuse mixes {', '.join(f'{round(m * 100)}%' for m in p.get('reuse_mixes', []))}; "
                  f"{p.get('max_output_tokens')} generated tokens per request (EOS ignored, temperature 0); "
                  f"streaming `/v1/completions` with the raw prompt.", ""]
    loads = [d.get("host_load") or {} for d in ok]
    if any(loads):
        lines += ["Host load (1-minute load average at the start / end of each cell, "
                  f"{loads[0].get('cpus')} CPUs; client and servers share them, so absolute times are noisy): "
                  + ", ".join(f"`{d['cell_id']}` {fmt(h.get('loadavg_1m_start'), 1)}/{fmt(h.get('loadavg_1m_end'), 1)}"
                              for d, h in zip(ok, loads, strict=True)) + ".", ""]
    if failed:
        lines += ["**Failed cells** (their numbers are missing below):", ""]
        lines += [f"- `{d['cell_id']}`: {d.get('error')}" for d in failed]
        lines += [""]
    lines += [
        "## Prefix strategy", "",
        "Each prompt is `<SHARED_PREFIX>\\nQ: <question>\\nA:`. The shared prefix is built from the bundled corpus's "
        "sentences in a seeded order and padded to **exactly** the regime's token count with words the engine's own "
        "tokenizer maps to one token each (checked by re-tokenizing through the engine's `/tokenize`); the question "
        "starts after a newline, which the byte-level BPE pre-tokenizer splits off, so every prompt's first N tokens "
        "are the prefix's tokens. Medium regimes (<= 512 tokens) are a `chat_policy` system prompt, larger ones a "
        "`rag_prefix` document context. Hit-rate mixes: in the X% mix, X% of the requests (seeded choice) keep the "
        "shared prefix and the rest get a never-seen unique prefix of the same length (another sentence first). "
        "Before each timed batch, `concurrency` untimed 1-token requests carrying the shared prefix warm the "
        "server (every llama-server slot, vLLM's block pool). A request is a *verified hit* when the engine reports "
        "at least the shared prefix rounded down to its cache granularity (llama-server 1 token; vLLM one block).",
        "", prompt_note, "",
        "## Server configurations", "",
        "Per engine the two configurations come from ONE RuntimeSpec and differ only in prefix caching. "
        "llama-server: `no_prefix_cache` = every request sends `cache_prompt: false` AND the server runs with "
        "`--cache-ram 0`; `with_prefix_cache` = `cache_prompt: true` with `--cache-ram 0` (the slot cache: each "
        "slot keeps the KV of the prompt it ran last). The host-RAM prompt cache (`--cache-ram`, llama-server's "
        "default 8192 MiB) is a separate knob, off in both modes. `--parallel` = the highest concurrency so "
        "requests never queue for a slot; `-c` = per-slot context x slots (non-unified KV: each slot has its own "
        "window). vLLM: `--enable-prefix-caching` vs `--no-enable-prefix-caching`, `--max-num-seqs` = the highest "
        "concurrency.", "",
    ]
    for doc in ok:
        rendered = (doc.get("runtime") or {}).get("rendered") or {}
        argv = rendered.get("argv") or []
        env = {k: v for k, v in (rendered.get("env") or {}).items() if k.startswith("VLLM_CPU")}
        request_note = ""
        if doc["backend"] == "llamacpp_http":
            request_note = f"  # + per request: cache_prompt: {str(doc['runtime']['requested']['prefix_caching']).lower()}"
        env_text = " ".join(f"{k}={v}" for k, v in env.items())
        lines += [f"`{doc['cell_id']}` ({(doc.get('prefix') or {}).get('mode')}):", "", "```",
                  (env_text + " " if env_text else "") + shlex.join(argv) + request_note, "```", ""]
    lines += ["## Summary (100% prefix reuse)", "",
              "`tok_s` = generated tokens per second of the batch (all requests of the row, wall clock); "
              "TTFT and end to end are client-side, per request, from the first byte of the request after the "
              "connection is up. Every mix is in `prefix_summary.csv` (p50/p99, requests/s, total tokens).", ""]
    for e in sorted({g["engine"] for g in groups}):
        rows_e = [[g["mode"], g["prefix_len_tokens"], g["concurrency"], g["mean_ttft_s"], g["mean_e2e_s"],
                   g["p95_e2e_s"], g["tok_s"], note(g)]
                  for g in groups if g["engine"] == e and g["reuse_pct"] == 100]
        lines += [f"### {ENGINE_NAMES.get(e, e)}", "", md_table(TABLE_COLUMNS, rows_e), ""]
    lines += ["### Every mix", "",
              md_table(("engine", "mode", "prefix", "conc", "reuse", "mean_ttft_s", "p95_ttft_s", "mean_e2e_s",
                        "p99_e2e_s", "req_s", "verified hit ratio", "expected"),
                       [[ENGINE_NAMES.get(g["engine"], g["engine"]), g["mode"], g["prefix_len_tokens"],
                         g["concurrency"], f"{g['reuse_pct']}%", g["mean_ttft_s"], g["p95_ttft_s"], g["mean_e2e_s"],
                         g["p99_e2e_s"], g["req_s"], f"{g['verified_hit_ratio']:.0%}",
                         f"{g['expected_hit_ratio']:.0%}"] for g in groups]), ""]
    model_rows, errs = hit_rate_model(groups)
    lines += ["## Hit-rate mental model", "",
              "With caching on, a request either reuses the prefix (pays only the question) or recomputes it. So "
              "mean TTFT at hit rate h should be close to h x TTFT(100% reuse) + (1 - h) x TTFT(0% reuse), where h "
              "is the hit rate the ENGINE verified. The table checks this line against every measured mix; the "
              "last column is the same mix with caching off.", ""]
    if model_rows:
        lines += [md_table(("engine", "prefix", "conc", "reuse", "verified h", "measured mean TTFT s",
                            "model h*T100+(1-h)*T0", "error", "off, same mix"), model_rows), ""]
        if errs:
            lines += [f"Intermediate mixes deviate from the line by {', '.join(errs)}% (absolute): "
                      "the saving per percentage point of hit rate is roughly constant, so the expected gain at a "
                      "production hit rate h is h x (TTFT(0%) - TTFT(100%)).", ""]
    else:
        lines += ["(needs the 0% and 100% mixes with caching on)", ""]
    lines += ["## Memory", "",
              "Resident memory of the server's whole process group (VmRSS, vLLM's engine core included) right after "
              "start and at its peak while batches ran (sampled every 0.5 s), the group's VmHWM at the end, and the "
              "engine's own KV read-outs (llama-server: KV buffer from its start-up log, `/slots`, `/metrics`; vLLM: "
              "`vllm:kv_cache_usage_perc`, prefix-cache counters).", "",
              md_table(("engine", "mode", "RSS after start MiB", "peak RSS MiB", "VmHWM MiB", "KV cache",
                        "cache counters"), memory_rows(ok)), ""]
    lines += memory_observation(ok)
    lines += ["## Conclusions", ""]
    lines += [f"{i}. {c}" for i, c in enumerate(conclusions(groups, ok, {d["cell_id"]: d.get("warmups") or []
                                                                          for d in ok}), 1)]
    lines += [""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.stem}]({f.relative_to(out_dir)})" for f in figures]
        lines += [""]
    lines += ["Files: `prompts.jsonl` (the prompt set), `prefix_requests.csv` / `.json` (every timed request), "
              "`prefix_summary.csv` / `.json` (every group), one result JSON per cell, engine logs under `logs/`.", ""]
    return "\n".join(lines)


def memory_observation(ok: list[dict]) -> list[str]:
    out = []
    by = {(d["backend"], (d.get("prefix") or {}).get("mode")): d for d in ok}
    for e in sorted({d["backend"] for d in ok}):
        off, on = by.get((e, MODES[0])), by.get((e, MODES[1]))
        if not (off and on):
            continue

        def peak(doc, key):
            vals = [(g.get("memory") or {}).get(key) for g in doc.get("groups") or []]
            vals = [v for v in vals if isinstance(v, (int, float))]
            return max(vals) if vals else None

        r_off, r_on = peak(off, "peak_rss_mib"), peak(on, "peak_rss_mib")
        text = f"{ENGINE_NAMES.get(e, e)}: peak RSS off {fmt(r_off, 1)} MiB vs on {fmt(r_on, 1)} MiB"
        if r_off and r_on:
            text += f" ({(r_on - r_off) / r_off * 100:+.1f}%)"
        if e == "vllm_http":
            k_off, k_on = peak(off, "peak_kv_cache_usage_perc"), peak(on, "peak_kv_cache_usage_perc")
            if k_off is not None and k_on is not None:
                text += (f"; peak KV-cache usage off {k_off * 100:.1f}% vs on {k_on * 100:.1f}% of the "
                         "preallocated pool (VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization: RSS does not move) "
                         + ("- lower with caching: the shared prefix's blocks are stored once and referenced by "
                            "every request" if k_on < k_off - 0.005 else
                            "- no difference at this scale (sampled every 0.5 s; batches are short)"))
        else:
            kv = ((on.get("memory") or {}).get("after_runs") or {}).get("kv_buffer_mib")
            text += (f"; the KV buffer is allocated at start ({fmt(kv, 1)} MiB for all slots) whatever the mode: "
                     "caching changes what the slots keep, not how much memory they take")
        out.append(f"- {text}.")
    return out + [""] if out else []


def write_report(out_dir: str | Path, dirs: list[str | Path] | None = None) -> Path:
    out_dir = Path(out_dir)
    cells, ok, rows = collect([Path(d) for d in (dirs or [out_dir])])
    groups = aggregate(rows)
    enrich(groups, rows)
    write_text_atomic(out_dir / "prefix_requests.csv", to_csv(rows, REQUEST_COLUMNS))
    write_json_atomic(out_dir / "prefix_requests.json", {"requests": rows})
    write_text_atomic(out_dir / "prefix_summary.csv", to_csv(groups, SUMMARY_COLUMNS))
    write_json_atomic(out_dir / "prefix_summary.json", {"groups": [_finite(g) for g in groups]})
    prompt_note = "No prompt set recorded."
    sets = {}
    for d in ok:
        ps = d.get("prompt_set") or {}
        if ps.get("path"):
            sets[d["cell_id"]] = (Path(d["_path"]).parent / ps["path"], ps.get("sha256"), ps.get("source"))
    if sets:
        first = next(iter(sets.values()))
        if first[0].is_file():
            write_text_atomic(out_dir / "prompts.jsonl", first[0].read_text())
        same = len({s[1] for s in sets.values()}) == 1
        prompt_note = (f"Prompt set: `prompts.jsonl` ({first[2]}, sha256 `{first[1][:16]}`); "
                       + ("every cell built the identical set with its own engine's tokenizer (the GGUF and HF "
                          "tokenizers agree token for token)." if same else
                          "the cells' sets DIFFER (" + ", ".join(f"{k}: {v[1][:12]}" for k, v in sets.items())
                          + "): the engines' tokenizers disagree somewhere."))
    figures = write_figures(groups, out_dir / "figures") if groups else []
    path = out_dir / "prefix_caching_results.md"
    write_text_atomic(path, render(cells, ok, rows, groups, figures, out_dir, prompt_note))
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; one-line error and exit 2 for a missing folder or one without prefix_reuse cells."""
    ap = ArgumentParser(prog="python -m kvmatrix.analysis.prefix_report",
                 description="The prefix-caching write-up (prefix_caching_results.md, CSV/JSON tables, prompts.jsonl, "
                             "figures) from the result JSON of `kvmatrix prefix` runs.")
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                    help="run folder(s) holding prefix_reuse cell *.json (`kvmatrix prefix --out DIR`)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    args = ap.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"kvmatrix: error: no prefix_reuse cells in {missing[0]}: no such folder; pass an existing results "
              "folder of `kvmatrix prefix`", file=sys.stderr)
        return 2
    if not collect(args.dirs)[0]:
        shown = " ".join(map(str, args.dirs))
        print(f"kvmatrix: error: no prefix_reuse cells in {shown}; run `kvmatrix prefix` (nox -s prefix) first or "
              "pass the folder that holds its *.json", file=sys.stderr)
        return 2
    path = write_report(args.out or args.dirs[0], args.dirs)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
