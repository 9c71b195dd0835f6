"""prefix_reuse: the write-up (``prefix_caching_results.md``): prefix strategy, server command lines, the
summary tables, the hit-rate model, memory and the conclusions, every number computed from the cells.
Standard library only."""

from __future__ import annotations

import shlex
from pathlib import Path

from kvmatrix.analysis.experiments.prefix_reuse.rows import (
    MODES,
    TABLE_COLUMNS,
    after_runs,
    engine_title,
    hit_rate_model,
    memory_rows,
    mode_of,
    note,
    pick,
    ratio,
)
from kvmatrix.analysis.fmt import md_table, value
from kvmatrix.runners.document import CellDoc, HostLoad, Prefix

# ---------------------------------------------------------------- conclusions


def conclusions(groups: list[dict], cells: list[CellDoc], warmups: dict[str, list[dict]]) -> list[str]:
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
            off, on = pick(groups, e, MODES[0], n, c_lo), pick(groups, e, MODES[1], n, c_lo)
            if off and on:
                speeds.append((n, off["mean_ttft_s"], on["mean_ttft_s"], ratio(off["mean_ttft_s"], on["mean_ttft_s"])))
        if not speeds:
            continue
        text = ", ".join(f"{n}-token prefix {a * 1000:.1f} -> {b * 1000:.1f} ms ({s:.2f}x)" for n, a, b, s in speeds)
        hi_off, hi_on = pick(groups, e, MODES[0], regimes[-1], c_hi), pick(groups, e, MODES[1], regimes[-1], c_hi)
        if hi_off and hi_on and c_hi != c_lo:
            text += (f"; at concurrency {c_hi} ({regimes[-1]} tokens) {hi_off['mean_ttft_s'] * 1000:.1f} -> "
                     f"{hi_on['mean_ttft_s'] * 1000:.1f} ms ({ratio(hi_off['mean_ttft_s'], hi_on['mean_ttft_s']):.2f}x)")
        trend = ""
        if len(speeds) > 1:
            trend = (" (the gain grows with the prefix length)" if speeds[-1][3] > speeds[0][3]
                     else " (the gain did not grow with the prefix length here)")
        parts.append(f"{engine_title(e)}: mean TTFT at 100% reuse, concurrency {c_lo}, off -> on: {text}{trend}")
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
        end = after_runs(doc)
        mode = mode_of(doc)
        if doc.backend == "vllm_http" and end.get("prefix_cache_queries"):
            counters.append(f"vLLM {mode}: vllm:prefix_cache_hits/queries = "
                            f"{end['prefix_cache_hits'] / end['prefix_cache_queries']:.0%}")
        elif doc.backend == "llamacpp_http" and end.get("prompt_tokens_total") is not None:
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
        fm.append(f"{engine_title(worst['engine'])}, {worst['prefix_len_tokens']} tokens, "
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
            off0, on0 = pick(groups, e, MODES[0], n, c_lo, 0), pick(groups, e, MODES[1], n, c_lo, 0)
            if off0 and on0:
                fm.append(f"{engine_title(e)} with 0% reuse ({n} tokens, concurrency {c_lo}): caching on "
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
        off, on = pick(groups, e, MODES[0], regimes[-1], c_lo), pick(groups, e, MODES[1], regimes[-1], c_lo)
        if off and on:
            s = ratio(off["mean_ttft_s"], on["mean_ttft_s"])
            if best is None or s > best[0]:
                best = (s, e, off, on)
    if best:
        s, e, off, on = best
        out.append(
            f"**For product and SRE.** When many requests start with the same long text, the server can keep the "
            f"work it already did on that text and skip it next time: in this run the first token of a request "
            f"with a {regimes[-1]}-token shared prefix arrived {s:.1f}x sooner on {engine_title(e)} "
            f"({off['mean_ttft_s'] * 1000:.0f} -> {on['mean_ttft_s'] * 1000:.0f} ms). It only helps while the "
            f"prefix is byte-for-byte identical and still cached, so alert on the cached-token counters: when they "
            f"drop, latency falls back to the uncached level.")
    return out


# ---------------------------------------------------------------- the write-up


def render(cells: list[CellDoc], ok: list[CellDoc], rows: list[dict], groups: list[dict], figures: list[Path],
           out_dir: Path, prompt_note: str) -> str:
    lines = ["# Prefix caching: repeated-prefix benchmark", ""]
    failed = [d for d in cells if not d.ok]
    if ok:
        p = ok[0].prefix or Prefix()
        model = ok[0].model
        lines += [f"Model `{model.name}` ({model.params} parameters); run `{ok[0].run}`; "
                  f"{p.variants} questions per prefix regime; concurrency {', '.join(map(str, p.concurrency or []))}; "
                  f"reuse mixes {', '.join(f'{round(m * 100)}%' for m in p.reuse_mixes or [])}; "
                  f"{p.max_output_tokens} generated tokens per request (EOS ignored, temperature 0); "
                  f"streaming `/v1/completions` with the raw prompt.", ""]
    loads = [d.host_load or HostLoad() for d in ok]
    if any(h.to_dict() for h in loads):
        lines += ["Host load (1-minute load average at the start / end of each cell, "
                  f"{loads[0].cpus} CPUs; client and servers share them, so absolute times are noisy): "
                  + ", ".join(f"`{d.cell_id}` {value(h.loadavg_1m_start, 1)}/{value(h.loadavg_1m_end, 1)}"
                              for d, h in zip(ok, loads, strict=True)) + ".", ""]
    if failed:
        lines += ["**Failed cells** (their numbers are missing below):", ""]
        lines += [f"- `{d.cell_id}`: {d.error}" for d in failed]
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
        rendered = doc.runtime.rendered or {}
        argv = rendered.get("argv") or []
        env = {k: v for k, v in (rendered.get("env") or {}).items() if k.startswith("VLLM_CPU")}
        request_note = ""
        if doc.backend == "llamacpp_http":
            request_note = f"  # + per request: cache_prompt: {str(doc.runtime.requested['prefix_caching']).lower()}"
        env_text = " ".join(f"{k}={v}" for k, v in env.items())
        lines += [f"`{doc.cell_id}` ({mode_of(doc)}):", "", "```",
                  (env_text + " " if env_text else "") + shlex.join(argv) + request_note, "```", ""]
    lines += ["## Summary (100% prefix reuse)", "",
              "`tok_s` = generated tokens per second of the batch (all requests of the row, wall clock); "
              "TTFT and end to end are client-side, per request, from the first byte of the request after the "
              "connection is up. Every mix is in `prefix_summary.csv` (p50/p99, requests/s, total tokens).", ""]
    for e in sorted({g["engine"] for g in groups}):
        rows_e = [[g["mode"], g["prefix_len_tokens"], g["concurrency"], g["mean_ttft_s"], g["mean_e2e_s"],
                   g["p95_e2e_s"], g["tok_s"], note(g)]
                  for g in groups if g["engine"] == e and g["reuse_pct"] == 100]
        lines += [f"### {engine_title(e)}", "", md_table(TABLE_COLUMNS, rows_e), ""]
    lines += ["### Every mix", "",
              md_table(("engine", "mode", "prefix", "conc", "reuse", "mean_ttft_s", "p95_ttft_s", "mean_e2e_s",
                        "p99_e2e_s", "req_s", "verified hit ratio", "expected"),
                       [[engine_title(g["engine"]), g["mode"], g["prefix_len_tokens"],
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
    lines += [f"{i}. {c}" for i, c in enumerate(conclusions(groups, ok, {d.cell_id: d.warmups or []
                                                                          for d in ok}), 1)]
    lines += [""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.stem}]({f.relative_to(out_dir)})" for f in figures]
        lines += [""]
    lines += ["Files: `prompts.jsonl` (the prompt set), `prefix_requests.csv` / `.json` (every timed request), "
              "`prefix_summary.csv` / `.json` (every group), one result JSON per cell, engine logs under `logs/`.", ""]
    return "\n".join(lines)


def memory_observation(ok: list[CellDoc]) -> list[str]:
    out = []
    by = {(d.backend, mode_of(d)): d for d in ok}
    for e in sorted({d.backend for d in ok}):
        off, on = by.get((e, MODES[0])), by.get((e, MODES[1]))
        if not (off and on):
            continue

        def peak(doc, key):
            vals = [(g.get("memory") or {}).get(key) for g in doc.groups or []]
            vals = [v for v in vals if isinstance(v, (int, float))]
            return max(vals) if vals else None

        r_off, r_on = peak(off, "peak_rss_mib"), peak(on, "peak_rss_mib")
        text = f"{engine_title(e)}: peak RSS off {value(r_off, 1)} MiB vs on {value(r_on, 1)} MiB"
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
            kv = after_runs(on).get("kv_buffer_mib")
            text += (f"; the KV buffer is allocated at start ({value(kv, 1)} MiB for all slots) whatever the mode: "
                     "caching changes what the slots keep, not how much memory they take")
        out.append(f"- {text}.")
    return out + [""] if out else []


def prompt_set(ok: list[CellDoc]) -> tuple[str, Path | None]:
    """(the write-up's sentence on the prompt set, the first cell's prompts.jsonl) from the cells' ``prompt_set``."""
    sets = {}
    for d in ok:
        ps = d.prompt_set
        if ps is not None and ps.path:
            sets[d.cell_id] = (Path(d.path).parent / ps.path, ps.sha256, ps.source)
    if not sets:
        return "No prompt set recorded.", None
    first = next(iter(sets.values()))
    same = len({s[1] for s in sets.values()}) == 1
    return (f"Prompt set: `prompts.jsonl` ({first[2]}, sha256 `{first[1][:16]}`); "
            + ("every cell built the identical set with its own engine's tokenizer (the GGUF and HF "
               "tokenizers agree token for token)." if same else
               "the cells' sets DIFFER (" + ", ".join(f"{k}: {v[1][:12]}" for k, v in sets.items())
               + "): the engines' tokenizers disagree somewhere.")), first[0]

