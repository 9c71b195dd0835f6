"""One llama.cpp source + one set of CMake flags = one build, whichever entry point asks.

On a (simulated) GPU host, ``build --cuda on`` followed by ``run`` / ``matrix --runtime host`` with
``--cuda on`` or ``auto`` must find the first build's ``.complete`` entry and never run CMake again;
the key depends on the tree's content and the flags only (not on how the source is spelled).
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import pytest

from kvmatrix.matrix import cli, host, llamacpp
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import UserError


def _tree(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "tools" / "server").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(llama)\n")
    (root / "include" / "llama.h").write_text("int llama(void);\n")
    (root / "src" / "llama.cpp").write_text("int llama(void) { return 0; }\n")
    (root / "tools" / "server" / "server.cpp").write_text("int main() {}\n")
    return root


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """A host with nvcc and one compute-capability 9.0 GPU (fake tools on PATH), an empty cache,
    and CMake replaced: configure+build calls are counted, and produce the two outputs."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, out in (("nvidia-smi", "9.0"), ("nvcc", "Cuda compilation tools, release 12.4")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho '{out}'\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("KVMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMATRIX_LLAMA_COMMIT", "abc1234")
    monkeypatch.delenv("KVMATRIX_CUDA", raising=False)
    calls = []

    def cmake(cmd, log, what):
        calls.append(what)
        log.parent.mkdir(parents=True, exist_ok=True)
        if what == "build":
            build_dir = Path(cmd[cmd.index("--build") + 1])
            (build_dir / "bin").mkdir(exist_ok=True)
            (build_dir / "bin" / "llama-server").write_text("")
            (build_dir / "bin" / "libllama.so").write_text("")

    monkeypatch.setattr(llamacpp, "_stream", cmake)
    monkeypatch.setattr(llamacpp, "ensure_bindings_env", lambda source: Path("/venv/bin/python"))
    return types.SimpleNamespace(calls=calls, src=_tree(tmp_path / "llama.cpp"), root=tmp_path)


def _no_cmake(*_a, **_k):
    raise AssertionError("cmake ran again for a build that is already in the cache")


def test_cuda_on_and_auto_give_the_same_flags_and_key(gpu_host):
    source = llamacpp.ensure_source(str(gpu_host.src))
    on, auto = llamacpp.build_key(source, "on"), llamacpp.build_key(source, "auto")
    assert on == auto
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in on.flags and "-DGGML_CUDA=ON" in on.flags
    assert llamacpp.planned_build(source, "on").cmake_flags == list(on.flags)
    assert llamacpp.build_key(source, "off").key != on.key


def test_key_is_the_source_content_not_its_name(gpu_host, monkeypatch):
    source = llamacpp.ensure_source(str(gpu_host.src))
    key = llamacpp.build_key(source, "on").key
    copy = llamacpp.ensure_source(str(shutil.copytree(gpu_host.src, gpu_host.root / "elsewhere")))
    assert llamacpp.build_key(copy, "on").key == key  # another path, same bytes: the same build
    monkeypatch.chdir(gpu_host.root)
    assert llamacpp.build_key(llamacpp.ensure_source("llama.cpp"), "on").key == key  # relative spelling
    # what a build or a Python tool leaves inside the tree does not count
    (gpu_host.src / "build" / "x").mkdir(parents=True)
    (gpu_host.src / "build" / "CMakeCache.txt").write_text("cache\n")
    (gpu_host.src / "build" / "x" / "a.o").write_text("obj\n")
    (gpu_host.src / "__pycache__").mkdir()
    (gpu_host.src / "__pycache__" / "c.pyc").write_text("pyc\n")
    (gpu_host.src / "docs").mkdir()
    (gpu_host.src / "docs" / "new.md").write_text("doc\n")
    assert llamacpp.build_key(source, "on").key == key
    (gpu_host.src / "src" / "llama.cpp").write_text("int llama(void) { return 1; }\n")  # same size, new bytes
    assert llamacpp.build_key(source, "on").key != key


def _stub_run_side(monkeypatch, gpu_host) -> list:
    """Everything ``run`` does besides the build: the model, and the cells (captured, not run)."""
    import kvmatrix.models.store as store

    gguf = gpu_host.root / "m.gguf"
    gguf.write_text("")
    model = types.SimpleNamespace(name="tiny", params=1, manifest={}, hf_dir=None, gguf_f16=gguf, gguf_q8_0=None)
    monkeypatch.setattr(store, "ensure_model", lambda *a, **k: model)
    plans = []

    def run_cells(plan, out_dir, resume, execute=None, reuse=True):
        plans.append(plan)
        return host.CellRun()

    monkeypatch.setattr(host, "run_cells", run_cells)
    return plans


def _entries(folder: Path) -> list[Path]:
    """Cache entries of a folder, without the ``.<entry>.lock`` files beside them (``envs.entry_lock``)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("second", [
    ["run", "--phases", "3a", "--cuda", "on"],
    ["run", "--phases", "3a,3b", "--cuda", "auto"],
    ["matrix", "--runtime", "host", "--phases", "3a", "--cuda", "on"],
])
def test_build_then_run_builds_once(gpu_host, monkeypatch, second):
    plans = _stub_run_side(monkeypatch, gpu_host)
    monkeypatch.chdir(gpu_host.root)
    assert cli.main(["build", "--cuda", "on", "--llama-source", "llama.cpp"]) == 0
    assert gpu_host.calls == ["configure", "build"]
    (built,) = _entries(envs.cache_dir() / "builds")
    assert envs.is_complete(built)

    monkeypatch.setattr(llamacpp, "_stream", _no_cmake)
    source_opt = "--llama" if second[0] == "matrix" else "--llama-source"
    out = gpu_host.root / "out"
    assert cli.main([*second, source_opt, str(gpu_host.src), "--out", str(out), "--config", "128/64"]) == 0
    assert [p.name for p in _entries(envs.cache_dir() / "builds")] == [built.name]
    (plan,) = plans
    assert plan and all(spec.engine["server"] == str(built / "bin" / "llama-server") for _c, spec, _l in plan)
    assert all(spec.runtime.n_gpu_layers == -1 for _c, spec, _l in plan)


def test_build_cached_under_the_earlier_key_is_reused_not_rebuilt(gpu_host, monkeypatch):
    source = llamacpp.ensure_source(str(gpu_host.src))
    bk = llamacpp.build_key(source, "on")
    old_key = envs.content_key(source.origin, source.commit, list(bk.flags), llamacpp.tree_stamp(source.path))
    legacy = envs.cache_dir() / "builds" / f"llama-{source.commit}-{old_key}"
    (legacy / "bin").mkdir(parents=True)
    (legacy / "bin" / "llama-server").write_text("")
    (legacy / "kvmatrix-build.json").write_text('{"compiler": "c++", "build_seconds": 1.0}')
    envs.mark_complete(legacy)
    monkeypatch.setattr(llamacpp, "_stream", _no_cmake)
    build = llamacpp.ensure_build(source, "on")
    assert build.build_dir == bk.build_dir and build.server.resolve() == (legacy / "bin" / "llama-server").resolve()
    assert llamacpp.ensure_build(source, "auto").build_dir == bk.build_dir  # and found directly afterwards


def test_cuda_on_without_nvcc_is_refused(gpu_host, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    source = llamacpp.ensure_source(str(gpu_host.src))
    with pytest.raises(UserError, match="nvcc"):
        llamacpp.ensure_build(source, "on")


@pytest.mark.engine
def test_warm_cache_build_command_runs_no_cmake(llama_build, monkeypatch, capsys):
    """With the real build cached (the fixture), ``build`` finds its .complete entry: no CMake."""
    source, build, _ = llama_build
    assert envs.is_complete(build.build_dir)
    assert llamacpp.build_key(source).build_dir == build.build_dir
    monkeypatch.setattr(llamacpp, "_stream", _no_cmake)
    assert cli.main(["build", *(["--llama-source", os.environ["KVMATRIX_LLAMA_SOURCE"]]
                                if os.environ.get("KVMATRIX_LLAMA_SOURCE") else [])]) == 0
    assert str(build.build_dir) in capsys.readouterr().out
