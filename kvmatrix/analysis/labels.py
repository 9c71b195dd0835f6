"""How the write-ups name and order things: phases and interfaces (from ``kvmatrix.catalog``), series of
cells, engine versions, configs. Standard library only.

Phase tables show the seeds' four phases (1, 2, 3a, 3b) always, and any other catalogue phase (the
token-id interfaces 1t, 3t) only when the cells hold it, so reports of runs without them are unchanged.
"""

from __future__ import annotations

import math
import re

from kvmatrix import catalog
from kvmatrix.analysis.load import as_doc
from kvmatrix.runners.document import CellDoc

#: the phases every four-phase table shows, run or not (the seeds' names)
SEED_PHASES = ("1", "2", "3a", "3b")


def phase_key(phase) -> tuple:
    """Sort "1" < "1t" < "2" < "3a" < "3b" < "3t" < "10"; unknown phases last."""
    m = re.fullmatch(r"(\d+)(.*)", str(phase or ""))
    return (int(m.group(1)), m.group(2)) if m else (math.inf, str(phase))


def config_key(a: int | None, b: int | None) -> tuple:
    """Largest context A first, as the default configs run (512/256, 384/384, 256/512)."""
    return (-(a or 0), b or 0)


def cell_key(c: CellDoc) -> tuple:
    """Cells by phase, then id (every per-cell table)."""
    return (phase_key(c.phase), str(c.cell_id))


def phase_title(phase: str) -> str:
    """How reports name a phase: its interface's catalogue title (the phase id itself when unknown)."""
    return catalog.phase_title(str(phase))


def table_phases(present) -> tuple[str, ...]:
    """The columns of a phase table, in catalogue order: the seeds' four, plus the catalogue's other
    phases that ``present`` (the phases of the cells) holds."""
    present = set(present)
    return tuple(p for p in catalog.phase_ids() if p in SEED_PHASES or p in present)


def family(backend) -> str | None:
    """The catalogue family of a backend ("llama" | "vllm"); None for a backend the catalogue lacks."""
    try:
        return catalog.interface(str(backend)).family
    except KeyError:
        return None


def family_title(backend) -> str | None:
    """"llama.cpp" | "vLLM" for a backend of the catalogue, else None."""
    fam = family(backend)
    return catalog.FAMILIES[fam] if fam else None


def interface_title(backend, titles: dict[str, str] | None = None) -> str:
    """How a write-up names a backend: ``titles`` (a write-up's own words) first, else the catalogue's
    title, else the backend name."""
    if titles and backend in titles:
        return titles[backend]
    try:
        return catalog.interface(str(backend)).title
    except KeyError:
        return str(backend)


def server_inprocess_pairs() -> list[tuple[str, str, str]]:
    """(server phase, in-process phase, family title) per engine family: the family's first chat server and
    its first in-process interface, in catalogue order (("1", "2", "vLLM"), ("3a", "3b", "llama.cpp"))."""
    out = []
    for fam, title in catalog.FAMILIES.items():
        rows = [i for i in catalog.INTERFACES if i.family == fam]
        server = next((i.phase for i in rows if i.has("server") and i.has("chat")), None)
        inproc = next((i.phase for i in rows if not i.has("server")), None)
        if server and inproc:
            out.append((server, inproc, title))
    out.sort(key=lambda p: phase_key(p[0]))
    return out


# ---------------------------------------------------------------- series of cells


def model_name(c: CellDoc) -> str | None:
    return c.model.title


def settings_text(cell: CellDoc) -> str | None:
    """The runtime settings that change TTFT between otherwise equal cells (flash attention, RAM cache)."""
    req = cell.runtime.requested
    if not req:
        return None
    parts = [f"FA {'on' if req.get('flash_attn') else 'off'}"]
    if req.get("cache_ram_mib"):
        parts.append(f"cache-ram {req['cache_ram_mib']}")
    return ", ".join(parts)


def _config_text(c: CellDoc) -> str | None:
    if c.config.context_size_a is None:
        return None
    return f"{c.config.context_size_a}/{c.config.context_size_b}"


SERIES_ATTRS = {
    "phase": lambda c: c.phase and f"phase {c.phase}",
    "model": model_name,
    "config": _config_text,
    "run": lambda c: c.run and f"run {c.run}",
    "cell": lambda c: c.cell_id,
    "settings": settings_text,
}


def series_labels(cells: list[CellDoc]) -> dict[int, str]:
    """Row label per cell (by index): ``label`` or backend, disambiguated when two
    cells of one phase and config would share it (by run, else by cell id)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        key = (c.phase, c.series_label, c.config.context_size_a, c.config.context_size_b)
        groups.setdefault(key, []).append(i)
    labels = {}
    for idxs in groups.values():
        runs = {cells[i].run for i in idxs}
        for i in idxs:
            base = cells[i].series_label
            if len(idxs) == 1:
                labels[i] = base
            elif len(runs) == len(idxs):
                labels[i] = f"{base} ({cells[i].run})"
            else:
                labels[i] = f"{base} [{cells[i].cell_id}]"
    return labels


def series_names(cells: list[CellDoc], attrs: tuple[str, ...], bases: list[str] | None = None) -> list[str]:
    """A series name per cell: its label (or ``bases[i]``), plus the attributes (of ``attrs``, in order) that
    differ between cells of the same label. Cells with equal attributes share a series."""
    bases = bases if bases is not None else [c.series_label for c in cells]
    ident = [tuple(SERIES_ATTRS[a](c) for a in attrs) for c in cells]
    groups: dict[str, list[int]] = {}
    for i, base in enumerate(bases):
        groups.setdefault(base, []).append(i)
    names = [""] * len(cells)
    for base, idxs in groups.items():
        differing = [k for k in range(len(attrs)) if len({ident[i][k] for i in idxs}) > 1]
        for i in idxs:
            extra = [str(ident[i][k]) for k in differing if ident[i][k] is not None]
            names[i] = f"{base} ({', '.join(extra)})" if extra else base
    return names


def version_text(cell: CellDoc | dict) -> str:
    """Engine version and build variant from the provenance, e.g. ``llama.cpp 0c1e570, cuda``.

    ``engine_version`` when the runner records one; else vLLM's version for vLLM backends, the
    llama.cpp commit (and the bindings' version for llama-cpp-python) for the others.
    """
    cell = as_doc(cell)
    prov = cell.provenance
    parts = []
    if prov.engine_version:
        parts.append(str(prov.engine_version))
    elif family(cell.backend) == "vllm":
        if prov.vllm_version:
            parts.append(f"vLLM {prov.vllm_version}")
    else:
        if prov.llama_cpp_commit:
            parts.append(f"llama.cpp {prov.llama_cpp_commit}")
        if cell.backend == "llamacpp_python" and prov.llama_cpp_python_version:
            parts.append(f"bindings {prov.llama_cpp_python_version}")
    if prov.build_variant:
        parts.append(str(prov.build_variant))
    return ", ".join(parts)
