"""The typed cell document (kvmatrix.runners.document, on the generic kvmatrix.runners.record): every committed
result file reads and writes back unchanged, and the runner (run_cell, which writes through CellDoc) writes
the committed files again from what their engine start and experiment recorded."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmatrix.runners import run_cell
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.document import CellDoc, Condition, Config, Model, Runtime, infer_experiment, is_condition
from kvmatrix.runners.record import Record, record_field
from kvmatrix.runners.results import Trial, condition_block, load_cells
from kvmatrix.runners.spec import CellSpec

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
def test_writing_through_the_document_step_by_step_gives_the_committed_file(path):
    """run_cell's steps (base document, start read-back, the experiment's conditions and keys, the end) by hand
    through CellDoc produce the committed file byte for byte; also for cells without a committed cell spec
    (prefix_reuse, older runs), which the replay of the real code path below cannot rebuild."""
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


# ---------------------------------------------------------------- the generic record (kvmatrix.runners.record)


@dataclass(kw_only=True)
class _Part(Record):
    a: int | None = record_field()
    b: dict = record_field("dict")
    c: int | None = record_field(optional=True)
    d: int | None = record_field(optional=True)


def test_keys_set_later_are_written_in_the_order_set_as_a_dict_would():
    fresh = _Part(a=1)
    fresh.d = 4  # declared after c, set before it: written before it
    fresh.update({"zz": 0, "c": 3})
    fresh.a = 7  # a key it has keeps its place
    assert list(fresh.to_dict()) == ["a", "b", "d", "zz", "c"] and fresh.to_dict()["a"] == 7
    read = _Part.from_dict({"x": 1, "b": None, "a": 2})
    read.update({"d": 1})
    read.c = 2
    read.extra["late"] = 0  # added behind the record's back: after everything it knows
    assert json.dumps(read.to_dict()) == json.dumps({"x": 1, "b": None, "a": 2, "d": 1, "c": 2, "late": 0})
    plain = {"x": 1, "b": None, "a": 2}
    plain.update({"d": 1})
    plain["c"] = 2
    plain["late"] = 0
    assert list(read.to_dict()) == list(plain)
    assert _Part(c=None).to_dict() == {"a": None, "b": {}}  # an optional key given as None: not written


# ---------------------------------------------------------------- the runner's real code path


def spec_backed_cells() -> list[Path]:
    """Committed cells whose cell spec is committed too and that record their engine start (engine_starts)."""
    out = []
    for f in committed_cells():
        if (f.parent / "cells" / f.name).exists() and "engine_starts" in json.loads(f.read_text())["timing"]:
            out.append(f)
    return out


class _AsRecorded:
    """A results.Trial as the committed file holds it (condition_block reads its attributes)."""

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name):
        return self._d.get(name)

    def to_dict(self) -> dict:
        return self._d


class _Backend:
    cell = None

    def __init__(self, begin: dict | None, fail: Exception | None = None):
        self.begin, self.fail = begin, fail

    def begin_cell(self, cell, reused):
        return self.begin


class _Engine:
    """run_cell.SharedEngine as far as _run_on uses it: the start the cell recorded, already established."""

    def __init__(self, record: dict, starts: int = 1, served: int = 0, begin: dict | None = None,
                 start_error: Exception | None = None):
        self.record, self.starts, self.served = {}, starts, served
        self._record, self._begin, self._error = record, begin, start_error
        self.stopped = 0

    def ensure(self):
        self.record = dict(self._record)
        if self._error is not None:
            raise self._error
        return _Backend(self._begin)

    def stop(self):
        self.stopped += 1

    def log_tail(self) -> str:
        return "engine log tail"


#: values that differ from run to run (host facts of the machine running the test, clocks, pids)
VOLATILE = {("timestamp",), ("provenance", "runner_host"), ("provenance", "runner_python"),
            ("timing", "cell_wall_s"), ("timing", "engine_starts", "runner_pid")}


def _mask(d, at=()):
    if isinstance(d, dict):
        return {k: "<volatile>" if (*at, k) in VOLATILE else _mask(v, (*at, k)) for k, v in d.items()}
    return d


def _replay(path: Path, tmp_path: Path, monkeypatch) -> tuple[dict, dict, dict]:
    """Run the committed cell's spec through run_cell._run_on with the engine start and the experiment result
    the committed file recorded: (committed, written, returned)."""
    d = json.loads(path.read_text())
    cell = dataclasses.replace(CellSpec.from_file(path.parent / "cells" / path.name), out_dir=str(tmp_path))
    rt, starts, prov = d["runtime"], d["timing"]["engine_starts"], d["provenance"]
    runner_keys = {"runner_host", "runner_python", "engine_extra_args", "gpu"}
    record = {"log_file": d["log_file"], "started_at": starts["started_at"],
              "engine_start_s": d["timing"]["engine_start_s"], "engine_pid": starts["engine_pid"],
              "effective": rt["effective"], "release_gaps": rt.get("release_gaps", {}),
              "provenance": {k: v for k, v in prov.items()  # what the adapter read back from the engine
                             if k not in runner_keys and cell.provenance.get(k, object()) != v}}
    if "rendered" in rt:
        record["rendered"] = rt["rendered"]
    if "gpu" in prov:
        record["gpu"] = prov["gpu"]
    conditions = [k for k in d if k not in CellDoc.keys() and is_condition(k, d[k])]
    written_by_runner = {*CellDoc.keys()[:CellDoc.keys().index("ttft_degradation_pct") + 1]}
    result = {"trials": {c: [_AsRecorded(t) for t in d[c]["trials"]] for c in conditions},
              **{k: v for k, v in d.items() if k not in written_by_runner and k not in conditions}}
    monkeypatch.setattr(run_cell.experiment_protocols, "runner", lambda name: lambda backend, spec, progress: result)
    engine = _Engine(record, starts=starts["starts_in_group"], served=int(starts["reused"]),
                     begin=starts.get("begin_cell"))
    returned = run_cell._run_on(engine, cell, starts["group"], starts["index"])
    return d, json.loads((tmp_path / f"{cell.cell_id}.json").read_text()), returned


@pytest.mark.parametrize("path", spec_backed_cells(), ids=lambda p: str(p.relative_to(REPO / "docs" / "results")))
def test_run_cell_writes_the_committed_cell_again(path, tmp_path, monkeypatch):
    """The real path (cell_document from the committed cell spec, _apply_start with the recorded engine start,
    the experiment's result, the end) writes the committed file key for key, in its order, at every level."""
    d, written, returned = _replay(path, tmp_path, monkeypatch)
    expected = dict(d)
    if "release_gaps" not in d["runtime"]:  # written since runtime.release_gaps exists (after rendered)
        rt = list(d["runtime"].items())
        at = [k for k, _ in rt].index("rendered") + 1
        expected["runtime"] = dict([*rt[:at], ("release_gaps", {}), *rt[at:]])
    assert json.dumps(_mask(written), indent=1) == json.dumps(_mask(expected), indent=1)
    assert json.dumps(returned) == json.dumps(written)
    assert written["provenance"]["runner_python"] and written["timing"]["cell_wall_s"] >= 0


def _cell(tmp_path: Path, experiment: str = "invalidation") -> CellSpec:
    spec = CellSpec.from_file(REPO / "docs/results/cpu-demo-2026-12-01/cells/phase3a-llamacpp_http-512x256.json")
    return dataclasses.replace(spec, out_dir=str(tmp_path), experiment=dataclasses.replace(spec.experiment,
                                                                                           name=experiment))


START = {"log_file": "logs/c.engine.log", "rendered": {"argv": ["llama-server"]}, "started_at": "t",
         "engine_start_s": 0.2, "engine_pid": 7, "provenance": {"engine": "llama-server", "system_info": "s"}}
BASE = ["schema_version", "cell_id", "run", "phase", "backend", "label", "experiment", "model", "timestamp", "status",
        "error", "config", "runtime", "provenance", "timing"]


def _fail(tmp_path, monkeypatch, raise_in_experiment=None, **engine):
    def experiment(backend, spec, progress):
        raise raise_in_experiment
    monkeypatch.setattr(run_cell.experiment_protocols, "runner", lambda name: experiment)
    cell = _cell(tmp_path)
    record = {**START, "effective": cell.runtime.to_dict()}
    eng = _Engine(engine.pop("record", record), **engine)
    if isinstance(raise_in_experiment, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            run_cell._run_on(eng, cell, [cell.cell_id], 0)
        returned = None
    else:
        returned = run_cell._run_on(eng, cell, [cell.cell_id], 0)
    written = json.loads((tmp_path / f"{cell.cell_id}.json").read_text())
    assert returned is None or returned == written
    assert eng.stopped == 1  # an engine that served a failed cell is stopped
    return written


def test_failure_documents_keep_their_layout(tmp_path, monkeypatch):
    died = _fail(tmp_path, monkeypatch, EngineError("engine died", "its log"))
    assert list(died) == [*BASE, "log_file", "log_tail"] and died["status"] == "failed"
    assert died["error"] == "EngineError: engine died" and died["log_tail"] == "its log"
    assert list(died["runtime"]) == ["requested", "effective", "mismatches", "unverified", "rendered", "release_gaps",
                                     "accepted_deviations"]
    assert list(died["timing"]) == ["engine_start_s", "engine_starts", "cell_wall_s"]
    assert list(died["provenance"])[-4:] == ["runner_host", "runner_python", "engine", "system_info"]
    boom = _fail(tmp_path, monkeypatch, RuntimeError("boom"))  # unexpected: traceback first, then the log tail
    assert list(boom) == [*BASE, "log_file", "traceback", "log_tail"] and "RuntimeError: boom" in boom["traceback"]
    assert boom["log_tail"] == "engine log tail"
    stopped = _fail(tmp_path, monkeypatch, KeyboardInterrupt("signal 15"))
    assert list(stopped) == [*BASE, "log_file", "log_tail"]
    assert stopped["error"] == "interrupted before the cell finished; rerun with --resume"
    no_start = _fail(tmp_path, monkeypatch, record={"log_file": "l", "rendered": {"argv": []}},
                     start_error=EngineError("cannot start", "start log"))
    assert list(no_start) == [*BASE, "log_file", "log_tail"] and no_start["log_tail"] == "start log"
    assert no_start["runtime"] == {"requested": no_start["runtime"]["requested"], "effective": {}, "mismatches": [],
                                   "unverified": [], "rendered": {"argv": []}}
    assert no_start["timing"] == {"cell_wall_s": no_start["timing"]["cell_wall_s"]}
    effective = {**_cell(tmp_path).runtime.to_dict(), "n_ctx": 1}
    mismatch = _fail(tmp_path, monkeypatch, record={**START, "effective": effective})
    assert mismatch["error"].startswith("SettingsMismatch: ") and list(mismatch) == [*BASE, "log_file", "log_tail"]
    assert mismatch["runtime"]["mismatches"] == [{"setting": "n_ctx", "requested": 2048, "effective": 1}]


def test_a_cell_interrupted_before_it_started_is_its_base_document(tmp_path):
    cell = _cell(tmp_path, "batch_sweep")
    base = run_cell.base_document(cell)
    assert list(base) == [*BASE, "sweep"] and base["status"] == "running" and base["error"] is None
    assert base["sweep"] == {"n_batch": cell.runtime.n_batch, "n_ubatch": cell.runtime.n_ubatch}
    assert base["config"]["keep_warm"] is cell.experiment.keep_warm and base["timing"] == {}
    assert base["runtime"] == {"requested": cell.runtime.to_dict(), "effective": {}, "mismatches": [],
                               "unverified": []}
    assert list(base["provenance"]) == [*cell.provenance, "runner_host", "runner_python"]
    slots = run_cell.base_document(_cell(tmp_path, "slot_eviction"))
    assert list(slots)[-1] == "slots" and slots["slots"] == {"n_parallel": 1, "n_ctx_total": 2048}
