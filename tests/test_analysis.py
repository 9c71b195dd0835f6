"""Report and figures from synthetic result cells written to tmp_path."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvmatrix.analysis import figures as figures_mod
from kvmatrix.analysis import roofline, stats
from kvmatrix.analysis.checks import device_state, outliers
from kvmatrix.analysis.experiments import build_evidence
from kvmatrix.analysis.experiments.invalidation import build as build_rows
from kvmatrix.analysis.experiments.invalidation import cascade, fig1_panels, ttft_split
from kvmatrix.analysis.experiments.recompute_scan import recompute_points
from kvmatrix.analysis.figures import SPECS, make_figures
from kvmatrix.analysis.provenance import settings_parity
from kvmatrix.analysis.report import NoCellsError, main, write_report
from kvmatrix.analysis.trials import order_text, unverified_trials
from kvmatrix.runners.results import Trial, condition_block, degradation_pct, describe, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = [s.name for s in SPECS]
REPO = Path(__file__).resolve().parents[1]


def trials(ttfts, *, ns_gap=5.0, engine_prompt=True, unverified=(), cached=None, expected=0, warmup=1):
    """Trials with the given measured TTFTs, preceded by ``warmup`` warm-up trials."""
    out = []
    for i, ttft in enumerate([ttfts[0]] * warmup + list(ttfts)):
        is_warm = i < warmup
        ok = is_warm or (i - warmup) not in unverified
        ns = ttft - ns_gap
        out.append(Trial(
            trial=i, warmup=is_warm, ttft_ms=ttft, ttft_non_streaming_ms=ns, overhead_ms=ttft - ns,
            engine_prompt_ms=(ns - 1.0) if engine_prompt else None, engine_predicted_ms=None,
            total_time_ms=1000.0 + i, throughput=50.0 + i, warmup_time_ms=200.0 + i,
            prompt_tokens=800, completion_tokens=50,
            cached_tokens=cached if ok else 0, expected_cached_tokens=expected, cache_granularity=1,
            cache_verified=ok,
        ))
    return out


def cell(phase, backend, a, b, hit_ttfts, miss_ttfts, *, effective=None, mismatches=(), label=None,
         hit_unverified=(), engine_prompt=True, run="demo"):
    """An ok cell document as the runner writes it."""
    hit = condition_block(trials(hit_ttfts, engine_prompt=engine_prompt, unverified=hit_unverified,
                                 cached=a, expected=a))
    miss = condition_block(trials(miss_ttfts, engine_prompt=engine_prompt, cached=0, expected=0))
    eff = {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": False, "n_threads": 2}
    eff.update(effective or {})
    doc = {
        "schema_version": 1, "cell_id": f"phase{phase}-{backend}-{a}x{b}", "run": run, "phase": phase,
        "backend": backend, "experiment": "invalidation",
        "model": {"name": "tiny", "file": "model-f16.gguf", "sha256": "ab" * 32},
        "timestamp": "2026-11-22T09:00:00Z", "status": "ok", "error": None,
        "config": {"context_size_a": a, "context_size_b": b, "query_tokens": 16, "max_output_tokens": 50,
                   "num_trials": len(hit_ttfts), "warmup_trials": 1, "settle_ms": 500},
        "cache_hit": hit, "cache_miss": miss, "ttft_degradation_pct": degradation_pct(hit, miss),
        "runtime": {"requested": dict(eff), "effective": eff, "mismatches": list(mismatches)},
        "provenance": {"llama_cpp_commit": "0c1e570", "build_flags": ["-DGGML_NATIVE=OFF"],
                       "compiler": "gcc 12", "host": {"hostname": "box", "cpu": "Xeon"}},
        "timing": {"engine_start_s": 1.2, "cell_wall_s": 30.1},
    }
    if label:
        doc["label"] = label
    return doc


def failed_cell(phase, backend, error):
    return {"schema_version": 1, "cell_id": f"phase{phase}-{backend}-512x256", "run": "demo", "phase": phase,
            "backend": backend, "status": "failed", "error": error, "config": {}, "model": {}}


def write_cells(folder: Path, docs) -> Path:
    for d in docs:
        write_json_atomic(folder / f"{d['cell_id']}.json", d)
    return folder


# ---------------------------------------------------------------- a synthetic run of all three experiments

H100 = {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54"}
MODEL = {"name": "llama-1b", "params": 1_000_000_000, "quant": "f16", "n_layers": 24, "hidden_size": 2048}
TINY = {"name": "tiny", "params": 4_262_144, "quant": "f16", "n_layers": 4, "hidden_size": 256}


def _trial(i, warm, ttft, prompt, cached, *, rng, warmup_ms=50.0, device=None, extra=None):
    ns = ttft - 0.5
    t = {"trial": i, "warmup": warm, "ttft_ms": ttft, "ttft_non_streaming_ms": ns, "overhead_ms": ttft - ns,
         "engine_prompt_ms": ns - 0.3, "engine_predicted_ms": 0.1, "total_time_ms": 400 + rng.normal(0, 5),
         "throughput": 120 + rng.normal(0, 3), "warmup_time_ms": warmup_ms, "prompt_tokens": prompt,
         "completion_tokens": 50, "cached_tokens": cached, "expected_cached_tokens": cached,
         "cache_granularity": 1, "cache_verified": True}
    if device is not None:
        t["device"] = device
    t.update(extra or {})
    return t


def _block(trials_):
    return {"trials": trials_, "stats": {"ttft_ms": describe([t["ttft_ms"] for t in trials_ if not t["warmup"]]),
                                         "n_trials": sum(not t["warmup"] for t in trials_),
                                         "verified_trials": sum(not t["warmup"] and t["cache_verified"]
                                                                for t in trials_)}}


def _doc(cell_id, phase, backend, experiment, *, gpu=True, label=None, provenance=None, n_batch=2048):
    prov = {"llama_cpp_commit": "0c1e570", "build_variant": "cuda" if gpu else "cpu",
            "host": {"hostname": "box", "cpus": 16}, "build_cuda": gpu}
    if gpu:
        prov["gpu"] = H100
    prov.update(provenance or {})
    eff = {"n_ctx": 4096, "n_batch": n_batch, "n_ubatch": min(n_batch, 512), "n_gpu_layers": 99 if gpu else 0,
           "n_threads": 8}
    return {"schema_version": 1, "cell_id": cell_id, "run": "full", "phase": phase, "backend": backend,
            "label": label or backend, "experiment": experiment, "model": dict(MODEL if gpu else TINY),
            "timestamp": "2026-11-22T09:00:00Z", "status": "ok", "error": None,
            "config": {"context_size_a": 512, "context_size_b": 256, "query_tokens": 16, "max_output_tokens": 50,
                       "num_trials": 10, "warmup_trials": 1, "settle_ms": 500},
            "runtime": {"requested": dict(eff), "effective": eff, "mismatches": []},
            "provenance": prov, "timing": {"engine_start_s": 1.0, "cell_wall_s": 30.0}}


def invalidation_cell(phase, backend, a, b, *, seed, per_token=0.05, n=10, gpu=True, warm_tokens=False,
                      throttle=None, label=None):
    """Interleaved hit/miss trials as the runner writes them, warm-ups slow after a miss (the cascade)."""
    rng = np.random.default_rng(seed)
    doc = _doc(f"phase{phase}-{backend}-{a}x{b}", phase, backend, "invalidation", gpu=gpu, label=label)
    doc["config"].update(context_size_a=a, context_size_b=b, num_trials=n)
    q, tmpl = 16, 23
    shapes = {"cache_hit": (a + b + q + tmpl, a + b + tmpl - 1), "cache_miss": (b + q + tmpl, 4)}
    plan = [(c, 0, True) for c in shapes] + [(c, i, False) for i in range(n) for c in shapes]
    blocks = {c: [] for c in shapes}
    prev = None
    for k, (cond, i, warm) in enumerate(plan):
        prompt, cached = shapes[cond]
        ttft = 3.0 + per_token * (prompt - cached) + abs(rng.normal(0, 0.4))
        if cond == "cache_miss" and i == 7 and not warm:
            ttft *= 3  # one slow miss: the outlier
        after_miss = prev in (None, "cache_miss")
        warm_ms = (per_token * (a + b) if after_miss else per_token * 2) + 2 + abs(rng.normal(0, 0.3))
        extra = {"warmup_prompt_tokens": a + b + tmpl, "warmup_cached_tokens": 4 if after_miss else a + b + tmpl - 1
                 } if warm_tokens else None
        device = None
        if gpu:
            device = {"sm_clock_mhz": 1980.0, "mem_clock_mhz": 2619.0, "power_w": 310.0 + k, "temp_c": 45.0}
            if throttle is not None and k == throttle:
                device["sm_clock_mhz"] = 1400.0
        control = {"reference_ttft_ms": ttft - 0.1 + rng.normal(0, 0.02), "reference_cached_tokens": cached,
                   "reference_verified": True, "tokenid_ttft_ms": ttft - 0.6, "tokenid_verified": True,
                   "breakdown": {"ttft_ms": ttft, "client_ms": 0.05, "first_byte_ms": ttft - 0.2,
                                 "engine_ms": ttft - 1.0, "interface_ms": 0.95}}
        blocks[cond].append(_trial(i, warm, ttft, prompt, cached, rng=rng, warmup_ms=warm_ms, device=device,
                                   extra={**(extra or {}), **control}))
        prev = cond
    doc["calibration"] = {"enabled": True, "reference_client": "stdlib http.client", "token_id_path": True}
    for cond, ts in blocks.items():
        doc[cond] = _block(ts)
    h = [t["ttft_ms"] for t in blocks["cache_hit"] if not t["warmup"]]
    m = [t["ttft_ms"] for t in blocks["cache_miss"] if not t["warmup"]]
    doc["ttft_degradation_pct"] = (np.mean(m) - np.mean(h)) / np.mean(h) * 100
    doc["order"] = [f"{c}:{i}{'w' if w else ''}" for c, i, w in plan]
    if gpu:
        doc["device_settle"] = [{"sm_clock_mhz": 1980.0, "mem_clock_mhz": 2619.0, "power_w": 80.0, "temp_c": 40.0}]
    return doc


def scan_cell(phase, backend, *, seed, per_token=0.05, total=800, gpu=True, n=5, label=None):
    rng = np.random.default_rng(seed)
    doc = _doc(f"phase{phase}-{backend}-scan", phase, backend, "recompute_scan", gpu=gpu, label=label)
    doc["scan"] = []
    for kept in (0, 200, 400, 600, 780):
        r = total - kept
        ts = [_trial(i, False, 3.0 + per_token * r + abs(rng.normal(0, 0.3)), total, kept, rng=rng)
              for i in range(n)]
        doc["scan"].append({"kept_tokens": kept, "recomputed_tokens": r, "trials": ts, "stats": _block(ts)["stats"]})
    return doc


def sweep_cell(phase, backend, n_batch, *, seed, gpu=True, n=5, label=None):
    rng = np.random.default_rng(seed)
    doc = _doc(f"phase{phase}-{backend}-nb{n_batch}", phase, backend, "batch_sweep", gpu=gpu, n_batch=n_batch,
               label=label)
    doc["sweep"] = {"n_batch": n_batch, "n_ubatch": min(n_batch, 512)}
    base = 12.0 + 400.0 / n_batch
    ts = [_trial(i, False, base + abs(rng.normal(0, 0.3)), 295, 4, rng=rng) for i in range(n)]
    doc["cache_miss"] = _block(ts)
    return doc


SLOT_CONDS = ("cache_hit", "cache_miss", "other_slot", "server_hit", "server_miss", "alternate")


def slot_cell(n_parallel, *, seed, n=5, n_ctx=2048, per_token=0.05):
    """A slot_eviction cell as the runner writes it: [A,B,Q] = 799 tokens fits 2048 and 1024 per slot, not 512;
    with one slot another prefix evicts [A,B], with two it stays; with 512 per slot [A,B] (783) is refused."""
    rng = np.random.default_rng(seed)
    doc = _doc(f"slot_eviction-phase3a-llamacpp_http-p{n_parallel}-512x256", "3a", "llamacpp_http",
               "slot_eviction", gpu=False)
    doc["runtime"]["effective"].update(n_ctx=n_ctx, n_parallel=n_parallel, n_ctx_per_slot=n_ctx // n_parallel,
                                       kv_unified=False)
    slot_ctx = n_ctx // n_parallel
    prompts = {"[A,B]": 783, "[A,B,Q]": 799, "[B,Q]": 287, "[A',B']": 783}
    hit, miss = (799, 776), (287, 4)
    other = hit if n_parallel == 1 else (799, 4)
    shapes = {"cache_hit": (hit, 0, 776), "cache_miss": (miss, 0, 4), "other_slot": (other, 1 % n_parallel, 4),
              "server_hit": (hit, 0, 776), "server_miss": (miss, min(1, n_parallel - 1), 4 if n_parallel == 1 else 782),
              "alternate": ((799, 4) if n_parallel == 1 else hit, 0, 782)}
    refused = []
    for cond, ((prompt, cached), slot, rewarm) in shapes.items():
        ts = []
        for i in range(n):
            if prompts["[A,B]"] >= slot_ctx:
                refused.append({"condition": cond, "trial": i, "warmup": False, "prompt": "[A,B]",
                                "prompt_tokens": 783, "n_ctx": slot_ctx, "id_slot": 0,
                                "message": f"request (783 tokens) exceeds the available context size ({slot_ctx})"})
                continue
            ttft = 3.0 + per_token * (prompt - cached) + abs(rng.normal(0, 0.3))
            ts.append(_trial(i, False, ttft, prompt, cached, rng=rng, extra={
                "id_slot": slot, "warmup_id_slot": 0, "rewarm_time_ms": 3.0 + per_token * (783 - rewarm),
                "rewarm_cached_tokens": rewarm, "rewarm_id_slot": 0}))
        doc[cond] = _block(ts)
    doc["order"] = [f"{c}:{i}" for i in range(n) for c in SLOT_CONDS]
    doc["slot_eviction"] = {
        "n_parallel": n_parallel, "slot_ctx": [slot_ctx] * n_parallel, "prompts": prompts,
        "fits": {k: v < slot_ctx for k, v in prompts.items()}, "conditions": {c: f"what {c} does" for c in SLOT_CONDS},
        "refused": refused, "slots_at_end": []}
    doc["keep_warm"] = {"requested": True, "active": False, "reason": "engine runs on the CPU (n_gpu_layers=0)"}
    return doc


def full_run_docs() -> list[dict]:
    """invalidation (two backends, two configs, one on a GPU with NVML samples) + recompute_scan + batch_sweep
    + slot_eviction (1, 2, 4 slots)."""
    py = "llamacpp_python/chat"
    return [
        invalidation_cell("3a", "llamacpp_http", 512, 256, seed=1, warm_tokens=True, throttle=9),
        invalidation_cell("3a", "llamacpp_http", 256, 512, seed=2),
        invalidation_cell("3b", "llamacpp_python", 512, 256, seed=3, per_token=0.08, gpu=False,
                          label=py),
        invalidation_cell("3b", "llamacpp_python", 256, 512, seed=4, per_token=0.08, gpu=False, label=py),
        scan_cell("3a", "llamacpp_http", seed=5),
        scan_cell("3b", "llamacpp_python", seed=6, per_token=0.08, gpu=False, label=py),
        *[sweep_cell("3a", "llamacpp_http", nb, seed=10 + nb) for nb in (64, 128, 256, 512, 2048)],
        *[sweep_cell("3b", "llamacpp_python", nb, seed=20 + nb, gpu=False, label=py) for nb in (64, 256, 2048)],
        *[slot_cell(n, seed=30 + n) for n in (1, 2, 4)],
        failed_cell("1", "vllm_http", "engine exited with code 1"),
    ]


@pytest.fixture
def full_run(tmp_path):
    return write_cells(tmp_path / "full", full_run_docs())


def run_docs():
    """llama.cpp HTTP (two configs), vLLM HTTP, one failed cell."""
    return [
        cell("3a", "llamacpp_http", 512, 256, [10, 12, 14], [100, 110, 120], hit_unverified=(1,)),
        cell("3a", "llamacpp_http", 256, 512, [20, 22, 24], [60, 66, 72]),
        cell("1", "vllm_http", 512, 256, [5, 6, 7], [40, 44, 48], engine_prompt=False,
             effective={"n_threads": 8, "gpu_memory_utilization": 0.9},
             mismatches=[{"key": "n_batch", "requested": 2048, "effective": 1024}]),
        failed_cell("3b", "llamacpp_python", "engine exited with code 1 (see logs/x.log)"),
    ]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder of ``run_docs``."""
    return write_cells(tmp_path / "demo", run_docs())


@pytest.fixture(scope="module")
def report_text(tmp_path_factory):
    """report.md of ``run_docs``, written once for the tests that only read it."""
    return write_report([write_cells(tmp_path_factory.mktemp("demo"), run_docs())]).read_text()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """(out folder, report.md text) of ``full_run_docs``, written once."""
    out = tmp_path_factory.mktemp("full_out")
    text = write_report([write_cells(tmp_path_factory.mktemp("full"), full_run_docs())], out).read_text()
    return out, text


INVALIDATION = "Invalidation: cache hit vs cache miss"
FULL_TABLE = "Invalidation: the full table"  # the appendix's wide table


def section(text: str, title: str) -> str:
    """The body of a ``## title`` section (its ``###`` subsections included)."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def subsection(text: str, title: str) -> str:
    """The body of a ``### title`` subsection."""
    return text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def table_rows(md: str) -> list[list[str]]:
    """Cells of the body rows of the FIRST github-format markdown table in ``md``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append(ln)
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in block[2:]]


def table_header(md: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith("|"))
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------- statistics


def test_bootstrap_ci_contains_median_and_is_deterministic():
    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 10, 31):
        x = rng.lognormal(3, 0.5, size=n)
        s = stats.summarize(x)
        assert s.ci[0] <= s.median <= s.ci[1]
        assert s.ci[0] >= x.min() and s.ci[1] <= x.max()
        assert stats.summarize(x) == s  # fixed seed: same CI every time
        assert stats.summarize(list(x)[::-1]).median == s.median
    assert stats.bootstrap_ci([4.0, 4.0, 4.0]) == (4.0, 4.0)
    assert stats.bootstrap_ci([]) is None
    assert stats.summarize([]).n == 0 and stats.summarize([None, float("nan")]).n == 0


def test_summary_fields():
    s = stats.summarize([10, 12, 14, 11, 50])
    assert s.n == 5 and s.median == 12 and s.mean == pytest.approx(19.4)
    assert s.stdev == pytest.approx(17.16974, rel=1e-5)
    assert s.cv == pytest.approx(s.stdev / s.mean)
    assert s.p95 == pytest.approx(42.8)  # linear interpolation, as results.percentile
    assert (s.min, s.max) == (10, 50)


def test_mann_whitney_hand_computed():
    # two clearly separated samples of 10, no ties: the exact test, U = 0, p = 2 / C(20, 10) = 1.0825e-05
    # (the normal approximation would bottom out at 1.83e-04)
    mw = stats.mann_whitney(range(10), range(10, 20))
    assert mw.method == "exact" and mw.u == 0
    assert mw.p == pytest.approx(2 / 184756, rel=1e-9)
    assert stats.mann_whitney(range(10, 20), range(10)).p == pytest.approx(mw.p)  # two-sided
    # identical samples: no evidence of a difference
    assert stats.mann_whitney(range(10), range(10)).p == 1.0
    assert stats.mann_whitney([5.0] * 10, [5.0] * 10).p == 1.0
    # tiny samples without ties: exact, P(U = 0) = 1 / C(6, 3) = 1/20, two-sided 0.1
    small = stats.mann_whitney([1, 2, 3], [4, 5, 6])
    assert small.method == "exact" and small.p == pytest.approx(0.1)
    # ties: average ranks and the tie-corrected variance (scipy.stats.mannwhitneyu gives 0.2310455)
    tied = stats.mann_whitney([1, 2, 2, 3, 9], [2, 4, 5, 6, 7, 8])
    assert tied.method == "asymptotic" and tied.u == 8 and tied.p == pytest.approx(0.2310455, abs=1e-6)
    assert stats.mann_whitney([], [1, 2]) is None


def test_compare_difference_of_medians():
    c = stats.compare([10, 12, 14], [100, 110, 120])
    assert c.diff == 98 and c.diff_ci[0] <= 98 <= c.diff_ci[1]
    assert c.rel_pct == pytest.approx(98 / 12 * 100) and c.rel_ci[0] <= c.rel_pct <= c.rel_ci[1]
    assert c.p == pytest.approx(0.1)
    assert stats.compare([], [1.0]).diff is None


def test_tukey_fences_and_fit():
    f = stats.tukey([1, 2, 3, 4, 100])
    assert f.flagged == (4,) and (f.low, f.high) == (-1.0, 7.0)
    assert stats.tukey([1, 2, 3]) is None  # too few to judge
    fit = stats.linear_fit([0, 100, 200, 300], [5, 15, 25, 35])
    assert fit.slope == pytest.approx(0.1) and fit.intercept == pytest.approx(5) and fit.r2 == pytest.approx(1)
    assert stats.linear_fit([5, 5], [1, 2]) is None


def test_fmt_p():
    assert stats.fmt_p(0.5) == "0.500" and stats.fmt_p(0.000183) == "1.83e-04" and stats.fmt_p(1e-9) == "< 1e-6"


# ---------------------------------------------------------------- roofline


def _roof_cell(gpu_name=None, ngl=99, **model):
    m = {"params": 1_000_000_000, "quant": "f16", "n_layers": 24, "hidden_size": 2048}
    m.update(model)
    prov = {"host": {"cpus": 16}}
    if gpu_name:
        prov["gpu"] = {"name": gpu_name}
    return {"model": m, "provenance": prov,
            "runtime": {"effective": {"n_gpu_layers": ngl, "n_threads": 4, "n_threads_batch": 8}}}


def test_roofline_known_case_h100():
    # 1e9 params, f16, 24 layers, hidden 2048; 512 tokens recomputed from scratch:
    # FLOPs = 2e9 * 512 + 4 * 24 * 2048 * 512 * (0 + 513/2) = 1.024e12 + 2.5820e10 = 1.0498e12
    # compute = 1.0498e12 / 989e12 = 1.0615 ms; memory = 2e9 B / 3.35e12 B/s = 0.597 ms
    f, why = roofline.floor(_roof_cell("NVIDIA H100 80GB HBM3"), 512, 0)
    assert why == "" and f.device.name == "H100 SXM"
    assert f.flops == pytest.approx(1.024e12 + 4 * 24 * 2048 * 512 * 256.5)
    assert f.attention_flops == pytest.approx(2.58201e10, rel=1e-5)
    assert f.compute_ms == pytest.approx(1.0615, abs=1e-4)
    assert f.memory_ms == pytest.approx(0.5970, abs=1e-4)
    assert f.ms == f.compute_ms and f.bound == "compute"
    # a handful of tokens after a long cached prefix is memory bound
    small, _ = roofline.floor(_roof_cell("NVIDIA H200"), 4, 1000)
    assert small.device.name == "H200" and small.bound == "memory"
    assert small.ms == pytest.approx(2e9 / 4.8e12 * 1e3)


def test_roofline_weights_devices_and_reasons():
    q8, _ = roofline.floor(_roof_cell("NVIDIA A100-SXM4-40GB", quant="q8_0"), 1, 0)
    assert q8.device.name == "A100 40GB" and q8.bytes == pytest.approx(1e9 * 1.0625)
    assert roofline.device_peak(_roof_cell("NVIDIA L4"))[0].name == "L4"
    assert roofline.device_peak(_roof_cell("NVIDIA A100 80GB PCIe"))[0].name == "A100 80GB"
    assert roofline.device_peak(_roof_cell("NVIDIA H100 PCIe"))[0].name == "H100 PCIe"
    unknown, why = roofline.floor(_roof_cell("NVIDIA GeForce RTX 4090"), 10)
    assert unknown is None and "not in the peak table" in why
    # GPU in the box but no layers offloaded: a CPU run, estimated from the prompt-processing threads
    cpu, _ = roofline.device_peak(_roof_cell("NVIDIA H100 80GB HBM3", ngl=0))
    assert cpu.source == "estimate" and cpu.flops == pytest.approx(8 * roofline.CPU_GFLOPS_PER_CORE * 1e9)
    measured = _roof_cell()
    measured["provenance"].update(cpu_peak_gflops=500.0, cpu_peak_gbps=50.0)
    peak, _ = roofline.device_peak(measured)
    assert peak.source == "measured" and (peak.flops, peak.bandwidth) == (500e9, 50e9)
    no_shape = _roof_cell()
    del no_shape["model"]["n_layers"]
    f, _ = roofline.floor(no_shape, 100)
    assert f.attention_flops == 0 and any("attention FLOPs left out" in n for n in f.notes)
    assert roofline.floor({"model": {}, "provenance": {"host": {"cpus": 2}}}, 10) == (None, "model.params not recorded")


# ---------------------------------------------------------------- trial order, cascade, outliers, device state


def test_order_text():
    order = ["cache_hit:0w", "cache_miss:0w"] + [f"{c}:{i}" for i in range(10) for c in ("cache_hit", "cache_miss")]
    assert order_text(order).startswith("interleaved: 1 warm-up round (hit, miss), then hit, miss × 10 "
                                        "(hit:0w, miss:0w, hit:0, miss:0, …; 22 queries)")
    assert order_text([]) == "not recorded"
    assert order_text([f"{c}:{i}" for c in ("cache_hit", "cache_miss") for i in range(3)]).startswith("blocked")


def test_cascade_attributes_warmups_to_the_previous_query():
    row = build_rows([invalidation_cell("3a", "llamacpp_http", 512, 256, seed=1, warm_tokens=True)])[0]
    c, why = cascade(row)
    assert why == "" and c.excluded == 2  # the cold first query and the warm-up trial after it
    # interleaved: every hit's warm-up follows a miss and vice versa
    assert [t["trial"] for t in c.after["miss"]] == list(range(10)) and all(
        t in row.trials["hit"] for t in c.after["miss"])
    assert c.summary("miss").median > 10 * c.summary("hit").median
    assert c.tokens("miss") == (4, 791 - 4) and c.tokens("hit") == (790, 1)
    no_order = row.cell.to_dict()
    del no_order["order"]
    assert cascade(build_rows([no_order])[0]) == (None, "no trial order recorded")


def test_outliers_flag_the_slow_trial_without_dropping_it():
    doc = invalidation_cell("3a", "llamacpp_http", 512, 256, seed=1)
    found = [o for o in outliers([doc]) if o.condition == "miss"]
    assert [o.trial for o in found] == [7] and found[0].value > found[0].high
    assert build_rows([doc])[0].summary("miss").n == 10  # still counted


def test_device_state_and_clock_drop():
    doc = invalidation_cell("3a", "llamacpp_http", 512, 256, seed=1, throttle=5)
    st = device_state(doc)
    assert st.has_data and st.range("sm_clock_mhz") == (1400.0, 1980.0) and len(st.settle) == 1
    assert [(cond, trial) for cond, trial, _, _ in st.drops] == [("miss", 1)]  # plan index 5 = cache_miss:1
    assert not device_state(invalidation_cell("3b", "llamacpp_python", 512, 256, seed=2, gpu=False)).has_data


def test_fig1_one_panel_per_model_split_by_phase_above_eight_series():
    docs = []
    for phase, backend, label in (("3a", "llamacpp_http", None), ("3b", "llamacpp_python", "llamacpp_python/chat")):
        for i in range(5):  # five runs of one backend on the llama-1b model: five series
            for a, b in ((512, 256), (256, 512)):
                d = invalidation_cell(phase, backend, a, b, seed=i, n=3, label=label)
                d["run"] = f"r{i}"
                d["runtime"]["requested"]["flash_attn"] = i % 2 == 1
                docs.append(d)
    docs += [invalidation_cell("3b", "llamacpp_python", 512, 256, seed=9, gpu=False, n=3)]  # tiny model
    panels = fig1_panels(build_rows(docs))
    assert [p.title for p in panels] == ["llama-1b/f16, phase 3a", "llama-1b/f16, phase 3b", "tiny/f16"]
    first = list(dict.fromkeys(panels[0].names))
    assert len(first) == 5 and len(panels[0].rows) == 10  # every config of a series stays in its panel
    assert first[0] == "3a llamacpp_http (FA off) (run r0)" and first[1] == "3a llamacpp_http (FA on) (run r1)"
    assert panels[2].names == ["3b llamacpp_python"]  # one series: no settings or run to tell apart
    chunks = fig1_panels(build_rows(docs), max_series=2)
    assert [p.title for p in chunks][:3] == ["llama-1b/f16, phase 3a (1/3)", "llama-1b/f16, phase 3a (2/3)",
                                             "llama-1b/f16, phase 3a (3/3)"]


def test_recompute_points_use_engine_counts_only():
    docs = full_run_docs()
    points, skipped = recompute_points(docs)
    assert skipped == 0 and len(points) == 4 * 20 + 2 * 25
    assert {p.source for p in points} == {"hit", "miss", "scan"}
    docs[0]["cache_hit"]["trials"][3]["cached_tokens"] = None
    assert recompute_points(docs)[1] == 1


# ---------------------------------------------------------------- the report


def test_report_written_with_header(run_dir):
    path = write_report([run_dir])
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# ")
    assert "Runs: demo" in text
    assert "Cells: 4 (3 ok, 1 failed)" in text
    assert "Generated: " in text
    assert "10,000 resamples" in text and "Mann-Whitney U" in text and "Tukey" in text


def test_main_table_rows_and_values(report_text):
    text = subsection(report_text, FULL_TABLE)
    header = table_header(text)
    rows = [dict(zip(header, r, strict=True)) for r in table_rows(text)]
    # phase 1 before 3a; within 3a the config with the larger A first
    assert [(r["Phase"], r["Backend"], r["A/B (tok)"]) for r in rows] == [
        ("1", "vllm_http", "512/256"), ("3a", "llamacpp_http †", "512/256"), ("3a", "llamacpp_http", "256/512"),
    ]
    vllm, llama = rows[0], rows[1]
    assert vllm["Hit TTFT (ms) median [95% CI]"] == "6.0 [5.0, 7.0]"
    assert vllm["Miss TTFT (ms) median [95% CI]"] == "44.0 [40.0, 48.0]"
    assert vllm["Degradation mean (%)"] == "+633.3"  # (44 - 6) / 6
    assert vllm["Miss − hit (ms) [95% CI]"].startswith("+38.0 [")
    assert vllm["p (Mann-Whitney)"] == "0.100 (exact)"  # 3 vs 3, no ties: 2 / C(6, 3)
    assert llama["Degradation (%) median [95% CI]"].startswith("+816.7 [")  # (110 - 12) / 12
    assert llama["Degradation mean (%)"] == "+816.7"
    assert llama["Non-stream TTFT hit / miss (ms)"] == "7.0 / 105.0"  # non-streaming medians (TTFT - 5)
    assert llama["Overhead hit / miss (ms)"] == "5.0 / 5.0"
    assert llama["Throughput hit (tok/s)"] == "52.0"  # measured trials 1..3 -> 51, 52, 53
    assert llama["Warm-up before hit / miss (ms)"] == "202.0 / 202.0"
    assert llama["Verified hit"] == "2/3" and llama["Verified miss"] == "3/3"
    assert llama["Trials (measured + warm-up)"] == "3 + 1"
    assert llama["Miss / floor"] == "—"  # the fixture's model records no params
    assert "Trial order (all 3 cells): not recorded." in section(report_text, INVALIDATION)


def test_unverified_trial_listed_and_footnoted(report_text):
    text = report_text
    rows = table_rows(section(text, "Unverified trials"))
    assert rows == [["phase3a-llamacpp_http-512x256", "hit", "2", "0", "512", "1"]]
    assert "Verified measured trials over all ok cells: 17/18." in text
    assert "† The statistics of this row include 1 unverified" in section(text, "Appendix")


def test_failed_cell_listed(report_text):
    rows = table_rows(section(report_text, "Failed cells"))
    assert rows == [["phase3b-llamacpp_python-512x256", "failed", "engine exited with code 1 (see logs/x.log)"]]


def test_parity_lists_differing_keys_and_mismatches(report_text):
    text = section(report_text, "Settings parity")
    assert table_header(text) == ["cell", "n_threads"]
    assert {r[0]: r[1] for r in table_rows(text.split("Requested")[0])} == {
        "phase1-vllm_http-512x256": "8", "phase3a-llamacpp_http-256x512": "2", "phase3a-llamacpp_http-512x256": "2",
    }
    assert "gpu_memory_utilization" not in text  # reported by one cell only: not a difference
    assert "n_batch: requested 2048, effective 1024" in text


def test_parity_all_equal():
    docs = [cell("3a", "llamacpp_http", 512, 256, [1, 2], [3, 4]), cell("3a", "llamacpp_http", 256, 512, [1, 2], [3, 4])]
    par = settings_parity(docs)
    assert par.keys == [] and par.compared == 5 and par.mismatches == []


def test_provenance_table(report_text):
    rows = table_rows(section(report_text, "Provenance"))
    assert ["phase1-vllm_http-512x256", "vllm_http", "llama_cpp_commit=0c1e570", "—", "—", "—", "-DGGML_NATIVE=OFF",
            "tiny", "abababababab", "box / Xeon", "CPU"] in rows  # runtime, image, runner git: not recorded here


def test_figures_are_pngs_and_svgs_and_embedded(run_dir, tmp_path):
    out = tmp_path / "out"
    text = write_report([run_dir], out).read_text()
    for name in ("fig1_invalidation_cost", "experiment1_results", "three_panel"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
        assert b"<svg" in (out / "figures" / f"{name}.svg").read_bytes()[:500]
        assert f"](figures/{name}.png)" in text and f"](figures/{name}.svg)" in text
    assert not (run_dir / "report.md").exists()
    assert "non-streaming TTFT for 1 vllm_http" in text


def test_full_run_produces_every_figure(full_report):
    out, text = full_report
    for name in ALL_FIGURES:
        png, svg = out / "figures" / f"{name}.png", out / "figures" / f"{name}.svg"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000, name
        assert b"<svg" in svg.read_bytes()[:500], name
        assert f"](figures/{name}.png)" in text, name
    assert "skipped (" not in text
    assert len(ALL_FIGURES) == 11 and ALL_FIGURES[0] == "fig0_summary"


def test_full_run_report_sections(full_report):
    _, text = full_report
    inv = section(text, INVALIDATION)
    assert "interleaved: 1 warm-up round (hit, miss), then hit, miss × 10" in inv
    full = subsection(text, FULL_TABLE)
    header = table_header(full)
    rows = [dict(zip(header, r, strict=True)) for r in table_rows(full)]
    assert len(rows) == 4 and all(r["p (Mann-Whitney)"] == "1.08e-05 (exact)" for r in rows)
    assert all(r["Miss / floor"].endswith("×") for r in rows)
    assert "### Invalidation: statistics per condition" in text and "### Warm-up cascade" in inv
    assert "fig4_cascade.png" in inv and "fig1_invalidation_cost.png" in inv
    scan = section(text, "Recompute scan: TTFT vs recomputed tokens")
    assert len(table_rows(scan)) == 10 and "Slope (ms/token)" in scan and "fig2_ttft_vs_recomputed.png" in scan
    fit = {r[0]: r for r in table_rows(scan.split("Least-squares fit")[1])}
    assert set(fit) == {"llamacpp_http", "llamacpp_python/chat"}
    sweep = section(text, "Batch sweep: cache-miss TTFT vs n_batch")
    sweep_rows = table_rows(sweep)
    assert [(r[0], r[1]) for r in sweep_rows][:5] == [("llamacpp_http", str(n)) for n in (64, 128, 256, 512, 2048)]
    assert "fig5_miss_ttft_vs_nbatch.png" in sweep
    roof = section(text, "Roofline floor")
    assert "H100 SXM" in roof and "CPU, 8 threads *" in roof and "FLOPs = 2 · params · r" in roof
    flagged = [r[:3] for r in table_rows(section(text, "Outlier trials"))]
    assert ["phase3a-llamacpp_http-512x256", "miss", "7"] in flagged  # the slow miss, flagged, kept
    slots = section(text, "Slot eviction: llama-server with N slots at one total context")
    header = table_header(slots)
    main_rows = [dict(zip(header, r, strict=True)) for r in table_rows(slots)[:3]]
    assert [(r["N slots"], r["Per-slot ctx (tok)"], r["[A,B,Q] fits"]) for r in main_rows] == [
        ("1", "2048", "yes"), ("2", "1024", "yes"), ("4", "512", "no")]
    assert main_rows[0]["cache_n / prompt hit"] == "776 / 799" and main_rows[0]["Verified"] == "30/30"
    assert main_rows[2]["Hit TTFT (ms) median [95% CI]"] == "refused 5× ([A,B], 783 tok ≥ slot 512)"
    assert main_rows[2]["Refused trials"] == "30"
    every = slots.split("### Every condition")[1]
    alternate = {r[2]: r for r in table_rows(every) if r[3] == "alternate"}
    assert alternate["1"][7] == "4 / 799" and alternate["2"][7] == "776 / 799"
    assert "fig6_slot_eviction.png" in slots
    dev = section(text, "Device state (NVML)")
    assert "1400–1980" in dev and "no NVML data (CPU run)" in dev and "Clock drops" in dev
    figs = subsection(text, "Figure files")
    assert all(f"`{n}.png`" in figs or f"{n}.png" in figs for n in ALL_FIGURES)
    assert "python -m kvmatrix.analysis.figures DIR" in figs


def test_cpu_only_run_says_no_nvml(report_text):
    text = report_text
    assert "No NVML data (CPU run)" in section(text, "Device state (NVML)")


def test_skipped_figures_say_why(run_dir, tmp_path):
    out = tmp_path / "out"
    stale = out / "figures" / "fig5_miss_ttft_vs_nbatch.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    text = write_report([run_dir], out).read_text()
    assert not stale.exists()  # no stale figure from an earlier report
    assert "Miss TTFT vs n_batch: skipped (no ok batch_sweep cell with cache-miss TTFT trials)" in text
    # the fixture's cells have no trial order: the cascade says so
    assert "fig4_cascade.png`, `.svg` — Warm-up cascade: warm-up after a miss vs after a hit: skipped (no trial " \
           "order recorded)" in text
    assert "No ok recompute_scan cells; the fit below uses the invalidation trials only." in text


def test_figures_skipped_without_data(tmp_path):
    results = make_figures(build_evidence([]), tmp_path / "figures")
    assert [r.name for r in results] == ALL_FIGURES
    assert all(r.path is None and r.note for r in results)
    assert not (tmp_path / "figures").exists()


def test_only_failed_cells_reports_skipped_figures(tmp_path):
    folder = write_cells(tmp_path / "r", [failed_cell("3a", "llamacpp_http", "boom")])
    text = write_report([folder]).read_text()
    assert "No ok invalidation cells" in text and "skipped (" in text and "boom" in text


def test_merges_dirs_and_disambiguates_runs(tmp_path):
    d1 = write_cells(tmp_path / "r1", [cell("3a", "llamacpp_http", 512, 256, [10, 12], [50, 60], run="r1")])
    d2 = write_cells(tmp_path / "r2", [cell("3a", "llamacpp_http", 512, 256, [11, 13], [51, 61], run="r2")])
    text = write_report([d1, d2, d1]).read_text()  # d1 twice: its cell counted once
    assert "Cells: 2 (2 ok, 0 failed)" in text and "Runs: r1, r2" in text
    labels = [r[1] for r in table_rows(subsection(text, FULL_TABLE))]
    assert labels == ["llamacpp_http (r1)", "llamacpp_http (r2)"]


def test_label_names_the_row():
    docs = [cell("3b", "llamacpp_python", 512, 256, [1, 2], [3, 4], label="llamacpp_python/low-level")]
    assert build_rows(docs)[0].series == "llamacpp_python/low-level"


def test_version_text_per_engine():
    from kvmatrix.analysis.labels import version_text

    prov = {"llama_cpp_commit": "0c1e570", "llama_cpp_python_version": "0.3.36", "vllm_version": "0.11.0"}
    assert version_text({"backend": "llamacpp_http", "provenance": prov}) == "llama.cpp 0c1e570"
    assert version_text({"backend": "llamacpp_python", "provenance": {**prov, "build_variant": "wheel"}}) == \
        "llama.cpp 0c1e570, bindings 0.3.36, wheel"
    assert version_text({"backend": "vllm_http", "provenance": prov}) == "vLLM 0.11.0"
    assert version_text({"backend": "x", "provenance": {"engine_version": "b4000"}}) == "b4000"


def test_rows_are_invalidation_cells_only():
    rows = build_rows(full_run_docs())
    assert len(rows) == 4 and {r.cell.experiment for r in rows} == {"invalidation"}


def test_ttft_split_uses_engine_time_else_non_streaming():
    hit = condition_block(trials([10, 10, 10]))  # engine prompt = ttft - 6
    assert ttft_split(hit["stats"]) == (4.0, 6.0)
    no_engine = condition_block(trials([10, 10, 10], engine_prompt=False))
    assert ttft_split(no_engine["stats"]) == (5.0, 5.0)
    slow_engine = condition_block(trials([10, 10, 10], ns_gap=-5))  # computation > TTFT
    assert ttft_split(slow_engine["stats"])[1] == 0.0


def test_unverified_ignores_warmup():
    doc = cell("3a", "llamacpp_http", 512, 256, [1, 2], [3, 4])
    doc["cache_hit"]["trials"][0]["cache_verified"] = False  # the warm-up trial
    assert unverified_trials(doc) == []


def test_unverified_covers_scan_and_sweep():
    docs = full_run_docs()
    docs[4]["scan"][1]["trials"][0]["cache_verified"] = False
    docs[6]["cache_miss"]["trials"][2]["cache_verified"] = False
    found = [(u.cell_id, u.condition) for d in docs for u in unverified_trials(d)]
    assert found == [("phase3a-llamacpp_http-scan", "scan kept=200"), ("phase3a-llamacpp_http-nb64", "cache_miss")]


def test_no_cells_error(tmp_path):
    with pytest.raises(NoCellsError, match="no result cells in .*run nox -s phase3a first"):
        write_report([tmp_path])


def test_cli(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").exists()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvmatrix: error: no result cells in ")


def test_cli_module_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvmatrix.analysis.report", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"kvmatrix: error: no result cells in {tmp_path}; run nox -s phase3a first "
                                   "or pass the folder that holds the *.json")


def test_figures_cli_regenerates_without_report(full_run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert figures_mod.main([str(full_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ALL_FIGURES:
        assert str(out / "figures" / f"{name}.png") in printed and str(out / "figures" / f"{name}.svg") in printed
    assert not (out / "report.md").exists()
    svg = (out / "figures" / "fig2_ttft_vs_recomputed.svg").read_bytes()
    (out / "figures" / "fig2_ttft_vs_recomputed.png").unlink()
    assert figures_mod.main([str(full_run), "--out", str(out)]) == 0
    assert (out / "figures" / "fig2_ttft_vs_recomputed.png").exists()
    assert (out / "figures" / "fig2_ttft_vs_recomputed.svg").read_bytes() == svg  # same results, same file


def test_figures_cli_module_entry(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvmatrix.analysis.figures", str(run_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "skipped fig5_miss_ttft_vs_nbatch: no ok batch_sweep cell" in proc.stdout
    assert (tmp_path / "figures" / "fig1_invalidation_cost.svg").exists()
    empty = subprocess.run([sys.executable, "-m", "kvmatrix.analysis.figures", str(tmp_path / "none")],
                           capture_output=True, text=True, cwd=REPO)
    assert empty.returncode == 2 and empty.stderr.startswith("kvmatrix: error: no result cells in ")


def test_analysis_never_imports_a_backend():
    for path in (REPO / "kvmatrix" / "analysis").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.startswith(("kvmatrix.runners.backends", "kvmatrix.runners.experiments",
                                                      "kvmatrix.matrix"))], path.name
    code = ("import sys, kvmatrix.analysis.report, kvmatrix.analysis.figures; "
            "print([m for m in sys.modules if m.startswith(('kvmatrix.runners.backends', "
            "'kvmatrix.runners.experiments', 'llama_cpp', 'vllm'))])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    # the runner side stays stdlib + aiohttp + numpy: scipy belongs to the analysis environment only
    for path in (REPO / "kvmatrix" / "runners").rglob("*.py"):
        assert "scipy" not in path.read_text(), path.name


def test_cells_json_roundtrip_is_what_the_report_reads(full_run):
    # the fixture files are plain JSON as the runner writes them (no Python objects)
    for f in full_run.glob("*.json"):
        assert isinstance(json.loads(f.read_text()), dict)
    assert math.isfinite(build_rows(full_run_docs())[0].comparison().p)


def test_provenance_row_names_the_container_image_and_runner_commit():
    from kvmatrix.analysis.provenance import provenance_row

    doc = cell("3a", "llamacpp_http", 512, 256, [10, 11], [90, 91])
    doc["provenance"].update(runtime_kind="docker", runner_git={"sha": "0ecea17abcdef123", "dirty": True},
                             container={"image": {"id": "sha256:" + "a2b462cb62a5" + "0" * 52,
                                                  "tag": "kvmatrix/llamacpp:vendored-0.3.36-cpu-31f55faed2"}})
    row = provenance_row(doc)
    assert row["runtime"] == "docker" and row["runner git"] == "0ecea17abc dirty"
    assert row["image"] == "a2b462cb62a5 (kvmatrix/llamacpp:vendored-0.3.36-cpu-31f55faed2)"
    assert row["scheduler"] is None


def test_provenance_names_the_scheduler_task_a_cell_ran_as():
    from kvmatrix.analysis.load import as_doc
    from kvmatrix.analysis.provenance import _provenance_section, provenance_row

    doc = cell("3a", "llamacpp_http", 512, 256, [10, 11], [90, 91])
    plain = _provenance_section([as_doc(doc)])
    doc["provenance"]["host"] = {"hostname": "gpu7", "scheduler": {
        "kind": "slurm", "slurm_job_id": "44", "slurm_array_job_id": "40", "slurm_array_task_id": "4",
        "slurmd_nodename": "gpu7"}}
    assert provenance_row(doc)["scheduler"] == "slurm job 40_4 on gpu7"
    assert "slurm job 40_4 on gpu7" in _provenance_section([as_doc(doc)]) and "scheduler" not in plain


def test_harness_overhead_section(full_report):
    _, text = full_report
    sec = section(text, "Harness overhead (calibration control)")
    header = table_header(sec)
    rows = [dict(zip(header, r, strict=True)) for r in table_rows(sec)]
    hits = [r for r in rows if r["Condition"] == "cache_hit"]
    assert hits and all(r["Same cached tokens"] == f"{r['n']}/{r['n']}" for r in hits)
    for r in hits:  # synthetic: reference = harness - 0.1 ms (+ noise), token-id path = harness - 0.6 ms
        diff = float(r["Harness − reference (ms) [95% CI]"].split()[0])
        assert 0.05 < diff < 0.15
        assert r["Chat − token-id path (ms)"].startswith("+0.60")
    assert "### TTFT breakdown (medians)" in sec and "fig7_ttft_breakdown.png" in sec
    assert "Largest median harness overhead on a cache hit: +0.1" in sec


def test_generated_findings(full_report):
    """The report opens with the generated Summary: one finding per interface and model (hit / miss, what a miss
    costs per config, a per-token slope, verified trials, harness overhead), the summary figure, the narrow
    headline table; the details, and the phases side by side in the appendix. No hand-written file needed."""
    _, text = full_report
    assert text.index("## Summary") < text.index("## Findings in detail") < text.index("## Appendix")
    summ = section(text, "Summary")
    bullets = [ln for ln in summ.splitlines() if ln.startswith("- **3")]
    assert len(bullets) == 2 and all("a miss costs 512/256: +" in b and "µs per recomputed token" in b
                                     and "trials verified" in b and "harness overhead on a hit" in b
                                     for b in bullets)
    assert "](figures/fig0_summary.png)" in summ
    header = table_header(summ)
    assert len(header) <= 8 and header[:3] == ["Interface", "Model", "A/B"]
    rows = table_rows(summ)
    assert len(rows) == 4 and all(len(r) == len(header) for r in rows)
    assert summ.index("fig0_summary.png") < summ.index("| Interface")
    side = subsection(text, "The four phases side by side: cache hit vs cache miss TTFT (ms)")
    rows = table_rows(side)
    assert rows and all(len(r) == 7 for r in rows)
    assert all(r[2] == "not run" and r[3] == "not run" for r in rows)  # no vLLM cells in this run
    phases = [c for r in rows for c in r[4:6]]  # 3a, 3b: hit / miss with CIs where the phase ran
    assert any(c != "not run" for c in phases)
    assert all(c == "not run" or (" / " in c and "[" in c) for c in phases)


def test_findings_server_vs_inprocess_uses_the_calibration():
    from kvmatrix.analysis import findings

    cells = [invalidation_cell("3a", "llamacpp_http", 512, 256, seed=1),
             invalidation_cell("3b", "llamacpp_python", 512, 256, seed=2, label="llamacpp_python/chat")]
    (line,) = findings.server_vs_inprocess(build_rows(cells))
    assert line.startswith("- **llama-1b, llama.cpp**: a hit through the server (3a) takes ")
    assert "Harness overhead (harness − reference client) on a hit: 0.1" in line  # synthetic: ~0.1 ms
    assert "costs 0.60" in line  # synthetic token-id path: harness - 0.6 ms
    for c in cells:  # the same cells without the control: said so, not attributed
        for cond in ("cache_hit", "cache_miss"):
            for t in c[cond]["trials"]:
                for k in ("reference_ttft_ms", "tokenid_ttft_ms"):
                    t.pop(k)
    (line,) = findings.server_vs_inprocess(build_rows(cells))
    assert "NOT separated from harness overhead" in line
