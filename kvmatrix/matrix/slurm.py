"""``matrix ... --emit slurm --out RUN``: the run as a Slurm job array, one task per cell, plus a report job.

Writes (beside ``RUN/plan.json``, ``matrix/planfile.py``):

- ``RUN/kvmatrix.sbatch``: ``--array=1-N%K`` (K = ``--max-parallel``), ``--requeue``, per-task logs
  ``RUN/slurm/%A_%a.out``, the site's options (``--sbatch-arg=--partition=gpu`` ...), each task running
  ``python -m kvmatrix.matrix matrix --plan RUN/plan.json --task $SLURM_ARRAY_TASK_ID --resume --out RUN``.
  Arrays beyond the site's ``MaxArraySize`` (``scontrol show config``; ``--max-array-size``) are split into
  ``kvmatrix-2.sbatch`` ... whose array indices are offset into the plan's task numbers.
- ``RUN/report.sbatch``: ``kvmatrix status`` (``RUN/status.txt``) and the merged report, submitted with
  ``--dependency=afterany`` on every array job, so it runs once all tasks ended, however they ended.
- ``RUN/submit.sh``: the submission of all of them in order, the same as ``--submit`` does.

The tasks run with the submitting checkout and interpreter (a shared file system is assumed: RUN, the repo,
the cache ``$KVMATRIX_CACHE``); a task refuses to run when that checkout's code or the options no longer
expand to the frozen plan.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kvmatrix.matrix import host
from kvmatrix.matrix.planfile import PLAN_FILE, FrozenPlan
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import fail

SCRIPT = "kvmatrix.sbatch"
REPORT_SCRIPT = "report.sbatch"
SUBMIT_SCRIPT = "submit.sh"
LOG_DIR = "slurm"
#: Slurm's default MaxArraySize: array indices run 0 .. MaxArraySize - 1
DEFAULT_MAX_ARRAY_SIZE = 1001
#: site options that ask for accelerators: the report job (analysis only) does not take them
ACCELERATOR_ARGS = re.compile(r"^(--gres|--gpus|--gpu|--gpus-per-\w+|--cpus-per-gpu|--mem-per-gpu|-G)(=|$)")


def max_array_size() -> int:
    """The site's MaxArraySize (``scontrol show config``), Slurm's default where it cannot be read."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
        if m:
            return int(m.group(1))
    return DEFAULT_MAX_ARRAY_SIZE


def chunks(n_tasks: int, max_size: int) -> list[tuple[int, int]]:
    """Task ranges (first, last) of at most ``max_size - 1`` tasks each (array indices 1 .. MaxArraySize - 1)."""
    per = max(1, max_size - 1)
    return [(first, min(n_tasks, first + per - 1)) for first in range(1, n_tasks + 1, per)]


def script_name(i: int) -> str:
    return SCRIPT if i == 1 else f"kvmatrix-{i}.sbatch"


def _header(job_name: str, log: str, extra: list[str]) -> list[str]:
    return ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log}",
            *[f"#SBATCH {a}" for a in extra]]


def _env_lines() -> list[str]:
    """The cache the emitting process used, so tasks share its builds and venvs."""
    return [f"export KVMATRIX_CACHE={shlex.quote(str(envs.cache_dir()))}"]


def task_script(frozen: FrozenPlan, run_dir: Path, chunk: dict, sbatch_args: list[str], max_parallel: int | None,
                python: str) -> str:
    run = shlex.quote(str(run_dir))
    size = chunk["last"] - chunk["first"] + 1
    array = f"1-{size}" + (f"%{max_parallel}" if max_parallel else "")
    lines = _header(f"kvmatrix-{frozen.run_name}", f"{run_dir}/{LOG_DIR}/%A_%a.out",
                    [f"--array={array}", "--requeue", "--open-mode=append", *sbatch_args])
    lines += ["", f"# kvmatrix run {frozen.run_name}: plan tasks {chunk['first']}-{chunk['last']} of "
                  f"{len(frozen.cells)} (one cell each), runner {(frozen.runner.get('sha') or '?')[:12]}",
              "# resubmit single tasks with: sbatch --array=I,J,... " + str(run_dir / chunk["script"]),
              "set -euo pipefail", *_env_lines(), f"cd {shlex.quote(str(host.REPO_ROOT))}",
              f"TASK=$(( SLURM_ARRAY_TASK_ID + {chunk['offset']} ))",
              f"exec {shlex.quote(python)} -m kvmatrix.matrix matrix --plan {run}/{PLAN_FILE} --task \"$TASK\" "
              f"--resume --out {run}", ""]
    return "\n".join(lines)


def report_script(frozen: FrozenPlan, run_dir: Path, sbatch_args: list[str], python: str) -> str:
    run = shlex.quote(str(run_dir))
    site = [a for a in sbatch_args if not ACCELERATOR_ARGS.match(a)]
    lines = _header(f"kvmatrix-{frozen.run_name}-report", f"{run_dir}/{LOG_DIR}/report_%j.out", site)
    lines += ["", f"# after every task of run {frozen.run_name}: its status and the merged report",
              "set -uo pipefail", *_env_lines(), f"cd {shlex.quote(str(host.REPO_ROOT))}",
              f"{shlex.quote(python)} -m kvmatrix.matrix status {run} | tee {run}/status.txt",
              f"exec {shlex.quote(python)} -m kvmatrix.analysis.report {run} --allow-invalid", ""]
    return "\n".join(lines)


def submit_script(frozen: FrozenPlan, run_dir: Path) -> str:
    lines = ["#!/bin/bash", f"# submit run {frozen.run_name}: the array job(s), then the report after all of them",
             "set -euo pipefail", "deps=afterany"]
    for c in frozen.chunks:
        lines.append(f"j=$(sbatch --parsable {shlex.quote(str(run_dir / c['script']))}); deps=$deps:${{j%%;*}}; "
                     "echo \"array job $j\"")
    lines += [f"r=$(sbatch --parsable --dependency=$deps {shlex.quote(str(run_dir / REPORT_SCRIPT))}); "
              "echo \"report job $r\"", ""]
    return "\n".join(lines)


def emit(frozen: FrozenPlan, run_dir: Path, sbatch_args: list[str], max_parallel: int | None,
         max_size: int | None) -> list[Path]:
    """Write the plan and the scripts into ``run_dir``; the paths written."""
    size = max_size or max_array_size()
    frozen.chunks = [{"script": script_name(i), "first": a, "last": b, "offset": a - 1}
                     for i, (a, b) in enumerate(chunks(len(frozen.cells), size), 1)]
    frozen.settings = {"sbatch_args": list(sbatch_args), "max_parallel": max_parallel, "max_array_size": size}
    python = sys.executable
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    written = [frozen.write(run_dir)]
    texts = {c["script"]: task_script(frozen, run_dir, c, sbatch_args, max_parallel, python) for c in frozen.chunks}
    texts[REPORT_SCRIPT] = report_script(frozen, run_dir, sbatch_args, python)
    texts[SUBMIT_SCRIPT] = submit_script(frozen, run_dir)
    for name, text in texts.items():
        path = run_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


def sbatch(args: list[str]) -> str:
    """``sbatch --parsable ARGS``: the job id (one line naming the fix when sbatch refuses)."""
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        fail(f"sbatch {' '.join(args)} failed: {last}; fix the site options (--sbatch-arg) or submit "
             "RUN/submit.sh by hand")
    return proc.stdout.strip().split(";")[0]


def submit(frozen: FrozenPlan, run_dir: Path) -> tuple[list[str], str]:
    """Submit every array script, then the report job after all of them: (array job ids, report job id)."""
    jobs = [sbatch([str(run_dir / c["script"])]) for c in frozen.chunks]
    report = sbatch([f"--dependency=afterany:{':'.join(jobs)}", str(run_dir / REPORT_SCRIPT)])
    return jobs, report


def check_submit() -> None:
    """``--submit`` needs sbatch: refused before anything is written."""
    if not shutil.which("sbatch"):
        fail("--submit: sbatch is not on PATH; run on a Slurm login node, or leave --submit out and run "
             "RUN/submit.sh there")


def resubmit_lines(frozen: FrozenPlan, run_dir: Path, tasks: list[int]) -> list[str]:
    """Ready ``sbatch --array=...`` lines for these plan tasks, per array script, then the report job."""
    lines = []
    for c in frozen.chunks:
        local = [t - c["offset"] for t in tasks if c["first"] <= t <= c["last"]]
        if local:
            lines.append(f"sbatch --array={','.join(map(str, local))} {run_dir / c['script']}")
    if lines:
        lines.append(f"then: sbatch --dependency=afterany:<job ids above> {run_dir / REPORT_SCRIPT}")
    return lines
