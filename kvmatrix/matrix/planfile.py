"""The frozen plan of a scheduled run, ``RUN/plan.json``: written by ``matrix --emit slurm|k8s``, read by every
task of the run (``matrix --plan RUN/plan.json --task I --resume --out RUN``) and by ``status``.

It holds the matrix's own options (what defines the cells and how they run; the scale-out options taken out),
the run name, the runner (git SHA and a digest of its code), the cell list with 1-based task indices, and how
the scheduler was told to run it. A task plans the matrix AGAIN from those options with its own checkout and
refuses to run when that expansion differs from the frozen one (other cells, another order, other code):
otherwise changed code or options would silently measure something other than what was planned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmatrix.matrix import host
from kvmatrix.plumbing.console import UserError, fail
from kvmatrix.runners.results import atomic_target

PLAN_FILE = "plan.json"
KIND = "kvmatrix-plan"
VERSION = 1
SCHEDULERS = ("slurm", "k8s")

#: options that say how a run is scheduled or where it is written, not what it measures: left out of the frozen
#: options (name -> whether it takes a value). A task gets --out, --run-name and --resume from its own command.
SCHEDULING_OPTIONS = {
    "--emit": True, "--submit": False, "--sbatch-arg": True, "--max-parallel": True, "--max-array-size": True,
    "--plan": True, "--task": True, "--out": True, "--run-name": True, "--resume": False, "--shard": True,
    "--retries": True, "--k8s-image": True, "--k8s-claim": True, "--k8s-mount": True, "--k8s-gpus": True,
    "--k8s-gpu-product": True, "--k8s-namespace": True, "--k8s-workdir": True,
}
#: what the runner's code digest covers (relative to the repository root)
CODE_GLOBS = ("kvmatrix/**/*.py", "kvmatrix/**/*.json", "docker/*", "pyproject.toml")
#: analysis code makes no cell: a report fix during a run does not stop its tasks
CODE_EXCLUDE = ("kvmatrix/analysis",)


@dataclass
class FrozenPlan:
    """``RUN/plan.json``: one entry per cell, ``task`` = its array index (Slurm) / completion index + 1 (k8s)."""

    scheduler: str
    run_name: str
    options: list[str]  # the matrix options, as given (scheduling options removed)
    runner: dict  # {"sha", "dirty", "code_digest"}
    cells: list[dict]  # {"task", "cell_id", "runtime", "family", "key"}
    created: str = ""
    chunks: list[dict] = field(default_factory=list)  # slurm: [{"script", "first", "last", "offset"}]
    settings: dict = field(default_factory=dict)  # what the scheduler was told (max_parallel, sbatch args, ...)
    kind: str = KIND
    version: int = VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"kind": d.pop("kind"), "version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> FrozenPlan:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def cell(self, task: int) -> dict:
        if not 1 <= task <= len(self.cells):
            fail(f"--task {task}: this plan has tasks 1 to {len(self.cells)}")
        return self.cells[task - 1]

    def chunk_of(self, task: int) -> dict | None:
        """The Slurm array script that runs ``task`` (arrays beyond MaxArraySize are split)."""
        return next((c for c in self.chunks if c["first"] <= task <= c["last"]), None)


def is_plan(d) -> bool:
    return isinstance(d, dict) and d.get("kind") == KIND


def read(path: str | Path) -> FrozenPlan:
    """A plan file, or a folder holding one; one line naming the fix otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    try:
        d = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{path}: no plan file; pass the run folder written by `matrix --emit slurm|k8s --out RUN` "
                        f"(or its {PLAN_FILE})") from None
    except ValueError as exc:
        raise UserError(f"{path}: not a readable plan ({exc}); emit the run again") from None
    if not is_plan(d):
        raise UserError(f"{path}: not a kvmatrix plan file (no \"kind\": \"{KIND}\"); pass RUN/{PLAN_FILE}")
    if d.get("version") != VERSION:
        raise UserError(f"{path}: plan version {d.get('version')}, this kvmatrix reads version {VERSION}; "
                        "emit the run again with this checkout")
    return FrozenPlan.from_dict(d)


def scheduling_free(argv: list[str]) -> list[str]:
    """The matrix options without the scheduling ones (``--emit slurm``, ``--out=RUN``, ``--submit`` ...)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in SCHEDULING_OPTIONS:
            skip = SCHEDULING_OPTIONS[name] and "=" not in item
            continue
        out.append(item)
    return out


def code_digest(root: Path = host.REPO_ROOT) -> str:
    """sha256 over the code that makes cells (``CODE_GLOBS`` but ``CODE_EXCLUDE``): uncommitted edits change it
    too, unlike the git SHA."""
    h = hashlib.sha256()
    files = sorted({p for g in CODE_GLOBS for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts
                    and not p.relative_to(root).as_posix().startswith(CODE_EXCLUDE)})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def runner(git: dict) -> dict:
    return {**git, "code_digest": code_digest()}


def freeze(plan, scheduler: str, options: list[str], git: dict, settings: dict | None = None) -> FrozenPlan:
    """The frozen plan of ``plan`` (a ``planner.Plan`` of every cell)."""
    cells = [{"task": i, "cell_id": pc.cell.cell_id, "runtime": pc.runtime, "family": pc.family, "key": pc.key}
             for i, pc in enumerate(plan.cells, 1)]
    return FrozenPlan(scheduler=scheduler, run_name=plan.run_name, options=scheduling_free(options),
                      runner=runner(git), cells=cells, settings=dict(settings or {}),
                      created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def check_expansion(frozen: FrozenPlan, plan, git: dict, path: Path) -> None:
    """Refuse (one line) a task whose own expansion of the options differs from the frozen one."""
    now = runner(git)
    if now["code_digest"] != frozen.runner.get("code_digest"):
        fail(f"{path}: the runner's code changed since the plan was written (planned at "
             f"{(frozen.runner.get('sha') or '?')[:12]}, digest {frozen.runner.get('code_digest')}; this checkout "
             f"{(now.get('sha') or '?')[:12]}, digest {now['code_digest']}); check out the planned commit or emit "
             "the run again")
    planned = [c["cell_id"] for c in frozen.cells]
    mine = [pc.cell.cell_id for pc in plan.cells]
    if planned != mine:
        extra = sorted(set(mine) - set(planned))
        gone = sorted(set(planned) - set(mine))
        what = (f"{len(extra)} cell(s) not in the plan (e.g. {extra[0]})" if extra else
                f"{len(gone)} planned cell(s) missing (e.g. {gone[0]})" if gone else "the cells in another order")
        fail(f"{path}: these options expand to {what}; the options or the catalogue changed since the plan was "
             "written: emit the run again")


def task_plan(args, reparse):
    """``matrix --plan FILE --task I``: (frozen plan, the Plan of task I's one cell); ``reparse(argv)`` parses the
    frozen options as a ``matrix`` command line. Every refusal comes before anything is built or written."""
    from kvmatrix.matrix import executor, planner  # noqa: PLC0415 - planner needs the parsed options first

    path = Path(args.plan)
    frozen = read(path)
    run_dir = Path(args.out) if args.out else (path if path.is_dir() else path.parent)
    opts = reparse([*frozen.options, "--out", str(run_dir), "--run-name", frozen.run_name])
    opts.resume = args.resume
    plan = planner.plan_run(opts)
    check_expansion(frozen, plan, executor.runner_git(), path)
    mine = frozen.cell(args.task)["cell_id"]
    plan.cells = [pc for pc in plan.cells if pc.cell.cell_id == mine]
    plan.summary = f"task {args.task} of {len(frozen.cells)}: {mine}"
    return opts, plan
