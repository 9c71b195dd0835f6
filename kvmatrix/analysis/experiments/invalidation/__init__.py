"""The invalidation experiment (T1 warm [A,B] -> T2 hit [A,B,Q] / T3 miss [B,Q], interleaved): its rows
(``rows``), its report section (``sections``) and its figures (``figures``, ``breakdown``)."""

from kvmatrix.analysis.experiments.invalidation.figures import FIGURES, fig1_panels
from kvmatrix.analysis.experiments.invalidation.rows import (
    NAME,
    Cascade,
    Row,
    build,
    cascade,
    computation_ms,
    condition_stats,
    max_tokens,
    ttft_split,
)
from kvmatrix.analysis.experiments.invalidation.sections import appendix, main_row, sections

__all__ = ["FIGURES", "NAME", "appendix", "Cascade", "Row", "build", "cascade", "computation_ms", "condition_stats",
           "fig1_panels", "main_row", "max_tokens", "sections", "ttft_split"]
