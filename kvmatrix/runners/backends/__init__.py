"""Backend adapters, registered by name and imported lazily.

Engine libraries (llama_cpp, vllm) are imported only inside their adapter's
module, so the runner starts in any backend environment.
"""

from kvmatrix.runners.backends.base import get_backend, known_backends, register


def _llamacpp_http():
    from kvmatrix.runners.backends.llamacpp_http import LlamaCppHttp

    return LlamaCppHttp


def _llamacpp_python():
    from kvmatrix.runners.backends.llamacpp_python import LlamaCppPython

    return LlamaCppPython


def _vllm_http():
    from kvmatrix.runners.backends.vllm_http import VllmHttp

    return VllmHttp


def _vllm_python():
    from kvmatrix.runners.backends.vllm_python import VllmPython

    return VllmPython


register("llamacpp_http", _llamacpp_http)
register("llamacpp_python", _llamacpp_python)
register("vllm_http", _vllm_http)
register("vllm_python", _vllm_python)

__all__ = ["get_backend", "known_backends", "register"]
