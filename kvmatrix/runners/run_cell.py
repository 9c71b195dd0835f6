"""Run a GROUP of cells on ONE engine: ``python -m kvmatrix.runners CELL.json [CELL.json ...]``.

The cells of a group share backend, engine, model and runtime settings
(``engine_key``; refused otherwise, exit 2). The runner drives the backend
lifecycle once (render -> start -> read back and validate) and then runs each
cell's experiment in turn on that engine, writing each cell's result JSON
(a ``document.CellDoc``, filled step by step) atomically as soon as the cell
finishes; the engine is stopped at the end.
Whatever happens, every cell the runner STARTED gets a result document:
``status: ok`` or ``status: failed`` with a one-line error and the tail of the
engine log.

Engine reuse rules:

* before each cell the runner calls ``backend.begin_cell(cell, reused)`` (``Backend.begin_cell``): ``reused`` is False on a fresh engine, True when the engine already served earlier cells;
  the adapter must then leave the engine holding no cached prompt state (slots / sequences, prefix
  cache, host-RAM prompt cache, its own isolation bookkeeping). It may return a dict (recorded as
  ``timing.engine_starts.begin_cell``); a dict with ``"restart": "<why>"`` says it cannot, and the
  runner leaves that cell and the rest for a fresh engine (exit 3).
* an engine that served a FAILED cell is not reused: the runner stops it and leaves the remaining
  cells without a result, exit 3; the host starts a new runner (a new engine) for them.

Interruption (SIGTERM/SIGINT): the cell being measured is written failed ("interrupted"), the
cells of the group not started yet are written failed ("interrupted before the cell started"),
completed cells are untouched; ``--resume`` reruns exactly the failed ones.

Exit code 0 = every cell ok, 1 = every cell has a result and some failed, 2 = bad spec(s),
3 = stopped early: the cells without a result are to be run by a fresh runner.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from kvmatrix.runners import backends
from kvmatrix.runners import experiments as experiment_protocols
from kvmatrix.runners.backends.base import EngineError, SettingsMismatch, compare_settings
from kvmatrix.runners.device import Nvml, host_facts
from kvmatrix.runners.document import CellDoc, Config, Model, Provenance, Runtime, Slots, Sweep
from kvmatrix.runners.results import condition_block, degradation_pct
from kvmatrix.runners.spec import CellSpec, SpecError

#: exit code: the runner stopped early on purpose; the cells without a result need a fresh engine
EXIT_RELAUNCH = 3

#: what the cells of one group must share (they run on one engine start)
GROUP_FIELDS = ("backend", "engine", "model", "runtime", "out_dir", "run")


def engine_key(cell: CellSpec) -> str:
    """The identity of the engine a cell needs: cells with equal keys can share one engine start."""
    return json.dumps(_group_fields(cell), sort_keys=True, default=str)


def _group_fields(cell: CellSpec) -> dict:
    return {f: (cell.runtime.to_dict() if f == "runtime" else getattr(cell, f)) for f in GROUP_FIELDS}


def check_group(cells: list[CellSpec]) -> None:
    """Refuse a group whose cells cannot share one engine (naming the first differing field)."""
    if not cells:
        raise SpecError("no cell specs given")
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise SpecError(f"cell {next(i for i in ids if ids.count(i) > 1)} is given twice")
    first = _group_fields(cells[0])
    for cell in cells[1:]:
        fields = _group_fields(cell)
        for name in GROUP_FIELDS:
            if json.dumps(fields[name], sort_keys=True, default=str) != json.dumps(first[name], sort_keys=True,
                                                                                   default=str):
                raise SpecError(f"cells {cells[0].cell_id} and {cell.cell_id} differ in {name}: they cannot share "
                                "one engine; run them in separate runner calls")


def cell_document(cell: CellSpec) -> CellDoc:
    """A cell's document as the runner starts it (``status: running``); ``_apply_start`` and ``_run_on``
    fill it in, step by step (a key set later is written after those it has, as a dict would)."""
    exp = cell.experiment
    config = Config(context_size_a=exp.config.a, context_size_b=exp.config.b, query_tokens=exp.config.q,
                    max_output_tokens=exp.max_output_tokens, num_trials=exp.num_trials,
                    warmup_trials=exp.warmup_trials, settle_ms=exp.settle_ms)
    config.keep_warm = exp.keep_warm  # an optional key of the schema: assigned, so written whatever its value
    extra_args = {"engine_extra_args": list(cell.engine["extra_args"])} if cell.engine.get("extra_args") else {}
    doc = CellDoc(
        cell_id=cell.cell_id, run=cell.run, phase=cell.phase, backend=cell.backend,
        label=cell.engine.get("label", cell.backend), experiment=exp.name, model=Model.from_dict(cell.model),
        timestamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), status="running", error=None,
        config=config, runtime=Runtime(requested=cell.runtime.to_dict()),
        provenance=Provenance.from_dict({**cell.provenance, "runner_host": host_facts(),
                                         "runner_python": sys.version.split()[0], **extra_args}),
    )
    if exp.name == "batch_sweep":
        doc.sweep = Sweep(n_batch=cell.runtime.n_batch, n_ubatch=cell.runtime.n_ubatch)
    if exp.name == "slot_eviction":
        doc.slots = Slots(n_parallel=cell.runtime.n_parallel, n_ctx_total=cell.runtime.n_ctx)
    return doc


def base_document(cell: CellSpec) -> dict:
    """The document of a cell that has not run (yet), as a plain dict (the host records failures on it)."""
    return cell_document(cell).to_dict()


class SharedEngine:
    """The one backend of a group: rendered, started and read back once, on the first cell that needs it.

    ``record`` collects what the start established (rendered flags, log file, start time, effective
    settings, engine provenance), filled step by step so a failed start still reports what it got to.
    """

    def __init__(self, first: CellSpec, log_dir: Path):
        self.first = first
        self.log_dir = log_dir
        self.backend = None
        self.record: dict = {}
        self.started = False
        self.stopped = True
        self.starts = 0
        self.served = 0  # cells this engine has served since its start

    def ensure(self):
        """The started backend (starting it on first use)."""
        if self.started:
            return self.backend
        backend = self.backend = backends.get_backend(self.first.backend)(self.first, self.log_dir)
        self.stopped = False
        rec = self.record = {"log_file": str(backend.log_path.relative_to(self.log_dir.parent))}
        rec["rendered"] = backend.render()
        self.starts += 1
        rec["started_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        t_start = time.monotonic()
        backend.start()
        rec["engine_start_s"] = round(time.monotonic() - t_start, 3)
        rec["engine_pid"] = backend.server_pid() if backend.has("server") else os.getpid()  # in-process: the runner
        rec["effective"] = backend.effective()
        rec["release_gaps"] = dict(backend.release_gaps)
        rec["provenance"] = backend.provenance()
        nvml = Nvml.open()
        if nvml is not None:
            rec["gpu"] = nvml.describe()
        self.started = True
        return backend

    def stop(self) -> None:
        """Stop the engine (once; the adapter's stop is idempotent anyway); a later ``ensure`` starts anew."""
        self.started = False
        if self.backend is not None and not self.stopped:
            self.stopped = True
            self.backend.stop()

    def log_tail(self) -> str:
        return self.backend.log_tail() if self.backend is not None else ""


class LeaveForFreshEngine(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The adapter cannot give this cell a clean engine: leave it (and the rest) to a fresh runner."""


def _apply_start(doc: CellDoc, cell: CellSpec, engine: SharedEngine, group: list[str], index: int) -> None:
    """Copy what the engine start established into one cell's document."""
    rec = engine.record
    if "log_file" in rec:
        doc.log_file = rec["log_file"]
    if "rendered" in rec:
        doc.runtime.rendered = rec["rendered"]
    if "engine_start_s" in rec:
        doc.timing.engine_start_s = rec["engine_start_s"]
    if "started_at" in rec:
        doc.timing.engine_starts = {
            "group": group, "index": index, "starts_in_group": engine.starts, "reused": engine.served > 0,
            "started_at": rec["started_at"], "engine_pid": rec.get("engine_pid"), "runner_pid": os.getpid(),
        }
    if "effective" not in rec:
        return
    effective = rec["effective"]
    runtime = doc.runtime
    runtime.effective = effective
    runtime.release_gaps = rec.get("release_gaps") or {}
    requested = {k: v for k, v in cell.runtime.to_dict().items() if k in effective}
    runtime.unverified = sorted(set(cell.runtime.to_dict()) - set(effective))
    mismatches = compare_settings(requested, effective)
    # A build variant may declare settings it cannot honour by definition (the stock
    # CPU-only wheel ignores n_gpu_layers): accepted only at exactly the declared value.
    declared = cell.engine.get("accepted_deviations") or {}
    accepted = [m for m in mismatches if m["setting"] in declared and m["effective"] == declared[m["setting"]]]
    runtime.accepted_deviations = accepted
    runtime.mismatches = [m for m in mismatches if m not in accepted]
    if "provenance" in rec:
        doc.provenance.update(rec["provenance"])
    if "gpu" in rec:
        doc.provenance.gpu = rec["gpu"]


def _begin_cell(backend, cell: CellSpec, reused: bool) -> dict | None:
    """The adapter's hook before each cell (see the module docstring); absent = nothing to do."""
    backend.cell = cell  # the cell the engine serves now (per-cell files, e.g. prefix_reuse's prompt set)
    done = backend.begin_cell(cell, reused)
    if reused and isinstance(done, dict) and done.get("restart"):
        raise LeaveForFreshEngine(str(done["restart"]))
    return done


def _run_on(engine: SharedEngine, cell: CellSpec, group: list[str], index: int, progress=None) -> dict:
    """Run one cell on the group's engine; always writes and returns its document (unless left, see above)."""
    out_dir = Path(cell.out_dir)
    doc = cell_document(cell)
    t0 = time.monotonic()
    left = False
    try:
        cell.runtime.validate()
        cell.experiment.validate(cell.runtime)
        try:
            backend = engine.ensure()
        finally:
            _apply_start(doc, cell, engine, group, index)
        if doc.runtime.mismatches:
            raise SettingsMismatch(doc.runtime.mismatches)
        begun = _begin_cell(backend, cell, reused=engine.served > 0)
        if begun:
            doc.timing.engine_starts["begin_cell"] = begun
        engine.served += 1
        experiment = experiment_protocols.runner(cell.experiment.name)
        result = experiment(backend, cell.experiment, progress)
        blocks = {cond: condition_block(trials) for cond, trials in result.pop("trials").items()}
        for cond, block in blocks.items():
            doc.set_condition(cond, block)
        if "cache_hit" in blocks and "cache_miss" in blocks:
            doc.ttft_degradation_pct = degradation_pct(blocks["cache_hit"], blocks["cache_miss"])
        doc.update(result)  # the experiment's other keys (unknown ones kept as they are)
        doc.status = "ok"
    except LeaveForFreshEngine:
        left = True
        raise
    except (SpecError, SettingsMismatch, EngineError, KeyError, OSError) as exc:
        doc.status = "failed"
        doc.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, EngineError) and exc.log_tail:
            doc.log_tail = exc.log_tail
    except Exception as exc:  # noqa: BLE001 - an unexpected error is still a failed cell, with its traceback
        doc.status = "failed"
        doc.error = f"{type(exc).__name__}: {exc}"
        doc.traceback = traceback.format_exc()[-4000:]
    finally:
        if not left:
            if doc.status == "running":  # interrupted (SIGINT/SIGTERM): still leave a failed cell behind
                doc.status = "failed"
                doc.error = "interrupted before the cell finished; rerun with --resume"
            if doc.status != "ok":
                try:  # an engine that served a failed cell is not trusted with the next one
                    engine.stop()
                finally:
                    if "log_tail" not in doc:
                        doc.log_tail = engine.log_tail()
            doc.timing.cell_wall_s = round(time.monotonic() - t0, 3)
            doc.write(out_dir / f"{cell.cell_id}.json")
    return doc.to_dict()


def run_group(cells: list[CellSpec], progress_for=None) -> tuple[list[dict], int]:
    """Run the cells on one engine, in order; (documents written, exit code).

    ``progress_for(cell)`` gives the progress callback of a cell (None: quiet).
    """
    check_group(cells)
    log_dir = Path(cells[0].out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    engine = SharedEngine(cells[0], log_dir)
    group = [c.cell_id for c in cells]
    before = {c.cell_id: _mtime(c) for c in cells}
    docs: list[dict] = []
    current = 0
    try:
        for current, cell in enumerate(cells):
            try:
                doc = _run_on(engine, cell, group, current, progress_for(cell) if progress_for else None)
            except LeaveForFreshEngine:
                return docs, EXIT_RELAUNCH
            docs.append(doc)
            if doc["status"] != "ok" and current + 1 < len(cells):
                return docs, EXIT_RELAUNCH  # the rest get a fresh engine (a new runner)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one interrupt is enough: finish the writes
        for index, cell in enumerate(cells):
            if _mtime(cell) != before[cell.cell_id]:
                continue  # completed, or the interrupted cell's own failed result
            when = "before the cell finished" if index == current else \
                "before the cell started (its group's runner was stopped)"
            doc = cell_document(cell)
            doc.status, doc.error = "failed", f"interrupted {when}; rerun with --resume"
            doc.write(Path(cell.out_dir) / f"{cell.cell_id}.json")
        raise
    finally:
        engine.stop()
    return docs, 0 if all(d["status"] == "ok" for d in docs) else 1


def _mtime(cell: CellSpec) -> int | None:
    try:
        return (Path(cell.out_dir) / f"{cell.cell_id}.json").stat().st_mtime_ns
    except OSError:
        return None


def run_cell(cell: CellSpec, progress=None) -> dict:
    """Run one cell on its own engine; always returns the result document (ok or failed)."""
    docs, _ = run_group([cell], (lambda _c: progress) if progress else None)
    return docs[0]


def _on_term(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m kvmatrix.runners CELL.json [CELL.json ...]  (cells sharing one engine)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    cells = []
    for path in argv:
        try:
            cells.append(CellSpec.from_file(path))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            print(f"kvmatrix runner: error: cannot read cell spec {path}: {exc}", file=sys.stderr)
            return 2
    try:
        check_group(cells)
    except SpecError as exc:
        print(f"kvmatrix runner: error: {exc}", file=sys.stderr)
        return 2

    # A private copy of stderr: in-process engines redirect fd 2 into their log.
    console = os.fdopen(os.dup(2), "w", buffering=1)

    def progress_for(cell: CellSpec):
        def progress(msg: str, step: int, total: int) -> None:
            print(f"  [{cell.cell_id} {step}/{total}] {msg}", file=console, flush=True)
        return progress

    docs, code = run_group(cells, None if os.environ.get("KVMATRIX_QUIET") else progress_for)
    for doc in docs:
        if doc["status"] != "ok":
            print(f"kvmatrix runner: cell {doc['cell_id']} failed: {doc['error']}", file=sys.stderr)
    if code == EXIT_RELAUNCH:
        left = len(cells) - len(docs)
        print(f"kvmatrix runner: {left} cell(s) left for a fresh engine", file=sys.stderr)
    return code
