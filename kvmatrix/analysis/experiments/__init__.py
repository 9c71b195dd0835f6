"""One analysis module per experiment of the catalogue (``kvmatrix.catalog.EXPERIMENTS``), imported lazily.

Each module ``kvmatrix.analysis.experiments.<name>`` exports:

* ``NAME``: the catalogue's experiment name;
* ``build(cells) -> list``: its rows, from its ok cells (``CellDoc``s, any experiment mixed in);
* ``sections(evidence, figures) -> list[str]``: its report.md sections (markdown), in order;
* ``FIGURES``: its report figures (``kvmatrix.analysis.figure.FigureSpec``), in order.

``Evidence`` holds the cells and builds each experiment's rows once, on first use. Adding an experiment:
its catalogue row + its module here (+ tests); report.md and the figures pick it up from this registry.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvmatrix import catalog
from kvmatrix.analysis.load import as_docs
from kvmatrix.runners.document import CellDoc

#: experiment name -> its analysis module, in catalogue order
REGISTRY: dict[str, str] = {e.name: f"{__name__}.{e.name}" for e in catalog.EXPERIMENTS}


def module(name: str) -> ModuleType:
    """The analysis module of an experiment (KeyError naming the known ones)."""
    if name not in REGISTRY:
        raise KeyError(f"no analysis for experiment {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def modules() -> list[ModuleType]:
    return [module(name) for name in REGISTRY]


class Evidence:
    """What the report and the figures are drawn from: the cells, and each experiment's rows (built once)."""

    def __init__(self, cells):
        self.cells: list[CellDoc] = as_docs(cells)
        self._rows: dict[str, list] = {}

    def of(self, name: str) -> list:
        """The rows of experiment ``name`` (``module(name).build(cells)``)."""
        if name not in self._rows:
            self._rows[name] = module(name).build(self.cells)
        return self._rows[name]

    @property
    def summary(self) -> list:
        """The summary model (``kvmatrix.analysis.summary.build``): one row per cell x condition, built once."""
        if "_summary" not in self._rows:
            from kvmatrix.analysis import summary

            self._rows["_summary"] = summary.build(self.cells)
        return self._rows["_summary"]

    @property
    def rows(self) -> list:
        """invalidation rows"""
        return self.of("invalidation")

    @property
    def scan(self) -> list:
        """recompute_scan points"""
        return self.of("recompute_scan")

    @property
    def sweep(self) -> list:
        """batch_sweep points"""
        return self.of("batch_sweep")

    @property
    def slots(self) -> list:
        """slot_eviction rows"""
        return self.of("slot_eviction")


def build_evidence(cells) -> Evidence:
    return Evidence(cells)
