"""Report figures: PNG files at 150 dpi, drawn off-screen (no display needed).

``make_figures(rows, folder)`` draws every figure it has data for and says
why it skipped the others; the report embeds the former and quotes the latter.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from matplotlib.colors import to_rgb
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
from matplotlib.patches import Patch

from kvmatrix.analysis.summary import Row, config_key, stat

DPI = 150
LOG_RATIO = 30  # switch the TTFT axis to log scale when max/min exceeds this
CONDITIONS = (("hit", "cache hit"), ("miss", "cache miss"))


@dataclass
class FigureResult:
    """One figure: written to ``path``, or skipped with ``note`` saying why."""

    name: str
    title: str
    path: Path | None = None
    note: str = ""


def make_figures(rows: list[Row], folder: Path) -> list[FigureResult]:
    """Draw all figures into ``folder``; one result per figure, drawn or skipped."""
    folder = Path(folder)
    return [
        _draw("ttft_hit_vs_miss.png", "Median TTFT, cache hit vs cache miss", ttft_hit_vs_miss, rows, folder),
        _draw("three_panel.png", "TTFT breakdown, throughput and warm-up", three_panel, rows, folder),
    ]


def _draw(name: str, title: str, fn, rows: list[Row], folder: Path) -> FigureResult:
    fig_or_note = fn(rows)
    if isinstance(fig_or_note, str):
        (folder / name).unlink(missing_ok=True)  # no stale figure from an earlier report
        return FigureResult(name, title, note=fig_or_note)
    return FigureResult(name, title, path=save(fig_or_note, folder / name))


def save(fig: Figure, path: Path) -> Path:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _tint(color, amount: float = 0.55):
    """The colour mixed with white (lighter shade for the cache-hit bar)."""
    return tuple(c + (1 - c) * amount for c in to_rgb(color))


def _has_ttft(r: Row) -> bool:
    return stat(r.hit, "ttft_ms") is not None or stat(r.miss, "ttft_ms") is not None


def _yerr(median: float | None, sd: float | None, log: bool) -> list[list[float]]:
    """Asymmetric error bar; on a log axis the lower arm stays above zero."""
    if median is None or sd is None:
        return [[0.0], [0.0]]
    lower = min(sd, 0.9 * median) if log else sd
    return [[lower], [sd]]


def ttft_hit_vs_miss(rows: list[Row]) -> Figure | str:
    """Grouped bars: x = config, per backend a hit and a miss bar (median, ±stdev)."""
    rows = [r for r in rows if _has_ttft(r)]
    if not rows:
        return "no ok cell has streaming TTFT data"
    configs = sorted({(r.a, r.b) for r in rows}, key=lambda ab: config_key(*ab))
    series = list(dict.fromkeys(r.name for r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(series)}
    by_key = {(r.name, (r.a, r.b)): r for r in rows}
    medians = [v for r in rows for v in (stat(r.hit, "ttft_ms"), stat(r.miss, "ttft_ms")) if v]
    log = bool(medians) and max(medians) / min(medians) > LOG_RATIO

    fig = Figure(figsize=(max(7.0, 1.2 + len(configs) * len(series) * 0.9), 4.8))
    ax = fig.subplots()
    width = 0.8 / (2 * len(series))
    for s, name in enumerate(series):
        for k, (cond, _) in enumerate(CONDITIONS):
            for x, cfg in enumerate(configs):
                pos = x - 0.4 + width * (2 * s + k + 0.5)
                _ttft_bar(ax, pos, width, by_key.get((name, cfg)), cond, colors[name], log, len(series) > 2)
    ax.set_xticks(range(len(configs)), [f"A/B = {_ab(a)}/{_ab(b)}" for a, b in configs])
    ax.set_xlabel("Config: context A / context B size (tokens)")
    ax.set_ylabel("Median streaming TTFT (ms)" + (", log scale" if log else ""))
    _headroom(ax, rows, log)
    ax.set_title(
        "Time to first token: cache hit vs cache miss\nbars = median, error bars = ±1 stdev, "
        "label = TTFT degradation of the miss, n/a = no data",
        fontsize=10,
    )
    handles = [
        Patch(facecolor=_tint(c) if cond == "hit" else c, edgecolor=c, label=f"{name}: {label}")
        for name, c in colors.items()
        for cond, label in CONDITIONS
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _ttft_bar(ax, pos: float, width: float, r: Row | None, cond: str, color, log: bool, rotate: bool) -> None:
    """One median TTFT bar with its stdev; the miss bar carries the degradation label."""
    stats = getattr(r, cond) if r else {}
    med, sd = stat(stats, "ttft_ms"), stat(stats, "ttft_ms", "stdev")
    if med is None:
        ax.text(pos, 0.02, "n/a", transform=ax.get_xaxis_transform(), rotation=90,
                ha="center", va="bottom", fontsize=7, color="grey")
        return
    ax.bar(pos, med, width, yerr=_yerr(med, sd, log), capsize=3,
           color=_tint(color) if cond == "hit" else color, edgecolor=color, linewidth=0.8)
    if cond == "miss" and r.degradation_pct is not None:
        ax.annotate(f"{r.degradation_pct:+.0f}%", (pos, med + (sd or 0)), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, rotation=90 if rotate else 0)


def _headroom(ax, rows: list[Row], log: bool) -> None:
    """Y limits leaving room above the tallest error bar for its label."""
    tallest = max((stat(st, "ttft_ms") or 0) + (stat(st, "ttft_ms", "stdev") or 0)
                  for r in rows for st in (r.hit, r.miss))
    if log:
        ax.set_yscale("log")
        ax.set_ylim(top=tallest * 4)
    else:
        ax.set_ylim(0, tallest * 1.2)


def _ab(v) -> str:
    return "?" if v is None else str(v)


def computation_ms(stats: dict) -> tuple[float | None, str]:
    """Prompt computation time: engine prompt time when reported, else non-streaming TTFT."""
    eng = stat(stats, "engine_prompt_ms")
    if eng is not None:
        return eng, "engine"
    return stat(stats, "ttft_non_streaming_ms"), "non-streaming"


def ttft_split(stats: dict) -> tuple[float, float] | None:
    """(computation, overhead) in ms; overhead = max(0, TTFT median - computation)."""
    ttft = stat(stats, "ttft_ms")
    comp, _ = computation_ms(stats)
    if ttft is None and comp is None:
        return None
    comp = comp if comp is not None else ttft
    return comp, max(0.0, (ttft if ttft is not None else comp) - comp)


def three_panel(rows: list[Row]) -> Figure | str:
    """(1) TTFT = computation + overhead, (2) throughput, (3) warm-up; bars per
    backend x config, hit plain and miss hatched."""
    rows = [r for r in rows if ttft_split(r.hit) or ttft_split(r.miss)]
    if not rows:
        return "no ok cell has TTFT or prompt-time data"
    xs = positions(rows)
    fig = Figure(figsize=(max(8.0, 2.5 + 0.9 * xs[-1]), 11.0))
    axes = fig.subplots(3, 1, sharex=True)
    _panel_split(axes[0], rows, xs)
    _panel_metric(axes[1], rows, xs, "throughput", "Throughput (tokens/s)", "C2",
                  f"(2) Generation throughput of the {_tokens(rows)}-token run (median ± stdev)")
    _panel_metric(axes[2], rows, xs, "warmup_time_ms", "Warm-up time (ms)", "C4",
                  "(3) Warm-up request time per trial (median ± stdev)")
    for ax in axes:
        _separate_series(ax, rows, xs)
    axes[2].set_xticks(xs, [r.config for r in rows], fontsize=8)
    lines = _label_series(axes[2], rows, xs)
    axes[2].set_xlabel("Config A/B (tokens), grouped by phase and backend", labelpad=20 + 13 * lines)
    fig.suptitle("Where the time goes: TTFT breakdown, throughput and warm-up", fontsize=12)
    fig.tight_layout()
    return fig


def positions(rows: list[Row]) -> list[float]:
    """x of each row; a gap of half a slot between backends."""
    xs, x = [], 0.0
    for i, r in enumerate(rows):
        if i and r.name != rows[i - 1].name:
            x += 0.5
        xs.append(x)
        x += 1.0
    return xs


def _groups(rows: list[Row], xs: list[float]) -> list[tuple[str, float, float, int]]:
    """(series name, first x, last x, count) for each run of rows of one series."""
    out = []
    for r, x in zip(rows, xs, strict=True):
        if out and out[-1][0] == r.name:
            name, x0, _, n = out[-1]
            out[-1] = (name, x0, x, n + 1)
        else:
            out.append((r.name, x, x, 1))
    return out


def _separate_series(ax, rows: list[Row], xs: list[float]) -> None:
    for _, _, last, _ in _groups(rows, xs)[:-1]:
        ax.axvline(last + 0.75, color="grey", linewidth=0.6, linestyle=":")


def _label_series(ax, rows: list[Row], xs: list[float]) -> int:
    """Backend names centred under their group of config ticks; returns the most lines used."""
    most = 1
    for name, first, last, n in _groups(rows, xs):
        text = wrap(name, max(22, 16 * n))
        most = max(most, text.count("\n") + 1)
        ax.text((first + last) / 2, -0.13, text, fontsize=9,
                ha="center", va="top", transform=ax.get_xaxis_transform())
    return most


def wrap(name: str, width: int) -> str:
    """Wrap a label at spaces and after slashes, never inside a word."""
    text = textwrap.fill(name.replace("/", "/ "), width, break_long_words=False)
    return text.replace("/ ", "/")


def _tokens(rows: list[Row]) -> str:
    n = {r.max_output_tokens for r in rows}
    return str(n.pop()) if len(n) == 1 and None not in n else "N"


HALF = 0.38  # bar width; hit at x - HALF/2, miss at x + HALF/2


def _offsets(x: float) -> dict[str, float]:
    return {"hit": x - HALF / 2, "miss": x + HALF / 2}


def _panel_split(ax, rows: list[Row], xs: list[float]) -> None:
    splits = [
        (pos, cond, split)
        for x, r in zip(xs, rows, strict=True)
        for cond, pos in _offsets(x).items()
        if (split := ttft_split(getattr(r, cond))) is not None
    ]
    tops = [c + o for _, _, (c, o) in splits if c + o > 0]
    log = bool(tops) and max(tops) / min(tops) > LOG_RATIO
    for pos, cond, (comp, over) in splits:
        hatch = "//" if cond == "miss" else None
        ax.bar(pos, comp, HALF, color="C0", hatch=hatch, edgecolor="black", linewidth=0.5)
        ax.bar(pos, over, HALF, bottom=comp, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
    if log:  # bars start at 0: keep the smallest segment above the axis floor
        ax.set_yscale("log")
        floor = min(v for _, _, split in splits for v in split if v > 0)
        ax.set_ylim(floor / 2, max(tops) * 1.5)
    ax.set_ylabel("TTFT (ms" + (", log scale)" if log else ")"))
    note = "; log scale: read boundaries on the axis, segment heights are not to scale" if log else ""
    ax.set_title(f"(1) Streaming TTFT split into computation and overhead (medians{note})", fontsize=10)
    ax.legend(handles=[
        Patch(facecolor="C0", edgecolor="black", label="computation (engine prompt time,\nelse non-streaming TTFT)"),
        Patch(facecolor="C1", edgecolor="black", label="overhead (TTFT − computation)"),
        *_condition_handles(),
    ], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _condition_handles() -> list[Patch]:
    return [Patch(facecolor="white", edgecolor="black", label="cache hit (plain)"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="cache miss (hatched)")]


def _panel_metric(ax, rows: list[Row], xs: list[float], metric: str, ylabel: str, color: str, title: str) -> None:
    drawn = False
    for x, r in zip(xs, rows, strict=True):
        for cond, pos in _offsets(x).items():
            stats = getattr(r, cond)
            med = stat(stats, metric)
            if med is None:
                continue
            drawn = True
            ax.bar(pos, med, HALF, yerr=stat(stats, metric, "stdev"), capsize=2, color=color,
                   hatch="//" if cond == "miss" else None, edgecolor="black", linewidth=0.5)
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(handles=_condition_handles(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
