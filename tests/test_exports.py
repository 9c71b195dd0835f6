"""The report folder's exports (kvmatrix.analysis.export): summary.csv / summary.jsonl (one row per cell x
condition, the summary model's rows) and trials.csv (one row per trial of every experiment, one per timed
request of a prefix_reuse cell), from the committed cells of every experiment."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
from pathlib import Path

import pytest

from kvmatrix.analysis import export, summary
from kvmatrix.analysis.experiments import build_evidence
from kvmatrix.analysis.load import load_checked
from kvmatrix.runners.document import CellDoc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
#: every experiment: invalidation, recompute_scan, batch_sweep, slot_eviction (demo) and prefix_reuse
FOLDERS = [RESULTS / "cpu-demo-2026-12-01", RESULTS / "cpu-prefix-2026-11-22"]


def _failed() -> dict:
    return {"schema_version": 1, "cell_id": "phase1-vllm_http-512x256", "run": "broken", "phase": "1",
            "backend": "vllm_http", "experiment": "invalidation", "status": "failed", "error": "engine exited 1",
            "config": {"context_size_a": 512, "context_size_b": 256}, "model": {"name": "tiny"}}


@pytest.fixture(scope="module")
def cells() -> list[CellDoc]:
    docs, problems = load_checked(FOLDERS)
    assert not problems
    return [*docs, CellDoc.from_dict(_failed())]


@pytest.fixture(scope="module")
def written(cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    paths = export.write_exports(cells, out)
    return out, paths


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    text = path.read_text()
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def test_write_exports_writes_the_three_files(written):
    out, paths = written
    assert paths == [out / name for name in export.EXPORTS] == [out / "summary.csv", out / "summary.jsonl",
                                                                out / "trials.csv"]
    assert all(p.is_file() for p in paths)


# ---------------------------------------------------------------- summary.csv / summary.jsonl


def test_summary_has_one_row_per_cell_and_condition(cells, written):
    out, _ = written
    rows = summary.build(cells)
    header, csv_rows = _csv(out / "summary.csv")
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert len(csv_rows) == len(lines) == len(rows)
    assert {(r.cell_id, r.condition, r.axis) for r in rows} == {(r["cell_id"], r["condition"], r["axis"])
                                                              for r in lines}
    assert {r["experiment"] for r in lines} == {"invalidation", "recompute_scan", "batch_sweep", "slot_eviction",
                                                "prefix_reuse"}
    assert header == export.summary_columns(lines)
    assert header[:4] == ["summary_version", "cell_id", "run", "experiment"]
    failed = [r for r in lines if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "engine exited 1" and failed[0]["n"] == 0


def test_summary_jsonl_lines_are_the_exported_rows(cells, written):
    out, _ = written
    by_key = {(r.cell_id, r.condition, r.axis): r.export() for r in summary.build(cells)}
    for line in (out / "summary.jsonl").read_text().splitlines():
        row = json.loads(line)
        want = by_key[(row["cell_id"], row["condition"], row["axis"])]
        assert list(row) == list(want) and next(iter(row)) == "summary_version"
        for k, v in want.items():
            if isinstance(v, float) and not math.isfinite(v):
                assert row[k] is None
            else:
                assert row[k] == v, k


def test_summary_csv_columns_hold_the_settings_that_define_the_cell(written):
    out, _ = written
    header, rows = _csv(out / "summary.csv")
    settings = [c for c in header if c.startswith("setting_")]
    assert settings == sorted(settings) and {"setting_n_ctx", "setting_n_batch", "setting_prefix_caching"} <= set(
        settings)
    assert header.index(settings[0]) == header.index("axis") + 1  # where SummaryRow declares settings
    assert header.index("release") == header.index(settings[-1]) + 1
    hit = next(r for r in rows if r["cell_id"] == "phase3a-llamacpp_http-512x256" and r["condition"] == "cache_hit")
    miss = next(r for r in rows if r["cell_id"] == "phase3a-llamacpp_http-512x256" and r["condition"] == "cache_miss")
    assert float(hit["ttft_ms"]) > 0 and hit["miss_minus_hit_ms"] == "" and float(miss["miss_minus_hit_ms"]) != 0
    assert hit["setting_flash_attn"] in ("True", "False") and hit["a"] == "512" and hit["b"] == "256"


# ---------------------------------------------------------------- trials.csv


def _expected_trials(cells) -> int:
    n = 0
    for c in cells:
        n += len(c.requests or []) if c.experiment == "prefix_reuse" else sum(len(t) for _, t in c.trial_blocks())
    return n


def test_trials_has_one_row_per_trial_of_every_experiment(cells, written):
    out, _ = written
    header, rows = _csv(out / "trials.csv")
    assert len(rows) == _expected_trials(cells) > 1000
    assert header[:len(export.TRIAL_IDENTITY)] == list(export.TRIAL_IDENTITY)
    assert header[len(export.TRIAL_IDENTITY):len(export.TRIAL_IDENTITY) + len(export.TRIAL_FIELDS)] == list(
        export.TRIAL_FIELDS)
    for col in ("cell_id", "experiment", "phase", "series", "model", "a", "b", "condition", "trial", "warmup",
                "ttft_ms", "reference_ttft_ms", "tokenid_ttft_ms", "prompt_tokens", "cached_tokens",
                "expected_cached_tokens", "cache_verified", "total_time_ms", "axis",
                "breakdown.interface_ms"):
        assert col in header, col
    assert "device" not in header and "breakdown" not in header  # objects are flattened, never written whole
    per_exp = {}
    for r in rows:
        per_exp[r["experiment"]] = per_exp.get(r["experiment"], 0) + 1
    assert set(per_exp) == {"invalidation", "recompute_scan", "batch_sweep", "slot_eviction", "prefix_reuse"}


def test_trial_rows_carry_the_trial_values(cells, written):
    out, _ = written
    _, rows = _csv(out / "trials.csv")
    cell = next(c for c in cells if c.cell_id == "slot_eviction-phase3a-llamacpp_http-p2-256x128")
    trial = cell.trials("other_slot")[2]
    row = next(r for r in rows if r["cell_id"] == cell.cell_id and r["condition"] == "other_slot"
               and r["trial"] == str(trial["trial"]) and r["warmup"] == str(trial["warmup"]))
    assert float(row["ttft_ms"]) == trial["ttft_ms"] and row["cache_verified"] == str(trial["cache_verified"])
    assert row["cached_tokens"] == str(trial["cached_tokens"]) and row["axis"] == "n_parallel=2"
    assert row["series"] == cell.series_label and row["model"] == cell.model.title and row["status"] == "ok"
    assert float(row["breakdown.interface_ms"]) == trial["breakdown"]["interface_ms"]
    assert row["id_slot"] == ("" if trial["id_slot"] is None else str(trial["id_slot"]))
    warm = [r for r in rows if r["cell_id"] == cell.cell_id and r["warmup"] == "True"]
    assert len(warm) == sum(c.warmups for c in cell.conditions.values())


def test_trial_rows_join_the_summary_rows(cells, written):
    """Every trial's (cell_id, condition, axis) is a summary row: the scan's points and prefix groups too."""
    out, _ = written
    _, rows = _csv(out / "trials.csv")
    keys = {(r["cell_id"], r["condition"], r["axis"]) for r in [json.loads(x) for x in
                                                                  (out / "summary.jsonl").read_text().splitlines()]}
    assert {(r["cell_id"], r["condition"], r["axis"]) for r in rows if r["status"] == "ok"} <= keys
    scan = [r for r in rows if r["experiment"] == "recompute_scan"]
    assert scan and all(r["condition"] == "scan" and r["axis"].startswith("kept=") for r in scan)


def test_prefix_reuse_rows_are_the_timed_requests(cells, written):
    out, _ = written
    _, rows = _csv(out / "trials.csv")
    cell = next(c for c in cells if c.cell_id == "prefix-vllm_http-cache_on")
    mine = [r for r in rows if r["cell_id"] == cell.cell_id]
    assert len(mine) == len(cell.requests)
    req = cell.requests[5]
    row = next(r for r in mine if r["trial"] == str(req["index"]) and r["prefix_len_tokens"] ==
               str(req["prefix_len_tokens"]) and r["concurrency"] == str(req["concurrency"])
               and r["reuse_pct"] == str(req["reuse_pct"]))
    assert float(row["ttft_ms"]) == pytest.approx(req["ttft_s"] * 1000) and float(row["ttft_s"]) == req["ttft_s"]
    assert row["warmup"] == "False" and row["cache_hit"] == str(req["cache_hit"]) and row["engine"] == "vllm_http"
    assert row["condition"] == (f"{req['workload']} prefix={req['prefix_len_tokens']} c={req['concurrency']} "
                                f"reuse={req['reuse_pct']}%")


# ---------------------------------------------------------------- inputs, order, values


def test_evidence_dicts_and_any_order_give_the_same_files(cells, written, tmp_path):
    out, paths = written
    shuffled = list(cells)
    random.Random(7).shuffle(shuffled)
    again = export.write_exports(build_evidence(shuffled), tmp_path / "ev")
    dicts = export.write_exports([c.to_dict() for c in shuffled], tmp_path / "dicts")
    for a, b, c in zip(paths, again, dicts, strict=True):
        assert a.read_bytes() == b.read_bytes() == c.read_bytes(), a.name


def test_no_cells_writes_headers_only(tmp_path):
    paths = export.write_exports([], tmp_path)
    header, rows = _csv(tmp_path / "summary.csv")
    assert rows == [] and header[0] == "summary_version" and "ttft_ms" in header
    assert (tmp_path / "summary.jsonl").read_text() == ""
    header, rows = _csv(tmp_path / "trials.csv")
    assert rows == [] and header == list(export.TRIAL_IDENTITY) + list(export.TRIAL_FIELDS)
    assert [p.name for p in paths] == list(export.EXPORTS)


def test_values_none_nan_and_unknown_keys(tmp_path):
    d = json.loads((FOLDERS[0] / "phase3a-llamacpp_http-512x256.json").read_text())
    d = copy.deepcopy(d)
    t = d["cache_hit"]["trials"][1]
    t.update(ttft_non_streaming_ms=float("nan"), engine_prompt_ms=None, new_metric_ms=1.25, note=[1, 2])
    export.write_exports([d], tmp_path)
    header, rows = _csv(tmp_path / "trials.csv")
    row = next(r for r in rows if r["condition"] == "cache_hit" and r["trial"] == str(t["trial"])
               and r["warmup"] == str(t["warmup"]))
    assert row["ttft_non_streaming_ms"] == "" and row["engine_prompt_ms"] == "" and row["new_metric_ms"] == "1.25"
    assert "note" not in header  # lists are not scalar trial keys
    assert header.index("new_metric_ms") < header.index("breakdown.ttft_ms")
    assert all("NaN" not in line for line in (tmp_path / "summary.jsonl").read_text().splitlines())


def test_one_cell_id_in_two_runs_is_two_cells_in_the_headline():
    """The h200 report merges one folder per model: the same cell id in two runs must stay two cells."""
    from kvmatrix.analysis import headline
    from tests.test_analysis import cell

    docs = [cell("3a", "llamacpp_http", 512, 256, [10, 11, 12], [90, 91, 92], run="gpt2-small"),
            cell("3a", "llamacpp_http", 512, 256, [20, 21, 22], [60, 61, 62], run="llama-1b")]
    docs[1]["model"] = {**docs[1]["model"], "name": "llama-1b"}
    ev = build_evidence([CellDoc.from_dict(d) for d in docs])
    pairs = summary.headline(ev.summary)
    assert sorted(m.run for _, m in pairs) == ["gpt2-small", "llama-1b"]
    text = "\n".join(headline.sections(ev, []))
    assert "Generated from the 2 cells of this report (2 ok)" in text
    assert len(headline.findings(ev)) == 2
