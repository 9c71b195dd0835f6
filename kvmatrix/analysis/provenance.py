"""Settings parity (effective settings that differ between ok cells, requested-vs-effective mismatches)
and the provenance of every cell: engine build, runtime, image, runner commit, model hash, host, device."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvmatrix.analysis import roofline
from kvmatrix.analysis.fmt import NA, setting, shorten, table
from kvmatrix.analysis.labels import cell_key
from kvmatrix.analysis.load import as_doc, as_docs
from kvmatrix.runners.document import CellDoc


@dataclass
class Parity:
    """Effective settings that differ across ok cells, and requested-vs-effective mismatches."""

    keys: list[str] = field(default_factory=list)  # differing keys, sorted
    table: dict[str, dict] = field(default_factory=dict)  # cell_id -> {key: value}
    compared: int = 0  # keys reported by at least two cells
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (cell_id, text)


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def settings_parity(cells) -> Parity:
    """Effective runtime keys whose values differ across ok cells.

    A key is compared among the cells that report it; engine-only keys that
    a single cell reports are not differences and are left out.
    """
    ok = sorted((c for c in as_docs(cells) if c.ok), key=cell_key)
    eff = {str(c.cell_id): c.runtime.effective for c in ok}
    all_keys = sorted({k for e in eff.values() for k in e})
    par = Parity()
    for k in all_keys:
        values = [e[k] for e in eff.values() if k in e]
        if len(values) < 2:
            continue
        par.compared += 1
        if len({_canon(v) for v in values}) > 1:
            par.keys.append(k)
    par.table = {cid: {k: e.get(k, None) for k in par.keys} for cid, e in eff.items()}
    for c in ok:
        for m in c.runtime.mismatches:
            par.mismatches.append((str(c.cell_id), mismatch_text(m)))
    return par


def mismatch_text(m) -> str:
    """A requested-vs-effective mismatch as one line, whatever shape the runner wrote."""
    if isinstance(m, dict):
        key = m.get("key") or m.get("setting") or m.get("name")
        if key is not None and ("requested" in m or "effective" in m):
            return f"{key}: requested {_canon(m.get('requested'))}, effective {_canon(m.get('effective'))}"
        return _canon(m)
    return str(m)


#: provenance keys naming the engine build, the first one recorded wins
ENGINE_VERSION_KEYS = (
    "llama_cpp_commit", "llama_cpp_python_version", "vllm_version", "engine_version", "version",
)


def provenance_row(cell: CellDoc | dict) -> dict:
    """Compact provenance of one cell: engine build, flags, model hash, host."""
    cell = as_doc(cell)
    prov = cell.provenance
    engine = next((f"{k}={prov.get(k)}" for k in ENGINE_VERSION_KEYS if prov.get(k)), None)
    flags = prov.build_flags
    if isinstance(flags, (list, tuple)):
        flags = " ".join(str(f) for f in flags)
    sha = cell.model.sha256 or ""
    image = (prov.container or {}).get("image") or {}
    git = prov.runner_git or {}
    return {
        "cell": cell.cell_id,
        "backend": cell.backend,
        "engine": engine,
        "runtime": prov.runtime_kind,
        "image": f"{image['id'].removeprefix('sha256:')[:12]} ({image.get('tag')})" if image.get("id") else None,
        "runner git": (f"{git['sha'][:10]}{' dirty' if git.get('dirty') else ''}" if git.get("sha") else None),
        "build flags": shorten(flags, 48),
        "model": cell.model.name,
        "sha256": sha[:12] or None,
        "host": host_text(prov.host),
        "scheduler": scheduler_text(prov.host),
        "device": roofline.gpu_name(cell) if roofline.runs_on_gpu(cell) else ("CPU" if prov.to_dict() else None),
    }


def scheduler_text(host) -> str | None:
    """The scheduler task a cell ran as: ``slurm job 12_3 on node7`` / ``kubernetes index 4 on node7``."""
    sched = (host or {}).get("scheduler") if isinstance(host, dict) else None
    if not sched:
        return None
    if sched.get("kind") == "slurm":
        job = sched.get("slurm_array_job_id") or sched.get("slurm_job_id")
        task = sched.get("slurm_array_task_id")
        return f"slurm job {job}{'_' + task if task else ''} on {sched.get('slurmd_nodename') or '?'}"
    return f"{sched.get('kind')} index {sched.get('job_completion_index')} on {sched.get('kvmatrix_k8s_node') or '?'}"


def host_text(host) -> str | None:
    """Host as a short string: hostname plus the accelerator or CPU if known."""
    if not host:
        return None
    if not isinstance(host, dict):
        return shorten(str(host), 40)
    parts = [host.get(k) for k in ("hostname", "node", "name") if host.get(k)][:1]
    parts += [host.get(k) for k in ("gpu", "accelerator", "cpu", "machine") if host.get(k)][:1]
    return shorten(" / ".join(str(p) for p in parts), 48) or shorten(_canon(host), 48)


# ---------------------------------------------------------------- the sections


def sections(ev, figures) -> list[str]:
    return [_parity_section(ev.cells), _provenance_section(ev.cells)]


def _parity_section(cells: list[CellDoc]) -> str:
    par = settings_parity(cells)
    out = ["## Settings parity"]
    if not par.table:
        out.append("No ok cells to compare.")
    elif not par.keys:
        out.append(f"All {par.compared} effective runtime settings reported by more than one cell "
                   "are equal across the ok cells.")
    else:
        out.append(f"Effective runtime settings that differ between ok cells ({len(par.keys)} of "
                   f"{par.compared} compared; {NA} = not reported by that engine):")
        out.append(table([[cid, *(setting(vals[k]) for k in par.keys)] for cid, vals in par.table.items()],
                         ["cell", *par.keys]))
    if par.mismatches:
        out.append("Requested vs effective mismatches:")
        out.append(table([{"cell": cid, "mismatch": text} for cid, text in par.mismatches]))
    elif par.table:
        out.append("Requested vs effective: no mismatches reported.")
    return "\n\n".join(out)


def _provenance_section(cells: list[CellDoc]) -> str:
    rows = [provenance_row(c) for c in sorted(cells, key=cell_key)]
    if not any(r["scheduler"] for r in rows):  # a scheduler column only for runs a scheduler ran
        rows = [{k: v for k, v in r.items() if k != "scheduler"} for r in rows]
    return "## Provenance\n\n" + table(rows)
