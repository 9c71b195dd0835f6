"""prefix_reuse: the write-up's figures, ``figures/prefix_ttft_vs_concurrency.png`` and
``figures/prefix_p95_e2e_vs_concurrency.png`` (matplotlib only when it is installed; no pyplot)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from kvmatrix.analysis.experiments.prefix_reuse.rows import MODES, engine_title
from kvmatrix.runners.results import atomic_target

DPI = 110
METRICS = (("mean_ttft_s", "mean TTFT (ms)", "prefix_ttft_vs_concurrency"),
           ("p95_e2e_s", "p95 end-to-end (ms)", "prefix_p95_e2e_vs_concurrency"))


def draw(groups: list[dict]) -> list[tuple[str, object]]:
    """``(name, Figure)`` per metric: mean TTFT and p95 end to end vs concurrency at 100% reuse, off vs on,
    a panel per engine and prefix regime (a row per engine, at most ``plot.MAX_COLS`` regimes a row)."""
    from kvmatrix.analysis import plot  # noqa: PLC0415 - matplotlib only here

    engines = sorted({g["engine"] for g in groups})
    regimes = sorted({g["prefix_len_tokens"] for g in groups})
    out = []
    for metric, label, name in METRICS:
        fig, axes = plot.grid([len(regimes)] * len(engines), 4.2, 3.2)
        cells = [(e, n) for e in engines for n in regimes]
        for (ax,), (e, n) in zip(axes, cells, strict=True):
            for mode, style in zip(MODES, ("--o", "-s"), strict=True):
                pts = sorted((g["concurrency"], g[metric] * 1000) for g in groups
                             if g["engine"] == e and g["mode"] == mode and g["prefix_len_tokens"] == n
                             and g["reuse_pct"] == 100 and math.isfinite(g[metric]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                            label="off" if mode == MODES[0] else "on")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{engine_title(e)}, {n}-token prefix", fontsize=9)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(title="prefix cache", fontsize=8)
        fig.suptitle(f"{label} vs concurrency, 100% prefix reuse", fontsize=10)
        fig.tight_layout()
        out.append((name, fig))
    return out


def write_figures(groups: list[dict], fig_dir: Path) -> list[Path]:
    """The figures of ``draw`` as PNG in ``fig_dir``; none when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        print("kvmatrix: matplotlib is not installed; figures skipped (pip install kvmatrix[analysis])",
              file=sys.stderr)
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in draw(groups):
        path = fig_dir / f"{name}.png"
        with atomic_target(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
        written.append(path)
    return written
