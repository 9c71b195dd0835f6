"""Expand the matrix axes into cells with stable ids.

A phase names an interface; each (phase, variant, config) is one cell:

    1   vllm_http                      (vLLM OpenAI server)
    2   vllm_python                    (vLLM in-process LLM)
    3a  llamacpp_http                  (llama-server)
    3b  llamacpp_python chat|template  (llama-cpp-python, two API paths)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmatrix.matrix.console import fail
from kvmatrix.runners.spec import ABConfig, RuntimeSpec

PHASES: dict[str, list[tuple[str, str | None]]] = {
    "1": [("vllm_http", None)],
    "2": [("vllm_python", None)],
    "3a": [("llamacpp_http", None)],
    "3b": [("llamacpp_python", "chat"), ("llamacpp_python", "template")],
}


EXPERIMENTS = ("invalidation", "recompute_scan", "batch_sweep", "slot_eviction")

#: slot_eviction runs where there are server slots: llama-server (phase 3a), one cell per slot count
SLOT_EVICTION_PHASES = ("3a",)
DEFAULT_PARALLEL_SLOTS = (1, 2, 4)

#: prefix_reuse (``kvmatrix prefix``): backend -> phase; one cell per (backend, prefix caching off/on)
PREFIX_BACKENDS = {"llamacpp_http": "3a", "vllm_http": "1"}


def prefix_cell_id(backend: str, caching: bool) -> str:
    return f"prefix-{backend}-{'cache_on' if caching else 'cache_off'}"
DEFAULT_BATCH_SIZES = (64, 128, 256, 512, 2048)


@dataclass(frozen=True)
class Cell:
    phase: str
    backend: str
    variant: str | None
    config: ABConfig
    experiment: str = "invalidation"
    build: str | None = None  # llama-cpp-python build variant (phase 3b): shared, pip, stock
    n_batch: int | None = None  # batch_sweep: the n_batch under test
    n_parallel: int | None = None  # slot_eviction: llama-server slots (--parallel) under test
    tag: str | None = None  # matrix: the engine version/source, e.g. llama_b4000, vllm_0.33.0

    @property
    def cell_id(self) -> str:
        parts = [f"phase{self.phase}", self.backend]
        if self.variant:
            parts.append(self.variant)
        if self.build and self.build != "shared":
            parts.append(self.build)
        if self.n_batch is not None:
            parts.append(f"b{self.n_batch}")
        if self.n_parallel is not None:
            parts.append(f"p{self.n_parallel}")
        parts.append(f"{self.config.a}x{self.config.b}")
        if self.experiment != "invalidation":
            parts.insert(0, self.experiment)
        if self.tag:
            parts.insert(0, self.tag)
        return "-".join(parts)

    @property
    def label(self) -> str:
        build = f" [{self.build}]" if self.build and self.build != "shared" else ""
        tag = f" @{self.tag}" if self.tag else ""
        return f"{self.backend}{'/' + self.variant if self.variant else ''}{build}{tag}"


def parse_phases(text: str) -> list[str]:
    phases = [p.strip().lower().removeprefix("phase") for p in text.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            fail(f"unknown phase {p!r}; use one or more of {', '.join(PHASES)} (comma-separated)")
    return phases


def split_list(text: str | None) -> list[str]:
    """``a, b,,c`` -> [a, b, c]: every comma-separated option is read this way."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = split_list(text)
    for x in items:
        if x not in allowed:
            fail(f"unknown {what} {x!r}; use one or more of {', '.join(allowed)} (comma-separated)")
    return items


def parse_ints(text: str, option: str, example: str, minimum: int | None = 1) -> list[int]:
    """A comma-separated list of integers (each >= ``minimum``), or one line naming the fix."""
    try:
        values = [int(x) for x in split_list(text)]
    except ValueError:
        values = []
    if not values or (minimum is not None and min(values) < minimum):
        fail(f"{option} {text!r}: give {'positive ' if minimum == 1 else ''}integers such as {example}")
    return values


def slug(text: str) -> str:
    """A source / version name as it may stand in cell ids and image tags."""
    return re.sub(r"[^a-zA-Z0-9_.]+", "-", text.replace("vendored:", "vendored-")).strip("-")[:40]


def parse_batch_sizes(text: str) -> list[int]:
    return parse_ints(text, "--batch-sizes", "64,128,256,512,2048")


def parse_parallel_slots(text: str) -> list[int]:
    """``--parallel-slots 1,2,4`` -> [1, 2, 4]: the slot counts slot_eviction compares."""
    return list(dict.fromkeys(parse_ints(text, "--parallel-slots", "1,2,4")))


def slot_runtime(runtime: RuntimeSpec, n_parallel: int) -> RuntimeSpec:
    """The runtime of a slot_eviction cell: n_parallel slots sharing the SAME total n_ctx, nothing else changed."""
    return RuntimeSpec(**{**runtime.to_dict(), "n_parallel": n_parallel})


def expand(phases: list[str], configs: list[ABConfig], experiments: tuple[str, ...] = ("invalidation",),
           builds: tuple[str, ...] = ("shared",), batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
           parallel_slots: tuple[int, ...] = DEFAULT_PARALLEL_SLOTS) -> list[Cell]:
    """Every cell of the matrix, in run order (phase, interface, build, experiment, config).

    Engine-major: all experiments of one engine come one after another, so cells with the same
    engine settings are adjacent and share one engine start (``host.group_cells``): the
    invalidation and recompute_scan cells of a phase run on one engine. slot_eviction: one cell per
    slot count of ``parallel_slots``, on the phases that have slots (``SLOT_EVICTION_PHASES``) only;
    batch_sweep and slot_eviction run the configs of one n_batch / slot count one after another.
    """
    cells = []
    for p in phases:
        for backend, variant in PHASES[p]:
            for build in (builds if p == "3b" else (None,)):
                for exp in experiments:
                    if exp == "slot_eviction":
                        if p in SLOT_EVICTION_PHASES:
                            cells += [Cell(p, backend, variant, cfg, exp, n_parallel=n)
                                      for n in parallel_slots for cfg in configs]
                    elif exp == "batch_sweep":
                        cells += [Cell(p, backend, variant, cfg, exp, build, b) for b in batch_sizes for cfg in configs]
                    else:
                        cells += [Cell(p, backend, variant, cfg, exp, build) for cfg in configs]
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        fail("the same config is given twice; list each --config once")
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard i/n`` (1 <= i <= n) -> (i, n)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        fail(f"--shard {text!r}: give i/n with 1 <= i <= n, e.g. --shard 1/3 on the first of three hosts")
    return int(m.group(1)), int(m.group(2))


def shard(cells: list, which: tuple[int, int] | None) -> list:
    """The deterministic slice ``i/n`` of the cells: every n-th cell in cell-id order, starting at the i-th.

    The same arguments give the same slices on every host; the n slices are disjoint and cover the matrix.
    """
    if which is None:
        return cells
    i, n = which
    ordered = sorted(cells, key=lambda c: c.cell_id)
    chosen = {c.cell_id for k, c in enumerate(ordered) if k % n == i - 1}
    return [c for c in cells if c.cell_id in chosen]
