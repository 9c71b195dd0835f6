"""Bad input: one line naming the problem and the fix, exit 2, nothing written or lost."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_kvmatrix


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "1500/600"], "context per slot is 2048"),
        (["--config", "512x256"], "malformed config '512x256'"),
        (["--config", "0/256"], "positive sizes"),
        (["--model", "no-such-preset"], "neither a preset"),
        (["--model", "/nonexistent/model.gguf"], "neither a preset"),
        (["--phases", "9"], "unknown phase '9'"),
        (["--trials", "0"], "at least 1 measured trial"),
        (["--n-ubatch", "4096"], "n_ubatch=4096 must be between 1 and n_batch=2048"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "phase3a-llamacpp_http-512x256.json"
    keep.write_text(json.dumps({"status": "ok"}))
    proc = run_kvmatrix("run", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("kvmatrix: error: ") and needle in line, line
    assert len(proc.stderr.strip().splitlines()) == 1  # refused before any work
    assert json.loads(keep.read_text()) == {"status": "ok"}  # nothing already written is touched


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--llama", "b100"], "no llama-cpp-python release within 150 builds"),
        (["--llama", "b4000", "--bindings-version", "9.9.9"], "9.9.9"),
        (["--shard", "3/2"], "--shard '3/2'"),
        (["--vllm", "0.5.0"], "0.5.0"),
        (["--llama-build", "server,wheel"], "unknown llama build 'wheel'"),
    ],
)
def test_matrix_bad_input(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_kvmatrix("matrix", "--runtime", "host", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("kvmatrix: error: ") and needle in line, line
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before any work


def test_run_refuses_several_versions(tmp_path):
    proc = run_kvmatrix("run", "--llama-source", "vendored:0.3.36,b4000", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "use `matrix`" in _last_line(proc)
