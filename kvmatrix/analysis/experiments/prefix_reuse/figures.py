"""prefix_reuse: the write-up's figures, ``figures/prefix_ttft_vs_concurrency.png`` and
``figures/prefix_p95_e2e_vs_concurrency.png`` (matplotlib only when it is installed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from kvmatrix.analysis.experiments.prefix_reuse.rows import MODES, engine_title
from kvmatrix.runners.results import atomic_target


def write_figures(groups: list[dict], fig_dir: Path) -> list[Path]:
    """Mean TTFT and p95 end to end vs concurrency at 100% reuse, off vs on, per engine and prefix regime
    (PNG, pyplot); none when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("kvmatrix: matplotlib is not installed; figures skipped (pip install kvmatrix[analysis])",
              file=sys.stderr)
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    engines = sorted({g["engine"] for g in groups})
    regimes = sorted({g["prefix_len_tokens"] for g in groups})
    written = []
    for metric, label, name in (("mean_ttft_s", "mean TTFT (ms)", "prefix_ttft_vs_concurrency"),
                                ("p95_e2e_s", "p95 end-to-end (ms)", "prefix_p95_e2e_vs_concurrency")):
        fig, axes = plt.subplots(len(engines), len(regimes), figsize=(4.2 * len(regimes), 3.2 * len(engines)),
                                 squeeze=False)
        for i, e in enumerate(engines):
            for j, n in enumerate(regimes):
                ax = axes[i][j]
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
                ax.legend(title="prefix cache", fontsize=8)
        fig.suptitle(f"{label} vs concurrency, 100% prefix reuse", fontsize=10)
        fig.tight_layout()
        path = fig_dir / f"{name}.png"
        with atomic_target(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
