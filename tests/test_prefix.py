"""The repeated-prefix benchmark (``kvmatrix prefix``): prompt sets, aggregation, write-up, bad input, engines.

Unit tests use a fake tokenizer (one token per word / punctuation mark /
newline, like a byte-level BPE whose vocabulary holds every corpus word).
The llama-server test starts the real engine on the tiny model (marked
``engine``). The vLLM test is marked ``slow`` and ``vllm`` and runs only with
``KVMATRIX_SLOW=1`` (two vLLM CPU start-ups take several minutes).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re

import pytest

from kvmatrix.analysis import prefix_report as pr_report
from kvmatrix.runners import prompts as pr
from kvmatrix.runners.spec import ABConfig, ExperimentSpec, RuntimeSpec, SpecError
from tests.conftest import run_kvmatrix

TOKEN = re.compile(r" ?[A-Za-z]+| ?[0-9]+|\n|[^\sA-Za-z0-9]| ")


class FakeTokenizer:
    def __init__(self):
        self.ids: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return [self.ids.setdefault(t, len(self.ids)) for t in TOKEN.findall(text)]


@pytest.fixture(scope="module")
def builder():
    return pr.PromptBuilder(FakeTokenizer())


# ---------------------------------------------------------------- prompt sets
def test_prompt_set_is_token_exact_and_readable(builder):
    records = builder.prompt_set([384, 1024], 20, seed=7)
    assert len(records) == 40
    tok = builder.tokenize
    for n in (384, 1024):
        group = [r for r in records if r.prefix_len_tokens == n]
        assert len(group) == 20 and len({r.prefix for r in group}) == 1  # ONE shared prefix per regime
        assert len({r.question_part for r in group}) == 20  # distinct questions
        assert all(r.workload == ("chat_policy" if n == 384 else "rag_prefix") for r in group)
        for r in group:
            pre = tok(r.prefix)
            assert len(pre) == n
            assert tok(r.prompt)[:n] == pre
            assert r.prompt.endswith("?\nA:") and "\nQ: What do" in r.prompt
        assert group[0].prefix.split(".")[0].count(" ") >= 3  # starts with a corpus sentence, not padding


def test_prompt_set_is_deterministic(builder):
    a = builder.prompt_set([384], 5, seed=3)
    b = pr.PromptBuilder(FakeTokenizer()).prompt_set([384], 5, seed=3)
    c = builder.prompt_set([384], 5, seed=4)
    assert pr.to_jsonl(a) == pr.to_jsonl(b)
    assert pr.digest(a) == pr.digest(b) != pr.digest(c)


def test_unique_prefix_same_length_different_start(builder):
    rec = builder.prompt_set([384], 2, seed=1)[0]
    u1, u2 = builder.with_unique_prefix(rec, 11), builder.with_unique_prefix(rec, 12)
    tok = builder.tokenize
    for u in (u1, u2):
        assert len(tok(u.prefix)) == 384 and u.question_part == rec.question_part
        assert tok(u.prefix)[:8] != tok(rec.prefix)[:8]
    assert u1.prefix != u2.prefix


def test_reuse_plan_counts_and_seed():
    assert sum(pr.reuse_plan(20, 0.5, 1)) == 10
    assert sum(pr.reuse_plan(20, 1.0, 1)) == 20 and sum(pr.reuse_plan(20, 0.0, 1)) == 0
    assert pr.reuse_plan(20, 0.5, 1) == pr.reuse_plan(20, 0.5, 1)


def test_jsonl_round_trip(builder):
    records = builder.prompt_set([384], 3, seed=2)
    assert pr.parse_jsonl(pr.to_jsonl(records)) == records


@pytest.mark.parametrize(("text", "needle"), [
    ("", "has no prompts"),
    ("\n\n", "has no prompts"),
    ("{not json\n", "line 1: not JSON"),
    ('["a"]\n', "expected a JSON object"),
    ('{"prompt": "P\\nQ: x?\\nA:", "workload": "chat_policy"}\n', "missing prefix_len_tokens"),
    ('{"prompt": "no question", "prefix_len_tokens": 3, "workload": "chat_policy"}\n', "<PREFIX>\\nQ:"),
    ('{"prompt": "P\\nQ: x?\\nA:", "prefix_len_tokens": -1, "workload": "chat_policy"}\n', "positive integer"),
    ('{"prompt": "P\\nQ: x?\\nA:", "prefix_len_tokens": 1, "workload": "chat"}\n', "workload 'chat'"),
    ('{"prompt": "P\\nQ: x?\\nA:", "prefix_len_tokens": 1, "workload": "chat_policy"}\n'
     '{"prompt": "R\\nQ: y?\\nA:", "prefix_len_tokens": 1, "workload": "chat_policy"}\n', "2 different prefixes"),
])
def test_jsonl_validation_errors(text, needle):
    with pytest.raises(pr.PromptSetError) as info:
        pr.parse_jsonl(text, "f.jsonl")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_builder_check_refuses_wrong_token_count(builder):
    rec = builder.prompt_set([384], 1, seed=2)[0]
    with pytest.raises(pr.PromptSetError, match="prefix is 384 tokens"):
        builder.check(pr.PromptRecord(rec.prompt, 380, rec.workload))


def test_regimes_and_spec_validation():
    assert pr.parse_regimes("medium,large") == [384, 1024]
    assert pr.parse_regimes("512, 512") == [512]
    with pytest.raises(pr.PromptSetError):
        pr.parse_regimes("huge")
    exp = ExperimentSpec(name="prefix_reuse", config=ABConfig(1024, 16), max_output_tokens=16,
                         prefix_regimes=(384, 1024))
    exp.validate(RuntimeSpec(n_ctx=2048 * 16, n_parallel=16))
    with pytest.raises(SpecError, match="context per slot is 1024"):
        exp.validate(RuntimeSpec(n_ctx=1024))
    with pytest.raises(SpecError, match=">= 1"):
        ExperimentSpec(name="prefix_reuse", concurrency=(0,)).validate(RuntimeSpec())
    assert ExperimentSpec.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp


# ---------------------------------------------------------------- aggregation + write-up
def _rows(engine="llamacpp_http", mode="with_prefix_cache", n=384, conc=1, reuse=100, ttfts=(0.01, 0.02, 0.03, 0.04),
          cached=384, wall=1.0):
    out = []
    for i, t in enumerate(ttfts):
        shares = i < round(len(ttfts) * reuse / 100)
        c = cached if (shares and mode == "with_prefix_cache") else 0
        out.append({"engine": engine, "mode": mode, "workload": "chat_policy", "regime": "medium",
                    "prefix_len_tokens": n, "concurrency": conc, "reuse_pct": reuse, "index": i,
                    "shares_prefix": shares, "ok": True, "error": None, "ttft_s": t, "e2e_s": t + 0.1,
                    "prompt_tokens": n + 18, "completion_tokens": 16, "cached_tokens": c,
                    "hit_threshold_tokens": n, "cache_hit": c >= n, "expected_hit": shares and mode == "with_prefix_cache",
                    "cache_granularity": 1, "start_offset_s": 0.0, "connect_s": 0.001, "batch_wall_s": wall,
                    "question": f"q{i}", "cell_id": f"prefix-{engine}-x"})
    return out


def test_aggregate_statistics_and_hit_ratios():
    rows = _rows(reuse=50) + _rows(mode="no_prefix_cache", ttfts=(0.5, 0.5, 0.5, 0.7), wall=2.0)
    groups = pr_report.aggregate(rows)
    on = pr_report.find(groups, mode="with_prefix_cache")
    off = pr_report.find(groups, mode="no_prefix_cache")
    assert on["n"] == 4 and on["failed"] == 0
    assert on["mean_ttft_s"] == pytest.approx(0.025)
    assert on["p50_ttft_s"] == pytest.approx(0.025)
    assert on["p95_ttft_s"] == pytest.approx(0.0385)
    assert on["mean_e2e_s"] == pytest.approx(0.125)
    assert on["verified_hits"] == 2 and on["verified_hit_ratio"] == 0.5 and on["expected_hit_ratio"] == 0.5
    assert on["reuse_hit_ratio"] == 1.0
    assert on["tok_s"] == pytest.approx(64.0) and on["req_s"] == pytest.approx(4.0)
    assert on["total_tokens"] == 4 * (384 + 18 + 16)
    assert off["verified_hit_ratio"] == 0 and off["expected_hit_ratio"] == 0.0
    assert off["tok_s"] == pytest.approx(32.0)
    assert [g["mode"] for g in groups] == ["no_prefix_cache", "with_prefix_cache"]


def test_failed_requests_are_counted_not_averaged():
    rows = _rows()
    rows[0].update(ok=False, ttft_s=None, e2e_s=None, error="HttpError: boom", cached_tokens=None, cache_hit=False)
    g = pr_report.aggregate(rows)[0]
    assert g["failed"] == 1 and g["mean_ttft_s"] == pytest.approx(0.03)
    assert "1 failed" in pr_report.note({**g, "threshold": 384})


def _cell(tmp_path, engine, caching, rows):
    mode = "with_prefix_cache" if caching else "no_prefix_cache"
    cell_id = f"prefix-{engine}-{'cache_on' if caching else 'cache_off'}"
    for r in rows:
        r["cell_id"] = cell_id
    prompts = tmp_path / "prompts" / f"{cell_id}.jsonl"
    prompts.parent.mkdir(exist_ok=True)
    prompts.write_text('{"prompt": "P\\nQ: x?\\nA:", "prefix_len_tokens": 1, "workload": "chat_policy"}\n')
    doc = {"schema_version": 1, "cell_id": cell_id, "run": "t", "phase": "3a", "backend": engine,
           "experiment": "prefix_reuse", "status": "ok", "model": {"name": "tiny", "params": 1},
           "runtime": {"requested": {"prefix_caching": caching},
                       "rendered": {"argv": ["llama-server", "-np", "16", "--cache-ram", "0"]}},
           "requests": rows, "groups": [{"memory": {"peak_rss_mib": 70.0 + caching}}],
           "warmups": [], "memory": {"after_start": {"rss_mib": 60.0}, "after_runs": {"kv_buffer_mib": 32.0}},
           "prefix": {"mode": mode, "variants": 4, "concurrency": [1, 16], "reuse_mixes": [1.0, 0.5, 0.0],
                      "max_output_tokens": 16},
           "prompt_set": {"path": f"prompts/{cell_id}.jsonl", "sha256": "ab" * 32, "source": "generated"},
           "host_load": {"cpus": 2, "loadavg_1m_start": 1.0, "loadavg_1m_end": 1.5}}
    (tmp_path / f"{cell_id}.json").write_text(json.dumps(doc))


def test_write_report_from_cell_json(tmp_path):
    on, off = [], []
    for conc in (1, 16):
        for reuse in (100, 50, 0):
            on += _rows(conc=conc, reuse=reuse, ttfts=(0.01 * conc, 0.02, 0.3, 0.4) if reuse < 100
                        else (0.01, 0.01, 0.02, 0.02))
            off += _rows(mode="no_prefix_cache", conc=conc, reuse=reuse, ttfts=(0.4, 0.4, 0.5, 0.5))
    _cell(tmp_path, "llamacpp_http", True, on)
    _cell(tmp_path, "llamacpp_http", False, off)
    path = pr_report.write_report(tmp_path)
    text = path.read_text()
    assert "| mode | prefix_len_tokens | concurrency | mean_ttft_s | mean_e2e_s | p95_e2e_s | tok_s | notes |" in text
    assert "with_prefix_cache" in text and "no_prefix_cache" in text
    assert "## Hit-rate mental model" in text and "## Memory" in text and "## Conclusions" in text
    assert "cache_prompt: false" in text and "--cache-ram 0" in text
    conclusions = text.split("## Conclusions")[1]
    assert 3 <= len(re.findall(r"^\d\. ", conclusions, re.M)) <= 5
    assert "x sooner" in conclusions  # computed: off 450 ms -> on 15 ms
    with open(tmp_path / "prefix_requests.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(on) + len(off)
    summary = json.loads((tmp_path / "prefix_summary.json").read_text())["groups"]
    assert len(summary) == 12 and all(not isinstance(v, float) or math.isfinite(v) for g in summary for v in g.values())
    assert (tmp_path / "prompts.jsonl").is_file()
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "figures" / "prefix_ttft_vs_concurrency.png").stat().st_size > 1000
        assert (tmp_path / "figures" / "prefix_p95_e2e_vs_concurrency.png").is_file()


# ---------------------------------------------------------------- bad input (CLI)
@pytest.mark.parametrize(("args", "content", "needle"), [
    (["--prefix-regimes", "4000"], None, "context per slot is 2048"),
    (["--prefix-regimes", "huge"], None, "prefix regime 'huge'"),
    (["--concurrency", "0,4"], None, "every level must be >= 1"),
    (["--concurrency", "a"], None, "give integers"),
    (["--backend", "nope"], None, "unknown backend 'nope'"),
    (["--reuse-mixes", "150"], None, "between 0 and 100"),
    (["--variants", "0"], None, "at least 1 question"),
    (["--prompts"], "", "has no prompts"),
    (["--prompts"], "{oops\n", "line 1: not JSON"),
    (["--prompts"], '{"prompt": "P\\nQ: x?\\nA:", "prefix_len_tokens": 3000, "workload": "rag_prefix"}\n',
     "context per slot is 2048"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, content, needle):
    if content is not None:
        f = tmp_path / "p.jsonl"
        f.write_text(content)
        args = [*args, str(f)]
    out = tmp_path / "out"
    proc = run_kvmatrix("prefix", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmatrix: error: ") and needle in lines[0], lines
    assert not out.exists()


# ---------------------------------------------------------------- real engines
def _check_run(out, backend):
    cells = {p.stem: json.loads(p.read_text()) for p in out.glob("prefix-*.json")}
    on, off = cells[f"prefix-{backend}-cache_on"], cells[f"prefix-{backend}-cache_off"]
    assert on["status"] == "ok" and off["status"] == "ok", (on.get("error"), off.get("error"))
    assert on["runtime"]["mismatches"] == [] and off["runtime"]["mismatches"] == []
    reusing = [r for r in on["requests"] if r["shares_prefix"]]
    assert reusing and all(r["ok"] for r in on["requests"] + off["requests"])
    assert all(r["cached_tokens"] > 0 for r in reusing)
    assert sum(r["cache_hit"] for r in reusing) >= len(reusing) * 0.75
    assert all(r["cached_tokens"] == 0 for r in off["requests"])
    assert all(r["completion_tokens"] == 8 for r in on["requests"] + off["requests"])
    assert (out / "prefix_caching_results.md").is_file() and (out / "prefix_requests.csv").is_file()
    assert (out / "prompts.jsonl").is_file() and (out / "prefix_summary.csv").is_file()
    return on, off


@pytest.mark.engine
def test_llama_server_prefix_cache_on_vs_off(llama_build, tiny_model, tmp_path):
    out = tmp_path / "prefix"
    proc = run_kvmatrix("prefix", "--backend", "llamacpp_http", "--variants", "4", "--concurrency", "1,4",
                        "--prefix-regimes", "medium", "--max-tokens", "8", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on, off = _check_run(out, "llamacpp_http")
    assert on["runtime"]["effective"]["n_parallel"] == 4 and on["runtime"]["effective"]["n_ctx"] == 4 * 2048
    assert "--cache-ram" in on["runtime"]["rendered"]["argv"]
    text = (out / "prefix_caching_results.md").read_text()
    assert "cache_prompt: true" in text and "cache_prompt: false" in text


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("KVMATRIX_SLOW") != "1",
                    reason="two vLLM CPU start-ups take minutes: set KVMATRIX_SLOW=1 to run")
def test_vllm_server_prefix_cache_on_vs_off(llama_build, tiny_model, tmp_path):
    out = tmp_path / "prefix-vllm"
    proc = run_kvmatrix("prefix", "--backend", "vllm_http", "--variants", "4", "--concurrency", "1,4",
                        "--prefix-regimes", "medium", "--max-tokens", "8", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on, _ = _check_run(out, "vllm_http")
    assert all(r["cached_tokens"] % r["cache_granularity"] == 0 for r in on["requests"])
