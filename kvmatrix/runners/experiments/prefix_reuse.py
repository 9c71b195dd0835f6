"""The prefix_reuse experiment: what prefix caching buys for repeated-prefix workloads.

One cell = one engine configuration (llama-server or the vLLM OpenAI server,
prefix caching on OR off, everything else identical). Inside the cell, for
each prefix regime (shared prefix of N tokens), each client concurrency and
each reuse mix (share of requests that reuse the shared prefix; the rest get
a unique prefix of the same length):

1. warm-up (untimed, recorded): ``concurrency`` requests with the shared
   prefix and a warm-up question, 1 token each, pinned to slots 0..c-1 on
   llama-server (slots keep their own prompt; vLLM ignores the pin): the
   engine starts the timed batch as a steady server would;
2. timed batch: the regime's questions (``variants``), streaming
   ``/v1/completions`` with the raw prompt, at most ``concurrency`` in flight,
   ``max_output_tokens`` tokens with EOS ignored. Per request: TTFT, end to
   end, prompt / completion tokens and the ENGINE's cached-token count
   (llama-server ``timings.cache_n``; vLLM
   ``usage.prompt_tokens_details.cached_tokens``);
3. memory during the batch: the engine's KV read-outs (``memory_readout``)
   and the resident memory of the server's whole process group
   (/proc/<pid>/status VmRSS / VmHWM), sampled by a thread.

A request counts as a verified hit when the engine reports at least the
shared prefix rounded down to its cache granularity (vLLM: whole blocks).
Aggregation lives in kvmatrix.analysis.prefix_report (from the cell JSON).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from kvmatrix.runners.backends.base import Backend, EngineError
from kvmatrix.runners.backends.http import StreamResult
from kvmatrix.runners.prompts import (
    QUESTION_MARK,
    PromptBuilder,
    PromptRecord,
    digest,
    read_jsonl,
    regime_name,
    reuse_plan,
    to_jsonl,
)
from kvmatrix.runners.results import write_text_atomic
from kvmatrix.runners.spec import ExperimentSpec

MODES = {True: "with_prefix_cache", False: "no_prefix_cache"}
SAMPLE_EVERY_S = 0.5


# ---------------------------------------------------------------- memory
def snapshot(backend: Backend) -> dict:
    """The engine's KV read-outs and its process group's resident memory (``ServerBackend``)."""
    return {**backend.memory_readout(), **backend.process_memory()}


class MemorySampler:
    """Samples KV read-outs and process memory in a thread while a batch runs; keeps the peaks."""

    PEAK_KEYS = ("kv_cache_usage_perc", "slots_busy", "rss_mib", "hwm_mib", "num_requests_running")

    def __init__(self, backend: Backend):
        self.backend = backend
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(snapshot(self.backend))
            except Exception:  # noqa: BLE001 - a failed sample must not fail the batch
                pass
            self._stop.wait(SAMPLE_EVERY_S)

    def peaks(self) -> dict:
        out: dict = {"samples": len(self.samples)}
        for key in self.PEAK_KEYS:
            vals = [s[key] for s in self.samples if isinstance(s.get(key), (int, float))]
            if vals:
                out[f"peak_{key}"] = max(vals)
        return out


# ---------------------------------------------------------------- requests
def unique_seed(*parts) -> int:
    return int(hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def send(backend: Backend, prompts: list[str], max_tokens: int, concurrency: int, pin: bool = False):
    """Stream ``prompts`` through the adapter's completion request; (results, t0, wall seconds).

    ``pin``: request k goes to slot k (llama-server; vLLM has one shared pool and ignores it).
    """
    path = None
    payloads = []
    for k, p in enumerate(prompts):
        path, payload = backend.completion_request(p, max_tokens, slot=k if pin else None)
        payloads.append(payload)
    t0 = time.perf_counter()
    results = backend.client.stream_many(path, payloads, concurrency)
    return results, t0, time.perf_counter() - t0


def row_of(backend: Backend, result, t0: float) -> dict:
    sent, r = result
    row = {"start_offset_s": round(sent - t0, 6)}
    if isinstance(r, StreamResult):
        counts = backend.completion_counts(r.fields)
        row.update(ok=True, error=None, ttft_s=r.ttft_s if r.ttft_s is not None else r.total_s, e2e_s=r.total_s,
                   connect_s=r.connect_s, **counts)
    else:
        row.update(ok=False, error=f"{type(r).__name__}: {r}"[:300], ttft_s=None, e2e_s=None, connect_s=None,
                   prompt_tokens=None, completion_tokens=None, cached_tokens=None, engine_prompt_ms=None)
    return row


def load_records(backend: Backend, spec: ExperimentSpec, builder: PromptBuilder) -> tuple[list[PromptRecord], str]:
    if spec.prompts_file:
        records = read_jsonl(spec.prompts_file)
        for r in records:
            builder.check(r)  # token-exact for THIS engine's tokenizer, or the cell fails
        return records, spec.prompts_file
    return builder.prompt_set(list(spec.prefix_regimes), spec.variants, spec.seed), "generated"


def run(backend: Backend, spec: ExperimentSpec, progress=None) -> dict:
    cell = backend.cell
    out_dir = Path(cell.out_dir)
    builder = PromptBuilder(backend.tokenize)
    try:
        records, source = load_records(backend, spec, builder)
    except ValueError as exc:  # PromptSetError: one line
        raise EngineError(f"prompt set: {exc}") from None
    prompts_path = write_text_atomic(out_dir / "prompts" / f"{cell.cell_id}.jsonl", to_jsonl(records))
    caching = bool(backend.spec.prefix_caching)
    mode = MODES[caching]
    g = max(1, int(backend.cache_granularity))
    max_tokens = spec.max_output_tokens
    regimes = list(dict.fromkeys(r.prefix_len_tokens for r in records))
    plan = [(n, c, m) for n in regimes for c in spec.concurrency for m in spec.reuse_mixes]
    rows: list[dict] = []
    warmups: list[dict] = []
    groups: list[dict] = []
    memory = {"after_start": snapshot(backend)}
    load = {"cpus": os.cpu_count(), "loadavg_1m_start": os.getloadavg()[0]}
    for step, (n, conc, mix) in enumerate(plan, 1):
        recs = [r for r in records if r.prefix_len_tokens == n]
        shared_prefix = recs[0].prefix
        reuse = reuse_plan(len(recs), mix, unique_seed(spec.seed, "plan", n, conc, mix))
        batch = [r if keep else builder.with_unique_prefix(r, unique_seed(spec.seed, n, conc, mix, i))
                 for i, (r, keep) in enumerate(zip(recs, reuse, strict=True))]
        threshold = (n // g) * g
        # 1. warm-up: the slots the batch will use / the block pool hold the shared prefix, as in a
        #    steady server (pinned: unpinned 1-token requests finish before the next arrives and all
        #    land on the one most similar slot)
        warm_prompts = [f"{shared_prefix}{QUESTION_MARK}Which warm-up request is number {k}?\nA:" for k in range(conc)]
        results, t0, wall = send(backend, warm_prompts, 1, conc, pin=True)
        for k, res in enumerate(results):
            w = row_of(backend, res, t0)
            warmups.append({"prefix_len_tokens": n, "concurrency": conc, "reuse_pct": round(mix * 100), "index": k,
                            "cached_tokens": w["cached_tokens"], "ttft_s": w["ttft_s"], "ok": w["ok"]})
        # 2. the timed batch, memory sampled meanwhile
        with MemorySampler(backend) as sampler:
            results, t0, wall = send(backend, [r.prompt for r in batch], max_tokens, conc)
        failed = 0
        for i, (rec, keep, res) in enumerate(zip(batch, reuse, results, strict=True)):
            row = {
                "engine": cell.backend, "mode": mode, "cell_id": cell.cell_id, "workload": rec.workload,
                "regime": regime_name(n), "prefix_len_tokens": n, "concurrency": conc,
                "reuse_pct": round(mix * 100), "index": i, "shares_prefix": keep,
                "question": rec.question_part.strip().removeprefix("Q:").removesuffix("A:").strip(),
                **row_of(backend, res, t0),
                "cache_granularity": g, "hit_threshold_tokens": threshold, "batch_wall_s": round(wall, 6),
            }
            cached = row["cached_tokens"]
            row["cache_hit"] = bool(cached is not None and threshold > 0 and cached >= threshold)
            row["expected_hit"] = bool(keep and caching)
            failed += not row["ok"]
            rows.append(row)
        if failed:
            backend.proc.check_alive(cell.backend)  # a dead engine fails the cell; else keep the errors as data
        hits = sum(r["cache_hit"] for r in rows[-len(batch):])
        groups.append({"prefix_len_tokens": n, "concurrency": conc, "reuse_pct": round(mix * 100),
                       "requests": len(batch), "failed": failed, "wall_s": round(wall, 6), "verified_hits": hits,
                       "memory": sampler.peaks()})
        if progress:
            ok_rows = [r for r in rows[-len(batch):] if r["ok"]]
            mean_ttft = sum(r["ttft_s"] for r in ok_rows) / max(1, len(ok_rows))
            progress(f"{mode} prefix {n} x{conc} reuse {round(mix * 100)}%: mean ttft {mean_ttft * 1000:.1f} ms, "
                     f"verified hits {hits}/{len(batch)}, wall {wall:.2f}s", step, len(plan))
    memory["after_runs"] = snapshot(backend)
    load["loadavg_1m_end"] = os.getloadavg()[0]
    if rows and all(not r["ok"] for r in rows):
        raise EngineError(f"every request failed; first: {rows[0]['error']}", backend.log_tail())
    return {
        "trials": {},
        "requests": rows,
        "warmups": warmups,
        "groups": groups,
        "memory": memory,
        "host_load": load,
        "prefix": {
            "mode": mode, "prefix_caching": caching, "cache_granularity": g, "max_output_tokens": max_tokens,
            "regimes": regimes, "concurrency": list(spec.concurrency), "reuse_mixes": list(spec.reuse_mixes),
            "variants": len(records) // max(1, len(regimes)),
        },
        "prompt_set": {"path": str(prompts_path.relative_to(out_dir)), "source": source, "sha256": digest(records),
                       "lines": len(records)},
    }
