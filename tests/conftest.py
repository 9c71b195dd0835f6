"""Shared fixtures: the real llama.cpp build and the generated tiny model, from the cache.

The first use builds llama.cpp (minutes) and generates the model; both are
cached under $KVMATRIX_CACHE, so later runs start in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_kvmatrix(*args: str, check: bool = False, timeout: float = 1800, env: dict | None = None):
    """Run ``python -m kvmatrix.matrix ...`` as a user would; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "kvmatrix.matrix", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvmatrix {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def llama_build():
    """Source, build and runner venv of the default llama.cpp (cached)."""
    from kvmatrix.matrix import llamacpp

    source = llamacpp.ensure_source(os.environ.get("KVMATRIX_LLAMA_SOURCE"))
    build = llamacpp.ensure_build(source)
    python = llamacpp.ensure_bindings_env(source)
    return source, build, python


@pytest.fixture(scope="session")
def tiny_model(llama_build):
    from kvmatrix.models.store import ensure_model

    source = llama_build[0]
    return ensure_model("tiny", source.path, source.commit)
