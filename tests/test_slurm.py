"""Scale-out on Slurm: the frozen plan, the job-array scripts, ``status``, the allocation, and a REAL Slurm.

The ``slurm`` tier starts a single-host cluster from Debian's packages (``tests/slurm_cluster.py``: munged,
slurmctld, slurmd as children of the test, a generated slurm.conf with MaxArraySize=3 so the array is split),
emits a small plan (tiny model, llama-server + bindings, four cells), submits it with ``--submit`` held,
cancels one task, lets the rest run, checks every other cell ran exactly once and the report job merged them,
that ``status`` names the cancelled task with a ready ``sbatch --array`` line, and that resubmitting it fills
the gap and reruns nothing else.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from kvmatrix.matrix import allocation, containers, planfile, slurm, status
from tests.conftest import run_kvmatrix
from tests.slurm_cluster import LocalSlurm, missing

#: four cells: llama-server and the shared bindings (chat API) at two A/B configs
SMALL = ("matrix", "--phases", "3a,3b", "--llama-build", "server,shared", "--bindings-api", "chat",
         "--config", "64/32", "--config", "96/32", "--trials", "2", "--warmup-trials", "0", "--settle-ms", "0",
         "--no-calibration", "--runtime", "host", "--threads", "1")


def emit(tmp_path: Path, *extra: str, out: str = "run", env=None):
    return run_kvmatrix(*SMALL, "--emit", "slurm", "--out", str(tmp_path / out), *extra, env=env)


# ---------------------------------------------------------------- the plan and the scripts (no Slurm)


def test_emit_writes_the_frozen_plan_and_split_arrays(tmp_path):
    proc = emit(tmp_path, "--max-parallel", "2", "--max-array-size", "3", "--sbatch-arg=--partition=gpu",
                "--sbatch-arg=--gres=gpu:1", "--sbatch-arg=--time=01:00:00")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    frozen = planfile.read(run)
    assert [c["task"] for c in frozen.cells] == [1, 2, 3, 4]
    assert frozen.cells[0]["cell_id"].endswith("phase3a-llamacpp_http-64x32")
    assert "--emit" not in frozen.options and "--out" not in frozen.options and "--max-parallel" not in frozen.options
    assert frozen.options[:2] == ["--phases", "3a,3b"] and frozen.runner["code_digest"] == planfile.code_digest()
    # MaxArraySize 3: indices 1-2 per script, offset into the plan's tasks
    assert [(c["script"], c["first"], c["last"], c["offset"]) for c in frozen.chunks] == [
        ("kvmatrix.sbatch", 1, 2, 0), ("kvmatrix-2.sbatch", 3, 4, 2)]
    one, two = (run / "kvmatrix.sbatch").read_text(), (run / "kvmatrix-2.sbatch").read_text()
    for text in (one, two):
        assert "#SBATCH --array=1-2%2" in text and "#SBATCH --requeue" in text
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --time=01:00:00" in text
        assert f"#SBATCH --output={run}/slurm/%A_%a.out" in text
        assert re.search(rf"-m kvmatrix.matrix matrix --plan {run}/plan.json --task \"\$TASK\" --resume --out {run}$",
                         text, re.M)
    assert "TASK=$(( SLURM_ARRAY_TASK_ID + 0 ))" in one and "TASK=$(( SLURM_ARRAY_TASK_ID + 2 ))" in two
    report = (run / "report.sbatch").read_text()
    assert "--partition=gpu" in report and "--gres" not in report  # the report job takes no GPU
    assert "kvmatrix.analysis.report" in report and "status" in report
    submit = (run / "submit.sh").read_text()
    assert submit.count("sbatch --parsable") == 3 and "--dependency=$deps" in submit
    assert not list(run.glob("*.json"))[1:]  # plan.json only: nothing ran


def test_chunks_cover_every_task_once():
    assert slurm.chunks(5, 3) == [(1, 2), (3, 4), (5, 5)]
    assert slurm.chunks(1000, 1001) == [(1, 1000)]
    assert slurm.chunks(1001, 1001) == [(1, 1000), (1001, 1001)]
    spans = slurm.chunks(47, 7)
    assert [t for a, b in spans for t in range(a, b + 1)] == list(range(1, 48))


@pytest.mark.parametrize("extra, needle", [
    ((), "--emit slurm needs --out RUN"),
    (("--out", "X", "--shard", "1/2"), "--shard do not go together"),
    (("--out", "X", "--max-parallel", "0"), "--max-parallel 0"),
    (("--out", "X", "--max-array-size", "1"), "--max-array-size 1"),
])
def test_emit_bad_input_is_one_line(tmp_path, extra, needle):
    extra = tuple(str(tmp_path / e) if e == "X" else e for e in extra)
    proc = run_kvmatrix(*SMALL, "--emit", "slurm", *extra)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "X").exists()


def test_submit_without_sbatch_and_k8s_submit_are_refused(tmp_path):
    proc = run_kvmatrix(*SMALL, "--emit", "k8s", "--out", str(tmp_path / "k"), "--submit", "--k8s-image", "i",
                        "--k8s-claim", "c")
    assert proc.returncode == 2 and "--submit submits to Slurm" in proc.stderr
    proc = emit(tmp_path, "--submit", env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_second_emit_into_the_same_folder_is_refused(tmp_path):
    assert emit(tmp_path).returncode == 0
    proc = emit(tmp_path)
    assert proc.returncode == 2 and "already holds a plan" in proc.stderr


def test_a_task_refuses_a_plan_its_checkout_expands_differently(tmp_path):
    assert emit(tmp_path).returncode == 0
    run = tmp_path / "run"
    plan_file = run / "plan.json"
    doc = json.loads(plan_file.read_text())
    # other options -> other cells
    changed = {**doc, "options": [o if o != "96/32" else "128/32" for o in doc["options"]]}
    plan_file.write_text(json.dumps(changed))
    proc = run_kvmatrix("matrix", "--plan", str(plan_file), "--task", "1", "--out", str(run))
    assert proc.returncode == 2 and "expand to" in proc.stderr and "emit the run again" in proc.stderr, proc.stderr
    # other code -> refused, naming the planned commit
    changed = {**doc, "runner": {**doc["runner"], "code_digest": "0" * 16}}
    plan_file.write_text(json.dumps(changed))
    proc = run_kvmatrix("matrix", "--plan", str(plan_file), "--task", "1", "--out", str(run))
    assert proc.returncode == 2 and "the runner's code changed" in proc.stderr, proc.stderr
    plan_file.write_text(json.dumps(doc))
    proc = run_kvmatrix("matrix", "--plan", str(plan_file), "--task", "9", "--out", str(run))
    assert proc.returncode == 2 and "tasks 1 to 4" in proc.stderr
    proc = run_kvmatrix("matrix", "--plan", str(plan_file), "--task", "1", "--trials", "3")
    assert proc.returncode == 2 and "--trials: a task takes its options from the plan" in proc.stderr, proc.stderr
    proc = run_kvmatrix("matrix", "--task", "1")
    assert proc.returncode == 2 and "--plan RUN/plan.json and --task I go together" in proc.stderr
    assert sorted(p.name for p in run.glob("*.json")) == ["plan.json"]  # nothing ran, nothing written


def test_scheduling_options_are_not_frozen():
    argv = ["--phases", "3a", "--emit", "slurm", "--out=/x", "--submit", "--sbatch-arg=--gres=gpu:1",
            "--sbatch-arg", "--time=1", "--max-parallel", "3", "--trials", "4"]
    assert planfile.scheduling_free(argv) == ["--phases", "3a", "--trials", "4"]


def _cell(run: Path, cell_id: str, ok: bool, node: str = "n1") -> None:
    doc = {"schema_version": 1, "cell_id": cell_id, "status": "ok" if ok else "failed",
           "error": None if ok else "llama-server exited 1\nwhile starting",
           "provenance": {"host": {"hostname": node, "scheduler": {"kind": "slurm", "slurmd_nodename": node}}}}
    (run / f"{cell_id}.json").write_text(json.dumps(doc))


def test_status_names_failed_and_missing_tasks_with_resubmission_lines(tmp_path):
    assert emit(tmp_path, "--max-array-size", "3").returncode == 0
    run = tmp_path / "run"
    ids = [c["cell_id"] for c in planfile.read(run).cells]
    _cell(run, ids[0], ok=True)
    _cell(run, ids[2], ok=False)
    text, code = status.report(run)
    assert code == 1
    assert "ok 1, failed 1, missing 2" in text
    assert f"failed  task    3  {ids[2]}: llama-server exited 1 while starting" in text
    assert f"missing task    2  {ids[1]}" in text and f"missing task    4  {ids[3]}" in text
    assert f"sbatch --array=2 {run}/kvmatrix.sbatch" in text  # task 2: index 2 of the first script
    assert f"sbatch --array=1,2 {run}/kvmatrix-2.sbatch" in text  # tasks 3, 4: indices 1, 2 of the second
    for cid in ids:
        _cell(run, cid, ok=True)
    text, code = status.report(run)
    assert code == 0 and "ok 4, failed 0, missing 0" in text and "resubmit" not in text
    proc = run_kvmatrix("status", str(run))
    assert proc.returncode == 0 and "ok 4" in proc.stdout
    proc = run_kvmatrix("status", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no plan file" in proc.stderr


# ---------------------------------------------------------------- the allocation (shared nodes)


def test_the_allocation_follows_the_scheduler(monkeypatch):
    assert allocation.cpuset([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert allocation.gpu_devices({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}) == ["2", "3"]
    assert allocation.gpu_devices({"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]
    assert allocation.gpu_devices({}) is None
    env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "4", "SLURMD_NODENAME": "gpu3",
           "SLURM_MEM_PER_NODE": "2048", "SLURM_JOB_GPUS": "1"}
    assert allocation.memory_bytes(env) <= 2048 << 20
    doc = allocation.scheduler(env)
    assert doc["kind"] == "slurm" and doc["slurm_array_task_id"] == "4" and doc["slurmd_nodename"] == "gpu3"
    assert doc["gpus"] == ["1"] and allocation.task_tag(env) == "s70_4"
    assert allocation.scheduler({}) is None and allocation.task_tag({}) is None
    monkeypatch.setattr(allocation, "cpus", lambda: [4, 5])
    monkeypatch.setenv("SLURM_JOB_GPUS", "1")
    s = containers.ContainerSettings.for_host(None, None, "1g", gpus=True)
    assert s.cpuset_cpus == "4-5" and s.gpus_flag() == "device=1"
    assert containers.ContainerSettings.for_host(None, None, "1g", gpus=False).gpus_flag() == "all"


def test_containers_are_labelled_and_cleaned_per_task(monkeypatch):
    seen = {}

    class Containers:
        def list(self, all, filters):  # noqa: A002 - the SDK's keyword
            seen["filters"] = filters
            return []

    class Client:
        containers = Containers()

    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    containers.remove_run_containers(Client(), "r1")
    assert seen["filters"] == {"label": [f"{containers.RUN_LABEL}=r1", f"{containers.TASK_LABEL}=s10_3"]}


def test_two_processes_never_make_one_cache_entry_at_once(tmp_path):
    """The entry lock: the second maker waits for the first, then finds the entry complete."""
    code = ("import sys, time; from pathlib import Path; from kvmatrix.plumbing import envs\n"
            "e = Path(sys.argv[1])\n"
            "with envs.entry_lock(e):\n"
            "    if not envs.is_complete(e):\n"
            "        e.mkdir(exist_ok=True); (e / 'makers').open('a').write('x'); time.sleep(1.5)\n"
            "        envs.mark_complete(e)\n")
    import subprocess
    import sys
    entry = tmp_path / "entry"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(entry)], cwd=Path(__file__).parents[1])
             for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert (entry / "makers").read_text() == "x"


# ---------------------------------------------------------------- a real Slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), max_array_size=3, cpus=2) as c:
        yield c


def _task_runs(run: Path) -> dict[int, int]:
    """How often each plan task ran a cell, from the task logs (``task I of N: <cell>`` once per run)."""
    counts: dict[int, int] = {}
    for log in (run / "slurm").glob("*_*.out"):
        for m in re.finditer(r"\(task (\d+) of \d+: ", log.read_text(errors="replace")):
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


@pytest.mark.slurm
@pytest.mark.engine
def test_a_real_slurm_runs_cancels_and_resubmits(cluster, tmp_path, llama_build, tiny_model):
    env = {**cluster.env, "SBATCH_HOLD": "1"}  # held, so one task can be cancelled before anything runs
    proc = emit(tmp_path, "--submit", "--max-parallel", "2", "--sbatch-arg=--cpus-per-task=1",
                "--sbatch-arg=--mem=2048", env=env)
    assert proc.returncode == 0, proc.stderr
    jobs = proc.stdout.split()
    assert len(jobs) == 3  # two array jobs (MaxArraySize=3 splits four tasks) and the report job
    run = tmp_path / "run"
    frozen = planfile.read(run)
    cancel = cluster.run("scancel", f"{jobs[0]}_2")  # plan task 2: index 2 of the first array
    assert cancel.returncode == 0, cancel.stderr
    release = cluster.run("scontrol", "release", *jobs)
    assert release.returncode == 0, release.stderr
    cluster.wait_idle(timeout=900)

    ids = [c["cell_id"] for c in frozen.cells]
    ran = {cid: json.loads((run / f"{cid}.json").read_text()) for cid in ids if (run / f"{cid}.json").exists()}
    assert sorted(ran) == sorted(ids[:1] + ids[2:]), sorted(ran)
    assert all(d["status"] == "ok" for d in ran.values()), {k: d.get("error") for k, d in ran.items()}
    assert _task_runs(run) == {1: 1, 3: 1, 4: 1}  # every cell exactly once, the cancelled one not at all
    for task, cid in ((1, ids[0]), (3, ids[2]), (4, ids[3])):
        sched = ran[cid]["provenance"]["host"]["scheduler"]
        chunk = frozen.chunk_of(task)
        assert sched["kind"] == "slurm" and sched["slurmd_nodename"] == cluster.node
        assert sched["slurm_array_job_id"] == jobs[frozen.chunks.index(chunk)]
        assert int(sched["slurm_array_task_id"]) == task - chunk["offset"]
    # the report job ran after all of them: status and the merged report of the three cells
    assert "ok 3, failed 0, missing 1" in (run / "status.txt").read_text()
    report = (run / "report.md").read_text()
    assert all(cid in report for cid in ran) and ids[1] not in report

    proc = run_kvmatrix("status", str(run), env=cluster.env)
    assert proc.returncode == 1 and f"missing task    2  {ids[1]}" in proc.stdout
    line = next(s.strip() for s in proc.stdout.splitlines() if s.strip().startswith("sbatch --array="))
    assert line == f"sbatch --array=2 {run}/kvmatrix.sbatch"
    before = {cid: (run / f"{cid}.json").read_bytes() for cid in ran}
    again = cluster.run(*shlex.split(line.replace("sbatch", "sbatch --wait", 1)), timeout=900)
    assert again.returncode == 0, again.stderr
    proc = run_kvmatrix("status", str(run), env=cluster.env)
    assert proc.returncode == 0 and "ok 4, failed 0, missing 0" in proc.stdout
    assert _task_runs(run) == {1: 1, 2: 1, 3: 1, 4: 1}  # the gap filled, nothing else rerun
    assert {cid: (run / f"{cid}.json").read_bytes() for cid in ran} == before
    assert json.loads((run / f"{ids[1]}.json").read_text())["status"] == "ok"
