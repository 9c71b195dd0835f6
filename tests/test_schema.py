"""The JSON Schema of the cell document (kvmatrix.analysis.schema) and validation on read (analysis.load):
the published file is the generated one, every committed cell file is valid, and an unreadable or invalid
file is named with a one-line reason while the valid cells still load."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

from kvmatrix.analysis import load, schema
from kvmatrix.analysis.load import Problem, is_cell_file, load_checked, load_dirs, read_checked
from kvmatrix.matrix import planfile
from kvmatrix.runners import document
from kvmatrix.runners.document import CellDoc, Condition, Model, ScanPoint
from kvmatrix.runners.results import SCHEMA_VERSION, Trial, load_cells

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DEMO = RESULTS / "cpu-demo-2026-12-01"
SLOTS = DEMO / "slot_eviction-phase3a-llamacpp_http-p2-256x128.json"
PREFIX = RESULTS / "cpu-prefix-2026-11-22" / "prefix-llamacpp_http-cache_on.json"


def committed_json() -> list[Path]:
    return sorted(RESULTS.glob("**/*.json"))


def committed_cells() -> list[Path]:
    return [f for f in committed_json() if is_cell_file(json.loads(f.read_text()))]


def result_folders() -> list[Path]:
    return sorted({f.parent for f in committed_cells()})


# ---------------------------------------------------------------- the schema and its published copy


def test_the_published_schema_is_the_generated_one():
    published = REPO / schema.PUBLISHED
    assert published.read_text() == schema.schema_text(), (
        f"{schema.PUBLISHED} is stale: python -m kvmatrix.analysis.schema --write {schema.PUBLISHED}")
    assert schema.main(["--check", str(published)]) == 0


def test_the_schema_is_a_valid_draft_2020_12_schema():
    s = schema.cell_schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["required"] == list(schema.REQUIRED) == ["schema_version", "cell_id", "status"]
    assert s["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_the_schema_follows_the_dataclasses():
    """Every key the document's records and the trial declare is in the schema, typed from its annotation."""
    s = schema.cell_schema()
    assert set(CellDoc.keys()) <= set(s["properties"])
    for name, sub in s["$defs"].items():
        cls = getattr(document, name, None)
        if isinstance(cls, type) and issubclass(cls, document.Record):
            assert list(sub["properties"]) == list(cls.keys()), name
    trial = s["$defs"]["Trial"]
    assert list(trial["properties"]) == [f.name for f in dataclasses.fields(Trial)]
    assert trial["required"][:3] == ["trial", "warmup", "ttft_ms"] and "cache_verified" in trial["required"]
    assert "device" not in trial["required"]
    props = trial["properties"]
    assert props["ttft_ms"] == {"type": "number"} and props["cache_verified"] == {"type": "boolean"}
    assert props["cached_tokens"] == {"type": ["integer", "null"]} and props["tokenid_ttft_ms"]["type"] == [
        "number", "null"]
    assert s["$defs"]["Condition"]["properties"]["trials"]["items"] == {"$ref": "#/$defs/Trial"}
    assert s["$defs"]["ScanPoint"]["properties"]["trials"]["items"] == {"$ref": "#/$defs/Trial"}
    assert s["properties"]["scan"]["items"] == {"$ref": "#/$defs/ScanPoint"}
    assert s["properties"]["model"] == {"$ref": "#/$defs/Model"}
    assert s["properties"]["sweep"] == {"anyOf": [{"$ref": "#/$defs/Sweep"}, {"type": "null"}]}
    assert set(s["$defs"]["Stats"]["properties"]) >= {"ttft_ms", "n_trials", "verified_trials"}
    assert {Model.__name__, Condition.__name__, ScanPoint.__name__} <= set(s["$defs"])


def test_runner_keys_are_the_non_optional_fields():
    assert schema.runner_keys() == ("schema_version", "cell_id", "run", "phase", "backend", "label", "experiment",
                                    "model", "timestamp", "status", "error", "config", "runtime", "provenance",
                                    "timing")


# ---------------------------------------------------------------- every committed file


def test_committed_json_is_cells_or_cell_specs():
    """Every committed *.json is a cell result, a cell spec (cells/ folders) or a scheduler's plan.json, as
    load_cells decides."""
    cells = committed_cells()
    assert len(cells) > 100
    for f in committed_json():
        d = json.loads(f.read_text())
        is_cell = bool(isinstance(d, dict) and d.get("schema_version") and "cell_id" in d)
        assert is_cell == is_cell_file(d), f
        if not is_cell:
            assert (f.parent.name == "cells" and "out_dir" in d) or planfile.is_plan(d), (
                f"{f}: neither a cell, a cell spec nor a scheduler plan")


@pytest.mark.parametrize("path", committed_cells(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_committed_cell_file_is_valid(path):
    assert schema.errors(json.loads(path.read_text())) == []


def test_every_committed_folder_loads_checked_without_problems():
    folders = result_folders()
    cells, problems = load_checked(folders)
    assert problems == []
    assert [c.path for c in cells] == [d["_path"] for d in load_cells(folders)]
    assert {c.experiment for c in cells} == {"invalidation", "recompute_scan", "batch_sweep", "slot_eviction",
                                             "prefix_reuse"}
    assert schema.main([str(f) for f in folders]) == 0


# ---------------------------------------------------------------- invalid documents


def _slots() -> dict:
    return json.loads(SLOTS.read_text())


INVALID = {
    "ttft_ms a string": (lambda d: d["cache_hit"]["trials"][0].update(ttft_ms="12.5"),
                         "cache_hit.trials[0].ttft_ms: '12.5' is not of type 'number'"),
    "missing cell_id": (lambda d: d.pop("cell_id"), "(document): 'cell_id' is a required property"),
    "cell_id empty": (lambda d: d.update(cell_id=""), "cell_id: "),
    "missing status": (lambda d: d.pop("status"), "'status' is a required property"),
    "unknown status": (lambda d: d.update(status="done"), "status: 'done' is not one of"),
    "a newer schema": (lambda d: d.update(schema_version=2), "schema_version: 1 was expected"),
    "cache_verified not a bool": (lambda d: d["other_slot"]["trials"][1].update(cache_verified="yes"),
                                  "other_slot.trials[1].cache_verified: 'yes' is not of type 'boolean'"),
    "a trial without ttft_ms": (lambda d: d["cache_miss"]["trials"][2].pop("ttft_ms"),
                                "cache_miss.trials[2]: 'ttft_ms' is a required property"),
    "trials not a list": (lambda d: d["cache_hit"].update(trials={}), "cache_hit.trials: {} is not of type 'array'"),
    "stats n not whole": (lambda d: d["cache_miss"]["stats"]["ttft_ms"].update(n=1.5),
                          "cache_miss.stats.ttft_ms.n: 1.5 is not of type 'integer'"),
    "model null": (lambda d: d.update(model=None), "model: None is not of type 'object'"),
    "params a string": (lambda d: d["model"].update(params="4M"), "model.params: '4M' is not of type"),
    "n_parallel a string": (lambda d: d["slot_eviction"].update(n_parallel="2"), "slot_eviction.n_parallel: '2'"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_document_says_where_and_what_in_one_line(case):
    mutate, expected = INVALID[case]
    d = _slots()
    assert schema.first_error(d) is None
    mutate(d)
    err = schema.first_error(d)
    assert err is not None and expected in err and "\n" not in err
    with pytest.raises(ValueError) as exc:
        schema.validate(d)
    assert str(exc.value) == err


def test_other_condition_blocks_and_scan_points_and_requests_are_checked():
    d = _slots()
    d["brand_new_condition"] = {"trials": [{"trial": 0, "warmup": "no"}], "stats": {}}
    assert "brand_new_condition.trials[0]" in schema.first_error(d)
    scan = json.loads((DEMO / "recompute_scan-phase3a-llamacpp_http-256x128.json").read_text())
    scan["scan"][1]["trials"][0]["prompt_tokens"] = 1.5
    assert schema.first_error(scan).startswith("scan[1].trials[0].prompt_tokens: 1.5 is not of type 'integer'")
    prefix = json.loads(PREFIX.read_text())
    prefix["requests"][3]["ttft_s"] = "fast"
    assert schema.first_error(prefix).startswith("requests[3].ttft_s: 'fast' is not of type")
    assert schema.first_error({**_slots(), "status": 1, "cell_id": 2}).endswith(" (+1 more)")


def test_unknown_keys_and_hand_made_cells_are_valid():
    d = _slots()
    d["brand_new"] = {"x": [1, "y"]}
    d["model"]["future_key"] = 1
    d["cache_hit"]["trials"][0]["new_metric_ms"] = 3.0
    d["cache_hit"]["stats"]["new_metric_ms"] = {"n": 0}
    d["not_a_condition"] = {"trials": "x"}  # not {trials[], stats{}}: kept as an unknown key
    assert schema.errors(d) == []
    # minimal documents as the tests and other tools write them
    failed = {"schema_version": 1, "cell_id": "phase1-vllm_http-512x256", "run": "demo", "phase": "1",
              "backend": "vllm_http", "status": "failed", "error": "boom", "config": {}, "model": {}}
    assert schema.errors(failed) == []
    assert schema.errors({"schema_version": 1, "cell_id": "x", "status": "running", "cache_hit": {}}) == []
    no_experiment = {k: v for k, v in _slots().items() if k != "experiment"}
    assert schema.errors(no_experiment) == []  # older documents: document.infer_experiment guesses


# ---------------------------------------------------------------- reading a folder


def _folder(tmp_path: Path, binary: bool = True) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = json.loads((DEMO / "phase3a-llamacpp_http-512x256.json").read_text())
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "truncated.json").write_text(json.dumps(good)[:500])
    (tmp_path / "empty.json").write_text("")
    bad = copy.deepcopy(good)
    bad["cache_hit"]["trials"][1]["ttft_ms"] = "fast"
    (tmp_path / "bad_ttft.json").write_text(json.dumps(bad))
    no_id = copy.deepcopy(good)
    del no_id["cell_id"]
    (tmp_path / "no_id.json").write_text(json.dumps(no_id))
    no_version = {k: v for k, v in good.items() if k != "schema_version"}
    (tmp_path / "no_version.json").write_text(json.dumps(no_version))
    if binary:  # (results.load_cells raises UnicodeDecodeError on it: load_dirs cannot read such a folder)
        (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00{")
    # JSON that is not a cell: neither read nor a problem
    (tmp_path / "prefix_requests.json").write_text(json.dumps({"requests": []}))
    (tmp_path / "peer_check.json").write_text(json.dumps([1, 2]))
    spec = json.loads((DEMO / "cells" / "phase3a-llamacpp_http-512x256.json").read_text())
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "notes.txt").write_text("{")
    return tmp_path


def test_load_checked_returns_the_valid_cells_and_names_every_broken_file(tmp_path):
    folder = _folder(tmp_path)
    cells, problems = load_checked([folder, folder])  # a folder named twice: each file once
    assert [c.path for c in cells] == [str(folder / "good.json")]
    assert isinstance(cells[0], CellDoc) and cells[0].ok
    by_name = {Path(p.path).name: p.reason for p in problems}
    assert sorted(by_name) == ["bad_ttft.json", "binary.json", "empty.json", "no_id.json", "no_version.json",
                               "truncated.json"]
    assert all(isinstance(p, Problem) and isinstance(p, tuple) and "\n" not in p.reason for p in problems)
    assert by_name["truncated.json"].startswith("unreadable: not valid JSON (")
    assert by_name["empty.json"] == "unreadable: empty file"
    assert by_name["binary.json"].startswith("unreadable: ")
    assert by_name["bad_ttft.json"] == "invalid: cache_hit.trials[1].ttft_ms: 'fast' is not of type 'number'"
    assert by_name["no_id.json"] == "invalid: (document): 'cell_id' is a required property"
    assert by_name["no_version.json"] == "invalid: (document): 'schema_version' is a required property"
    assert [p.path for p in problems] == sorted(p.path for p in problems)  # in file order


def test_existing_loaders_keep_their_behaviour(tmp_path):
    folder = _folder(tmp_path)  # a file that is not UTF-8 is skipped by load_cells, as a truncated one is
    ids = sorted(Path(c.path).name for c in load_dirs([folder]))
    assert ids == ["bad_ttft.json", "good.json"]  # load_cells' rule: schema_version and cell_id, no validation
    assert [Path(c.path).name for c in load.load_required([folder])] == ids


def test_read_checked_and_a_named_file(tmp_path):
    folder = _folder(tmp_path)
    doc, problem = read_checked(folder / "good.json")
    assert doc is not None and problem is None and doc.path == str(folder / "good.json")
    assert read_checked(folder / "prefix_requests.json") == (None, None)
    doc, problem = read_checked(folder / "missing.json")
    assert doc is None and problem.reason.startswith("unreadable: ")
    cells, problems = load_checked([folder / "no_id.json", folder / "good.json"])
    assert len(cells) == 1 and [Path(p.path).name for p in problems] == ["no_id.json"]


# ---------------------------------------------------------------- telling the reader


def test_problems_section_and_lines():
    assert schema.problems_section([]) == ""
    problems = [Problem("run/a.json", "unreadable: empty file"), Problem("run/b.json", "invalid: x: 'a|b' bad")]
    text = schema.problems_section(problems)
    assert text.startswith("## Unreadable or invalid result files\n")
    assert "2 files in the result folders are not a readable, valid cell document" in text
    assert "| `run/a.json` | unreadable: empty file |" in text
    assert "| `run/b.json` | invalid: x: 'a\\|b' bad |" in text  # a pipe in a reason does not split the table
    assert "1 file in the result folders is not" in schema.problems_section(problems[:1])
    assert schema.problem_line(problems[0]) == "kvmatrix: warning: run/a.json: unreadable: empty file"


def test_the_command_line(tmp_path, capsys):
    folder = _folder(tmp_path / "run")
    assert schema.main([str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "1 valid cell, 6 unreadable or invalid"
    assert err.count("kvmatrix: warning: ") == 6 and f"{folder / 'empty.json'}: unreadable: empty file" in err
    stale = tmp_path / "cell.schema.json"
    stale.write_text("{}\n")
    assert schema.main(["--check", str(stale)]) == 1
    assert "is not the generated schema" in capsys.readouterr().err
    assert schema.main(["--write", str(stale)]) == 0 and stale.read_text() == schema.schema_text()
    assert schema.main(["--check", str(stale)]) == 0
    capsys.readouterr()
    assert schema.main([]) == 0 and json.loads(capsys.readouterr().out) == schema.cell_schema()
