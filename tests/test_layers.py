"""Imports run downwards only: every ``import kvmatrix...`` (also inside functions) checked against the layers.

    catalog, cli_parser                      stdlib only
    plumbing  (console, envs)                -> catalog
    runners   (the cell runner)              -> catalog
    models    (generated / converted models) -> plumbing
    analysis  (report from result JSON)      -> runners.results / runners.document, catalog
    matrix    (the host CLI, planner, executor, runtimes) -> everything
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kvmatrix"

#: layer -> the layers (or exact modules) it may import
ALLOWED = {
    "__init__": set(),
    "catalog": set(),
    "cli_parser": set(),
    "plumbing": {"catalog"},
    "runners": {"catalog", "runners"},
    "models": {"plumbing", "models"},
    "analysis": {"catalog", "cli_parser", "analysis", "kvmatrix.runners.results", "kvmatrix.runners.document"},
    "matrix": {"catalog", "cli_parser", "plumbing", "runners", "models", "analysis", "matrix"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in out if m == "kvmatrix" or m.startswith("kvmatrix.")]


def test_every_import_runs_downwards():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        own = _layer("kvmatrix." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        if own not in ALLOWED:
            own = path.stem  # a top-level module: catalog.py, cli_parser.py
        allowed = ALLOWED.get(own)
        assert allowed is not None, f"{path}: no layer; add it to ALLOWED"
        for module in _imports(path):
            target = _layer(module)
            if target in (own,) or target in allowed or module in allowed:
                continue
            if any(module.startswith(a + ".") or module == a for a in allowed if a.startswith("kvmatrix.")):
                continue
            if module == "kvmatrix" or target == "":
                continue
            bad.append(f"{path.relative_to(PKG.parent)} imports {module} ({own} -> {target})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_catalogue_tables_are_consistent():
    from kvmatrix import catalog

    phases = catalog.phases()
    assert list(phases)[:4] == ["1", "2", "3a", "3b"], "the seeds' phases come first, in their order"
    for p, rows in phases.items():
        assert len({i.family for i in rows}) == 1, f"phase {p} mixes families"
        assert len({(i.backend, i.variant) for i in rows}) == len(rows)
        for i in rows:
            assert i.family in catalog.FAMILIES and i.capabilities <= set(catalog.CAPABILITIES)
            assert i.has("chat") != i.has("token_ids"), f"{i.backend}: a prompt is chat messages or token ids"
    for e in catalog.EXPERIMENTS:
        assert catalog.phases_for(e.name), f"{e.name} runs on no interface"
    assert catalog.phases_for("slot_eviction") == ("3a",)
    assert catalog.phases_for("prefix_reuse") == ("1", "3a")
