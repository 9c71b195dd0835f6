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
