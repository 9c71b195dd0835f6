"""The slot_eviction experiment (llama-server with N slots sharing one n_ctx): ``SlotRow`` per slot count
(per-slot context read back, what fits, the six conditions and their refusals), the report section and fig6."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.figure import FigureResult, FigureSpec, embed
from kvmatrix.analysis.fmt import NA, finite, med_ci, ms, na, table, unknown, wrap, yes_no
from kvmatrix.analysis.labels import config_key, series_names
from kvmatrix.analysis.load import ok_cells
from kvmatrix.analysis.stats import Summary, summarize
from kvmatrix.analysis.trials import median, order_lines
from kvmatrix.runners.document import CellDoc, SlotEviction, measured

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence

NAME = "slot_eviction"

#: slot_eviction's conditions in run order, with the words the report and figure use
SLOT_CONDITIONS = {
    "cache_hit": "[A,B] → [A,B,Q] on slot 0",
    "cache_miss": "[A,B] → [B,Q] on slot 0",
    "other_slot": "[A,B] on slot 0 → [A,B,Q] on slot 1",
    "server_hit": "[A,B] → [A,B,Q], server's slots",
    "server_miss": "[A,B] → [B,Q], server's slots",
    "alternate": "[A,B], [A',B'] → [A,B,Q], server's slots",
}


@dataclass
class SlotCondition:
    """One condition of a slot_eviction cell: its measured trials and refusals."""

    name: str
    trials: list[dict]  # measured
    refused: list[dict]  # refusals of measured trials (warm-up trials excluded)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def summary(self, metric: str = "ttft_ms") -> Summary:
        if metric not in self._memo:
            self._memo[metric] = summarize([t.get(metric) for t in self.trials])
        return self._memo[metric]

    def median(self, key: str) -> float | None:
        return median([v for t in self.trials if (v := finite(t.get(key))) is not None])

    @property
    def verified(self) -> tuple[int, int]:
        return sum(1 for t in self.trials if t.get("cache_verified")), len(self.trials)

    @property
    def cached_share(self) -> float | None:
        """Median of the engine's cache_n / prompt tokens of the timed query, 0..1."""
        return median([c / t["prompt_tokens"] for t in self.trials
                       if isinstance(c := t.get("cached_tokens"), int) and (t.get("prompt_tokens") or 0) > 0])

    def slots(self, key: str = "id_slot") -> list[int]:
        """The slots that served the condition's requests (``id_slot``, ``warmup_id_slot``, ``rewarm_id_slot``)."""
        return sorted({t[key] for t in self.trials if isinstance(t.get(key), int)})


@dataclass
class SlotRow:
    """One ok slot_eviction cell: one slot count at one total context."""

    cell_id: str
    series: str
    a: int | None
    b: int | None
    n_parallel: int | None
    slot_ctx: int | None  # per-slot context as the engine reports it (/slots, else /props)
    n_ctx_total: int | None
    kv_unified: bool | None
    prompts: dict[str, int]  # "[A,B]", "[A,B,Q]", "[B,Q]", "[A',B']" -> engine-tokenized length
    fits: dict[str, bool]
    conditions: dict[str, SlotCondition]
    cell: CellDoc = field(default_factory=CellDoc, repr=False)

    @property
    def config(self) -> str:
        return f"{unknown(self.a)}/{unknown(self.b)}"

    @property
    def verified(self) -> tuple[int, int]:
        pairs = [c.verified for c in self.conditions.values()]
        return sum(v for v, _ in pairs), sum(n for _, n in pairs)

    @property
    def refused(self) -> int:
        return sum(len(c.refused) for c in self.conditions.values())


def build(cells) -> list[SlotRow]:
    """Rows of the ok slot_eviction cells, by series, config, then slot count."""
    ok = ok_cells(cells, NAME)
    names = series_names(ok, ("phase", "model", "settings", "run"))
    out = []
    for c, name in zip(ok, names, strict=True):
        se = c.slot_eviction or SlotEviction()
        eff, req = c.runtime.effective, c.runtime.requested
        slot_ctx = [v for v in se.slot_ctx if isinstance(v, int)]
        refused = [r for r in se.refused if isinstance(r, dict) and not r.get("warmup")]
        conds = {k: SlotCondition(k, measured(c.trials(k)), [r for r in refused if r.get("condition") == k])
                 for k in SLOT_CONDITIONS if k in c or any(r.get("condition") == k for r in refused)}
        out.append(SlotRow(
            cell_id=str(c.cell_id), series=name, a=c.config.context_size_a, b=c.config.context_size_b,
            n_parallel=se.n_parallel or eff.get("n_parallel") or req.get("n_parallel"),
            slot_ctx=min(slot_ctx) if slot_ctx else eff.get("n_ctx_per_slot"),
            n_ctx_total=eff.get("n_ctx") or req.get("n_ctx"), kv_unified=eff.get("kv_unified"),
            prompts=dict(se.prompts), fits=dict(se.fits), conditions=conds, cell=c,
        ))
    out.sort(key=lambda r: (r.series, config_key(r.a, r.b), r.n_parallel or 0))
    return out


# ---------------------------------------------------------------- report section


def _cached(c) -> str:
    """"cached / prompt" medians of the timed query (the engine's cache_n)."""
    if c is None or not c.trials:
        return NA
    return f"{ms(c.median('cached_tokens'), 0)} / {ms(c.median('prompt_tokens'), 0)}"


def refusal_text(c) -> str:
    """Why a condition's trials were refused: the prompt, its tokens and the slot's context."""
    if c is None or not c.refused:
        return ""
    r = c.refused[0]
    what = f"{r.get('prompt') or 'a prompt'}, {na(r.get('prompt_tokens'))} tok ≥ slot {na(r.get('n_ctx'))}"
    return f"refused {len(c.refused)}× ({what})"


def _ttft_or_refused(c) -> str:
    """Median TTFT with its CI; the refusals when none (or not all) of the trials could run."""
    if c is None:
        return NA
    if not c.trials:
        return refusal_text(c) or NA
    return med_ci(c.summary()) + (f"; {refusal_text(c)}" if c.refused else "")


def _main_row(r: SlotRow) -> dict:
    hit, miss = r.conditions.get("cache_hit"), r.conditions.get("cache_miss")
    v, n = r.verified
    return {
        "Backend": r.series, "A/B (tok)": r.config, "N slots": na(r.n_parallel),
        "Per-slot ctx (tok)": na(r.slot_ctx), "[A,B,Q] (tok)": na(r.prompts.get("[A,B,Q]")),
        "[A,B,Q] fits": yes_no(r.fits.get("[A,B,Q]")),
        "Hit TTFT (ms) median [95% CI]": _ttft_or_refused(hit), "Miss TTFT (ms) median [95% CI]": _ttft_or_refused(miss),
        "cache_n / prompt hit": _cached(hit), "cache_n / prompt miss": _cached(miss),
        "Verified": f"{v}/{n}", "Refused trials": str(r.refused),
    }


def _condition_rows(rows: list[SlotRow]) -> list[dict]:
    out = []
    for r in rows:
        for name, c in r.conditions.items():
            v, n = c.verified
            slots = "refused" if not c.trials else (
                f"{_slots(c.slots('warmup_id_slot'))} → {_slots(c.slots('id_slot'))}")
            out.append({
                "Backend": r.series, "A/B (tok)": r.config, "N": na(r.n_parallel), "Condition": name,
                "Slots warm-up → query": slots, "n": str(c.summary().n),
                "TTFT (ms) median [95% CI]": _ttft_or_refused(c),
                "cache_n / prompt": _cached(c), "Expected cached": ms(c.median("expected_cached_tokens"), 0),
                "Verified": f"{v}/{n}",
                "Re-warm [A,B] (ms) median": ms(c.summary("rewarm_time_ms").median),
                "Re-warm cache_n": ms(c.median("rewarm_cached_tokens"), 0),
            })
    return out


def _slots(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) if ids else NA


def sections(ev: Evidence, figures: list[FigureResult]) -> list[str]:
    head = "## Slot eviction: llama-server with N slots at one total context\n\n"
    if not ev.slots:
        return ["\n\n".join([head + "No ok slot_eviction cells.", *embed(figures, NAME)])]
    rows = ev.slots
    conditions = (rows[0].cell.slot_eviction or SlotEviction()).conditions
    unified = sorted({r.kv_unified for r in rows if r.kv_unified is not None})
    notes = [
        "The total context n_ctx is the same in every cell; llama-server splits it across its N slots "
        + ("(non-unified KV cache: each slot gets n_ctx / N, rounded up to a multiple of 256 by current builds). "
           if unified == [False] else "(as its start-up log reports `kv_unified`; see Settings parity). ")
        + "Per-slot ctx is read back from the engine (`/slots` `n_ctx`). A prompt fits when it is shorter than "
        "its slot's context; llama-server refuses a longer one (HTTP 400 `exceed_context_size_error`) and the "
        "trial is counted under Refused instead of being timed. cache_n / prompt: medians of the engine's "
        "`timings.cache_n` and the prompt tokens of the timed query; Verified: measured trials whose cache_n "
        "matched the expectation computed per slot from what each slot held.",
        "Conditions (interleaved round by round):\n\n" + "\n".join(
            f"- `{k}` ({SLOT_CONDITIONS.get(k, k)}): {v}" for k, v in conditions.items()),
        "Re-warm: the [A,B] request right after the timed query — what getting the prefix back costs after that "
        "query; after a miss on the only slot it recomputes [A,B] (the \"miss warm-up\"), with N ≥ 2 and the "
        "server routing, the miss went to another slot and [A,B] is still cached.",
    ]
    return ["\n\n".join([
        head + order_lines([r.cell for r in rows]),
        table([_main_row(r) for r in rows]),
        *notes,
        "### Every condition\n\n" + table(_condition_rows(rows)),
        *embed(figures, NAME),
    ])]


# ---------------------------------------------------------------- fig6


def fig6_slot_eviction(ev: Evidence) -> Figure | str:
    """Per condition and slot count: TTFT of the timed query, the share of it served from the cache
    (engine cache_n), and the re-warm of [A,B] after it; refused conditions marked. One column per
    backend / config / total context, the three metrics stacked."""
    if not ev.slots:
        return "no ok slot_eviction cell"
    groups = list(dict.fromkeys((r.series, r.config, r.n_ctx_total) for r in ev.slots))
    counts = sorted({r.n_parallel for r in ev.slots if r.n_parallel is not None})
    colors = {n: f"C{i % 10}" for i, n in enumerate(counts)}
    conds = list(SLOT_CONDITIONS)
    fig, columns = plot.grid(len(groups), 11.5, 3.6, per_panel=3, max_cols=1)
    w = 0.8 / max(1, len(counts))
    panels = [("ttft_ms", "Timed query TTFT,\nmedian (ms)", f"(a) Time to first token of the timed query; {plot.CI_NOTE}"),
              ("share", "Query prompt served\nfrom cache (%)",
               "(b) Share of the timed query's prompt the engine reused: median cache_n / prompt tokens"),
              ("rewarm_time_ms", "Re-warm [A,B],\nmedian (ms)",
               f"(c) Getting [A,B] back: the warm-up request right after the query; {plot.CI_NOTE}")]
    for axes, (series, config, total) in zip(columns, groups, strict=True):
        rows = sorted((r for r in ev.slots if (r.series, r.config, r.n_ctx_total) == (series, config, total)),
                      key=lambda r: r.n_parallel or 0)
        for ax, (metric, ylabel, title) in zip(axes, panels, strict=True):
            _slot_panel(ax, rows, conds, counts, colors, w, metric)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-0.6, len(conds) - 0.4)
            ax.grid(axis="y", alpha=0.3)
        for ax in axes[:-1]:
            ax.sharex(axes[-1])
            ax.tick_params(labelbottom=False)
        axes[-1].set_xticks(range(len(conds)), [f"{c}\n{wrap(SLOT_CONDITIONS[c], 18)}" for c in conds], fontsize=8)
        axes[-1].set_xlabel("Condition: warm-up → timed query (pinned slots, or the server's choice; "
                            "[A',B'] = another client's prefix)")
        handles = [Patch(facecolor=colors[r.n_parallel], edgecolor="black",
                         label=f"N = {r.n_parallel} slot{'s' if r.n_parallel != 1 else ''}: {unknown(r.slot_ctx)} "
                               f"tok/slot" + ("" if r.fits.get("[A,B,Q]", True)
                                              else f", [A,B,Q] ({r.prompts.get('[A,B,Q]')} tok) does not fit"))
                   for r in rows if r.n_parallel in colors]
        plot.legend(fig, handles, title=f"{series}, A/B = {config}, n_ctx = {unknown(total)}", ax=axes[0])
    plot.finish(fig, "Slot eviction: llama-server with N slots sharing one total context", title_size=12)
    return fig


def _slot_panel(ax, rows, conds: list[str], counts: list[int], colors: dict, w: float, metric: str) -> None:
    """Bars per (condition, slot count); a condition whose trials were all refused gets a red 'refused'."""
    bars = []  # (position, summary or share, colour)
    for r in rows:
        k = counts.index(r.n_parallel) if r.n_parallel in counts else 0
        for x, name in enumerate(conds):
            pos = x - 0.4 + w * (k + 0.5)
            c = r.conditions.get(name)
            if c is None or not c.trials:
                refused = c is not None and bool(c.refused)
                ax.text(pos, 0.02, "refused" if refused else "n/a", transform=ax.get_xaxis_transform(),
                        rotation=90, ha="center", va="bottom", fontsize=7, color="C3" if refused else "grey")
                continue
            value = c.cached_share if metric == "share" else c.summary(metric)
            if value is not None and (metric == "share" or value.median is not None):
                bars.append((pos, value, colors[r.n_parallel]))
    if metric == "share":
        for pos, v, color in bars:
            ax.bar(pos, 100 * v, w, color=color, edgecolor="black", linewidth=0.5)
        ax.set_ylim(0, 105)
        return
    log = plot.is_log([st.median for _, st, _ in bars])
    for pos, st, color in bars:
        ax.bar(pos, st.median, w, yerr=plot.err(st, log), capsize=2, color=color, edgecolor="black", linewidth=0.5)
    plot.limits(ax, [plot.top(st) for _, st, _ in bars], log, room=1.15, lows=[st.median for _, st, _ in bars])


# ---------------------------------------------------------------- registry, CLI


FIGURES = (
    FigureSpec("fig6_slot_eviction", "Slot eviction: N slots sharing one context", NAME, fig6_slot_eviction,
               "Per condition and slot count: TTFT of the timed query, the share of its prompt the engine served "
               "from the cache, and the time to get [A,B] back right after it; refused = the prompt does not fit a "
               "slot."),
)
