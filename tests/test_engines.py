"""Real engines: llama-server and llama-cpp-python from ONE llama.cpp build on the generated tiny model.

These start the real engines through the same command a user types
(``python -m kvmatrix.matrix run``) and check the result documents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_kvmatrix

pytestmark = pytest.mark.engine

SMALL = ["--config", "128/64", "--trials", "2", "--settle-ms", "50", "--max-output-tokens", "8"]


def _cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def _all_engine_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "llama-server" in line and "kvmatrix" in line]


# llama-servers already running before these tests (another run on the machine) are not ours to judge.
_PREEXISTING = {line.split()[0] for line in _all_engine_processes()}


def _engine_processes() -> list[str]:
    """llama-server processes started since this module was imported and still alive."""
    return [line for line in _all_engine_processes() if line.split()[0] not in _PREEXISTING]


@pytest.fixture(scope="module")
def phase3_run(llama_build, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("phase3")
    proc = run_kvmatrix("run", "--phases", "3a,3b", *SMALL, "--out", str(out), "--run-name", "itest")
    return out, proc


def test_all_cells_ok_and_every_trial_engine_verified(phase3_run):
    out, proc = phase3_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = _cells(out)
    assert set(cells) == {
        "phase3a-llamacpp_http-128x64",
        "phase3b-llamacpp_python-chat-128x64",
        "phase3b-llamacpp_python-template-128x64",
    }
    for cell_id, doc in cells.items():
        assert doc["status"] == "ok", (cell_id, doc.get("error"))
        for cond in ("cache_hit", "cache_miss"):
            trials = doc[cond]["trials"]
            assert len([t for t in trials if not t["warmup"]]) == 2
            assert doc[cond]["stats"]["verified_trials"] == 2
            for t in trials:
                assert t["cache_verified"], (cell_id, cond, t)
                assert t["cached_tokens"] == t["expected_cached_tokens"]
                assert t["ttft_ms"] > 0 and t["ttft_non_streaming_ms"] > 0 and t["throughput"] > 0
                assert t["completion_tokens"] == 8  # EOS ignored: the count is exact
        hit, miss = doc["cache_hit"]["trials"][-1], doc["cache_miss"]["trials"][-1]
        # hit: the whole [A,B] prefix (plus the template's first tokens) is reused
        assert hit["cached_tokens"] >= 128 + 64
        # miss: nothing beyond the chat template's shared first tokens
        assert 0 < miss["cached_tokens"] < 16
        assert doc["ttft_degradation_pct"] is not None


def test_effective_settings_equal_requested(phase3_run):
    out, _ = phase3_run
    for cell_id, doc in _cells(out).items():
        rt = doc["runtime"]
        assert rt["mismatches"] == [], cell_id
        for key in ("n_ctx", "n_batch", "n_ubatch", "n_parallel", "flash_attn", "n_threads", "n_threads_batch",
                    "cache_type_k", "cache_type_v", "n_gpu_layers", "cache_ram_mib"):
            assert rt["effective"][key] == rt["requested"][key], (cell_id, key)


def test_provenance_names_commit_and_build_flags(phase3_run, llama_build):
    out, _ = phase3_run
    source, build, _ = llama_build
    for doc in _cells(out).values():
        prov = doc["provenance"]
        assert prov["llama_cpp_commit"] == source.commit != "unknown"
        assert "-DBUILD_SHARED_LIBS=ON" in prov["build_flags"]
        assert prov["system_info"]
        assert prov["compiler"]
    server = _cells(out)["phase3a-llamacpp_http-128x64"]["provenance"]
    assert server["engine_build_info"].endswith(source.commit)
    bindings = _cells(out)["phase3b-llamacpp_python-chat-128x64"]["provenance"]
    assert bindings["libllama"] == str(build.bin_dir)  # the bindings ran the server's build


def test_no_engine_left_running(phase3_run):
    assert _engine_processes() == []


def test_resume_skips_completed_cells(phase3_run):
    out, _ = phase3_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    proc = run_kvmatrix("run", "--phases", "3a,3b", *SMALL, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped (--resume)" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == before


def test_report_from_real_results(phase3_run, tmp_path):
    pytest.importorskip("matplotlib")
    from kvmatrix.analysis.report import write_report

    out, _ = phase3_run
    report = write_report([out], tmp_path)
    text = report.read_text()
    assert "phase3a" in text or "llamacpp_http" in text
    assert "2/2" in text  # verified trials per condition
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 2


def test_engine_that_fails_to_start_is_a_failed_cell(llama_build, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = run_kvmatrix("run", "--phases", "3a", *SMALL, "--model", str(bad), "--out", str(tmp_path / "r"))
    # an unreadable GGUF is refused up front with one line
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kvmatrix: error: cannot read")
    assert not list((tmp_path / "r").glob("*.json"))


def test_killed_runner_becomes_failed_cell_and_leaves_no_engine(llama_build, tiny_model, tmp_path):
    """SIGKILL the runner mid-cell: the host records a failed cell and reaps llama-server."""
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "kvmatrix.matrix", "run", "--phases", "3a", "--config", "128/64",
            "--trials", "50", "--settle-ms", "50", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = out / "logs" / "phase3a-llamacpp_http-128x64.engine.pid"
    deadline = time.monotonic() + 300
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "llama-server never started"
    time.sleep(2)
    runner = subprocess.run(["pgrep", "-f", f"kvmatrix.runners {out}"], capture_output=True, text=True).stdout.split()
    assert runner, "runner process not found"
    for pid in runner:
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    doc = json.loads((out / "phase3a-llamacpp_http-128x64.json").read_text())
    assert doc["status"] == "failed"
    assert "SIGKILL" in doc["error"]
    assert doc["log_tail"]
    assert _engine_processes() == []
