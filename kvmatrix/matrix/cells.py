"""Expand the matrix axes into cells with stable ids.

A phase names an interface of the catalogue (``kvmatrix/catalog.py``); each (phase, variant, build,
experiment, axis value, config) is one cell:

    1   vllm_http                      (vLLM OpenAI server)
    2   vllm_python                    (vLLM in-process LLM)
    3a  llamacpp_http                  (llama-server)
    3b  llamacpp_python chat|template  (llama-cpp-python, two API paths)
    1t  vllm_tokens                    (vLLM server, /v1/completions with token ids)
    3t  llamacpp_tokens                (llama-server, /completion with token ids)

Which experiment gets cells on which phase, and its extra axis, come from the catalogue too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmatrix import catalog
from kvmatrix.plumbing.console import fail
from kvmatrix.runners.spec import ABConfig, RuntimeSpec

#: phase -> [(backend, variant)], from the catalogue
PHASES: dict[str, list[tuple[str, str | None]]] = {
    p: [(i.backend, i.variant) for i in rows] for p, rows in catalog.phases().items()}

#: the experiments of `run` / `matrix` (--experiments)
EXPERIMENTS = catalog.experiment_names(in_matrix=True)

DEFAULT_PARALLEL_SLOTS = (1, 2, 4)
DEFAULT_BATCH_SIZES = (64, 128, 256, 512, 2048)


def prefix_cell_id(backend: str, caching: bool) -> str:
    return f"prefix-{backend}-{'cache_on' if caching else 'cache_off'}"


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
        if self.experiment == "prefix_reuse":  # one cell per server x caching (the variant): cache_off / cache_on
            return prefix_cell_id(self.backend, self.variant == "cache_on")
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
        if self.experiment == "prefix_reuse":
            return self.backend
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
    invalidation and recompute_scan cells of a phase run on one engine. An experiment gets cells
    only on interfaces with the capabilities it requires (slot_eviction: slots), one per value of
    its axis (``n_parallel``: ``parallel_slots``, ``n_batch``: ``batch_sizes``), the configs of one
    value one after another. ``builds`` applies to interfaces built as bindings variants (3b).
    """
    cells = []
    for p in phases:
        for iface in catalog.phases()[p]:
            variant_builds = builds if set(iface.builds) - {"server"} else (None,)
            for build in variant_builds:
                for name in experiments:
                    exp = catalog.experiment(name)
                    if not catalog.runs_on(exp, iface):
                        continue
                    if exp.axis == "n_parallel":
                        cells += [Cell(p, iface.backend, iface.variant, cfg, name, n_parallel=n)
                                  for n in parallel_slots for cfg in configs]
                    elif exp.axis == "n_batch":
                        cells += [Cell(p, iface.backend, iface.variant, cfg, name, build, b)
                                  for b in batch_sizes for cfg in configs]
                    else:
                        cells += [Cell(p, iface.backend, iface.variant, cfg, name, build) for cfg in configs]
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
