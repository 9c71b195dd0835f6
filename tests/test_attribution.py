"""Server-vs-bindings attribution (analysis only, from result documents)."""

from __future__ import annotations

import pytest

from kvmatrix.analysis import attribution
from tests.test_analysis import cell


def _llama(backend, variant, build, hit, miss, commit="0c1e570"):
    phase = "3a" if backend == "llamacpp_http" else "3b"
    label = backend if build is None else f"{backend}/{variant}" + ("" if build == "shared" else f" [{build}]")
    doc = cell(phase, backend, 512, 256, hit, miss, label=label)
    doc["cell_id"] += f"-{variant}-{build}"
    doc["provenance"].update(llama_cpp_source="vendored:0.3.36", llama_cpp_commit=commit, runtime_kind="docker",
                             build_variant=build or "server")
    return doc


def _chain(commit="0c1e570"):
    return [
        _llama("llamacpp_http", None, None, [10, 11, 12, 11, 10], [100, 101, 99, 100, 102], commit),
        _llama("llamacpp_python", "chat", "shared", [7, 8, 7, 8, 7], [96, 97, 95, 96, 98], commit),
        _llama("llamacpp_python", "chat", "pip", [7, 8, 7, 8, 7], [90, 91, 89, 90, 92], commit),
        _llama("llamacpp_python", "chat", "stock", [40, 41, 40, 41, 40], [800, 810, 790, 805, 795], commit),
    ]


def test_each_step_is_attributed():
    rows = attribution.rows(_chain())
    by = {(r["step"], r["condition"]): r for r in rows}
    assert set(by) == {(s, c) for s in ("server -> shared", "shared -> pip", "pip -> stock") for c in ("hit", "miss")}
    miss = by[("server -> shared", "miss")]
    assert miss["attributed_to"] == "binding / API path" and miss["api"] == "chat"
    assert miss["diff_ms"] == pytest.approx(96 - 100)
    assert by[("shared -> pip", "miss")]["diff_ms"] == pytest.approx(90 - 96)
    stock = by[("pip -> stock", "miss")]
    assert stock["attributed_to"].startswith("build flags") and stock["diff_ms"] == pytest.approx(800 - 90)
    lo, hi = stock["diff_ci"]
    assert lo <= stock["diff_ms"] <= hi and lo > 0


def test_cells_of_different_commits_are_never_compared():
    docs = _chain("0c1e570")[:1] + _chain("c02e5ab")[1:2]
    assert attribution.rows(docs) == [] and attribution.section(docs) == ""


def test_section_is_a_table():
    text = attribution.section(_chain())
    assert text.startswith("## Server vs bindings: binding or build?")
    assert text.count("\n| vendored:0.3.36 (0c1e570) | docker | tiny | 512/256 | chat |") == 6
