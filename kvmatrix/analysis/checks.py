"""What every report checks in every ok cell, whatever the experiment: outlier trials (Tukey fences),
the device state (NVML samples, clock drops, keep-warm), unverified trials, and the failed cells."""

from __future__ import annotations

from dataclasses import dataclass

from kvmatrix.analysis import roofline, stats
from kvmatrix.analysis.experiments.invalidation.sections import MARK
from kvmatrix.analysis.fmt import finite, ms, na, span, table
from kvmatrix.analysis.labels import cell_key
from kvmatrix.analysis.load import as_doc, as_docs
from kvmatrix.analysis.stats import tukey
from kvmatrix.analysis.trials import CONDITION_NAMES, unverified_trials, verified_count
from kvmatrix.runners.document import CellDoc, KeepWarm, measured

# ---------------------------------------------------------------- outliers


@dataclass(frozen=True)
class Outlier:
    cell_id: str
    condition: str
    trial: int | None
    value: float
    low: float
    high: float


def outliers(cells, metric: str = "ttft_ms") -> list[Outlier]:
    """Measured trials beyond the Tukey fences of their block (kept in every statistic)."""
    out = []
    for c in as_docs(cells):
        if not c.ok:
            continue
        for cond, trials in c.trial_blocks():
            ms_ = measured(trials)
            fences = tukey([t.get(metric) for t in ms_])
            if fences is None:
                continue
            for i in fences.flagged:
                out.append(Outlier(str(c.cell_id), CONDITION_NAMES.get(cond, cond), ms_[i].get("trial"),
                                   float(ms_[i][metric]), fences.low, fences.high))
    return out


# ---------------------------------------------------------------- device state (NVML)

DEVICE_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c")
CLOCK_DROP = 0.9  # a timed request below 90 % of the cell's highest SM clock counts as throttled


@dataclass
class DeviceState:
    cell_id: str
    timed: list[tuple[str, int | None, dict]]  # (condition, trial, sample) per timed request
    settle: list[dict]
    keep_warm: KeepWarm | None = None  # the cell's keep_warm{requested, active, ...} when recorded

    def _vals(self, key: str, samples=None) -> list[float]:
        samples = samples if samples is not None else [s for _, _, s in self.timed] + self.settle
        return [v for s in samples if (v := finite(s.get(key))) is not None]

    @property
    def has_data(self) -> bool:
        return bool(self._vals("sm_clock_mhz") or self._vals("power_w") or self._vals("temp_c"))

    def range(self, key: str) -> tuple[float, float] | None:
        """(min, max) over the timed and the settle samples."""
        vals = self._vals(key)
        return (min(vals), max(vals)) if vals else None

    def settle_range(self, key: str) -> tuple[float, float] | None:
        """(min, max) over the settle samples only."""
        vals = self._vals(key, self.settle)
        return (min(vals), max(vals)) if vals else None

    @property
    def drops(self) -> list[tuple[str, int | None, float, float]]:
        """(condition, trial, SM clock, fraction of the cell's max) of throttled timed requests."""
        rng = self.range("sm_clock_mhz")
        if rng is None or rng[1] <= 0:
            return []
        out = []
        for cond, trial, s in self.timed:
            sm = finite(s.get("sm_clock_mhz"))
            if sm is not None and sm < CLOCK_DROP * rng[1]:
                out.append((cond, trial, sm, sm / rng[1]))
        return out


def _samples(v) -> list[dict]:
    if isinstance(v, dict):
        v = v.get("samples", [v])
    return [s for s in v or [] if isinstance(s, dict)]


def device_state(cell: CellDoc | dict) -> DeviceState:
    """NVML samples of a cell: ``device`` of each trial, ``device_settle`` of the cell and its trials."""
    cell = as_doc(cell)
    timed, settle = [], _samples(cell.device_settle)
    for cond, trials in cell.trial_blocks():
        for t in trials:
            if isinstance(t.get("device"), dict):
                timed.append((CONDITION_NAMES.get(cond, cond), t.get("trial"), t["device"]))
            settle.extend(_samples(t.get("device_settle")))
    return DeviceState(str(cell.cell_id), timed, settle, cell.keep_warm)


def keep_warm_text(kw: KeepWarm | None) -> str:
    """Keep-warm of one cell: off, active (how much device work), or requested but inactive (why)."""
    if kw is None or not kw.requested:
        return "off"
    if kw.active:
        return f"active: {kw.get('settles', '?')} settles, {kw.get('busy_s', '?')} s busy"
    return f"requested, inactive: {kw.reason or 'no reason recorded'}"


def _keep_warm_note(states) -> str:
    """For a run without NVML data: what keep-warm did where it was requested."""
    texts = sorted({keep_warm_text(s.keep_warm) for s in states if s.keep_warm is not None and s.keep_warm.requested})
    return (" Keep-warm: " + "; ".join(texts) + ".") if texts else ""


# ---------------------------------------------------------------- the sections


def sections(ev, figures) -> list[str]:
    return [_outlier_section(ev.cells), _device_section(ev.cells), _unverified_section(ev.cells),
            _failed_section(ev.cells)]


def _outlier_section(cells: list[CellDoc]) -> str:
    found = outliers(cells)
    head = "## Outlier trials\n\n"
    if not found:
        return head + f"None: no measured TTFT beyond the Tukey fences ({stats.TUKEY_K} IQR) of its condition."
    rows = [{"cell": o.cell_id, "condition": o.condition, "trial": na(o.trial), "TTFT (ms)": ms(o.value),
             "fences (ms)": f"[{o.low:.1f}, {o.high:.1f}]"} for o in found]
    return head + (f"Measured trials whose TTFT lies beyond the Tukey fences ({stats.TUKEY_K} IQR) of their "
                   "condition. They are flagged here and kept in every statistic above.\n\n") + table(rows)


def _device_section(cells: list[CellDoc]) -> str:
    head = "## Device state (NVML)\n\n"
    states = [device_state(c) for c in sorted(cells, key=cell_key) if c.ok]
    kw = _keep_warm_note(states)
    if not states or not any(s.has_data for s in states):
        gpu = [c for c in cells if c.ok and roofline.runs_on_gpu(c)]
        if gpu:
            return head + (f"No NVML samples recorded, although {len(gpu)} ok cell(s) ran on a GPU "
                           "(trial field `device`, cell field `device_settle`)." + kw)
        return head + "No NVML data (CPU run): no cell recorded device samples." + kw
    rows, drops = [], []
    for s in states:
        if not s.has_data:
            gpu = roofline.runs_on_gpu(next(c for c in cells if str(c.cell_id) == s.cell_id))
            rows.append({"cell": s.cell_id, "SM clock min–max (MHz)":
                         "no NVML samples recorded" if gpu else "no NVML data (CPU run)"})
            continue
        sm, mem, pw, tc = (s.range(k) for k in DEVICE_KEYS)
        rows.append({
            "cell": s.cell_id, "SM clock min–max (MHz)": span(sm),
            "SM clock in settles min–max (MHz)": span(s.settle_range("sm_clock_mhz")),
            "Memory clock min–max (MHz)": span(mem),
            "Power max (W)": ms(pw and pw[1]), "Temperature max (°C)": ms(tc and tc[1], 0),
            "Timed samples": str(len(s.timed)), "Settle samples": str(len(s.settle)),
            "Timed requests below 90% of max SM clock": str(len(s.drops)),
            "Keep-warm": keep_warm_text(s.keep_warm),
        })
        drops += [{"cell": s.cell_id, "condition": cond, "trial": na(trial), "SM clock (MHz)": f"{sm_:.0f}",
                   "of cell max": f"{frac * 100:.0f}%"} for cond, trial, sm_, frac in s.drops]
    text = head + ("SM clock in settles: the NVML sample at the end of each settle pause, right before the "
                   "timed request (with keep-warm the pause is spent in device work, `--keep-warm`).\n\n") + table(rows)
    if drops:
        text += (f"\n\nClock drops: timed requests whose SM clock was below {CLOCK_DROP:.0%} of the highest SM "
                 "clock seen in the cell (timed and settle samples); their TTFT may be inflated.\n\n" + table(drops))
    else:
        text += f"\n\nNo timed request ran below {CLOCK_DROP:.0%} of its cell's highest SM clock."
    return text


def _unverified_section(cells: list[CellDoc]) -> str:
    found = [u for c in cells if c.ok for u in unverified_trials(c)]
    counts = [verified_count(c) for c in cells if c.ok]
    v, n = sum(a for a, _ in counts), sum(b for _, b in counts)
    head = f"## Unverified trials\n\nVerified measured trials over all ok cells: {v}/{n}.\n\n"
    if not found:
        return head + "None unverified: every measured trial's cached-token count matched the expectation."
    rows = [{
        "cell": u.cell_id, "condition": u.condition.replace("cache_", ""), "trial": u.trial,
        "cached tokens": "not reported" if u.cached_tokens is None else u.cached_tokens,
        "expected cached": u.expected_cached_tokens, "granularity": u.cache_granularity,
    } for u in found]
    return head + ("Measured trials whose engine-reported cached tokens did not check out. "
                   "They are included in the statistics above (rows marked " + MARK + ").\n\n") + table(rows)


def _failed_section(cells: list[CellDoc]) -> str:
    failed = [c for c in cells if not c.ok]
    head = "## Failed cells\n\n"
    if not failed:
        return head + "None."
    rows = [{"cell": c.cell_id, "status": c.status, "error": c.error or "(no message)"}
            for c in sorted(failed, key=cell_key)]
    return head + table(rows)
