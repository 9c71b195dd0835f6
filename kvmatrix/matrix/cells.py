"""Expand the matrix axes into cells with stable ids.

A phase names an interface; each (phase, variant, config) is one cell:

    1   vllm_http                      (vLLM OpenAI server)
    2   vllm_python                    (vLLM in-process LLM)
    3a  llamacpp_http                  (llama-server)
    3b  llamacpp_python chat|template  (llama-cpp-python, two API paths)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmatrix.matrix.console import fail
from kvmatrix.runners.spec import ABConfig

PHASES: dict[str, list[tuple[str, str | None]]] = {
    "3a": [("llamacpp_http", None)],
    "3b": [("llamacpp_python", "chat"), ("llamacpp_python", "template")],
}


@dataclass(frozen=True)
class Cell:
    phase: str
    backend: str
    variant: str | None
    config: ABConfig
    experiment: str = "invalidation"

    @property
    def cell_id(self) -> str:
        parts = [f"phase{self.phase}", self.backend]
        if self.variant:
            parts.append(self.variant)
        parts.append(f"{self.config.a}x{self.config.b}")
        if self.experiment != "invalidation":
            parts.insert(0, self.experiment)
        return "-".join(parts)

    @property
    def label(self) -> str:
        return f"{self.backend}{'/' + self.variant if self.variant else ''}"


def parse_phases(text: str) -> list[str]:
    phases = [p.strip().lower().removeprefix("phase") for p in text.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            fail(f"unknown phase {p!r}; use one or more of {', '.join(PHASES)} (comma-separated)")
    return phases


def expand(phases: list[str], configs: list[ABConfig]) -> list[Cell]:
    cells = [Cell(p, backend, variant, cfg) for p in phases for backend, variant in PHASES[p] for cfg in configs]
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        fail("the same config is given twice; list each --config once")
    return cells
