"""The version axis: old releases rendered from their own --help, the tag path offline, the runtime axis.

* llama-server b4094 (llama.cpp 74d73dc, vendored by llama-cpp-python 0.3.2): flags rendered from the
  REAL ``--help`` captured from that binary (tests/data/llama-server-b4094-help.txt); what the release
  lacks is declared in ``release_gaps``, not guessed.
* ``--llama bNNNN`` downloads the tag's archive; ``KVMATRIX_LLAMA_ARCHIVE_URL`` points the same code path
  at a mirror. Here: a ``file://`` mirror holding an archive made from the 0.3.2 vendored tree, paired
  with the nearest bindings release (0.3.2) and mapped onto the SAME build as ``vendored:0.3.2``.
* ``matrix --runtime host,docker`` is an axis; bad values are one-line errors.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest

from kvmatrix.matrix import bindings_map, envs, llamacpp
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.backends.llamacpp_http import LlamaCppHttp
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec
from tests.conftest import run_kvmatrix

DATA = Path(__file__).parent / "data"


def help_of(name: str) -> str:
    """A captured --help, without the provenance header lines."""
    text = (DATA / name).read_text()
    return "\n".join(line for line in text.splitlines() if not line.startswith("# "))


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)", text))


def server_cell(tmp_path: Path, **runtime) -> CellSpec:
    return CellSpec(
        cell_id="t", run="t", phase="3a", backend="llamacpp_http",
        model={"gguf": str(tmp_path / "m.gguf"), "name": "tiny"},
        runtime=RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=2, n_threads_batch=2, **runtime),
        experiment=ExperimentSpec(name="invalidation", config=ABConfig(512, 256)), out_dir=str(tmp_path),
        engine={"server": str(tmp_path / "llama-server")},
    )


def rendered(tmp_path: Path, help_text: str, **runtime) -> tuple[list[str], dict]:
    backend = LlamaCppHttp(server_cell(tmp_path, **runtime), tmp_path)
    backend._help = help_text
    return backend.render()["argv"], backend.release_gaps


# ---------------------------------------------------------------- b4094 from its real --help
def test_b4094_renders_only_flags_its_help_offers(tmp_path):
    text = help_of("llama-server-b4094-help.txt")
    offered = help_flags(text)
    for fa in (False, True):
        argv, gaps = rendered(tmp_path, text, flash_attn=fa)
        flags = [a for a in argv[1:] if re.fullmatch(r"--?[a-zA-Z][a-zA-Z0-9-]*", a)]
        assert set(flags) <= offered, set(flags) - offered
        # the old boolean flash attention: present = on, absent = off (no "-fa on|off" value)
        assert ("-fa" in argv) is fa and "on" not in argv and "off" not in argv
        for newer in ("--cache-ram", "--fit", "--no-webui", "--jinja"):
            assert newer not in argv
        assert argv[argv.index("-lv") + 1] == "4"  # b4094 has -lv: the context lines are printed
        # what the release lacks is declared, with the reason
        assert set(gaps) == {"cache_ram_mib", "chat_template"}
        assert "no --cache-ram" in gaps["cache_ram_mib"] and "no --jinja" in gaps["chat_template"]


def test_b4094_refuses_a_host_ram_cache_it_does_not_have(tmp_path):
    with pytest.raises(EngineError, match="no --cache-ram"):
        rendered(tmp_path, help_of("llama-server-b4094-help.txt"), cache_ram_mib=8192)


# ---------------------------------------------------------------- the tag path, offline
@pytest.fixture()
def b4094_mirror(tmp_path, monkeypatch):
    """A file:// mirror with llama.cpp b4094's archive made from the 0.3.2 vendored tree (GitHub's layout:
    one top folder, the commit id in the global pax header), and a fresh cache entry for the tag."""
    vendored = llamacpp.ensure_source("vendored:0.3.2")
    release = bindings_map.for_version("0.3.2")
    tag = f"b{release.llama_cpp_build_number}"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / f"{tag}.tar.gz", "w:gz", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": release.llama_cpp_commit}) as tf:
        tf.add(vendored.path, arcname=f"llama.cpp-{tag}")
    envs.reset_entry(envs.cache_dir() / "sources" / f"llama.cpp-{tag}")  # exercise the download every time
    monkeypatch.setenv(llamacpp.ARCHIVE_URL_ENV, f"file://{mirror}/{{tag}}.tar.gz")
    return tag, vendored, release


def test_tag_from_a_file_mirror_pairs_with_the_nearest_bindings_and_shares_the_build(b4094_mirror):
    tag, vendored, release = b4094_mirror
    assert tag == "b4094" and release.llama_cpp_commit.startswith("74d73dc")
    source = llamacpp.ensure_source(tag)
    assert source.origin == tag
    assert source.commit == "74d73dc"  # from the archive's pax header, as GitHub writes it
    assert source.bindings_version == "0.3.2" and source.bindings_sdist == vendored.bindings_sdist
    assert (source.path / "CMakeLists.txt").is_file() and source.path != vendored.path
    # the same content and flags: the build made for vendored:0.3.2 serves the tag, nothing recompiles
    assert llamacpp.build_key(source).key == llamacpp.build_key(vendored).key
    # and the seeds' tag b4000 pairs with the same bindings release (nearest vendored build, 94 builds away)
    assert llamacpp.bindings_for_tag("b4000") == "0.3.2"


def test_archive_url_errors_are_one_line(tmp_path):
    envs.reset_entry(envs.cache_dir() / "sources" / "llama.cpp-b4094")  # not cached: the download must fail
    proc = run_kvmatrix("run", "--llama-source", "b4094", "--phases", "3a", "--out", str(tmp_path / "o"),
                        env={llamacpp.ARCHIVE_URL_ENV: "file:///nowhere/archive.tar.gz"})
    assert proc.returncode == 2 and "has no {tag}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_kvmatrix("run", "--llama-source", "b4094", "--phases", "3a", "--out", str(tmp_path / "o"),
                        env={llamacpp.ARCHIVE_URL_ENV: f"file://{tmp_path}/missing-{{tag}}.tar.gz"})
    assert proc.returncode == 2 and "cannot download llama.cpp b4094" in proc.stderr
    assert llamacpp.ARCHIVE_URL_ENV in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the runtime axis
@pytest.mark.parametrize(("cmd", "runtime", "message"), [
    ("matrix", "host,host", "list each runtime once"),
    ("matrix", "auto,docker", "list each runtime once"),
    ("matrix", "podman", "unknown runtime 'podman'"),
    ("run", "host,docker", "run takes one runtime"),
])
def test_runtime_axis_refusals(tmp_path, cmd, runtime, message):
    proc = run_kvmatrix(cmd, "--runtime", runtime, "--phases", "3a", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
