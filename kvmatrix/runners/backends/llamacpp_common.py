"""What both llama.cpp adapters (server and bindings) share: the log lines
llama.cpp prints when it creates a context, and the GPU-layers convention.

Both interfaces run the same compiled library, so they print the same
``llama_context:`` / ``load_tensors:`` / ``llama_kv_cache:`` lines; reading
effective settings from them is done here, once.
"""

from __future__ import annotations

import re

ALL_LAYERS = 999  # llama.cpp clamps -ngl to the model's layer count


def help_flags(help_text: str) -> set[str]:
    """Every flag (``-x`` and ``--long``) a llama.cpp ``--help`` lists."""
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)", help_text))


def gpu_layers_arg(n_gpu_layers: int) -> int:
    return ALL_LAYERS if n_gpu_layers < 0 else n_gpu_layers


def _last_int(pattern: str, log: str) -> int | None:
    found = re.findall(pattern, log)
    return int(found[-1]) if found else None


#: the function name llama.cpp prints before its context lines: ``llama_context:`` since the
#: context refactor (2025), ``llama_new_context_with_model:`` in older builds (e.g. b4094)
CONTEXT_FN = r"(?:llama_context|llama_new_context_with_model):"


def parse_context_log(log: str) -> dict:
    """Effective context settings from llama.cpp's start-up log (last context wins), either log format."""
    eff: dict = {
        key: _last_int(CONTEXT_FN + r" " + key + r"\s+=\s+(\d+)", log)
        for key in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max")
    }
    fa = re.findall(CONTEXT_FN + r" flash_attn\s+=\s+(\w+)", log)
    if fa:
        value = fa[-1].lower()
        eff["flash_attn"] = {"enabled": True, "disabled": False, "1": True, "0": False}.get(value, value)
    kv = re.findall(r"K \((\w+)\):\s*[\d.]+ MiB, V \((\w+)\)", log)
    if kv:
        eff["cache_type_k"], eff["cache_type_v"] = kv[-1]
    off = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", log)
    if off:
        done, total = map(int, off[-1])
        eff["offloaded_layers"] = f"{done}/{total}"
        eff["n_gpu_layers"] = -1 if done == total and done > 0 else done
    return eff


def resolve_gpu_layers(requested: int, gpu_available: bool) -> int:
    """What n_gpu_layers SHOULD read back as: all (-1) only when a GPU backend exists."""
    return requested if gpu_available else 0
