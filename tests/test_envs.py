"""Host environments: offline venvs (the lent GPU machine has no package index) and planned builds."""

from __future__ import annotations

import subprocess

from kvmatrix.matrix import llamacpp
from kvmatrix.plumbing import envs


def test_offline_venv_inherits_the_running_interpreters_packages(tmp_path, monkeypatch):
    """Without an index, a requirement the running interpreter already has must still resolve
    (on the GPU machine python3 is itself a venv, which --system-site-packages does not reach)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("KVMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMATRIX_OFFLINE_WHEELS", str(wheels))
    py = envs.ensure_venv("offline-check", ["pytest"])
    out = subprocess.run([str(py), "-c", "import pytest, sys; print(pytest.__file__); print(sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert str(tmp_path / "cache") in out[1]  # the new venv ...
    assert str(tmp_path / "cache") not in out[0]  # ... sees the parent's pytest
    # cached: a second call neither recreates nor reinstalls
    assert envs.ensure_venv("offline-check", ["pytest"]) == py


def test_planned_build_compiles_nothing(tmp_path):
    source = llamacpp.LlamaSource(origin="x", path=tmp_path, commit="abc1234")
    build = llamacpp.planned_build(source, cuda="off")
    assert "-DLLAMA_BUILD_COMMIT=abc1234" in build.cmake_flags
    assert not build.cuda and build.info["planned_only"]
    assert llamacpp.pip_cmake_args(build).split()[0].startswith("-D")
    assert "-DBUILD_SHARED_LIBS=ON" not in llamacpp.pip_cmake_args(build)


def test_cuda_flags_for_the_gpu_arch(tmp_path):
    source = llamacpp.LlamaSource(origin="x", path=tmp_path, commit="abc1234")
    flags = llamacpp.cmake_flags(source, True, "90")
    assert "-DGGML_CUDA=ON" in flags and "-DCMAKE_CUDA_ARCHITECTURES=90" in flags
    assert "-DGGML_CUDA=ON" not in llamacpp.cmake_flags(source, False, None)
