"""Real vLLM: the OpenAI server (phase 1) and LLM in-process (phase 2) on the generated tiny model.

Uses the cached vLLM environment (``kvmatrix.matrix.vllm.ensure_env``; skipped
with the reason when it cannot be made) and runs the cells through the same
command a user types. vLLM caches whole blocks (128 tokens on the CPU), so the
config spans several blocks; 256/110 also makes [A,B] end 22 tokens before a
block boundary that [A,B,Q] crosses, which exercises the adapters' re-send
of the previous prompt (vllm_common.CacheIsolation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.spec import RuntimeSpec
from tests.conftest import REPO, run_kvmatrix

pytestmark = [pytest.mark.engine, pytest.mark.vllm]

CONFIG = "256/110"
SMALL = ["--config", CONFIG, "--trials", "2", "--settle-ms", "50", "--max-output-tokens", "8"]
CELLS = ("phase1-vllm_http-256x110", "phase2-vllm_python-256x110")
BLOCK = 128


@pytest.fixture(scope="session")
def vllm_env():
    from kvmatrix.matrix import vllm as vllmenv
    from kvmatrix.plumbing.console import UserError

    try:
        return vllmenv.ensure_env(vllmenv.DEFAULT_VERSION, "cpu")
    except (UserError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the vLLM environment cannot be created here: {exc}")


@pytest.fixture(scope="session")
def hf_model():
    """The generated tiny model (HF directory), without building llama.cpp."""
    from kvmatrix.matrix import llamacpp
    from kvmatrix.models.store import ensure_model

    source = llamacpp.ensure_source(os.environ.get("KVMATRIX_LLAMA_SOURCE"))
    return ensure_model("tiny", source.path, source.commit)


def _all_vllm_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "vllm" in line.lower() and "pytest" not in line]


# vLLM processes that existed before these tests (someone else's run on the same machine) are not ours to judge.
_PREEXISTING = {line.split()[0] for line in _all_vllm_processes()}


def _vllm_processes() -> list[str]:
    """vLLM processes started since this module was imported (the ones these tests must not leave behind)."""
    return [line for line in _all_vllm_processes() if line.split()[0] not in _PREEXISTING]


def _leftover_run_dirs() -> list[Path]:
    """Run folders of vLLM runners that are gone (their pid is in the folder name)."""
    base = Path(tempfile.gettempdir())
    bases = {base, Path("/tmp")}
    return [p for b in bases for p in b.glob(vc.RUN_DIR_PREFIX + "*")
            if not Path(f"/proc/{p.name[len(vc.RUN_DIR_PREFIX):].split('-')[0]}").exists()]


def _requests(out: Path, cell_id: str) -> list[dict]:
    path = out / "logs" / f"{cell_id}.requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def vllm_run(vllm_env, hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    t0 = time.monotonic()
    proc = run_kvmatrix("run", "--phases", "1,2", *SMALL, "--out", str(out), "--run-name", "vtest", timeout=1500)
    return out, proc, time.monotonic() - t0


def test_rendered_flags_exist_in_the_real_help(vllm_env, hf_model):
    """Every flag rendered for this version (CPU and GPU options, prefix caching on and off) is in --help."""
    python = str(vllm_env.python)
    proc = subprocess.run([python, "-m", vc.SERVER_ENTRYPOINT, "--help=all"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if proc.returncode != 0:  # versions without --help=all list every flag in --help's usage lines
        proc = subprocess.run([python, "-m", vc.SERVER_ENTRYPOINT, "--help"], capture_output=True, text=True,
                              timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    known = vc.help_flags(proc.stdout)
    assert len(known) > 100
    flags = vc.flags_for(vllm_env.version)
    cpu = vc.EngineOptions(device="cpu", dtype="float32", enforce_eager=True, kv_cache_space_gib=1)
    gpu = vc.EngineOptions(device="cuda", gpu_memory_utilization=0.9)
    for opts, kv in ((cpu, "f32"), (gpu, "f16")):
        for prefix in (True, False):
            spec = RuntimeSpec(n_threads=1, n_threads_batch=1, cache_type_k=kv, cache_type_v=kv, prefix_caching=prefix)
            settings = vc.engine_settings(flags, spec, opts, hf_model.hf_dir)
            argv = vc.server_argv(flags, settings, str(hf_model.hf_dir), python=python, host="127.0.0.1", port=1,
                                  served_model_name="m")
            missing = [f for f in vc.flag_names(argv) if f not in known]
            assert not missing, f"flags not in vLLM {vllm_env.version}'s --help: {missing}"
    # the row's claims about this version: both prefix-caching forms exist (rendered explicitly both ways:
    # the --help default is None, resolved by vLLM per model), cached-token details can be switched on
    assert {"--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-prompt-tokens-details"} <= known


def test_cells_ok_and_every_trial_engine_verified(vllm_run):
    out, proc, _ = vllm_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    for cell_id in CELLS:
        doc = json.loads((out / f"{cell_id}.json").read_text())
        assert doc["status"] == "ok", (cell_id, doc.get("error"), doc.get("log_tail"))
        for cond in ("cache_hit", "cache_miss"):
            trials = doc[cond]["trials"]
            assert len([t for t in trials if not t["warmup"]]) == 2
            for t in trials:
                assert t["cache_verified"], (cell_id, cond, t)
                assert t["cached_tokens"] == t["expected_cached_tokens"]
                assert t["cache_granularity"] == BLOCK
                assert t["completion_tokens"] == 8  # ignore_eos: exact
                assert t["ttft_ms"] > 0 and t["ttft_non_streaming_ms"] > 0 and t["throughput"] > 0
                assert t["engine_prompt_ms"] is not None and t["engine_prompt_ms"] > 0
        # hit: [A,B] plus the template's 4 first tokens = 370 tokens -> 2 whole blocks
        assert {t["cached_tokens"] for t in doc["cache_hit"]["trials"]} == {256}
        # miss: [B,Q] shares only the template's first 4 tokens with [A,B]: no whole block
        assert {t["cached_tokens"] for t in doc["cache_miss"]["trials"]} == {0}
        assert doc["timing"]["engine_start_s"] < 300


def test_effective_settings_equal_requested(vllm_run):
    out, _, _ = vllm_run
    for cell_id in CELLS:
        rt = json.loads((out / f"{cell_id}.json").read_text())["runtime"]
        assert rt["mismatches"] == [], cell_id
        eff, req = rt["effective"], rt["requested"]
        for key in ("n_ctx", "n_batch", "prefix_caching", "seed", "cache_type_k", "cache_type_v", "n_gpu_layers",
                    "cache_ram_mib", "n_threads", "n_threads_batch", "temperature"):
            assert eff[key] == req[key], (cell_id, key)
        assert eff["block_size"] == BLOCK and eff["device"] == "cpu" and eff["dtype"] == "float32"
        assert eff["max_num_seqs"] == 1 and eff["enforce_eager"] is True
        assert eff["cache_isolation"] == "previous_prompt"
        # no vLLM equivalent: reported as unverified, never as equal
        assert {"n_parallel", "n_ubatch", "flash_attn"} <= set(rt["unverified"])
    phase2 = json.loads((out / f"{CELLS[1]}.json").read_text())
    assert phase2["runtime"]["effective"]["ttft_kind"] == "generate_max_tokens_1"


def test_engine_cached_tokens_agree_with_the_counters(vllm_run):
    """usage.cached_tokens / num_cached_tokens == the vllm:prefix_cache_hits delta, every request."""
    out, _, _ = vllm_run
    for cell_id in CELLS:
        reqs = _requests(out, cell_id)
        # 1 warm-up + 2 measured trials, 2 conditions, 6 protocol requests each + the calibration control
        # (re-warm + reference query; the server also re-warm + token-id query): the cell ran exactly once
        per_trial = 6 + 2 + (2 if cell_id.startswith("phase1") else 0)
        assert len(reqs) == 3 * 2 * per_trial, cell_id
        for r in reqs:
            engine = r.get("cached_tokens_usage", r.get("cached_tokens_engine"))
            assert engine == r["metrics_prefix_cache_hits"], (cell_id, r)
            assert r["metrics_prefix_cache_queries"] == r["prompt_tokens"], (cell_id, r)
        assert any(r.get("cache_reset") for r in reqs)
        assert any(r.get("resent_tokens") for r in reqs)  # 256/110 needs the previous prompt re-sent
    chat = [r for r in _requests(out, CELLS[0]) if r["endpoint"] == "/v1/chat/completions"]
    assert chat and all(r["prompt_ids_source"] == "engine" and r["prompt_ids_match_tokenize"] for r in chat)
    tokens = [r for r in _requests(out, CELLS[0]) if r["endpoint"] == "/v1/completions"]
    assert tokens and all(r["prompt_ids_source"] == "request" for r in tokens)  # the calibration's token-id path
    assert all(r["prompt_ids_match_template"] for r in _requests(out, CELLS[1]))


def test_phase2_children_were_spawned_once_and_the_cell_ran_once(vllm_run):
    out, proc, _ = vllm_run
    log = (out / "logs" / f"{CELLS[1]}.engine.log").read_text(errors="replace")
    assert log.count("Initializing a V1 LLM engine") == 1
    # each progress step printed once: the spawned children never re-ran the runner's main
    assert proc.stderr.count(f"[{CELLS[1]} 6/6]") == 1


def test_nothing_left_behind(vllm_run):
    out, _, _ = vllm_run
    assert _vllm_processes() == []
    assert _leftover_run_dirs() == []  # run-owned caches and temp files removed
    assert not list((out / "logs").glob("*.pid"))


def test_report_includes_vllm_cells(vllm_run, tmp_path):
    pytest.importorskip("matplotlib")
    from kvmatrix.analysis.report import write_report

    out, _, _ = vllm_run
    text = write_report([out], tmp_path).read_text()
    assert "vllm" in text.lower()


def test_server_and_llm_that_fail_during_start_up(vllm_env, hf_model, tmp_path):
    """max_model_len above what the model allows: both engines exit during start-up -> failed cells with the
    engine's own error in the log tail, exit 1, no process left."""
    out = tmp_path / "bad"
    proc = run_kvmatrix("run", "--phases", "1,2", "--config", "256/128", "--trials", "1", "--n-ctx", "8192",
                        "--n-batch", "8192", "--out", str(out), timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for cell_id in ("phase1-vllm_http-256x128", "phase2-vllm_python-256x128"):
        doc = json.loads((out / f"{cell_id}.json").read_text())
        assert doc["status"] == "failed"
        assert "\n" not in doc["error"]
        assert "max_model_len" in doc["log_tail"], doc["log_tail"][-2000:]
    server = json.loads((out / "phase1-vllm_http-256x128.json").read_text())
    assert "exited during start-up" in server["error"] and "max_model_len (8192)" in server["error"]
    llm = json.loads((out / "phase2-vllm_python-256x128.json").read_text())
    assert llm["error"].startswith("EngineError: vLLM LLM() failed: ") and "max_model_len (8192)" in llm["error"]
    assert "Traceback" in llm["log_tail"] or "max_model_len (8192)" in llm["log_tail"]
    assert _vllm_processes() == []
    assert _leftover_run_dirs() == []


def test_killed_phase2_runner_leaves_no_engine_process(vllm_env, hf_model, tmp_path):
    """SIGKILL the in-process runner mid-cell: the host records the failure and reaps vLLM's children
    through the runner's process group named in the pid file."""
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "kvmatrix.matrix", "run", "--phases", "2", "--config", "256/128",
            "--trials", "50", "--settle-ms", "50", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cell_id = "phase2-vllm_python-256x128"
    requests = out / "logs" / f"{cell_id}.requests.jsonl"
    deadline = time.monotonic() + 300
    while not requests.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests.exists(), "the engine never served a request"
    assert (out / "logs" / f"{cell_id}.engine.pid").exists()
    assert _vllm_processes(), "expected vLLM's engine processes while the cell runs"
    runner = subprocess.run(["pgrep", "-f", f"kvmatrix.runners {out}"], capture_output=True, text=True).stdout.split()
    assert runner, "runner process not found"
    for pid in runner:
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    doc = json.loads((out / f"{cell_id}.json").read_text())
    assert doc["status"] == "failed" and "SIGKILL" in doc["error"]
    deadline = time.monotonic() + 30
    while _vllm_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _vllm_processes() == []
    # the killed runner could not remove its run folder; the next vLLM start does (dead pid in its name)
    for base in {Path(tempfile.gettempdir()), Path("/tmp")}:
        vc.remove_stale_run_dirs(base)
    assert _leftover_run_dirs() == []
