"""Backend adapters, registered by name and imported lazily.

Every catalogue interface (``kvmatrix.catalog.INTERFACES``) is registered under its backend name
from its ``adapter`` ("module:Class"); the module is imported on first use. Engine libraries
(llama_cpp, vllm) are imported only inside their adapter's methods, so the runner starts in any
backend environment.
"""

from kvmatrix import catalog
from kvmatrix.runners.backends.base import adapter_loader, get_backend, known_backends, register


def _register_catalogue() -> None:
    for backend in catalog.backends():
        register(backend, adapter_loader(catalog.interface(backend).adapter))


_register_catalogue()

__all__ = ["get_backend", "known_backends", "register"]
