"""Attribute a llama-server vs llama-cpp-python difference to the binding or to the build.

On ONE llama.cpp source commit, model and runtime spec, the llama.cpp cells form a chain
in which each step changes one thing:

    server  llama-server over HTTP
    shared  llama-cpp-python loading the SAME libllama.so      -> binding / API path (shared - server)
    pip     llama-cpp-python compiled by pip, same CMake flags -> build               (pip - shared)
    stock   llama-cpp-python as pip builds it by default       -> build flags         (stock - pip)

Each step is a difference of median TTFT with a bootstrap 95% CI and a Mann-Whitney p,
per condition (hit, miss) and per bindings API path (chat, template). Computed from the
result JSON only.
"""

from __future__ import annotations

import json

from kvmatrix.analysis.experiments import invalidation
from kvmatrix.analysis.experiments.invalidation import Row
from kvmatrix.analysis.fmt import fmt_p, md_table, value
from kvmatrix.analysis.stats import compare
from kvmatrix.runners.document import CellDoc

STEPS = (("server", "shared", "binding / API path"), ("shared", "pip", "build (pip-compiled, same flags)"),
         ("pip", "stock", "build flags (pip defaults)"))
CONDITIONS = ("hit", "miss")


def _variant(row: Row) -> str | None:
    if row.cell.backend == "llamacpp_http":
        return "server"
    if row.cell.backend == "llamacpp_python":
        return row.cell.provenance.build_variant or "shared"
    return None


def _api(cell: CellDoc) -> str | None:
    """The bindings API path from the cell label ``llamacpp_python/<api>[ [build]][ @tag]``."""
    label = str(cell.label or "")
    return label.split("/", 1)[1].split()[0] if "/" in label else None


def _group_key(row: Row) -> str:
    """What must be equal for two cells to be compared: model, source commit, runtime, config, runtime kind."""
    c = row.cell
    prov = c.provenance
    return json.dumps([c.model.name, c.model.quant, prov.llama_cpp_commit, prov.llama_cpp_source, prov.runtime_kind,
                       c.config.to_dict(), dict(c.runtime.requested)], sort_keys=True, default=str)


def rows(cells) -> list[dict]:
    """One row per (group, API path, condition, step) where both ends of the step were measured."""
    return step_rows(invalidation.build(cells))


def step_rows(inv_rows: list[Row]) -> list[dict]:
    """``rows`` from the invalidation rows."""
    groups: dict[str, dict[tuple[str, str | None], Row]] = {}
    for r in inv_rows:
        v = _variant(r)
        if v is None:
            continue
        api = None if v == "server" else _api(r.cell)
        groups.setdefault(_group_key(r), {})[(v, api)] = r
    out = []
    for members in groups.values():
        apis = sorted({api for (_v, api) in members if api})
        for api in apis:
            for a_name, b_name, what in STEPS:
                a = members.get((a_name, None if a_name == "server" else api))
                b = members.get((b_name, api))
                if a is None or b is None:
                    continue
                for cond in CONDITIONS:
                    cmp_ = compare(a.values(cond), b.values(cond))
                    if cmp_.diff is None:
                        continue
                    prov = b.cell.provenance
                    out.append({
                        "source": f"{prov.llama_cpp_source} ({prov.llama_cpp_commit})",
                        "runtime": prov.runtime_kind or "host", "model": b.cell.model.name,
                        "config": b.config, "api": api, "condition": cond, "step": f"{a_name} -> {b_name}",
                        "attributed_to": what, "a_ms": a.summary(cond).median, "b_ms": b.summary(cond).median,
                        "diff_ms": cmp_.diff, "diff_ci": cmp_.diff_ci, "p": cmp_.p, "n": (cmp_.n_a, cmp_.n_b),
                    })
    return out


HEADERS = ("Source", "Runtime", "Model", "A/B", "API", "Condition", "Step", "Attributed to", "From (ms)", "To (ms)",
           "Difference (ms) [95% CI]", "p", "n")


def sections(ev, figures) -> list[str]:
    return [_section(step_rows(ev.rows))]


def section(cells) -> str:
    """The report section, or '' when no cell pair shares a source, model and runtime."""
    return _section(rows(cells))


def _section(found: list[dict]) -> str:
    if not found:
        return ""
    body = []
    for r in found:
        ci = f" [{r['diff_ci'][0]:+.1f}, {r['diff_ci'][1]:+.1f}]" if r["diff_ci"] else ""
        body.append([str(r[k]) for k in ("source", "runtime", "model", "config", "api", "condition", "step",
                                         "attributed_to")]
                    + [value(r["a_ms"], 1), value(r["b_ms"], 1), f"{r['diff_ms']:+.1f}{ci}", fmt_p(r["p"]),
                       f"{r['n'][0]}/{r['n'][1]}"])
    lines = [
        "## Server vs bindings: binding or build?",
        "",
        "On one llama.cpp commit, model and runtime spec, each step of server -> shared -> pip -> stock changes one "
        "thing: `shared - server` is the binding and API path (same libllama.so), `pip - shared` the build "
        "(pip-compiled with the same CMake flags), `stock - pip` the build flags (pip defaults). Difference of "
        "median TTFT, bootstrap 95% CI, Mann-Whitney p.",
        "",
        md_table(HEADERS, body),
    ]
    return "\n".join(lines) + "\n"
