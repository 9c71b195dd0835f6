"""Findings generated from the result cells: every sentence carries its number and its CI.

Replaces a hand-written findings file. Built only from what the cells hold (invalidation rows,
the calibration trials, the settings of each cell); a finding whose cells are missing says so.

* the four-phase table: per model and config, hit / miss median TTFT [95% CI] and verified trials
  of phase 1 (vLLM server), 2 (vLLM in-process), 3a (llama-server), 3b (llama-cpp-python), at the
  baseline settings (flash attention off, no host-RAM prompt cache); a column more for each other
  catalogue phase the cells hold (the token-id interfaces 1t, 3t), titles from ``kvmatrix.catalog``;
* server vs in-process per engine: the hit-TTFT difference [CI], next to the harness overhead of
  each path (calibration: harness - reference) and the chat-template + tokenization cost measured on
  the server (chat path - token-id path), so the server's cost is not the harness's;
* what llama-server's host-RAM prompt cache (``--cache-ram``) does to a miss, and what flash
  attention and the batch size change, where the cells hold those axes;
* optional: the earlier H100 findings, each checked against these cells.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmatrix import catalog
from kvmatrix.analysis.experiments import batch_sweep, invalidation
from kvmatrix.analysis.experiments.invalidation import Row
from kvmatrix.analysis.fmt import NA, ci_text, md_table
from kvmatrix.analysis.labels import config_key, phase_title, server_inprocess_pairs, table_phases
from kvmatrix.analysis.load import as_docs
from kvmatrix.analysis.stats import compare, summarize
from kvmatrix.analysis.summary import overhead

#: the llama.cpp interfaces' phases (flash attention is a llama.cpp setting)
LLAMA_PHASES = tuple(dict.fromkeys(i.phase for i in catalog.INTERFACES if i.family == "llama"))
COUNT_WORDS = {4: "four", 5: "five", 6: "six"}


def _model(row: Row) -> str:
    return row.model


def _req(row: Row) -> dict:
    return row.requested


def _baseline(row: Row) -> bool:
    r = _req(row)
    return not r.get("flash_attn") and not r.get("cache_ram_mib")


def diff_text(a: list[float], b: list[float], digits: int = 2) -> tuple[str, float | None]:
    """b - a as a difference of medians with its bootstrap CI."""
    c = compare(a, b)
    if c.diff is None:
        return NA, None
    ci = f" [{c.diff_ci[0]:+.{digits}f}, {c.diff_ci[1]:+.{digits}f}]" if c.diff_ci else ""
    return f"{c.diff:+.{digits}f}{ci} ms", c.diff


def _tag(row: Row) -> str:
    """The engine release / runtime a matrix row ran on (the label after ``@``, e.g. ``docker-vllm_0.27.0``);
    "" for cells of one release. Rows of different tags are never pooled or paired across tags."""
    return row.series.split(" @", 1)[1] if " @" in row.series else ""


def _pair_tag(row: Row) -> str:
    """The tag without its engine family, so a server and an in-process row of one release pair up."""
    return re.sub(r"(^|-)(llama|vllm)_", r"\1", _tag(row))


@dataclass
class Phases:
    model: str
    config: tuple
    rows: dict[str, Row]
    tag: str = ""


def four_phase(rows: list[Row]) -> list[Phases]:
    """Baseline rows by (model, config, tag) -> phase -> row (the first row of a phase when several), for the
    phases of ``labels.table_phases``."""
    phases = table_phases(r.phase for r in rows if _baseline(r))
    table: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        if _baseline(r) and r.phase in phases:  # rows are sorted by series: the plain label comes first
            key = (_model(r), (r.a, r.b), _tag(r))
            table.setdefault(key, {}).setdefault(r.phase, r)
    out = [Phases(m, cfg, ph, tag) for (m, cfg, tag), ph in table.items()]
    out.sort(key=lambda p: (p.model, [-k for k in config_key(*p.config)], p.tag))
    return out


def _verified(row: Row) -> str:
    return f"{row.hit.get('verified_trials', 0)}+{row.miss.get('verified_trials', 0)}/" \
           f"{row.hit.get('n_trials', 0) + row.miss.get('n_trials', 0)}"


def table_columns(table: list[Phases]) -> tuple[str, ...]:
    """The phase columns of the four-phase table: the seeds' four, and any other phase the table holds."""
    return table_phases(p for t in table for p in t.rows)


def four_phase_table(table: list[Phases]) -> list[str]:
    tagged = any(t.tag for t in table)  # a matrix of releases / runtimes: one row per engine release and runtime
    phases = table_columns(table)
    header = ["Model", "A/B", *(["Release (runtime)"] if tagged else []),
              *(f"{p} {phase_title(p)} hit / miss (ms)" for p in phases), "Verified (all phases)"]
    body = []
    for t in table:
        cells, ver, total = [f"`{t.tag}`"] if tagged else [], 0, 0
        for p in phases:
            r = t.rows.get(p)
            if r is None:
                cells.append(NA if t.tag else "not run")  # a tagged row holds one engine family's phases
                continue
            cells.append(f"{ci_text(r.summary('hit'))} / {ci_text(r.summary('miss'))}")
            ver += r.hit.get("verified_trials", 0) + r.miss.get("verified_trials", 0)
            total += r.hit.get("n_trials", 0) + r.miss.get("n_trials", 0)
        body.append([t.model, f"{t.config[0]}/{t.config[1]}", *cells, f"{ver}/{total}"])
    return md_table(header, body).split("\n")


def _calib(rows: list[Row], cond: str, key: str) -> list[float]:
    return [t[key] for r in rows for t in r.trials.get(cond, []) if t.get(key) is not None]


def _overhead(rows: list[Row], cond: str = "hit") -> str:
    s = overhead([t for r in rows for t in r.trials.get(cond, [])])
    return f"{ci_text(s, 2)} ms" if s is not None else "not measured"


def _template(rows: list[Row], cond: str = "hit") -> str:
    d = [t["ttft_ms"] - t["tokenid_ttft_ms"] for r in rows for t in r.trials.get(cond, [])
         if t.get("tokenid_ttft_ms") is not None]
    return f"{ci_text(summarize(d), 2)} ms" if d else "not measured"


def server_vs_inprocess(rows: list[Row]) -> list[str]:
    out = []
    base = [r for r in rows if _baseline(r)]
    for model, tag in sorted({(_model(r), _pair_tag(r)) for r in base}):
        for server, inproc, engine in server_inprocess_pairs():
            s = [r for r in base if _model(r) == model and _pair_tag(r) == tag and r.phase == server]
            b = [r for r in base if _model(r) == model and _pair_tag(r) == tag and r.phase == inproc]
            if not s or not b:
                continue
            hs, hb = _calib(s, "hit", "ttft_ms"), _calib(b, "hit", "ttft_ms")
            text, _ = diff_text(hb, hs)
            where = f" `{tag}`" if tag else ""
            head = (f"- **{model}, {engine}{where}**: a hit through the server ({server}) takes {text} longer than in "
                    f"process ({inproc}), pooled over {len(s)} config{'s' if len(s) != 1 else ''} "
                    f"(medians {summarize(hs).median:.1f} vs {summarize(hb).median:.1f} ms).")
            if _overhead(s) == "not measured" and _overhead(b) == "not measured":
                out.append(head + " These cells carry no calibration control: the difference is NOT separated "
                           "from harness overhead.")
                continue
            inproc_tmpl = _template(b)
            if inproc_tmpl != "not measured":
                inproc_tmpl += " in process"
            elif not any(i.has("token_control") for i in catalog.phases()[inproc]):
                inproc_tmpl = "nothing in process (that path already takes token ids)"
            out.append(
                head + f" Harness overhead (harness − reference client) on a hit: {_overhead(s)} on the server "
                f"path, {_overhead(b)} in process. The chat path minus the same prompt as token ids costs "
                f"{_template(s)} on the server and {inproc_tmpl}: the chat template, tokenization and chat "
                "endpoint, measured, not the harness.")
    return out


def _pick(rows: list[Row], model: str, phase: str, pred) -> list[Row]:
    return [r for r in rows if _model(r) == model and r.phase == phase and pred(_req(r))]


def ram_cache(rows: list[Row]) -> list[str]:
    out = []
    for model in sorted({_model(r) for r in rows}):
        on = _pick(rows, model, "3a", lambda q: q.get("cache_ram_mib"))
        for r in on:
            off = [x for x in _pick(rows, model, "3a", lambda q: not q.get("cache_ram_mib") and not q.get("flash_attn"))
                   if (x.a, x.b) == (r.a, r.b)]
            if not off:
                continue
            m_on, m_off = r.summary("miss"), off[0].summary("miss")
            unv = r.miss.get("n_trials", 0) - r.miss.get("verified_trials", 0)
            cached = [t.get("cached_tokens") for t in r.trials.get("miss", [])]
            cached = sorted(c for c in cached if c is not None)
            out.append(
                f"- **{model}, llama-server {r.config}, --cache-ram {_req(r)['cache_ram_mib']} MiB**: the miss takes "
                f"{ci_text(m_on)} ms against {ci_text(m_off)} ms with the RAM cache off "
                f"({m_on.median / m_off.median:.0f}× slower); the engine reports {cached[len(cached) // 2] if cached else '?'}"
                f" cached tokens (median) on the miss: the prompt is restored from host RAM instead of recomputed "
                f"({unv} of {r.miss.get('n_trials', 0)} misses flagged unverified for that reason). The hit is "
                f"{ci_text(r.summary('hit'))} vs {ci_text(off[0].summary('hit'))} ms.")
    return out


def flash_attention(rows: list[Row]) -> list[str]:
    out = []
    for model in sorted({_model(r) for r in rows}):
        for phase in LLAMA_PHASES:
            for r in _pick(rows, model, phase, lambda q: q.get("flash_attn") and not q.get("cache_ram_mib")):
                off = [x for x in _pick(rows, model, phase, lambda q: not q.get("flash_attn") and not q.get("cache_ram_mib"))
                       if (x.a, x.b) == (r.a, r.b)]
                if not off:
                    continue
                dm, _ = diff_text(off[0].values("miss"), r.values("miss"))
                dh, _ = diff_text(off[0].values("hit"), r.values("hit"))
                out.append(f"- **{model}, {phase} {phase_title(phase)} {r.config}**: flash attention on changes the miss "
                           f"by {dm} ({ci_text(off[0].summary('miss'))} → {ci_text(r.summary('miss'))} ms) and the "
                           f"hit by {dh}.")
    return out


def batch_size(points: list[batch_sweep.SweepPoint]) -> list[str]:
    if not points:
        return ["- Not measured in these cells (no batch_sweep cells)."]
    out = []
    by: dict[str, list] = {}
    for p in points:
        model = p.cell.model.name or "?"
        by.setdefault(f"{model}, {p.cell.phase} {p.series}", []).append(p)
    for name, ps in sorted(by.items()):
        ps = sorted(ps, key=lambda p: p.n_batch)
        text = ", ".join(f"n_batch {p.n_batch}: {ci_text(p.summary)} ms" for p in ps)
        out.append(f"- **{name}** miss TTFT: {text}.")
    return out


def other_gpu(cells) -> bool:
    """Whether the cells ran on a GPU other than the H100 (the H100 claims are then checked)."""
    gpus = {str((c.provenance.gpu or {}).get("name")) for c in cells if c.provenance.gpu}
    return bool(gpus) and not all("H100" in g for g in gpus)


def sections(ev, figures) -> list[str]:
    return [_section(ev.rows, ev.sweep, other_gpu(ev.cells))]


def section(cells, h100: bool = False) -> str:
    """The findings section ("" without ok invalidation cells); ``h100``: check the H100 claims too."""
    cells = as_docs(cells)
    return _section(invalidation.build(cells), batch_sweep.build(cells), h100)


def _section(rows: list[Row], sweep: list, h100: bool) -> str:
    if not rows:
        return ""
    count = len(table_columns(four_phase(rows)))
    parts = ["## Findings in detail (generated from these cells)", "",
             "Every number below is computed from the result files in this folder: medians over the measured "
             "(non-warm-up) trials with 95% bootstrap CIs; differences are differences of medians with their "
             "bootstrap CI. Baseline settings: flash attention off, host-RAM prompt cache off. The "
             f"{COUNT_WORDS.get(count, count)} phases side by side: Appendix.", "",
             "### Server vs in-process, separated from harness overhead", "",
             *(server_vs_inprocess(rows) or ["- Needs both paths of one engine on one model."]), "",
             "### llama-server's host-RAM prompt cache", "",
             *(ram_cache(rows) or ["- Not measured in these cells (no --cache-ram cells beside a baseline)."]), "",
             "### Flash attention", "",
             *(flash_attention(rows) or ["- Not measured in these cells (no flash-attention-on cells)."]), "",
             "### Batch size", "", *batch_size(sweep)]
    if h100:
        parts += ["", "### The H100 findings (2026-11-22), checked here", "",
                  *h100_check(rows, bool(sweep))]
    return "\n".join(parts)


def appendix(ev, figures) -> list[str]:
    """The phases side by side (one row per model and config, a column per phase): the wide findings table."""
    table = four_phase(ev.rows)
    if not table:
        return []
    count = len(table_columns(table))
    return ["\n".join([f"### The {COUNT_WORDS.get(count, count)} phases side by side: cache hit vs cache miss TTFT "
                       "(ms)", "", *four_phase_table(table)])]


def h100_check(rows: list[Row], has_sweep: bool) -> list[str]:
    """The H100 report's claims against these cells."""
    out = []
    base = [r for r in rows if _baseline(r)]
    s = [r for r in base if r.phase == "3a"]
    b = [r for r in base if r.phase == "3b"]
    if s and b:
        text, diff = diff_text(_calib(b, "hit", "ttft_ms"), _calib(s, "hit", "ttft_ms"))
        claim = (f"- \"llama-server costs a fixed 2–5 ms per request over the bindings\": here the server's hit is "
                 f"{text} slower (all models and configs pooled).")
        if _overhead(s) == "not measured":
            out.append(claim + " Not separated from harness overhead: these cells carry no calibration control.")
        else:
            out.append(claim + f" The harness overhead on the server path is {_overhead(s)} and the chat path minus "
                       f"the token-id path costs {_template(s)} on the server: the fixed cost is the server's chat "
                       "endpoint (template + tokenization), not the harness. Status: "
                       + ("holds, and is now attributed." if diff is not None and diff > 0 else "does not hold here."))
    ratios = []
    for model in sorted({_model(r) for r in rows}):
        for r in _pick(rows, model, "3a", lambda q: q.get("cache_ram_mib")):
            off = [x for x in base if _model(x) == model and x.phase == "3a" and (x.a, x.b) == (r.a, r.b)]
            if off and off[0].summary("miss").median:
                ratios.append(f"{model} {r.config}: {r.summary('miss').median / off[0].summary('miss').median:.0f}×")
    if ratios:
        out.append("- \"The RAM prompt cache turns misses into restores 12–60× slower than recomputing\" (H100): "
                   f"here {', '.join(ratios)} (miss median with --cache-ram over the miss median without). "
                   "Status: holds.")
    fa = [r for r in rows if _model(r) == "llama-1b" and r.phase == "3a" and _req(r).get("flash_attn")
          and (r.a, r.b) == (256, 512)]
    off = [r for r in base if _model(r) == "llama-1b" and r.phase == "3a" and (r.a, r.b) == (256, 512)]
    if fa and off:
        text, diff = diff_text(off[0].values("miss"), fa[0].values("miss"))
        out.append(f"- \"Flash attention cuts the llama-1b 256/512 miss from 30.1 to 21.5 ms\" (H100): here "
                   f"{ci_text(off[0].summary('miss'))} → {ci_text(fa[0].summary('miss'))} ms ({text}). Status: "
                   + ("the direction holds, the size differs." if diff is not None and diff < 0 else "does not hold."))
    out.append("- \"n_batch 64 doubles miss TTFT\": " + ("see Batch size above." if has_sweep else
                                                          "not re-measured here (no batch_sweep cells)."))
    return out
