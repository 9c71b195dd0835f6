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
    """How to run the runner for one cell: its python (a host venv's, or a path inside ``image``) and env."""

    python: Path
    env: dict[str, str]
    image: object | None = None  # images.Image in the docker runtime


def cell_done(out_dir: Path, cell_id: str) -> bool:
    path = out_dir / f"{cell_id}.json"
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_cells(specs: list[tuple[Cell, CellSpec, Launch]], out_dir: Path, resume: bool, execute=None) -> list[dict]:
    """Run cells one after another with ``execute`` (this runtime's ``run_one`` by default); result documents in order.

    Shared by both runtimes: progress (cells done / total, current cell, elapsed), ``--resume``,
    and SIGINT/SIGTERM: the cell being run is recorded as failed (unless its runner wrote a result)
    and the interrupt goes on up; completed cells are never touched.
    """
    execute = execute or run_one
    total = len(specs)
    t0 = time.monotonic()
    docs = []
    for i, (_cell, spec, launch) in enumerate(specs, 1):
        result_path = out_dir / f"{spec.cell_id}.json"
        if resume and cell_done(out_dir, spec.cell_id):
            say(f"[{i}/{total}] {spec.cell_id}: already ok, skipped (--resume)")
            docs.append(json.loads(result_path.read_text()))
            continue
        say(f"[{i}/{total}] {spec.cell_id}: running ({time.monotonic() - t0:.0f}s elapsed)")
        before = mtime(result_path)
        try:
            doc = execute(spec, launch, out_dir)
        except KeyboardInterrupt:
            if mtime(result_path) == before:
                record_failure(spec, out_dir, "interrupted (SIGINT/SIGTERM) before the cell finished; "
                               "rerun with --resume")
            raise
        status = doc.get("status")
        extra = f" - {doc.get('error')}" if status != "ok" else _summary(doc)
        say(f"[{i}/{total}] {spec.cell_id}: {status}{extra}")
        docs.append(doc)
    return docs


def mtime(path: Path) -> int | None:
    """A result file's modification time (None: absent): whether a runner wrote a result."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def write_spec(spec: CellSpec, out_dir: Path) -> Path:
    spec_path = out_dir / "cells" / f"{spec.cell_id}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.to_json())
    return spec_path


def record_failure(spec: CellSpec, out_dir: Path, error: str, extra: dict | None = None,
                   logs: tuple[str, ...] = ("engine",)) -> dict:
    """Write the failed result of a cell whose runner could not (crash, kill, interrupt), with log tails."""
    doc = base_document(spec)
    doc.update(status="failed", error=error, **(extra or {}))
    for kind in logs:
        log = out_dir / "logs" / f"{spec.cell_id}.{kind}.log"
        if log.exists() and log.stat().st_size:
            doc.setdefault("log_file", str(log.relative_to(out_dir)))
            doc.setdefault("log_tail", "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    write_json_atomic(out_dir / f"{spec.cell_id}.json", doc)
    return doc


def _summary(doc: dict) -> str:
    try:
        hit = doc["cache_hit"]["stats"]
        miss = doc["cache_miss"]["stats"]
        return (f" - hit {hit['ttft_ms']['median']:.1f} ms, miss {miss['ttft_ms']['median']:.1f} ms, "
                f"verified {hit['verified_trials'] + miss['verified_trials']}/{hit['n_trials'] + miss['n_trials']}")
    except (KeyError, TypeError):
        return ""


def run_one(spec: CellSpec, launch: Launch, out_dir: Path) -> dict:
    """Host runtime: the runner in its venv, in its own process group; a crash becomes a failed cell."""
    spec_path = write_spec(spec, out_dir)
    result_path = out_dir / f"{spec.cell_id}.json"
    before = mtime(result_path)
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
    if mtime(result_path) != before:
        return json.loads(result_path.read_text())
    return record_failure(spec, out_dir, f"runner {describe_exit(code)} before writing a result")


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
