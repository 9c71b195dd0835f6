"""Engine releases compared: the report's "Versions" section and ``fig8_versions``.

For runs whose ok invalidation cells span two or more RELEASES of one engine family
(the version axis of ``kvmatrix matrix``: llama.cpp vendored by llama-cpp-python 0.3.2
vs 0.3.36, vLLM 0.27.0 vs 0.32.0, each possibly in the host and the docker runtime).
Everything is read from the cells; nothing is taken from cell ids:

* the family from the backend (``vllm*`` -> vLLM, ``llamacpp*`` -> llama.cpp);
* the release from the provenance: vLLM ``vllm_version``; llama.cpp the commit
  (``llama_cpp_commit``, else ``engine_build_info``), labelled with the
  llama-cpp-python version of that commit (``0.3.2 (74d73dc)``) or, without one,
  the source tag (``b4094 (3f2a1c0)``); ordered by version number;
* the interface from the label without its ``@tag`` (backend plus variant:
  ``llamacpp_python/chat``), the runtime from ``provenance.runtime_kind``.

Per family with at least two releases: ``ttft_rows`` (hit, miss and miss − hit with
bootstrap CIs, verified trials), ``flag_diff`` (rendered argv / kwargs / ``VLLM_*`` env
that differ between the releases of one interface, volatile items dropped), ``gaps``
(``runtime.unverified``, ``runtime.release_gaps``, ``cached_tokens_source``) and
``figure`` (one panel per family). ``section`` returns "" when no family has two
releases, so reports of single-release runs are unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmatrix.analysis.figure import FigureSpec, embed
from kvmatrix.analysis.fmt import NA, ci_text, table
from kvmatrix.analysis.labels import config_key, family_title, phase_key, settings_text
from kvmatrix.analysis.load import as_docs
from kvmatrix.analysis.stats import Summary
from kvmatrix.analysis.trials import verified_count
from kvmatrix.runners.document import CellDoc, Provenance

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments.invalidation import Row

LOG_RATIO = 20  # fig8: log TTFT axis when the panel's largest / smallest median exceeds this
RUNTIMES = ("host", "docker")
#: rendered items that change from start to start or name a path, never a release difference
VOLATILE_FLAGS = {"--port", "--host", "--model", "--served-model-name"}
VOLATILE_KWARGS = {"model", "model_path"}
PATH_FLAGS = {"-m"}  # llama-server's model path (dropped); ``python -m module`` names the entry point (kept)


# ---------------------------------------------------------------- release, interface, runtime


@dataclass(frozen=True)
class Release:
    family: str  # "llama.cpp" | "vLLM"
    ident: str  # what makes it one release: the llama.cpp commit or the vLLM version
    label: str  # "0.3.2 (74d73dc)", "0.27.0"
    key: tuple  # sort key: version number first


def family_of(cell: CellDoc) -> str | None:
    """"llama.cpp" | "vLLM": the catalogue family of the cell's backend."""
    return family_title(cell.backend)


def interface_of(cell: CellDoc) -> str:
    """Backend plus variant (and build), as the label names it without its ``@tag``."""
    label = str(cell.label or "").split(" @", 1)[0].strip()
    if label:
        return label
    variant = cell.get("variant") or (cell.runtime.rendered or {}).get("variant")
    return f"{cell.backend or '?'}{'/' + str(variant) if variant else ''}"


def runtime_of(cell: CellDoc) -> str:
    return str(cell.provenance.runtime_kind or "host")


def version_key(text: str | None) -> tuple[int, ...]:
    """``0.3.36`` -> (0, 3, 36); ``b4094`` -> (4094,)."""
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))


def _commit(prov: Provenance) -> str | None:
    if prov.llama_cpp_commit:
        return str(prov.llama_cpp_commit)
    m = re.fullmatch(r"b\d+-([0-9a-f]+)", str(prov.engine_build_info or ""))
    return m.group(1) if m else None


def _tag(source) -> str | None:
    """The release name in ``llama_cpp_source``: ``vendored:0.3.2`` -> 0.3.2, ``b4094``; None for a directory."""
    if not source or str(source).startswith(("/", ".", "~")):
        return None
    return str(source).removeprefix("vendored:")


def releases(cells) -> list[Release | None]:
    """The release of each cell (None: not an engine family, or no version recorded).

    llama.cpp cells of one commit are one release, whichever interface recorded the bindings version."""
    idents: list[tuple[str, str] | None] = []
    bindings: dict[str, str] = {}
    tags: dict[str, str] = {}
    for c in as_docs(cells):
        prov, fam = c.provenance, family_of(c)
        if fam == "vLLM":
            v = prov.vllm_version or (c.runtime.rendered or {}).get("vllm_version")
            idents.append((fam, str(v)) if v else None)
        elif fam == "llama.cpp":
            ident = _commit(prov) or _tag(prov.llama_cpp_source)
            idents.append((fam, ident) if ident else None)
            if ident and prov.llama_cpp_python_version:
                bindings.setdefault(ident, str(prov.llama_cpp_python_version))
            if ident and _tag(prov.llama_cpp_source):
                tags.setdefault(ident, _tag(prov.llama_cpp_source))
        else:
            idents.append(None)
    out: list[Release | None] = []
    for found in idents:
        if found is None:
            out.append(None)
            continue
        fam, ident = found
        if fam == "vLLM":
            out.append(Release(fam, ident, ident, (version_key(ident), ident)))
            continue
        name = bindings.get(ident) or tags.get(ident)
        label = f"{name} ({ident})" if name and name != ident else ident
        out.append(Release(fam, ident, label, (version_key(name), ident)))
    return out


# ---------------------------------------------------------------- the cells on the version axis


@dataclass
class Entry:
    """One ok invalidation cell of a family that ran on two or more releases."""

    row: Row
    release: Release
    interface: str
    runtime: str

    @property
    def cell(self) -> CellDoc:
        return self.row.cell


def _runtime_order(runtime: str) -> tuple:
    return (RUNTIMES.index(runtime) if runtime in RUNTIMES else len(RUNTIMES), runtime)


def families(rows: list[Row]) -> dict[str, list[Entry]]:
    """Family -> its entries, for the families with at least two releases (in family order), each
    list ordered by release, interface (phase first), runtime, then config (largest A first)."""
    rels = releases([r.cell for r in rows])
    by_family: dict[str, list[Entry]] = {}
    for r, rel in zip(rows, rels, strict=True):
        if rel is not None:
            by_family.setdefault(rel.family, []).append(Entry(r, rel, interface_of(r.cell), runtime_of(r.cell)))
    out = {}
    for fam in sorted(by_family):
        entries = by_family[fam]
        if len({e.release for e in entries}) < 2:
            continue
        entries.sort(key=lambda e: (e.release.key, phase_key(e.row.phase), e.interface, _runtime_order(e.runtime),
                                    config_key(e.row.a, e.row.b), e.row.cell_id))
        out[fam] = entries
    return out


def _releases(entries: list[Entry]) -> list[Release]:
    return list(dict.fromkeys(e.release for e in entries))


def _interfaces(entries: list[Entry]) -> list[str]:
    return [i for _, i in sorted({(phase_key(e.row.phase), e.interface) for e in entries})]


# ---------------------------------------------------------------- 1. TTFT per release


TTFT_HEADERS = ["Release", "Interface", "Runtime", "A/B (tok)", "Hit TTFT (ms) median [95% CI]",
                "Miss TTFT (ms) median [95% CI]", "Miss − hit (ms) [95% CI]", "Verified trials"]


def _settings(e: Entry) -> str:
    return settings_text(e.cell) or NA


def ttft_rows(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per cell; a Settings column when the runtime settings differ between cells."""
    with_settings = len({_settings(e) for e in entries}) > 1
    headers = TTFT_HEADERS[:4] + (["Settings"] if with_settings else []) + TTFT_HEADERS[4:]
    out = []
    for e in entries:
        c = e.row.comparison()
        v, n = verified_count(e.cell)
        out.append([e.release.label, e.interface, e.runtime, e.row.config, *([_settings(e)] if with_settings else []),
                    ci_text(e.row.summary("hit"), 2), ci_text(e.row.summary("miss"), 2),
                    ci_text(Summary(c.n_b, median=c.diff, ci=c.diff_ci), 2, sign=True), f"{v}/{n}"])
    return headers, out


# ---------------------------------------------------------------- 2. flag diff


def _text(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _volatile(value: str) -> bool:
    """A path that changes from run to run or host to host: temporary folders, the kvmatrix cache."""
    return value.startswith("/tmp/") or "/.cache/" in value or value.startswith("~/")


def _is_flag(tok: str) -> bool:
    return tok.startswith("-") and tok != "-" and not re.fullmatch(r"-\d+(\.\d+)?", tok)


def parse_argv(argv: list) -> dict[str, str]:
    """A server's argv (binary first) as flag -> value: the next token when it is not a flag, else
    ``on``; ``--flag=value`` split; positional words under ``(positional)``. Volatile items dropped."""
    tokens = [str(t) for t in argv[1:]]
    out: dict[str, str] = {}
    positional = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not _is_flag(tok):
            if not _volatile(tok) and not tok.startswith("/"):
                positional.append(tok)
            continue
        name, eq, value = tok.partition("=")
        if not (tok.startswith("--") and eq):
            name, value = tok, "on"
            if i < len(tokens) and not _is_flag(tokens[i]):
                value = tokens[i]
                i += 1
        if name in VOLATILE_FLAGS or _volatile(value) or (name in PATH_FLAGS and "/" in value):
            continue
        out[name] = f"{out[name]} {value}" if name in out else value
    if positional:
        out["(positional)"] = " ".join(positional)
    return out


def rendered_settings(cell: CellDoc) -> dict[str, str]:
    """What kvmatrix rendered for the engine: argv flags (servers) or constructor kwargs (in process),
    plus the ``VLLM_*`` environment as ``env VLLM_X``; volatile and path items left out."""
    rendered = cell.runtime.rendered or {}
    if rendered.get("argv"):
        out = parse_argv(rendered["argv"])
    else:
        out = {k: _text(v) for k, v in (rendered.get("kwargs") or {}).items()
               if k not in VOLATILE_KWARGS and not _volatile(_text(v))}
    for k, v in sorted((rendered.get("env") or {}).items()):
        if str(k).startswith("VLLM_") and not _volatile(str(v)):
            out[f"env {k}"] = str(v)
    return out


def _values(values: set[str]) -> str:
    return " / ".join(sorted(values - {NA}) + ([NA] if NA in values else []))


def flag_diff(entries: list[Entry]) -> list[tuple[str, str, dict[Release, str]]]:
    """(interface, setting, release -> value) for every rendered setting whose values differ between
    the releases that ran the interface; a release that did not render it shows —, values that differ
    between the cells of one release are joined with " / "."""
    out = []
    for iface in _interfaces(entries):
        mine = [e for e in entries if e.interface == iface]
        rels = _releases(mine)
        if len(rels) < 2:
            continue
        per_cell = [(e.release, rendered_settings(e.cell)) for e in mine]
        names = sorted(dict.fromkeys(k for _, s in per_cell for k in s), key=lambda k: k.startswith("env "))
        for name in names:
            vals = {rel: {s.get(name, NA) for r, s in per_cell if r == rel} for rel in rels}
            if len({frozenset(v) for v in vals.values()}) > 1:
                out.append((iface, name, {rel: _values(v) for rel, v in vals.items()}))
    return out


# ---------------------------------------------------------------- 3. could not read back / lacks


@dataclass
class Gaps:
    release: Release
    interface: str
    runtimes: list[str]
    unverified: list[str]
    cached_source: list[str]
    release_gaps: list[tuple[str, str]]  # (setting or counter, sentence)


def gaps(entries: list[Entry]) -> list[Gaps]:
    """Per release x interface: the union over its cells of ``runtime.unverified``, every
    ``runtime.release_gaps`` entry, and the effective ``cached_tokens_source``."""
    out = []
    for rel in _releases(entries):
        for iface in _interfaces(entries):
            mine = [e for e in entries if e.release == rel and e.interface == iface]
            if not mine:
                continue
            runtime = [e.cell.runtime for e in mine]
            out.append(Gaps(
                rel, iface, sorted({e.runtime for e in mine}, key=_runtime_order),
                sorted({str(u) for r in runtime for u in r.unverified}),
                sorted({str(s) for r in runtime if (s := r.effective.get("cached_tokens_source"))}
                       | {str(s) for e in mine for _, trials in e.cell.trial_blocks() for t in trials
                          if (s := t.get("cached_tokens_source"))}),
                sorted({(str(k), str(v)) for r in runtime for k, v in (r.release_gaps or {}).items()}),
            ))
    return out


# ---------------------------------------------------------------- the section


def _identified_by(entries: list[Entry]) -> str:
    found = []
    for e in entries:
        prov = e.cell.provenance
        if e.release.family == "vLLM":
            found += [f"vLLM {prov.vllm_version or e.release.ident}"]
            row = prov.vllm_flag_table_row or (e.cell.runtime.rendered or {}).get("flag_table_row")
            found += [f"flag table {row}"] if row else []
        else:
            found += [f"source {prov.llama_cpp_source}"] if prov.llama_cpp_source else []
            found += [f"commit {_commit(prov)}"] if _commit(prov) else []
            found += [f"bindings {prov.llama_cpp_python_version}"] if prov.llama_cpp_python_version else []
            found += [f"build_info {prov.engine_build_info}"] if prov.engine_build_info else []
    return ", ".join(dict.fromkeys(found)) or NA


def _release_rows(entries: list[Entry]) -> list[list[str]]:
    out = []
    for rel in _releases(entries):
        mine = [e for e in entries if e.release == rel]
        out.append([rel.label, _identified_by(mine), ", ".join(sorted({e.runtime for e in mine}, key=_runtime_order)),
                     ", ".join(_interfaces(mine)), str(len(mine))])
    return out


def _family_text(fam: str, entries: list[Entry]) -> str:
    rels = _releases(entries)
    headers, rows = ttft_rows(entries)
    parts = [f"### {fam}: " + " → ".join(r.label for r in rels),
             table(_release_rows(entries), ["Release", "Recorded as", "Runtimes", "Interfaces", "Ok cells"]),
             "#### TTFT per release", table(rows, headers)]
    diff = flag_diff(entries)
    if diff:
        body = [[iface, f"`{name}`", *(vals.get(r, "not run") for r in rels)] for iface, name, vals in diff]
        parts += ["#### Flag diff", table(body, ["Interface", "Setting", *(r.label for r in rels)])]
    else:
        parts.append("#### Flag diff\n\nNothing differs: every interface rendered the same settings on every release.")
    found = gaps(entries)
    parts += ["#### Could not read back / lacks",
              table([[g.release.label, g.interface, ", ".join(g.runtimes), ", ".join(g.unverified) or "none",
                      ", ".join(g.cached_source) or NA] for g in found],
                    ["Release", "Interface", "Runtimes", "Not read back", "Cached tokens from"])]
    lacks = [f"- {g.release.label}, {g.interface}: `{k}`: {text}" for g in found for k, text in g.release_gaps]
    parts.append("Release gaps:\n\n" + "\n".join(lacks) if lacks else
                 "Release gaps: none recorded (`runtime.release_gaps` empty or absent in these cells).")
    return "\n\n".join(parts)


def sections(ev, figures) -> list[str]:
    return [section(ev.rows, embed(figures, "versions"))]


def section(rows: list[Row], figure_lines: list[str] = ()) -> str:
    """The report's "Versions" section ("" when no engine family ran on two releases); ``rows`` are the
    evidence's invalidation rows, ``figure_lines`` the embedded figures' markdown."""
    fams = families(rows)
    if not fams:
        return ""
    head = ("## Versions: engine releases compared\n\n"
            "Ok invalidation cells of one engine family that ran on two or more releases. The release is read "
            "from each cell's provenance (vLLM: `vllm_version`; llama.cpp: `llama_cpp_commit`, named by the "
            "llama-cpp-python version that vendors it, else by its source tag), never from the cell id; releases "
            "are ordered oldest first by version number. Interface = backend and variant; runtime = "
            "`provenance.runtime_kind`. Per family:\n\n"
            "- TTFT per release: streaming TTFT over the measured trials of each cell, median with its 95% "
            "bootstrap CI; miss − hit = the difference of the medians (CI from resampling both); verified = "
            "measured hit and miss trials whose engine-reported cached tokens matched the expectation.\n"
            "- Flag diff: the rendered settings (server argv, in-process constructor kwargs, `VLLM_*` environment) "
            "that differ between the releases of one interface; — = that release did not render it, values that "
            "differ between cells of one release are joined by /; ports, hosts, model names and paths, the "
            "binary and temporary or cache paths are left out.\n"
            "- Could not read back / lacks: the requested settings the engine does not report "
            "(`runtime.unverified`, union over the cells), where the cached-token count came from "
            "(`runtime.effective.cached_tokens_source`), and what the release lacks with what kvmatrix did "
            "instead (`runtime.release_gaps`).")
    return "\n\n".join([head, *(_family_text(f, e) for f, e in fams.items()), *figure_lines])


# ---------------------------------------------------------------- fig8


def _panel_config(entries: list[Entry]) -> tuple[int | None, int | None]:
    """The A/B config the panel plots: the one with the most cells, largest A first on a tie."""
    counts: dict[tuple, int] = {}
    for e in entries:
        counts[(e.row.a, e.row.b)] = counts.get((e.row.a, e.row.b), 0) + 1
    return min(counts, key=lambda ab: (-counts[ab], config_key(*ab)))


def figure(rows: list[Row]):
    """One panel per family with two or more releases: x = release (oldest first), y = streaming TTFT
    (median, 95% CI error bars), hit (dashed, open) and miss (solid, filled) per interface (colour) and
    runtime (marker), for the panel's most common A/B config. None when no family has two releases."""
    fams = families(rows)
    if not fams:
        return None
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib only for the figure (no pyplot)

    from kvmatrix.analysis import plot  # noqa: PLC0415
    from kvmatrix.analysis.fmt import wrap  # noqa: PLC0415

    interfaces = list(dict.fromkeys(i for entries in fams.values() for i in _interfaces(entries)))
    runtimes = sorted({e.runtime for entries in fams.values() for e in entries}, key=_runtime_order)
    colors = {i: plot.series_color(k, len(interfaces)) for k, i in enumerate(interfaces)}
    markers = dict(zip(runtimes, "osD^v<>p", strict=False))
    most = max(len(_releases(entries)) for entries in fams.values())
    fig, axes = plot.grid(len(fams), plot.panel_width(most, 1.5, 2.0, least=4.5), 4.6)
    for (ax,), (fam, entries) in zip(axes, fams.items(), strict=True):
        a, b = _panel_config(entries)
        shown = [e for e in entries if (e.row.a, e.row.b) == (a, b)]
        rels = _releases(entries)
        series = list(dict.fromkeys((e.interface, e.runtime) for e in shown))
        step = 0.7 / max(1, len(series))
        medians = [s.median for e in shown for c in ("hit", "miss") if (s := e.row.summary(c)).median]
        log = bool(medians) and min(medians) > 0 and max(medians) / min(medians) > LOG_RATIO
        for j, (iface, runtime) in enumerate(series):
            for cond, style in (("hit", "--"), ("miss", "-")):
                pts = [(rels.index(e.release) + (j - (len(series) - 1) / 2) * step, e.row.summary(cond))
                       for e in shown if (e.interface, e.runtime) == (iface, runtime)]
                pts = [(x, s) for x, s in pts if s.median is not None]
                if not pts:
                    continue
                arms = [plot.err(s, log) for _, s in pts]
                ax.errorbar([x for x, _ in pts], [s.median for _, s in pts],
                            yerr=[[e[0][0] for e in arms], [e[1][0] for e in arms]], color=colors[iface],
                            linestyle=style, marker=markers[runtime], markersize=6, capsize=3, linewidth=1.2,
                            markerfacecolor="white" if cond == "hit" else colors[iface])
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(-0.6, len(rels) - 0.4)
        ax.set_xticks(range(len(rels)), [wrap(r.label, 16) for r in rels], fontsize=8)
        ax.set_xlabel("release (oldest first)", fontsize=9)
        ax.set_ylabel("streaming TTFT, median (ms)" + (", log scale" if log else ""), fontsize=9)
        ax.set_title(f"{fam}, A/B {a}/{b}", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    handles = [Line2D([], [], color=colors[i], linewidth=2, label=i) for i in interfaces]
    handles += [Line2D([], [], color="grey", linestyle="none", marker=markers[r], label=r) for r in runtimes]
    handles += [Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="white", label="cache hit"),
                Line2D([], [], color="black", linestyle="-", marker="o", label="cache miss")]
    plot.finish(fig, "TTFT per engine release: cache hit vs cache miss per interface and runtime\n"
                     f"points = median, {plot.CI_NOTE}", handles)
    return fig


FIGURES = (
    FigureSpec("fig8_versions", "TTFT per engine release", "versions", lambda ev: figure(ev.rows),
               "Median streaming TTFT of the cache hit (dashed, open) and the cache miss (solid, filled) per release, "
               "one panel per engine family, per interface (colour) and runtime (marker), with 95% bootstrap CIs.",
               optional=True),
)

