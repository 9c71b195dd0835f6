"""One engine start per group of cells: grouping (pure), the runner's group loop on a fake backend,
the host loop (resume, relaunch, failures) on a fake executor, and one real llama-server group."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import host
from kvmatrix.runners import run_cell
from kvmatrix.runners.backends import base
from kvmatrix.runners.backends.base import Backend, EngineError
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError
from tests.conftest import run_kvmatrix

RT = RuntimeSpec(n_ctx=1024, n_threads=2, n_threads_batch=2)
LAUNCH = host.Launch(python=Path("/venv/bin/python"), env={"LLAMA_CPP_LIB_PATH": "/b/bin"})


def _spec(cell_id: str, out: Path, runtime: RuntimeSpec = RT, backend: str = "fake", engine: dict | None = None,
          config: ABConfig = ABConfig(128, 64)) -> CellSpec:
    return CellSpec(cell_id=cell_id, run="r", phase="3a", backend=backend, model={"name": "tiny", "gguf": "/m.gguf"},
                    runtime=runtime, experiment=ExperimentSpec(config=config, num_trials=1), out_dir=str(out),
                    engine=engine or {"server": "/b/bin/llama-server", "variant": None, "label": backend})


def _cell(spec: CellSpec) -> cellmod.Cell:
    return cellmod.Cell(spec.phase, spec.backend, None, spec.experiment.config)


def _plan(specs, launch=LAUNCH):
    return [(_cell(s), s, launch) for s in specs]


# -- grouping (pure) ---------------------------------------------------------------

def test_consecutive_cells_with_one_engine_form_one_group(tmp_path):
    a, b, c = (_spec(f"c{i}", tmp_path, config=ABConfig(128 * i, 64)) for i in (1, 2, 3))
    groups = host.group_cells(_plan([a, b, c]))
    assert [[e[1].cell_id for e in g] for g in groups] == [["c1", "c2", "c3"]]
    assert [[e[1].cell_id for e in g] for g in host.group_cells(_plan([a, b, c]), reuse=False)] == \
        [["c1"], ["c2"], ["c3"]]


def test_groups_split_on_runtime_engine_model_backend_and_launch(tmp_path):
    base_specs = [_spec("a1", tmp_path), _spec("a2", tmp_path, config=ABConfig(64, 128))]
    other_rt = _spec("b", tmp_path, runtime=replace(RT, n_batch=64))
    other_engine = _spec("c", tmp_path, engine={"server": "/b/bin/llama-server", "variant": "chat", "label": "x"})
    other_model = replace(_spec("d", tmp_path), model={"name": "gpt2-small", "gguf": "/g.gguf"})
    other_backend = _spec("e", tmp_path, backend="fake2")
    plan = _plan([*base_specs, other_rt, other_engine, other_model, other_backend])
    plan.append((_cell(base_specs[0]), _spec("f", tmp_path), host.Launch(python=Path("/other/python"), env={})))
    plan.append((_cell(base_specs[0]), _spec("g", tmp_path), host.Launch(python=Path("/other/python"), env={})))
    groups = [[e[1].cell_id for e in g] for g in host.group_cells(plan)]
    assert groups == [["a1", "a2"], ["b"], ["c"], ["d"], ["e"], ["f", "g"]]


def test_equal_cells_apart_are_not_merged_and_order_is_kept(tmp_path):
    a, b, c = _spec("a", tmp_path), _spec("b", tmp_path, runtime=replace(RT, n_batch=64)), _spec("c", tmp_path)
    assert [[e[1].cell_id for e in g] for g in host.group_cells(_plan([a, b, c]))] == [["a"], ["b"], ["c"]]


def test_expand_puts_cells_of_one_engine_next_to_each_other():
    cfgs = [ABConfig(512, 256), ABConfig(256, 512)]
    sweep = cellmod.expand(["3a"], cfgs, ("batch_sweep",), batch_sizes=(64, 2048))
    assert [(c.n_batch, c.config.a) for c in sweep] == [(64, 512), (64, 256), (2048, 512), (2048, 256)]
    slots = cellmod.expand(["3a"], cfgs, ("slot_eviction",), parallel_slots=(1, 2))
    assert [(c.n_parallel, c.config.a) for c in slots] == [(1, 512), (1, 256), (2, 512), (2, 256)]
    # ids (and so shards) are those of the cells, whatever the order
    assert {c.cell_id for c in sweep} == {f"batch_sweep-phase3a-llamacpp_http-b{b}-{c.a}x{c.b}"
                                          for b in (64, 2048) for c in cfgs}


def test_runner_refuses_cells_that_cannot_share_an_engine(tmp_path):
    run_cell.check_group([_spec("a", tmp_path), _spec("b", tmp_path, config=ABConfig(64, 64))])
    with pytest.raises(SpecError, match="differ in runtime"):
        run_cell.check_group([_spec("a", tmp_path), _spec("b", tmp_path, runtime=replace(RT, n_ctx=2048))])
    with pytest.raises(SpecError, match="given twice"):
        run_cell.check_group([_spec("a", tmp_path), _spec("a", tmp_path)])


def test_runner_cli_takes_several_specs_and_refuses_a_mixed_group(tmp_path, capsys):
    paths = []
    for spec in (_spec("a", tmp_path), _spec("b", tmp_path, runtime=replace(RT, n_ctx=2048))):
        paths.append(host.write_spec(spec, tmp_path))
    assert run_cell.main([str(p) for p in paths]) == 2
    assert "cannot share one engine" in capsys.readouterr().err
    assert run_cell.main([]) == 2
    assert not list(tmp_path.glob("*.json"))


# -- the runner's group loop on a fake engine -------------------------------------------

class FakeEngine(Backend):
    name = "fake"
    events: list = []
    fail_in: set = set()
    restart_in: set = set()
    interrupt_in: set = set()
    hook = True
    capabilities = frozenset({"server"})  # a test double outside the catalogue declares what it has

    def render(self):
        self.rendered = {"argv": ["fake"]}
        return self.rendered

    def start(self):
        FakeEngine.events.append(("start", self.cell.cell_id))
        self.log_path.write_text("fake engine log\n")

    def effective(self):
        return {"n_ctx": self.spec.n_ctx}

    def measure(self, request):  # pragma: no cover - the fake experiment does not measure
        raise NotImplementedError

    def prompt_tokens(self, messages):  # pragma: no cover
        return []

    def tokenize(self, text):  # pragma: no cover
        return []

    def stop(self):
        FakeEngine.events.append(("stop",))

    def server_pid(self):
        return 4242

    def begin_cell(self, cell, reused):
        FakeEngine.events.append(("begin", cell.cell_id, reused))
        if reused and cell.cell_id in FakeEngine.restart_in:
            return {"restart": "cannot empty the fake cache"}
        return {"cleared": reused}


def _fake_experiment(backend, spec, progress=None):
    cell_id = backend.cell.cell_id
    FakeEngine.events.append(("measure", cell_id))
    if cell_id in FakeEngine.fail_in:
        raise EngineError("fake engine died")
    if cell_id in FakeEngine.interrupt_in:
        raise KeyboardInterrupt("signal 15")
    return {"trials": {}, "workload": {"cell": cell_id}}


@pytest.fixture
def fake(monkeypatch):
    base.register("fake", lambda: FakeEngine)
    monkeypatch.setattr(run_cell.experiment_protocols, "runner", lambda name: _fake_experiment)
    FakeEngine.events, FakeEngine.fail_in, FakeEngine.restart_in, FakeEngine.interrupt_in = [], set(), set(), set()
    yield FakeEngine
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _docs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_group_runs_on_one_start_and_records_it_per_cell(fake, tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(3)]
    docs, code = run_cell.run_group(specs)
    assert code == 0 and [d["status"] for d in docs] == ["ok"] * 3
    assert [e for e in fake.events if e[0] == "start"] == [("start", "c0")]
    assert [e for e in fake.events if e[0] == "begin"] == [("begin", "c0", False), ("begin", "c1", True),
                                                           ("begin", "c2", True)]
    assert fake.events[-1] == ("stop",) and fake.events.count(("stop",)) == 1
    starts = [d["timing"]["engine_starts"] for d in _docs(tmp_path).values()]
    assert {s["started_at"] for s in starts} == {starts[0]["started_at"]}
    for i, doc in enumerate(docs):
        s = doc["timing"]["engine_starts"]
        assert s["group"] == ["c0", "c1", "c2"] and s["index"] == i and s["starts_in_group"] == 1
        assert s["engine_pid"] == 4242 and s["reused"] == (i > 0)
        assert doc["timing"]["engine_start_s"] == docs[0]["timing"]["engine_start_s"]
        assert doc["log_file"] == "logs/c0.engine.log"  # the group's one engine log
        assert doc["runtime"]["effective"] == {"n_ctx": 1024} and doc["runtime"]["mismatches"] == []
        assert doc["workload"] == {"cell": f"c{i}"}  # each cell's own experiment, backend.cell pointed at it
    assert docs[1]["timing"]["engine_starts"]["begin_cell"] == {"cleared": True}


def test_a_failed_cell_ends_the_engine_and_leaves_the_rest_for_a_fresh_one(fake, tmp_path):
    fake.fail_in = {"c1"}
    specs = [_spec(f"c{i}", tmp_path) for i in range(3)]
    docs, code = run_cell.run_group(specs)
    assert code == run_cell.EXIT_RELAUNCH
    assert [(d["cell_id"], d["status"]) for d in docs] == [("c0", "ok"), ("c1", "failed")]
    assert "fake engine died" in docs[1]["error"] and docs[1]["log_tail"] == "fake engine log"
    assert not (tmp_path / "c2.json").exists()
    assert ("measure", "c2") not in fake.events


def test_adapter_that_cannot_clean_the_engine_gets_a_fresh_one(fake, tmp_path):
    fake.restart_in = {"c1"}
    docs, code = run_cell.run_group([_spec(f"c{i}", tmp_path) for i in range(3)])
    assert code == run_cell.EXIT_RELAUNCH and [d["cell_id"] for d in docs] == ["c0"]
    assert not (tmp_path / "c1.json").exists() and not (tmp_path / "c2.json").exists()


def test_interrupt_fails_the_measured_and_unstarted_cells_and_keeps_completed_ones(fake, tmp_path):
    fake.interrupt_in = {"c1"}
    with pytest.raises(KeyboardInterrupt):
        run_cell.run_group([_spec(f"c{i}", tmp_path) for i in range(3)])
    docs = _docs(tmp_path)
    assert docs["c0"]["status"] == "ok"
    assert docs["c1"]["status"] == "failed" and "interrupted before the cell finished" in docs["c1"]["error"]
    assert docs["c2"]["status"] == "failed" and "interrupted before the cell started" in docs["c2"]["error"]
    assert fake.events[-1] == ("stop",)


def test_a_failed_start_fails_the_first_cell_only(fake, tmp_path, monkeypatch):
    def broken(self):
        raise EngineError("cannot start fake", "boom")
    monkeypatch.setattr(FakeEngine, "start", broken)
    docs, code = run_cell.run_group([_spec("c0", tmp_path), _spec("c1", tmp_path)])
    assert code == run_cell.EXIT_RELAUNCH and docs[0]["status"] == "failed"
    assert docs[0]["log_tail"] == "boom" and docs[0]["runtime"]["rendered"] == {"argv": ["fake"]}
    assert "engine_starts" not in docs[0]["timing"] or docs[0]["timing"]["engine_starts"]["starts_in_group"] == 1


# -- the host loop: resume, relaunch, failures (fake executor) ----------------------------

class FakeExecutor:
    """Writes ok results like a runner would; ``stop_after``: leave the rest (exit 3) after that many."""

    def __init__(self, out: Path, stop_after: int | None = None, crash: bool = False):
        self.out, self.stop_after, self.crash, self.calls = out, stop_after, crash, []

    def __call__(self, specs, launch, out_dir):
        self.calls.append([s.cell_id for s in specs])
        before = {s.cell_id: host.mtime(out_dir / f"{s.cell_id}.json") for s in specs}
        n = len(specs) if self.stop_after is None else self.stop_after
        if self.crash:
            n = 0
        for s in specs[:n]:
            doc = run_cell.base_document(s)
            doc.update(status="ok", timing={"engine_starts": {"group": [x.cell_id for x in specs]}})
            host.write_json_atomic(out_dir / f"{s.cell_id}.json", doc)
        self.stop_after = None  # the relaunch runs to the end
        code = -9 if self.crash else (run_cell.EXIT_RELAUNCH if n < len(specs) else 0)
        return host.collect(specs, out_dir, before, code, f"runner exit {code} before writing a result")


def test_run_cells_one_launch_per_group_and_counts_starts(tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(3)] + [_spec("d", tmp_path, runtime=replace(RT, n_batch=64))]
    ex = FakeExecutor(tmp_path)
    ran = host.run_cells(_plan(specs), tmp_path, resume=False, execute=ex)
    assert ex.calls == [["c0", "c1", "c2"], ["d"]] and ran.engine_starts == 2
    assert [d["cell_id"] for d in ran.docs] == ["c0", "c1", "c2", "d"]
    ex = FakeExecutor(tmp_path)
    assert host.run_cells(_plan(specs), tmp_path, resume=False, execute=ex, reuse=False).engine_starts == 4
    assert ex.calls == [["c0"], ["c1"], ["c2"], ["d"]]


def test_resume_runs_only_the_cells_of_a_group_not_ok(tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(4)]
    host.run_cells(_plan(specs), tmp_path, resume=False, execute=FakeExecutor(tmp_path))
    for name in ("c1", "c3"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        host.write_json_atomic(tmp_path / f"{name}.json", {**doc, "status": "failed"})
    kept = (tmp_path / "c0.json").read_bytes(), (tmp_path / "c2.json").read_bytes()
    ex = FakeExecutor(tmp_path)
    ran = host.run_cells(_plan(specs), tmp_path, resume=True, execute=ex)
    assert ex.calls == [["c1", "c3"]] and ran.engine_starts == 1
    assert ((tmp_path / "c0.json").read_bytes(), (tmp_path / "c2.json").read_bytes()) == kept
    assert all(d["status"] == "ok" for d in ran.docs) and len(ran.docs) == 4


def test_cells_left_by_the_runner_get_a_fresh_launch(tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(3)]
    ex = FakeExecutor(tmp_path, stop_after=1)
    ran = host.run_cells(_plan(specs), tmp_path, resume=False, execute=ex)
    assert ex.calls == [["c0", "c1", "c2"], ["c1", "c2"]] and ran.engine_starts == 2
    assert [d["status"] for d in ran.docs] == ["ok"] * 3


def test_a_dead_runner_fails_every_cell_of_its_group_with_the_group_log(tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(2)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "c0.engine.log").write_text("segfault at model load\n")
    ran = host.run_cells(_plan(specs), tmp_path, resume=False, execute=FakeExecutor(tmp_path, crash=True))
    assert [d["status"] for d in ran.docs] == ["failed", "failed"]
    assert all("runner exit -9" in d["error"] and d["log_tail"] == "segfault at model load" for d in ran.docs)


def test_interrupted_host_records_every_cell_of_the_group_without_result(tmp_path):
    specs = [_spec(f"c{i}", tmp_path) for i in range(3)]

    def interrupted(batch, launch, out_dir):
        doc = run_cell.base_document(batch[0])
        doc["status"] = "ok"
        host.write_json_atomic(out_dir / f"{batch[0].cell_id}.json", doc)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        host.run_cells(_plan(specs), tmp_path, resume=False, execute=interrupted)
    docs = _docs(tmp_path)
    assert docs["c0"]["status"] == "ok"
    assert all(docs[c]["status"] == "failed" and "interrupted" in docs[c]["error"] for c in ("c1", "c2"))


def test_group_container_runs_every_spec_of_the_group(tmp_path):
    from kvmatrix.matrix import containers

    cpu = containers.ContainerSettings(cpuset_cpus="0-1", memory="2g", user="0:0", gpus=False)
    out = tmp_path / "o"
    paths = [out / "cells" / "a.json", out / "cells" / "b.json"]
    opts = containers.run_options("img", "/py", paths, out, [], cpu, "r", ["a", "b"], {})
    assert opts.cli()[-6:] == ["img", "/py", "-m", "kvmatrix.runners", *map(str, paths)]
    assert opts.labels[containers.CELL_LABEL] == "a,b" and opts.name.endswith("-a")


# -- one real llama-server group ---------------------------------------------------------

@pytest.mark.engine
def test_llama_server_runs_two_configs_on_one_start(llama_build, tiny_model, tmp_path):
    out = tmp_path / "group"
    proc = run_kvmatrix("run", "--phases", "3a", "--config", "128/64", "--config", "64/128", "--trials", "2",
                        "--settle-ms", "50", "--max-output-tokens", "8", "--out", str(out), "--run-name", "reuse")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 engine start;" in proc.stderr
    ids = ["phase3a-llamacpp_http-128x64", "phase3a-llamacpp_http-64x128"]
    docs = [json.loads((out / f"{i}.json").read_text()) for i in ids]
    starts = [d["timing"]["engine_starts"] for d in docs]
    for i, (doc, s) in enumerate(zip(docs, starts, strict=True)):
        assert doc["status"] == "ok", doc.get("error")
        assert s["group"] == ids and s["index"] == i and s["starts_in_group"] == 1
        for cond in ("cache_hit", "cache_miss"):
            assert doc[cond]["stats"]["verified_trials"] == doc[cond]["stats"]["n_trials"] == 2
            assert all(t["cache_verified"] for t in doc[cond]["trials"]), (ids[i], cond)
    assert starts[0]["engine_pid"] == starts[1]["engine_pid"] and starts[0]["engine_pid"]
    assert starts[0]["started_at"] == starts[1]["started_at"]
    assert docs[0]["timing"]["engine_start_s"] == docs[1]["timing"]["engine_start_s"]
    log = (out / "logs" / f"{ids[0]}.engine.log").read_text()
    assert sum(line.startswith("$ ") for line in log.splitlines()) == 1  # one llama-server command line
    assert not (out / "logs" / f"{ids[1]}.engine.log").exists()
    assert [p for p in os.listdir(out / "logs") if p.endswith(".pid")] == []


def test_no_engine_reuse_option():
    from kvmatrix.matrix import cli

    for cmd in ("run", "matrix", "prefix"):
        assert cli.parser().parse_args([cmd]).engine_reuse is True
        assert cli.parser().parse_args([cmd, "--no-engine-reuse"]).engine_reuse is False
