"""``kvmatrix status RUN``: which cells of a scheduled run are ok, failed or missing, and how to fill the gaps.

Reads only files: ``RUN/plan.json`` (``matrix/planfile.py``) and each cell's ``RUN/<cell id>.json`` (absent:
missing; ``status`` other than ok: failed, with its one-line error). For a Slurm run it prints ready
``sbatch --array=3,17,42 RUN/kvmatrix.sbatch`` lines (per array script when the array was split); tasks run
with ``--resume``, so a resubmitted task whose cell is ok meanwhile does nothing. Exit 0 when every cell is ok,
1 while any is failed or missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmatrix.matrix import planfile, slurm


@dataclass(frozen=True)
class TaskState:
    task: int
    cell_id: str
    state: str  # ok | failed | missing
    error: str | None = None
    node: str | None = None  # where it ran (the scheduler's node, else the host name)


def states(run_dir: Path, frozen: planfile.FrozenPlan) -> list[TaskState]:
    out = []
    for c in frozen.cells:
        path = run_dir / f"{c['cell_id']}.json"
        try:
            doc = json.loads(path.read_text())
        except OSError:
            out.append(TaskState(c["task"], c["cell_id"], "missing"))
            continue
        except ValueError:
            out.append(TaskState(c["task"], c["cell_id"], "failed", "unreadable result file"))
            continue
        h = ((doc.get("provenance") or {}).get("host") or {})
        node = (h.get("scheduler") or {}).get("slurmd_nodename") or h.get("hostname")
        ok = doc.get("status") == "ok"
        error = None if ok else " ".join(str(doc.get("error") or "no error recorded").split())[:160]
        out.append(TaskState(c["task"], c["cell_id"], "ok" if ok else "failed", error, node))
    return out


def report(run_dir: Path) -> tuple[str, int]:
    """(the status text, exit code)."""
    run_dir = Path(run_dir)
    frozen = planfile.read(run_dir)
    st = states(run_dir, frozen)
    by = {k: [s for s in st if s.state == k] for k in ("ok", "failed", "missing")}
    lines = [f"run {frozen.run_name} ({frozen.scheduler}): {len(st)} cells, one per task; "
             f"ok {len(by['ok'])}, failed {len(by['failed'])}, missing {len(by['missing'])}"]
    for s in by["failed"]:
        lines.append(f"  failed  task {s.task:>4}  {s.cell_id}: {s.error}")
    for s in by["missing"]:
        lines.append(f"  missing task {s.task:>4}  {s.cell_id}")
    todo = sorted(s.task for s in by["failed"] + by["missing"])
    if todo and frozen.scheduler == "slurm":
        lines.append("resubmit:")
        lines += [f"  {line}" for line in slurm.resubmit_lines(frozen, run_dir, todo)]
    elif todo:
        lines.append("indexes to rerun (JOB_COMPLETION_INDEX): " + ",".join(str(t - 1) for t in todo)
                     + "; apply the Job again (tasks skip ok cells: --resume)")
    return "\n".join(lines), 0 if not todo else 1
