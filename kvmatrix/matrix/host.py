"""The ``host`` runtime: run each cell's runner in a cached venv on this machine.

For every cell: write its spec (cells/<id>.json), start
``<venv>/bin/python -m kvmatrix.runners <spec>`` in its own process group,
relay its progress, and make sure a result exists afterwards: if the runner
died without writing one (a segfault at model load, an OOM kill), the host
writes the failed cell itself with the signal and the engine log's tail.
Completed cells are never rewritten; ``--resume`` skips cells already ok.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmatrix.matrix.cells import Cell
from kvmatrix.matrix.console import say
from kvmatrix.runners.backends.process import describe_exit, reap_group
from kvmatrix.runners.results import write_json_atomic
from kvmatrix.runners.run_cell import base_document
from kvmatrix.runners.spec import CellSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Launch:
    """How to run the runner for one backend family on this host."""

    python: Path
    env: dict[str, str]


def cell_done(out_dir: Path, cell_id: str) -> bool:
    path = out_dir / f"{cell_id}.json"
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_cells(specs: list[tuple[Cell, CellSpec, Launch]], out_dir: Path, resume: bool) -> list[dict]:
    """Run cells one after another; returns the result documents in order."""
    total = len(specs)
    t0 = time.monotonic()
    docs = []
    for i, (_cell, spec, launch) in enumerate(specs, 1):
        if resume and cell_done(out_dir, spec.cell_id):
            say(f"[{i}/{total}] {spec.cell_id}: already ok, skipped (--resume)")
            docs.append(json.loads((out_dir / f"{spec.cell_id}.json").read_text()))
            continue
        say(f"[{i}/{total}] {spec.cell_id}: running ({time.monotonic() - t0:.0f}s elapsed)")
        doc = run_one(spec, launch, out_dir)
        status = doc.get("status")
        extra = f" - {doc.get('error')}" if status != "ok" else _summary(doc)
        say(f"[{i}/{total}] {spec.cell_id}: {status}{extra}")
        docs.append(doc)
    return docs


def _summary(doc: dict) -> str:
    try:
        hit = doc["cache_hit"]["stats"]
        miss = doc["cache_miss"]["stats"]
        return (f" - hit {hit['ttft_ms']['median']:.1f} ms, miss {miss['ttft_ms']['median']:.1f} ms, "
                f"verified {hit['verified_trials'] + miss['verified_trials']}/{hit['n_trials'] + miss['n_trials']}")
    except (KeyError, TypeError):
        return ""


def run_one(spec: CellSpec, launch: Launch, out_dir: Path) -> dict:
    spec_path = out_dir / "cells" / f"{spec.cell_id}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.to_json())
    result_path = out_dir / f"{spec.cell_id}.json"
    before = result_path.stat().st_mtime_ns if result_path.exists() else None
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)  # only the shared-library variant sets it
    env.update(launch.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([str(launch.python), "-m", "kvmatrix.runners", str(spec_path)], env=env,
                            start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    finally:
        if reap_group(out_dir / "logs" / f"{spec.cell_id}.engine.pid"):
            say(f"{spec.cell_id}: the runner left its engine running; killed it")
    wrote = result_path.exists() and result_path.stat().st_mtime_ns != before
    if wrote:
        return json.loads(result_path.read_text())
    # The runner died without a result: record the crash as a failed cell.
    doc = base_document(spec)
    doc.update(status="failed", error=f"runner {describe_exit(code)} before writing a result")
    log = out_dir / "logs" / f"{spec.cell_id}.engine.log"
    if log.exists():
        doc["log_file"] = str(log.relative_to(out_dir))
        doc["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    write_json_atomic(result_path, doc)
    return doc


def _terminate(proc: subprocess.Popen) -> None:
    """Stop the runner's whole process group (its engine included)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
