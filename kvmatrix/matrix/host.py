"""The ``host`` runtime, and the ONE cell loop of both runtimes.

``run_cells`` groups consecutive cells that can share one engine start
(``group_key``: the runner's ``engine_key`` -- backend, engine, model, runtime
settings -- plus the same runner environment), and runs each group with ONE
runner launch: ``<venv>/bin/python -m kvmatrix.runners <spec> <spec> ...`` in
its own process group here (``run_one``), or one container per group
(``containers.DockerExecutor``). Progress is relayed per cell as each result
appears, and afterwards every cell of the group has a result: if the runner
died without writing some (a segfault at model load, an OOM kill), the host
writes those cells failed itself with the signal and the engine log's tail. A
runner that stopped early on purpose (a failed cell: its engine is not reused)
leaves the rest of its group to a fresh launch. Completed cells are never
rewritten; ``--resume`` skips cells already ok (a group runs only the rest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmatrix.matrix.cells import Cell
from kvmatrix.plumbing.console import say
from kvmatrix.runners.backends.process import describe_exit, reap_group
from kvmatrix.runners.results import write_json_atomic
from kvmatrix.runners.run_cell import EXIT_RELAUNCH, base_document, engine_key
from kvmatrix.runners.spec import CellSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Launch:
    """How to run the runner for one cell: its python (a host venv's, or a path inside ``image``) and env."""

    python: Path
    env: dict[str, str]
    image: object | None = None  # images.Image in the docker runtime

    def key(self) -> str:
        image = getattr(self.image, "id", self.image)
        return json.dumps({"python": str(self.python), "env": self.env, "image": str(image) if image else None},
                          sort_keys=True)


@dataclass
class CellRun:
    """What ``run_cells`` did: the result documents in plan order and the engine starts (runner launches)."""

    docs: list[dict] = field(default_factory=list)
    engine_starts: int = 0


def group_key(spec: CellSpec, launch: Launch) -> str:
    """Cells with equal keys run in one runner on one engine start."""
    return engine_key(spec) + launch.key()


def group_cells(plan: list[tuple], reuse: bool = True) -> list[list[tuple]]:
    """Consecutive (cell, spec, launch) entries with equal ``group_key``; the plan's order is kept.

    ``reuse=False`` (``--no-engine-reuse``): every cell alone (one engine start per cell).
    """
    groups: list[list[tuple]] = []
    last = None
    for entry in plan:
        key = group_key(entry[1], entry[2])
        if reuse and groups and key == last:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        last = key
    return groups


def cell_done(out_dir: Path, cell_id: str) -> bool:
    path = out_dir / f"{cell_id}.json"
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_cells(specs: list[tuple[Cell, CellSpec, Launch]], out_dir: Path, resume: bool, execute=None,
              reuse: bool = True) -> CellRun:
    """Run the cells, a group of cells sharing an engine per runner launch, with ``execute`` (this runtime's
    ``run_one`` by default: ``execute(specs, launch, out_dir) -> {cell_id: doc}``).

    Shared by both runtimes: progress (cells done / total, current cell, elapsed), ``--resume``,
    and SIGINT/SIGTERM: every cell of the running group without a result is recorded as failed and the
    interrupt goes on up; completed cells are never touched.
    """
    execute = execute or run_one
    total = len(specs)
    position = {spec.cell_id: i for i, (_c, spec, _l) in enumerate(specs, 1)}
    t0 = time.monotonic()
    run = CellRun()
    docs: dict[str, dict] = {}
    for group in group_cells(specs, reuse):
        todo = []
        for _cell, spec, launch in group:
            if resume and cell_done(out_dir, spec.cell_id):
                say(f"[{position[spec.cell_id]}/{total}] {spec.cell_id}: already ok, skipped (--resume)")
                docs[spec.cell_id] = json.loads((out_dir / f"{spec.cell_id}.json").read_text())
                continue
            todo.append((spec, launch))
        while todo:
            batch = [s for s, _ in todo]
            if len(batch) > 1:
                say(f"[{position[batch[0].cell_id]}-{position[batch[-1].cell_id]}/{total}] {len(batch)} cells "
                    f"on one {batch[0].backend} engine start")
            before = {s.cell_id: mtime(out_dir / f"{s.cell_id}.json") for s in batch}
            watch = _Progress(batch, out_dir, before, position, total, t0)
            run.engine_starts += 1
            try:
                got = execute(batch, todo[0][1], out_dir)
            except KeyboardInterrupt:
                for s in batch:
                    if mtime(out_dir / f"{s.cell_id}.json") == before[s.cell_id]:
                        record_failure(s, out_dir, "interrupted (SIGINT/SIGTERM) before the cell finished; "
                                       "rerun with --resume", log_id=batch[0].cell_id)
                raise
            finally:
                watch.stop()
            docs.update(got)
            rest = [(s, l) for s, l in todo if s.cell_id not in got]
            if len(rest) == len(todo):  # the runner wrote nothing and left everything: do not loop
                for s, _ in rest:
                    docs[s.cell_id] = record_failure(s, out_dir, "runner stopped without writing a result",
                                                     log_id=batch[0].cell_id)
                rest = []
            elif rest:
                say(f"{len(rest)} cell(s) of the group left by its runner for a fresh engine (an engine that "
                    "served a failed cell is not reused)")
            todo = rest
    run.docs = [docs[spec.cell_id] for _c, spec, _l in specs if spec.cell_id in docs]
    return run


class _Progress:
    """Per-cell progress lines while a group's runner works: '[i/N] id: running', then its result line."""

    def __init__(self, batch: list[CellSpec], out_dir: Path, before: dict, position: dict, total: int, t0: float):
        self.pending = list(batch)
        self.out_dir, self.before, self.position, self.total, self.t0 = out_dir, before, position, total, t0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._running(self.pending[0])
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _running(self, spec: CellSpec) -> None:
        say(f"[{self.position[spec.cell_id]}/{self.total}] {spec.cell_id}: running "
            f"({time.monotonic() - self.t0:.0f}s elapsed)")

    def _poll(self) -> None:
        while not self.done.wait(0.5):
            self.check()

    def check(self) -> None:
        with self.lock:
            while self.pending:
                spec = self.pending[0]
                path = self.out_dir / f"{spec.cell_id}.json"
                if mtime(path) == self.before[spec.cell_id]:
                    return
                try:
                    doc = json.loads(path.read_text())
                except (OSError, ValueError):
                    return
                self.pending.pop(0)
                status = doc.get("status")
                extra = f" - {doc.get('error')}" if status != "ok" else _summary(doc)
                say(f"[{self.position[spec.cell_id]}/{self.total}] {spec.cell_id}: {status}{extra}")
                if self.pending and not self.done.is_set():
                    self._running(self.pending[0])

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.check()


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
                   logs: tuple[str, ...] = ("engine",), log_id: str | None = None) -> dict:
    """Write the failed result of a cell whose runner could not (crash, kill, interrupt), with log tails.

    ``log_id``: the cell whose name the logs carry (a group's logs are named after its first cell).
    """
    doc = base_document(spec)
    doc.update(status="failed", error=error, **(extra or {}))
    for kind in logs:
        log = out_dir / "logs" / f"{log_id or spec.cell_id}.{kind}.log"
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


def collect(specs: list[CellSpec], out_dir: Path, before: dict, code: int | None, why: str,
            extra: dict | None = None, logs: tuple[str, ...] = ("engine",)) -> dict[str, dict]:
    """After a group's runner: {cell_id: doc} of the cells with a result. Cells without one are recorded
    failed (``why``, the group's log tails), except when the runner left them on purpose (EXIT_RELAUNCH)."""
    docs = {}
    for spec in specs:
        path = out_dir / f"{spec.cell_id}.json"
        if mtime(path) != before[spec.cell_id]:
            docs[spec.cell_id] = json.loads(path.read_text())
        elif code != EXIT_RELAUNCH:
            docs[spec.cell_id] = record_failure(spec, out_dir, why, extra, logs, log_id=specs[0].cell_id)
    return docs


def runner_command(python, spec_paths: list[Path]) -> list[str]:
    return [str(python), "-m", "kvmatrix.runners", *map(str, spec_paths)]


def run_one(specs: list[CellSpec], launch: Launch, out_dir: Path) -> dict[str, dict]:
    """Host runtime: ONE runner for the group in its venv, in its own process group; a crash becomes
    failed cells (every cell of the group without a result)."""
    spec_paths = [write_spec(spec, out_dir) for spec in specs]
    before = {spec.cell_id: mtime(out_dir / f"{spec.cell_id}.json") for spec in specs}
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)  # only the shared-library variant sets it
    env.update(launch.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(runner_command(launch.python, spec_paths), env=env, start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    finally:
        # the engine's pid file is named after the group's first cell (the runner's backend)
        if reap_group(out_dir / "logs" / f"{specs[0].cell_id}.engine.pid"):
            say(f"{specs[0].cell_id}: the runner left its engine running; killed it")
    return collect(specs, out_dir, before, code, f"runner {describe_exit(code)} before writing a result")


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
