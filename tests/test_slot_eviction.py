"""slot_eviction: cells and spec checks (pure), and the experiment on a real llama-server.

The engine test runs the three cells of one matrix (N = 1, 2, 4 slots sharing
n_ctx = 1024) through the runner entry point ``python -m kvmatrix.runners
CELL.json`` in the runner venv, on the tiny model: A/B = 192/96, so [A,B,Q]
(~315 tokens) fits a slot of 1024 or 512 tokens but not one of 256.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kvmatrix.matrix import cells as cellmod
from kvmatrix.plumbing.console import UserError
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError
from tests.conftest import REPO

N_CTX = 1024
CONFIG = ABConfig(192, 96)
TRIALS = 2
engine = pytest.mark.engine


# ---------------------------------------------------------------- cells and spec (pure)


def test_slot_eviction_cells_are_llama_server_only_one_per_slot_count():
    cells = cellmod.expand(["3a", "3b", "1"], [ABConfig(512, 256)], ("invalidation", "slot_eviction"),
                           parallel_slots=(1, 2, 4))
    ids = [c.cell_id for c in cells]
    # engine-major run order: the llama-server cells (invalidation, then one per slot count) first
    assert ids == ["phase3a-llamacpp_http-512x256",
                   *[f"slot_eviction-phase3a-llamacpp_http-p{n}-512x256" for n in (1, 2, 4)],
                   "phase3b-llamacpp_python-chat-512x256", "phase3b-llamacpp_python-template-512x256",
                   "phase1-vllm_http-512x256"]
    assert [c.n_parallel for c in cells[1:4]] == [1, 2, 4]
    assert cellmod.expand(["3b"], [ABConfig(512, 256)], ("slot_eviction",)) == []


def test_parse_parallel_slots():
    assert cellmod.parse_parallel_slots("1,2,4") == [1, 2, 4]
    assert cellmod.parse_parallel_slots("4, 4,1") == [4, 1]
    for bad in ("", "0,2", "two"):
        with pytest.raises(UserError, match="--parallel-slots"):
            cellmod.parse_parallel_slots(bad)


def test_slot_runtime_keeps_the_total_context():
    rt = cellmod.slot_runtime(RuntimeSpec(n_ctx=2048, n_threads=2, n_threads_batch=2), 4)
    assert (rt.n_ctx, rt.n_parallel, rt.n_threads) == (2048, 4, 2)


def test_slot_eviction_validation():
    exp = ExperimentSpec(name="slot_eviction", config=ABConfig(512, 256))
    for n in (1, 2, 4):  # per-slot share too small is allowed: it is what the experiment measures
        exp.validate(RuntimeSpec(n_ctx=2048, n_parallel=n))
    with pytest.raises(SpecError, match="multiple of 1024, such as 2048"):
        exp.validate(RuntimeSpec(n_ctx=1536, n_parallel=4))
    with pytest.raises(SpecError, match="total context is 512"):
        exp.validate(RuntimeSpec(n_ctx=512, n_batch=512))
    # the other experiments still need the whole config in one slot's share
    with pytest.raises(SpecError, match="context per slot is 512"):
        ExperimentSpec(config=ABConfig(512, 256)).validate(RuntimeSpec(n_ctx=2048, n_parallel=4))


def test_keep_warm_survives_the_cell_spec(tmp_path):
    cell = CellSpec(cell_id="c", run="r", phase="3a", backend="llamacpp_http", model={"gguf": "m"},
                    runtime=RuntimeSpec(n_parallel=2), experiment=ExperimentSpec(name="slot_eviction",
                                                                                 keep_warm=True),
                    out_dir=str(tmp_path))
    path = tmp_path / "c.json"
    path.write_text(cell.to_json())
    back = CellSpec.from_file(path)
    assert back == cell and back.experiment.keep_warm and back.runtime.n_parallel == 2


# ---------------------------------------------------------------- the real engine


def _still_running(argv: list[str]) -> list[str]:
    """llama-server processes still alive with this cell's argv (its port is unique to it)."""
    port = argv[argv.index("--port") + 1]
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if "llama-server" in line and f"--port {port} " in line]


@pytest.fixture(scope="module")
def slot_run(llama_build, tiny_model, tmp_path_factory):
    from kvmatrix.matrix import llamacpp

    _, build, python = llama_build
    out = tmp_path_factory.mktemp("slots")
    model = {"name": tiny_model.name, "gguf": str(tiny_model.gguf_f16), "quant": "f16", "params": tiny_model.params}
    runtime = RuntimeSpec(n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2)
    exp = ExperimentSpec(name="slot_eviction", config=CONFIG, num_trials=TRIALS, warmup_trials=0, settle_ms=20,
                         max_output_tokens=4, keep_warm=True)
    env = {**os.environ, **llamacpp.engine_env(build), "PYTHONPATH": str(REPO), "KVMATRIX_QUIET": "1"}
    docs = {}
    for cell in cellmod.expand(["3a"], [CONFIG], ("slot_eviction",), parallel_slots=(1, 2, 4)):
        rt = cellmod.slot_runtime(runtime, cell.n_parallel)
        exp.validate(rt)
        spec = CellSpec(cell_id=cell.cell_id, run="slots", phase=cell.phase, backend=cell.backend, model=model,
                        runtime=rt, experiment=exp, out_dir=str(out),
                        engine={"server": str(build.server), "variant": None, "label": cell.label},
                        provenance={**build.provenance(), "build_variant": "server"})
        path = out / "cells" / f"{cell.cell_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(spec.to_json())
        proc = subprocess.run([str(python), "-m", "kvmatrix.runners", str(path)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        docs[cell.n_parallel] = json.loads((out / f"{cell.cell_id}.json").read_text())
        assert proc.returncode == 0, (cell.cell_id, docs[cell.n_parallel].get("error"), proc.stderr[-2000:])
    return out, docs


def _measured(doc: dict, cond: str) -> list[dict]:
    return [t for t in doc[cond]["trials"] if not t["warmup"]]


@engine
def test_per_slot_context_is_read_back_from_the_engine(slot_run):
    _, docs = slot_run
    for n, doc in docs.items():
        assert doc["status"] == "ok", doc.get("error")
        eff = doc["runtime"]["effective"]
        assert doc["runtime"]["mismatches"] == []
        assert (eff["n_parallel"], eff["n_ctx"], eff["n_ctx_per_slot"], eff["kv_unified"]) == (n, N_CTX, N_CTX // n,
                                                                                                 False)
        se = doc["slot_eviction"]
        assert se["n_parallel"] == n and se["slot_ctx"] == [N_CTX // n] * n
        abq = se["prompts"]["[A,B,Q]"]
        assert CONFIG.a + CONFIG.b + CONFIG.q < abq < 512
        assert se["fits"]["[A,B,Q]"] is (abq < N_CTX // n)
        assert doc["keep_warm"] == {"requested": True, "active": False, "reason": doc["keep_warm"]["reason"]}
        assert "CPU" in doc["keep_warm"]["reason"]  # the tiny model runs on the CPU here: a documented no-op


@engine
def test_every_timed_query_is_engine_verified_per_slot(slot_run):
    _, docs = slot_run
    for n in (1, 2):
        for cond in docs[n]["slot_eviction"]["conditions"]:
            trials = _measured(docs[n], cond)
            assert len(trials) == TRIALS, (n, cond)
            for t in trials:
                assert t["cache_verified"] and t["cached_tokens"] == t["expected_cached_tokens"], (n, cond, t)
                assert t["id_slot"] in range(n) and t["warmup_id_slot"] in range(n)


@engine
def test_pinned_slot_zero_hits_and_misses_like_the_invalidation_experiment(slot_run):
    _, docs = slot_run
    for n in (1, 2):
        for t in _measured(docs[n], "cache_hit"):
            assert t["id_slot"] == t["warmup_id_slot"] == 0
            assert t["cached_tokens"] >= CONFIG.a + CONFIG.b
        for t in _measured(docs[n], "cache_miss"):
            assert 0 < t["cached_tokens"] < 16  # only the chat template's first tokens
            assert t["rewarm_cached_tokens"] < 16  # the miss overwrote slot 0: [A,B] is recomputed


@engine
def test_one_slot_evicts_what_several_slots_keep(slot_run):
    _, docs = slot_run
    one, two = docs[1], docs[2]
    # a query pinned to another slot: with one slot it is the same slot (hit), with two it finds another prefix
    assert all(t["id_slot"] == 0 and t["cached_tokens"] >= CONFIG.a + CONFIG.b for t in _measured(one, "other_slot"))
    assert all(t["id_slot"] == 1 and t["cached_tokens"] < 16 for t in _measured(two, "other_slot"))
    # another client's prefix in between: evicts [A,B] from the only slot, sits beside it with two slots
    assert all(t["cached_tokens"] < 16 for t in _measured(one, "alternate"))
    for t in _measured(two, "alternate"):
        assert t["cached_tokens"] >= CONFIG.a + CONFIG.b and t["id_slot"] != t["warmup_id_slot"]
    # a miss routed by the server: one slot loses [A,B]; with two the miss goes elsewhere and [A,B] stays
    assert all(t["rewarm_cached_tokens"] < 16 for t in _measured(one, "server_miss"))
    for t in _measured(two, "server_miss"):
        assert t["id_slot"] != t["warmup_id_slot"] and t["rewarm_cached_tokens"] >= CONFIG.a + CONFIG.b
    # a repeat routed by the server lands where its prefix is
    for doc in (one, two):
        assert all(t["cached_tokens"] >= CONFIG.a + CONFIG.b for t in _measured(doc, "server_hit"))


@engine
def test_a_prompt_longer_than_its_slot_is_refused_and_recorded(slot_run):
    _, docs = slot_run
    four = docs[4]
    se = four["slot_eviction"]
    assert se["fits"] == {"[A,B]": False, "[A,B,Q]": False, "[B,Q]": True, "[A',B']": False}
    refused = se["refused"]
    assert len(refused) == TRIALS * len(se["conditions"])
    for r in refused:
        assert r["n_ctx"] == N_CTX // 4 and r["prompt"] in ("[A,B]", "[A',B']")
        assert r["prompt_tokens"] == se["prompts"][r["prompt"]] and "exceeds the available context" in r["message"]
    assert all(four[cond]["trials"] == [] for cond in se["conditions"])


@engine
def test_no_engine_left_running(slot_run):
    _, docs = slot_run
    for doc in docs.values():
        assert _still_running(doc["provenance"]["server_argv"]) == []


@engine
def test_report_section_and_figure(slot_run, tmp_path):
    pytest.importorskip("matplotlib")
    from kvmatrix.analysis.report import write_report

    out, docs = slot_run
    text = write_report([out], tmp_path).read_text()
    section = text[text.index("## Slot eviction"):text.index("## Roofline floor")]
    abq = docs[4]["slot_eviction"]["prompts"]["[A,B,Q]"]
    for n, fits in ((1, "yes"), (2, "yes"), (4, "no")):
        row = next(line for line in section.splitlines() if line.startswith(f"| llamacpp_http | 192/96      | {n} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:6] == [str(N_CTX // n), str(abq), fits]
    assert "refused 2× ([A,B], " in section and "≥ slot 256" in section
    assert f"{2 * len(docs[1]['slot_eviction']['conditions'])}/{2 * len(docs[1]['slot_eviction']['conditions'])}" \
        in section  # verified trials of N = 1
    assert (tmp_path / "figures" / "fig6_slot_eviction.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "fig6_slot_eviction.svg").is_file()
