"""Report and figures from synthetic result cells written to tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmatrix.analysis.figures import make_figures, ttft_split
from kvmatrix.analysis.report import NoCellsError, main, write_report
from kvmatrix.analysis.summary import build_rows, settings_parity, unverified_trials
from kvmatrix.runners.results import Trial, condition_block, degradation_pct, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


@pytest.fixture
def run_dir(tmp_path):
    """A run folder: llama.cpp HTTP (two configs), vLLM HTTP, one failed cell."""
    return write_cells(tmp_path / "demo", [
        cell("3a", "llamacpp_http", 512, 256, [10, 12, 14], [100, 110, 120], hit_unverified=(1,)),
        cell("3a", "llamacpp_http", 256, 512, [20, 22, 24], [60, 66, 72]),
        cell("1", "vllm_http", 512, 256, [5, 6, 7], [40, 44, 48], engine_prompt=False,
             effective={"n_threads": 8, "gpu_memory_utilization": 0.9},
             mismatches=[{"key": "n_batch", "requested": 2048, "effective": 1024}]),
        failed_cell("3b", "llamacpp_python", "engine exited with code 1 (see logs/x.log)"),
    ])


def section(text: str, title: str) -> str:
    """The body of a ``## title`` section."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(md: str) -> list[list[str]]:
    """Cells of a github-format markdown table's body rows."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_report_written_with_header(run_dir):
    path = write_report([run_dir])
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# ")
    assert "Runs: demo" in text
    assert "Cells: 4 (3 ok, 1 failed)" in text
    assert "Generated: " in text


def test_main_table_rows_and_values(run_dir):
    rows = table_rows(section(write_report([run_dir]).read_text(), "Results"))
    # phase 1 before 3a; within 3a the config with the larger A first
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "vllm_http", "512/256"), ("3a", "llamacpp_http †", "512/256"), ("3a", "llamacpp_http", "256/512"),
    ]
    vllm, llama = rows[0], rows[1]
    assert vllm[3] == "6.0 ± 1.0" and vllm[4] == "44.0 ± 4.0"
    assert vllm[5] == "+633.3"  # (44 - 6) / 6
    assert llama[3] == "12.0 ± 2.0" and llama[4] == "110.0 ± 10.0"
    assert llama[5] == "+816.7"
    assert llama[6] == "7.0 / 105.0"  # non-streaming medians (TTFT - 5)
    assert llama[7] == "5.0 / 5.0"  # overhead medians
    assert llama[8] == "52.0"  # throughput of measured trials 1..3 -> 51, 52, 53
    assert llama[9] == "202.0 / 202.0"
    assert llama[10] == "2/3" and llama[11] == "3/3"
    assert llama[12] == "3 + 1"


def test_unverified_trial_listed_and_footnoted(run_dir):
    text = write_report([run_dir]).read_text()
    rows = table_rows(section(text, "Unverified trials"))
    assert rows == [["phase3a-llamacpp_http-512x256", "hit", "2", "0", "512", "1"]]
    assert "† The statistics of this row include 1 unverified" in section(text, "Results")


def test_failed_cell_listed(run_dir):
    rows = table_rows(section(write_report([run_dir]).read_text(), "Failed cells"))
    assert rows == [["phase3b-llamacpp_python-512x256", "failed", "engine exited with code 1 (see logs/x.log)"]]


def test_parity_lists_differing_keys_and_mismatches(run_dir):
    text = section(write_report([run_dir]).read_text(), "Settings parity")
    header = [ln for ln in text.splitlines() if ln.startswith("|")][0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["cell", "n_threads"]
    assert {r[0]: r[1] for r in table_rows(text.split("Requested")[0])} == {
        "phase1-vllm_http-512x256": "8", "phase3a-llamacpp_http-256x512": "2", "phase3a-llamacpp_http-512x256": "2",
    }
    assert "gpu_memory_utilization" not in text  # reported by one cell only: not a difference
    assert "n_batch: requested 2048, effective 1024" in text


def test_parity_all_equal():
    docs = [cell("3a", "llamacpp_http", 512, 256, [1, 2], [3, 4]), cell("3a", "llamacpp_http", 256, 512, [1, 2], [3, 4])]
    par = settings_parity(docs)
    assert par.keys == [] and par.compared == 5 and par.mismatches == []


def test_provenance_table(run_dir):
    rows = table_rows(section(write_report([run_dir]).read_text(), "Provenance"))
    assert ["phase1-vllm_http-512x256", "vllm_http", "llama_cpp_commit=0c1e570", "-DGGML_NATIVE=OFF",
            "tiny", "abababababab", "box / Xeon"] in rows


def test_figures_are_pngs_and_embedded(run_dir, tmp_path):
    out = tmp_path / "out"
    text = write_report([run_dir], out).read_text()
    for name in ("ttft_hit_vs_miss.png", "three_panel.png"):
        png = out / "figures" / name
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
        assert f"](figures/{name})" in text
    assert not (run_dir / "report.md").exists()
    assert "non-streaming TTFT for 1 vllm_http" in text


def test_figures_skipped_without_data(tmp_path):
    results = make_figures([], tmp_path / "figures")
    assert [r.path for r in results] == [None, None] and all(r.note for r in results)
    assert not (tmp_path / "figures").exists()


def test_only_failed_cells_reports_skipped_figures(tmp_path):
    folder = write_cells(tmp_path / "r", [failed_cell("3a", "llamacpp_http", "boom")])
    text = write_report([folder]).read_text()
    assert "No ok cells" in text and "skipped (" in text and "boom" in text


def test_merges_dirs_and_disambiguates_runs(tmp_path):
    d1 = write_cells(tmp_path / "r1", [cell("3a", "llamacpp_http", 512, 256, [10, 12], [50, 60], run="r1")])
    d2 = write_cells(tmp_path / "r2", [cell("3a", "llamacpp_http", 512, 256, [11, 13], [51, 61], run="r2")])
    text = write_report([d1, d2, d1]).read_text()  # d1 twice: its cell counted once
    assert "Cells: 2 (2 ok, 0 failed)" in text and "Runs: r1, r2" in text
    labels = [r[1] for r in table_rows(section(text, "Results"))]
    assert labels == ["llamacpp_http (r1)", "llamacpp_http (r2)"]


def test_label_names_the_row():
    docs = [cell("3b", "llamacpp_python", 512, 256, [1, 2], [3, 4], label="llamacpp_python/low-level")]
    assert build_rows(docs)[0].series == "llamacpp_python/low-level"


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
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"kvmatrix: error: no result cells in {tmp_path}; run nox -s phase3a first "
                                   "or pass the folder that holds the *.json")
