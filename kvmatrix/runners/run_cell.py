"""Run ONE cell inside a backend environment: ``python -m kvmatrix.runners CELL.json``.

Drives the backend lifecycle (render -> start -> read back and validate ->
measure -> stop) around one experiment and writes the cell's result JSON
atomically. Whatever happens, the backend is stopped and a result document
is written: ``status: ok`` or ``status: failed`` with a one-line error and
the tail of the engine log. Exit code 0 = ok, 1 = failed cell, 2 = bad spec.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from kvmatrix.runners import backends
from kvmatrix.runners.backends.base import EngineError, SettingsMismatch, compare_settings
from kvmatrix.runners.device import Nvml, host_facts
from kvmatrix.runners.experiments import EXPERIMENTS
from kvmatrix.runners.results import SCHEMA_VERSION, condition_block, degradation_pct, write_json_atomic
from kvmatrix.runners.spec import CellSpec, SpecError


def base_document(cell: CellSpec) -> dict:
    exp = cell.experiment
    return {
        "schema_version": SCHEMA_VERSION,
        "cell_id": cell.cell_id,
        "run": cell.run,
        "phase": cell.phase,
        "backend": cell.backend,
        "label": cell.engine.get("label", cell.backend),
        "experiment": exp.name,
        "model": cell.model,
        "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "status": "running",
        "error": None,
        "config": {
            "context_size_a": exp.config.a,
            "context_size_b": exp.config.b,
            "query_tokens": exp.config.q,
            "max_output_tokens": exp.max_output_tokens,
            "num_trials": exp.num_trials,
            "warmup_trials": exp.warmup_trials,
            "settle_ms": exp.settle_ms,
            "keep_warm": exp.keep_warm,
        },
        "runtime": {"requested": cell.runtime.to_dict(), "effective": {}, "mismatches": [], "unverified": []},
        "provenance": {**cell.provenance, "runner_host": host_facts(), "runner_python": sys.version.split()[0]},
        "timing": {},
        **({"sweep": {"n_batch": cell.runtime.n_batch, "n_ubatch": cell.runtime.n_ubatch}}
           if exp.name == "batch_sweep" else {}),
        **({"slots": {"n_parallel": cell.runtime.n_parallel, "n_ctx_total": cell.runtime.n_ctx}}
           if exp.name == "slot_eviction" else {}),
    }


def run_cell(cell: CellSpec, progress=None) -> dict:
    """Run the cell; always returns the result document (ok or failed)."""
    out_dir = Path(cell.out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    doc = base_document(cell)
    t0 = time.monotonic()
    backend = None
    try:
        cell.runtime.validate()
        cell.experiment.validate(cell.runtime)
        backend = backends.get_backend(cell.backend)(cell, log_dir)
        doc["log_file"] = str(backend.log_path.relative_to(out_dir))
        doc["runtime"]["rendered"] = backend.render()
        t_start = time.monotonic()
        backend.start()
        doc["timing"]["engine_start_s"] = round(time.monotonic() - t_start, 3)
        effective = backend.effective()
        doc["runtime"]["effective"] = effective
        requested = {k: v for k, v in cell.runtime.to_dict().items() if k in effective}
        doc["runtime"]["unverified"] = sorted(set(cell.runtime.to_dict()) - set(effective))
        mismatches = compare_settings(requested, effective)
        # A build variant may declare settings it cannot honour by definition (the stock
        # CPU-only wheel ignores n_gpu_layers): accepted only at exactly the declared value.
        declared = cell.engine.get("accepted_deviations") or {}
        accepted = [m for m in mismatches if m["setting"] in declared and m["effective"] == declared[m["setting"]]]
        mismatches = [m for m in mismatches if m not in accepted]
        doc["runtime"]["accepted_deviations"] = accepted
        doc["runtime"]["mismatches"] = mismatches
        doc["provenance"].update(backend.provenance())
        nvml = Nvml.open()
        if nvml is not None:
            doc["provenance"]["gpu"] = nvml.describe()
        if mismatches:
            raise SettingsMismatch(mismatches)
        experiment = EXPERIMENTS[cell.experiment.name]
        result = experiment(backend, cell.experiment, progress)
        for cond, trials in result.pop("trials").items():
            doc[cond] = condition_block(trials)
        if "cache_hit" in doc and "cache_miss" in doc:
            doc["ttft_degradation_pct"] = degradation_pct(doc["cache_hit"], doc["cache_miss"])
        doc.update(result)
        doc["status"] = "ok"
    except (SpecError, SettingsMismatch, EngineError, KeyError, OSError) as exc:
        doc["status"] = "failed"
        doc["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, EngineError) and exc.log_tail:
            doc["log_tail"] = exc.log_tail
    except Exception as exc:  # noqa: BLE001 - an unexpected error is still a failed cell, with its traceback
        doc["status"] = "failed"
        doc["error"] = f"{type(exc).__name__}: {exc}"
        doc["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if doc["status"] == "running":  # interrupted (SIGINT/SIGTERM): still leave a failed cell behind
            doc["status"] = "failed"
            doc["error"] = "interrupted before the cell finished; rerun with --resume"
        if backend is not None:
            try:
                backend.stop()
            finally:
                if doc["status"] != "ok" and "log_tail" not in doc:
                    doc["log_tail"] = backend.log_tail()
        doc["timing"]["cell_wall_s"] = round(time.monotonic() - t0, 3)
        write_json_atomic(out_dir / f"{cell.cell_id}.json", doc)
    return doc


def _on_term(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kvmatrix.runners CELL.json", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    try:
        cell = CellSpec.from_file(argv[0])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"kvmatrix runner: error: cannot read cell spec {argv[0]}: {exc}", file=sys.stderr)
        return 2

    # A private copy of stderr: in-process engines redirect fd 2 into their log.
    console = os.fdopen(os.dup(2), "w", buffering=1)

    def progress(msg: str, step: int, total: int) -> None:
        print(f"  [{cell.cell_id} {step}/{total}] {msg}", file=console, flush=True)

    if os.environ.get("KVMATRIX_QUIET"):
        progress = None  # noqa: F811
    doc = run_cell(cell, progress)
    if doc["status"] != "ok":
        print(f"kvmatrix runner: cell {cell.cell_id} failed: {doc['error']}", file=sys.stderr)
        return 1
    return 0
