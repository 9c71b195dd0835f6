"""The typed cell document (kvmatrix.runners.document): every committed result file reads and writes back
unchanged, and a document the runner builds writes what the runner writes today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmatrix.runners.document import CellDoc, Condition, Config, Model, Runtime, infer_experiment
from kvmatrix.runners.results import Trial, condition_block, load_cells

REPO = Path(__file__).resolve().parents[1]


def committed_cells() -> list[Path]:
    """Every committed cell result (schema_version + cell_id; the ``cells/`` folders hold cell specs)."""
    out = []
    for f in sorted(REPO.glob("docs/results/**/*.json")):
        d = json.loads(f.read_text())
        if isinstance(d, dict) and d.get("schema_version") and "cell_id" in d:
            out.append(f)
    return out


def test_there_are_committed_cells_of_every_experiment():
    names = {json.loads(f.read_text())["experiment"] for f in committed_cells()}
    assert names == {"invalidation", "recompute_scan", "batch_sweep", "slot_eviction", "prefix_reuse"}


@pytest.mark.parametrize("path", committed_cells(), ids=lambda p: str(p.relative_to(REPO / "docs" / "results")))
def test_every_committed_cell_round_trips(path):
    d = json.loads(path.read_text())
    doc = CellDoc.from_dict(d)
    out = doc.to_dict()
    assert out == d
    assert json.dumps(out) == json.dumps(d)  # the same key order, at every level
    assert doc.experiment == d["experiment"] and not doc.experiment_guessed
    assert doc.cell_id == d["cell_id"] and doc.status == d["status"]
    for name, cond in doc.conditions.items():
        assert cond.trials == d[name]["trials"]


def test_loaded_cells_keep_their_path_but_never_write_it():
    folder = REPO / "docs" / "results" / "cpu-demo-2026-12-01"
    raw = load_cells([folder])
    docs = [CellDoc.from_dict(d) for d in raw]
    assert docs and all(doc.path == d["_path"] for doc, d in zip(docs, raw, strict=True))
    assert all("_path" not in doc.to_dict() for doc in docs)


def test_typed_parts_and_trial_blocks():
    d = json.loads((REPO / "docs/results/cpu-demo-2026-12-01/slot_eviction-phase3a-llamacpp_http-p2-256x128.json")
                   .read_text())
    doc = CellDoc.from_dict(d)
    assert doc.ok and doc.experiment == "slot_eviction" and doc.slot_eviction.n_parallel == 2
    assert list(doc.conditions) == ["cache_hit", "cache_miss", "other_slot", "server_hit", "server_miss", "alternate"]
    assert [name for name, _ in doc.trial_blocks()] == list(doc.conditions)
    assert doc.runtime.value("n_ctx") == d["runtime"]["effective"]["n_ctx"]
    assert doc.model.name == d["model"]["name"] and doc.config.context_size_a == 256
    assert doc.provenance.llama_cpp_commit == d["provenance"]["llama_cpp_commit"]
    assert doc.provenance.get("runner_host") == d["provenance"]["runner_host"]  # outside the schema: extra
    scan = CellDoc.from_dict(json.loads(
        (REPO / "docs/results/cpu-demo-2026-12-01/recompute_scan-phase3a-llamacpp_http-256x128.json").read_text()))
    assert [n for n, _ in scan.trial_blocks()][0].startswith("scan kept=")


def test_unknown_keys_and_odd_shapes_are_kept():
    d = {"schema_version": 1, "cell_id": "x", "experiment": "invalidation", "runtime": None, "brand_new": {"a": 1},
         "model": {"name": "tiny", "future_key": [1]}, "scan": [{"kept_tokens": 1, "trials": [], "stats": {}}, 7],
         "cache_hit": {}, "other": {"trials": [], "stats": {}}}
    doc = CellDoc.from_dict(d)
    assert doc.to_dict() == d and list(doc.to_dict()) == list(d)
    assert doc.runtime == Runtime() and doc.runtime.requested == {}  # read as the empty one
    assert doc.extra == {"brand_new": {"a": 1}} and doc.model.extra == {"future_key": [1]}
    assert set(doc.conditions) == {"cache_hit", "other"} and doc.scan[1] == 7
    doc.runtime = Runtime(requested={"n_ctx": 8})  # replaced: written
    assert doc.to_dict()["runtime"] == {"requested": {"n_ctx": 8}, "effective": {}, "mismatches": [], "unverified": []}


def test_the_guess_is_made_in_one_place_and_never_written():
    for d, name in (({"cell_id": "a", "scan": []}, "recompute_scan"), ({"cell_id": "b", "sweep": {}}, "batch_sweep"),
                    ({"cell_id": "c", "slot_eviction": {}}, "slot_eviction"), ({"cell_id": "d"}, "invalidation"),
                    ({"cell_id": "e", "experiment": None}, "invalidation")):
        doc = CellDoc.from_dict(d)
        assert doc.experiment == name == infer_experiment(d) and doc.experiment_guessed
        assert doc.to_dict() == d
    doc = CellDoc.from_dict({"cell_id": "d"})
    doc.experiment = "batch_sweep"  # assigned: written, no longer a guess
    assert doc.to_dict()["experiment"] == "batch_sweep" and not doc.experiment_guessed


def _trial(i, warm=False):
    return Trial(trial=i, warmup=warm, ttft_ms=10.0 + i, ttft_non_streaming_ms=9.0, overhead_ms=1.0,
                 engine_prompt_ms=8.0, engine_predicted_ms=None, total_time_ms=20.0, throughput=50.0,
                 warmup_time_ms=30.0, prompt_tokens=100, completion_tokens=8, cached_tokens=90,
                 expected_cached_tokens=90, cache_granularity=1, cache_verified=True)


def test_a_document_built_by_the_runner_writes_the_runner_s_layout(tmp_path):
    doc = CellDoc(cell_id="phase3a-llamacpp_http-512x256", run="demo", phase="3a", backend="llamacpp_http",
                  label="llamacpp_http", experiment="invalidation", model=Model.from_dict({"name": "tiny"}),
                  timestamp="2026-12-01T00:00:00Z", status="running",
                  config=Config(context_size_a=512, context_size_b=256, query_tokens=16, max_output_tokens=8,
                                num_trials=2, warmup_trials=1, settle_ms=100, keep_warm=False),
                  runtime=Runtime(requested={"n_ctx": 2048}))
    doc.log_file = "logs/x.log"
    hit = doc.set_condition("cache_hit", condition_block([_trial(0, True), _trial(1), _trial(2)]))
    doc.set_condition("cache_miss", condition_block([_trial(0, True), _trial(1)]))
    doc.ttft_degradation_pct = None  # assigned: written, even as null
    doc.update({"order": ["cache_hit:0w", "cache_miss:0w"], "workload": {"a_tokens": 512}, "new_block": 1})
    doc.status = "ok"
    out = doc.to_dict()
    assert list(out) == ["schema_version", "cell_id", "run", "phase", "backend", "label", "experiment", "model",
                         "timestamp", "status", "error", "config", "runtime", "provenance", "timing", "log_file",
                         "cache_hit", "cache_miss", "ttft_degradation_pct", "order", "workload", "new_block"]
    assert out["schema_version"] == 1 and out["error"] is None and out["ttft_degradation_pct"] is None
    assert out["config"]["keep_warm"] is False and out["workload"] == {"a_tokens": 512}
    assert isinstance(hit, Condition) and out["cache_hit"]["stats"]["n_trials"] == 2
    assert doc.trials("cache_hit")[0]["warmup"] and doc.stats("cache_miss")["n_trials"] == 1
    path = doc.write(tmp_path / "cell.json")
    back = json.loads(path.read_text())
    assert back == json.loads(json.dumps(out)) and CellDoc.from_dict(back).to_dict() == back
    with pytest.raises(ValueError, match="document field"):
        doc.set_condition("order", {"trials": [], "stats": {}})


BASE_KEYS = ("schema_version", "cell_id", "run", "phase", "backend", "label", "experiment", "model", "timestamp",
             "status", "error", "config", "runtime", "provenance", "timing", "sweep", "slots")


@pytest.mark.parametrize("path", committed_cells()[::7], ids=lambda p: p.name)
def test_writing_through_the_document_as_run_cell_does_gives_the_committed_file(path):
    """run_cell's steps (base document, start read-back, the experiment's conditions and keys, the end) through
    CellDoc produce the committed file byte for byte."""
    d = json.loads(path.read_text())
    base = {k: d[k] for k in BASE_KEYS if k in d}
    rt, timing = d["runtime"], d["timing"]
    base.update(status="running", error=None, timing={},
                runtime={"requested": rt["requested"], "effective": {}, "mismatches": [], "unverified": []})
    doc = CellDoc.from_dict(base)  # base_document(cell)
    doc.log_file = d["log_file"]  # _apply_start
    if "rendered" in rt:
        doc.runtime.rendered = rt["rendered"]
    for k in ("engine_start_s", "engine_starts"):
        if k in timing:
            setattr(doc.timing, k, timing[k])
    doc.runtime.effective = rt["effective"]
    if "release_gaps" in rt:
        doc.runtime.release_gaps = rt["release_gaps"]
    doc.runtime.unverified = rt["unverified"]
    if "accepted_deviations" in rt:
        doc.runtime.accepted_deviations = rt["accepted_deviations"]
    doc.runtime.mismatches = rt["mismatches"]
    for name in (k for k in d if k not in CellDoc.keys()):  # the experiment's result
        if name in ("cache_hit", "cache_miss", "other_slot", "server_hit", "server_miss", "alternate"):
            doc.set_condition(name, d[name])
    if "ttft_degradation_pct" in d:
        doc.ttft_degradation_pct = d["ttft_degradation_pct"]
    doc.update({k: v for k, v in d.items() if k not in doc.to_dict() and k != "log_tail"})
    doc.status, doc.error = d["status"], d["error"]
    if "log_tail" in d:
        doc.log_tail = d["log_tail"]
    if "cell_wall_s" in timing:
        doc.timing.cell_wall_s = timing["cell_wall_s"]
    assert json.dumps(doc.to_dict(), indent=1) == json.dumps(d, indent=1)
