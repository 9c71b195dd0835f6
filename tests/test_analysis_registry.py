"""The analysis registry (one module per catalogue experiment), phase titles from the catalogue, and the
prefix write-up's standard-library-only import path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvmatrix import catalog
from kvmatrix.analysis import figures, labels, report
from kvmatrix.analysis.experiments import REGISTRY, Evidence, module
from kvmatrix.analysis.experiments.invalidation import build as build_rows
from tests.test_analysis import cell, section, table_header, write_cells

REPO = Path(__file__).resolve().parents[1]
SEEDS = ["1 vLLM server", "2 vLLM in-process", "3a llama-server", "3b llama-cpp-python"]


def test_every_catalogue_experiment_has_its_analysis_module():
    assert list(REGISTRY) == list(catalog.experiment_names())
    for name in catalog.experiment_names():
        mod = module(name)
        assert mod.NAME == name
        assert callable(mod.build) and callable(mod.sections) and isinstance(mod.FIGURES, tuple)
        assert all(spec.section in (name, "calibration", "versions") for spec in mod.FIGURES)
    ev = Evidence([])
    assert all(module(name).build([]) == [] for name in REGISTRY) and ev.rows == [] and ev.slots == []


def test_figures_come_from_the_modules_in_report_order():
    names = [s.name for s in figures.ALL]
    assert len(names) == len(set(names))
    assert names == [s.name for mod in (*figures.LEAD, *(module(n) for n in REGISTRY), *figures.CROSS)
                     for s in mod.FIGURES]
    assert names[0] == "fig0_summary"
    assert [s.name for s in figures.WHEN_APPLICABLE] == ["fig8_versions"]


def test_seed_phase_titles_are_the_catalogue_s():
    assert [f"{p} {labels.phase_title(p)}" for p in labels.SEED_PHASES] == SEEDS
    assert labels.table_phases([]) == labels.SEED_PHASES == labels.table_phases(["3a", "x"])
    assert labels.table_phases(["3t"]) == ("1", "2", "3a", "3b", "3t")
    assert labels.server_inprocess_pairs() == [("1", "2", "vLLM"), ("3a", "3b", "llama.cpp")]


def _four_phase_header(text: str) -> list[str]:
    body = section(text, "Appendix")
    return table_header(body.split(" phases side by side: cache hit vs cache miss TTFT (ms)\n", 1)[1])


def test_a_new_phase_appears_with_its_catalogue_title_only_when_the_cells_hold_it(tmp_path):
    docs = [cell("3a", "llamacpp_http", 512, 256, [10, 11, 12], [50, 52, 54]),
            cell("3b", "llamacpp_python", 512, 256, [7, 8, 9], [40, 42, 44], label="llamacpp_python/chat")]
    text = report.write_report([write_cells(tmp_path / "seeds", docs)]).read_text()
    assert "### The four phases side by side: cache hit vs cache miss TTFT (ms)" in text
    assert _four_phase_header(text)[2:6] == [f"{s} hit / miss (ms)" for s in SEEDS]
    assert len(_four_phase_header(text)) == 7

    tokens = cell("3a", "llamacpp_http", 512, 256, [20, 21, 22], [60, 62, 64])
    tokens.update(cell_id="phase3t-llamacpp_tokens-512x256", phase="3t", backend="llamacpp_tokens",
                  label="llamacpp_tokens")
    text = report.write_report([write_cells(tmp_path / "with3t", [*docs, tokens])]).read_text()
    title = catalog.phase_title("3t")
    assert title == catalog.interface("llamacpp_tokens").title
    header = _four_phase_header(text)
    assert header[2:7] == [f"{s} hit / miss (ms)" for s in SEEDS] + [f"3t {title} hit / miss (ms)"]
    assert "### The five phases side by side: cache hit vs cache miss TTFT (ms)" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny | 512/256 |"))
    assert row.count("not run") == 2  # phases 1 and 2; 3t has its medians
    assert "| 3t      | llamacpp_tokens" in section(text, "Appendix")  # the full table
    assert f"- **3t {title} · llamacpp_tokens · tiny**: hit " in section(text, "Summary")
    assert [r.phase for r in build_rows([*docs, tokens])] == ["3a", "3b", "3t"]


def test_prefix_write_up_needs_only_the_standard_library(tmp_path):
    """``kvmatrix prefix`` writes the write-up on the host, which has no numpy, tabulate or matplotlib."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('numpy', 'tabulate', 'matplotlib'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from kvmatrix.analysis import prefix_report\n"
        "from kvmatrix.analysis.experiments import prefix_reuse\n"
        "assert prefix_report.write_report is prefix_reuse.write_report\n"
        "print(prefix_report.main([sys.argv[1]]))\n"
    )
    src = REPO / "docs" / "results" / "cpu-prefix-2026-11-22"
    folder = tmp_path / "prefix"
    folder.mkdir()
    for f in src.glob("prefix-*.json"):
        (folder / f.name).write_text(f.read_text())
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0" and "figures skipped" in proc.stderr
    text = (folder / "prefix_caching_results.md").read_text()
    assert "### vLLM OpenAI server" in text and "### llama-server" in text
