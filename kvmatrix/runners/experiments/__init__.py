"""Experiments: the only place that knows a trial protocol.

Each experiment is a function ``run(backend, ExperimentSpec, progress) -> dict``
returning ``{"trials": {condition: [Trial]}, ...extra fields for the result}``,
named by its catalogue row (``kvmatrix.catalog.EXPERIMENTS``: ``runner = "module:function"``)
and imported when a cell runs it (prefix_reuse needs aiohttp, which the host side does not have).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kvmatrix import catalog


def runner(name: str) -> Callable:
    """The protocol function of experiment ``name`` (KeyError naming the known ones)."""
    module, function = catalog.experiment(name).runner.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
