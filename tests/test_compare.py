"""``compare``: the gate grammar and its semantics (hand-made summary rows: pure logic), matching across releases,
ambiguity and rows on one side only, and end-to-end runs between committed result folders (the real data)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmatrix.analysis import compare as cmp
from kvmatrix.analysis.gates import GateError, evaluate, holds, parse_gate
from kvmatrix.analysis.summary import SummaryRow

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DEMO_A, DEMO_B = RESULTS / "cpu-demo-2026-11-22", RESULTS / "cpu-demo-2026-12-01"
VERSIONS = RESULTS / "cpu-versions-2026-12-02"
GATES = ["--fail-if", "miss_ttft_ms>+10%", "--fail-if", "unverified>0", "--fail-if", "harness_overhead_ms>0.5"]

SETTINGS = {"n_ctx": 2048, "n_batch": 512, "flash_attn": False, "cache_ram_mib": 0, "n_threads": 2}


def row(condition="cache_miss", values=(), *, release="vLLM 0.32.0", settings=None, cell="phase1-vllm_http-512x256",
        run="r", **kw) -> SummaryRow:
    """A hand-made summary row; median and CI as given (``ttft_ms`` etc.), ``values`` for the two-run deltas."""
    base = dict(cell_id=cell, run=run, experiment="invalidation", status="ok", phase="1", backend="vllm_http",
                interface="vLLM server", series="vllm_http", api="vllm_http", model="tiny/f16", a=512, b=256, q=16,
                max_output_tokens=50, condition=condition, axis="", settings=dict(settings or SETTINGS),
                release=release, runtime_kind="host", device="cpu", host="vm", n=len(values),
                values=[float(v) for v in values])
    base.update(kw)
    return SummaryRow(**base)


def gates(res, *exprs, gate_on="ci"):
    return {g.gate.text: g for g in evaluate([parse_gate(e) for e in exprs], res, gate_on)}


# ---------------------------------------------------------------- grammar


@pytest.mark.parametrize("text, metric, op, value, mode", [
    ("miss_ttft_ms>+10%", "miss_ttft_ms", ">", 10.0, "rel"),
    ("miss_ttft_ms>+2", "miss_ttft_ms", ">", 2.0, "abs"),
    ("unverified>0", "unverified", ">", 0.0, "own"),
    ("harness_overhead_ms>0.5", "harness_overhead_ms", ">", 0.5, "own"),
    (" hit_ttft_ms <= -5 % ", "hit_ttft_ms", "<=", -5.0, "rel"),
    ("miss_minus_hit_ms>=+.5", "miss_minus_hit_ms", ">=", 0.5, "abs"),
    ("failed>+0", "failed", ">", 0.0, "abs"),
    ("only_in_base>0", "only_in_base", ">", 0.0, "own"),
])
def test_good_expressions(text, metric, op, value, mode):
    g = parse_gate(text)
    assert (g.metric, g.op, g.value, g.mode) == (metric, op, value, mode)


@pytest.mark.parametrize("text, fix", [
    ("miss_ttft_ms", "not METRIC OP VALUE[%]; write e.g. miss_ttft_ms>+10%"),
    ("ttft>1", "unknown metric 'ttft'; one of hit_ttft_ms, miss_ttft_ms"),
    ("miss_ttft_ms==1", "OP '==' is not one of > >= < <="),
    ("miss_ttft_ms=>1", "OP '=>' is not one of"),
    ("miss_ttft_ms>abc", "'abc' is not a number; write VALUE as 0.5"),
    ("miss_ttft_ms>nan", "'nan' is not a number"),
    ("miss_ttft_ms>10%", "takes a sign: miss_ttft_ms>+10%"),
    ("unverified>+1%", "unverified is a count, it has no % change; write unverified>0"),
    ("only_in_base>+1", "it has no change; write only_in_base>1"),
])
def test_bad_expressions_name_the_fix(text, fix):
    with pytest.raises(GateError, match=None) as exc:
        parse_gate(text)
    assert fix in str(exc.value)


@pytest.mark.parametrize("text", ["miss_ttft_ms>10%", "bogus>1", "unverified>=+3%"])
def test_bad_expression_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, text):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cmp.main([str(DEMO_A), str(DEMO_B), "--out", str(out), "--fail-if", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvmatrix: error: --fail-if: ") and "\n" not in err
    assert err.endswith("(see `python -m kvmatrix.analysis.compare --help`)")
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    ([str(DEMO_A)], "give BASE and NEW (1 folder given)"),
    ([], "give BASE and NEW (0 folders given)"),
    (["--base", str(DEMO_A), "--new", str(DEMO_B), "--", str(DEMO_B)], "both sides are given by --base and --new"),
    (["--new", str(DEMO_B)], "BASE missing"),
])
def test_bad_sides_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        cmp.main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_missing_folder_exits_2(tmp_path, capsys):
    assert cmp.main([str(DEMO_A), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmatrix: error: no result cells in ") and "no such folder" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- semantics


TIGHT = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02, 9.98, 10.0, 10.03, 9.97]


def test_relative_absolute_and_own_value():
    res = cmp.match([row(values=TIGHT)], [row(values=[v * 1.5 for v in TIGHT], ttft_ms=15.0, ttft_ci_lo=14.9,
                                               ttft_ci_hi=15.1)])
    assert len(res.matches) == 1 and res.matches[0].ttft.rel_pct == pytest.approx(50, abs=0.5)
    g = gates(res, "miss_ttft_ms>+10%", "miss_ttft_ms>+60%", "miss_ttft_ms>+2", "miss_ttft_ms>+6",
              "miss_ttft_ms>14", "miss_ttft_ms>15.05", "hit_ttft_ms>+10%", "ttft_ms>+10%", "miss_ttft_ms<-10%")
    assert g["miss_ttft_ms>+10%"].held and not g["miss_ttft_ms>+60%"].held
    assert g["miss_ttft_ms>+2"].held and not g["miss_ttft_ms>+6"].held  # +5 ms
    assert g["miss_ttft_ms>14"].held  # NEW's own median 15 [14.9, 15.1]
    assert not g["miss_ttft_ms>15.05"].held  # point 15 is not beyond 15.05
    assert g["hit_ttft_ms>+10%"].status == "not evaluated"  # no hit row: reads so, never a silent pass
    assert g["ttft_ms>+10%"].held  # any condition
    assert not g["miss_ttft_ms<-10%"].held
    trip = g["miss_ttft_ms>+10%"].trips[0]
    assert trip.where == "1 vllm_http tiny/f16 512/256 cache_miss" and trip.ci[0] > 10


def test_a_regression_inside_the_noise_trips_the_point_gate_not_the_ci_gate():
    noisy = [5.0, 20.0, 8.0, 15.0, 10.0, 25.0, 6.0, 18.0, 9.0, 12.0]
    res = cmp.match([row(values=noisy)], [row(values=[v * 1.2 for v in noisy])])
    d = res.matches[0].ttft
    assert d.rel_pct > 10 > d.rel_ci[0]  # +20 % by the medians, but the CI reaches below +10 %
    assert gates(res, "miss_ttft_ms>+10%", gate_on="point")["miss_ttft_ms>+10%"].held
    assert not gates(res, "miss_ttft_ms>+10%", gate_on="ci")["miss_ttft_ms>+10%"].held


def test_holds_uses_the_near_bound_of_the_ci():
    assert holds(">", 12, (11, 13), 10, "ci") and not holds(">", 12, (9, 13), 10, "ci")
    assert holds(">", 12, (9, 13), 10, "point")
    assert holds("<", -20, (-30, -12), -10, "ci") and not holds("<", -20, (-30, -5), -10, "ci")
    assert holds(">=", 10, (10, 11), 10, "ci") and not holds(">", 10, (10, 11), 10, "ci")
    assert holds(">", 3, None, 0, "ci")  # no CI (a count): the value decides
    assert not holds(">", 9, (11, 13), 10, "ci")  # the point must be beyond too


def test_own_value_gates_read_every_new_row_and_its_ci():
    base = [row(values=TIGHT, harness_overhead_ms=0.1, harness_overhead_ci_lo=0.0, harness_overhead_ci_hi=0.2)]
    new = [row(values=TIGHT, unverified=2, verified=8, harness_overhead_ms=0.8, harness_overhead_ci_lo=0.2,
               harness_overhead_ci_hi=1.5),
           row("cache_hit", TIGHT, cell="other", unverified=0, harness_overhead_ms=0.9, harness_overhead_ci_lo=0.6,
               harness_overhead_ci_hi=1.2)]  # only in NEW: own-value gates read it too
    res = cmp.match(base, new)
    g = gates(res, "unverified>0", "harness_overhead_ms>0.5", "harness_overhead_ms>+0.5")
    assert [t.where for t in g["unverified>0"].trips] == ["1 vllm_http tiny/f16 512/256 cache_miss"]
    assert g["unverified>0"].evaluated == 2
    assert len(g["harness_overhead_ms>0.5"].trips) == 1  # 0.8 [0.2, 1.5] is inside the noise, 0.9 [0.6, 1.2] not
    assert len(gates(res, "harness_overhead_ms>0.5", gate_on="point")["harness_overhead_ms>0.5"].trips) == 2
    # the change: 0.7 with the MOVER interval from the two CIs, lower bound below +0.5
    assert not g["harness_overhead_ms>+0.5"].held
    assert gates(res, "harness_overhead_ms>+0.5", gate_on="point")["harness_overhead_ms>+0.5"].held


def test_counts_unverified_change_failed_and_only_in_base():
    failed = row("", (), cell="phase3b-x", status="failed", error="boom")
    base = [row(values=TIGHT, unverified=2), row("cache_hit", TIGHT), failed]
    new = [row(values=TIGHT, unverified=2), failed]
    res = cmp.match(base, new)
    g = gates(res, "unverified>0", "unverified>+0", "failed>0", "failed>+0", "only_in_base>0", "only_in_base>1")
    assert g["unverified>0"].held and not g["unverified>+0"].held  # as unverified as BASE was
    assert g["failed>0"].held and not g["failed>+0"].held  # one failed cell on each side
    assert g["only_in_base>0"].held and not g["only_in_base>1"].held
    assert g["only_in_base>0"].trips[0].where.startswith("1 rows: 1 vllm_http tiny/f16 512/256 cache_hit")


def test_mover_interval():
    d = cmp.mover(10.0, (9.0, 11.0), 15.0, (14.0, 16.0))
    assert d.diff == 5 and d.diff_ci == pytest.approx((5 - 2 ** 0.5, 5 + 2 ** 0.5))
    assert d.rel_pct == 50 and d.rel_ci == pytest.approx((10 * (5 - 2 ** 0.5), 10 * (5 + 2 ** 0.5)))
    assert cmp.mover(None, None, 1.0, None) is None


# ---------------------------------------------------------------- matching


def test_same_settings_other_release_match():
    res = cmp.match([row(values=TIGHT, release="vLLM 0.27.0")], [row(values=TIGHT, release="vLLM 0.32.0",
                                                                     host="h200", run="other")])
    assert len(res.matches) == 1 and not res.matches[0].by and not res.ambiguous
    assert cmp.where_change(res.matches[0].base, res.matches[0].new) == "vLLM 0.27.0 → vLLM 0.32.0"


def test_release_axis_on_real_cells(tmp_path):
    """Two committed vLLM cells of one settings and two releases, as two run folders: matched cell by cell."""
    for side, ver in (("base", "0.27.0"), ("new", "0.32.0")):
        (tmp_path / side).mkdir()
        shutil.copy(VERSIONS / f"host-vllm_{ver}-phase1-vllm_http-512x256.json", tmp_path / side)
    res, _, md = cmp.run([tmp_path / "base"], [tmp_path / "new"], [])
    assert [m.new.condition for m in res.matches] == ["cache_hit", "cache_miss"]
    assert not res.only_base and not res.only_new
    assert all(cmp.where_change(m.base, m.new) == "vLLM 0.27.0 → vLLM 0.32.0" for m in res.matches)
    assert all(m.ttft is not None and m.ttft.diff_ci is not None for m in res.matches)
    assert md.startswith("# compare: 2 matched, 0 only in BASE, 0 only in NEW; no gates")


def test_ambiguous_keys_match_by_release_and_say_so():
    base = [row(values=TIGHT, release="vLLM 0.27.0"), row(values=TIGHT, release="vLLM 0.32.0")]
    new = [row(values=TIGHT, release="vLLM 0.32.0"), row(values=TIGHT, release="vLLM 0.27.0")]
    res = cmp.match(base, new)
    assert sorted((m.base.release, m.new.release) for m in res.matches) == [("vLLM 0.27.0", "vLLM 0.27.0"),
                                                                         ("vLLM 0.32.0", "vLLM 0.32.0")]
    assert all(m.by == ("release/runtime/device",) for m in res.matches)
    assert len(res.ambiguous) == 1 and "several rows on BASE and NEW" in res.ambiguous[0]
    # identical on every fact (a folder copied under another name): paired in order, and said so
    res = cmp.match([row(values=TIGHT), row(values=TIGHT)], [row(values=TIGHT), row(values=TIGHT)])
    assert len(res.matches) == 2 and res.matches[0].by[-1] == "order"


def test_ambiguous_side_on_real_cells():
    """cpu-versions holds every key four times (two releases x host/docker): only the same release and
    runtime as cpu-demo's pairs up; the other rows are listed, with why."""
    res, _, md = cmp.run([DEMO_A], [VERSIONS], [])
    assert (len(res.matches), len(res.only_base), len(res.only_new)) == (10, 54, 30)
    assert all(m.by == ("release/runtime/device",) and m.base.where == m.new.where for m in res.matches)
    assert "10 keys with several rows on NEW" in md
    assert all("a key with several rows on a side matches by release/runtime/device too" in u.reason
               for u in res.only_new)


def test_rows_on_one_side_are_listed_with_the_reason():
    base = [row(values=TIGHT, settings={**SETTINGS, "flash_attn": True}), row("cache_hit", TIGHT, cell="c2", b=512)]
    new = [row(values=TIGHT), row(values=TIGHT, cell="new-only", model="llama-1b/f16")]
    res = cmp.match(base, new)
    assert not res.matches
    reasons = {u.row.cell_id: u.reason for u in res.only_base}
    assert reasons["phase1-vllm_http-512x256"] == "NEW ran it only with flash_attn=false (here flash_attn=true)"
    assert reasons["c2"] == "no such cell in NEW"
    assert {u.row.model for u in res.only_new} == {"tiny/f16", "llama-1b/f16"}
    md = cmp.markdown(res, [], ["B"], ["N"])
    assert md.startswith("# compare: 0 matched, 2 only in BASE, 2 only in NEW")
    assert "## Only in BASE (2)" in md and "## Only in NEW (2)" in md
    assert "(flash_attn=true)" in md  # the setting that tells the rows apart is in the cell's label


# ---------------------------------------------------------------- end to end (committed folders)


def test_end_to_end_two_dates(tmp_path, capsys):
    out = tmp_path / "out"
    assert cmp.main([str(DEMO_A), str(DEMO_B), "--out", str(out), *GATES]) == 1
    stdout = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("# compare: 64 matched, 0 only in BASE, 0 only in NEW; gates: 1 passed, 2 failed")
    assert md in stdout
    assert "`miss_ttft_ms>+10%` tripped on:" in md and "`unverified>0` tripped on:" not in md
    lines = (out / "compare.csv").read_text().splitlines()
    assert len(lines) == 65 and lines[0].startswith("experiment,phase,api,model,")
    assert sum("miss_ttft_ms>+10%" in line for line in lines) == int(
        md.split("| `miss_ttft_ms>+10%`")[1].split("|")[4].strip())
    # gates that do not hold: exit 0
    assert cmp.main([str(DEMO_A), str(DEMO_B), "--out", str(out), "--fail-if", "unverified>0",
                     "--fail-if", "miss_ttft_ms>+500%", "--fail-if", "failed>0"]) == 0


def test_default_out_is_news_first_folder(tmp_path):
    for side, src in (("a", DEMO_A), ("b", DEMO_B)):
        (tmp_path / side).mkdir()
        for f in sorted(src.glob("phase3a-*.json")):
            shutil.copy(f, tmp_path / side)
    proc = subprocess.run([sys.executable, "-m", "kvmatrix.analysis.compare", str(tmp_path / "a"),
                           str(tmp_path / "b"), "--fail-if", "unverified>0"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "compare.md").read_text().startswith("# compare: 6 matched, 0 only in BASE")
    assert (tmp_path / "b" / "compare.csv").exists() and not (tmp_path / "a" / "compare.md").exists()


def test_cross_host_sides_of_several_folders(tmp_path):
    """H100 vs H200 run folders: what shares its settings matches (41 rows); the rest is listed with the
    settings that differ (flash attention, --cache-ram) or as absent (vLLM only on the H200)."""
    h100 = sorted((RESULTS / "h100-2026-11-22").glob("*/"))
    h200 = sorted((RESULTS / "h200-2026-12-01").glob("*/"))
    rc = cmp.main(["--base", *map(str, h100), "--new", *map(str, h200), "--out", str(tmp_path),
                   "--fail-if", "failed>0"])
    assert rc == 0
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("# compare: 41 matched, 53 only in BASE, 24 only in NEW; gates: 1 passed")
    assert "NVIDIA H100 80GB HBM3 → NVIDIA H200" in md
    assert "NEW ran it only with flash_attn=false (here flash_attn=true)" in md
