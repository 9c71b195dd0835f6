"""What every server backend shares: the engine process, its HTTP client, start / stop, pid, memory.

A server backend (catalogue capability ``server``: llama-server, the vLLM OpenAI server) runs its
engine as a separate process that kvmatrix starts and owns:

start:   the rendered ``argv`` (and ``env``, where the engine needs one) in its own process group
         (``process.EngineProcess``) on 127.0.0.1:<free port>, logging to the cell's engine log;
         ``HttpClient`` (``http.py``, the ONE stream reader) on that address; a bounded wait until
         ``ready()`` (the engine's health endpoint) that notices an early exit.
stop:    the whole process group (``stop_grace_s`` between SIGTERM and SIGKILL), the client closed;
         idempotent.
pid:     ``server_pid()``, recorded by the runner; the host reaps the group from the pid file.
memory:  ``memory_readout()`` the engine's own KV read-outs, on a client of its own (thread-safe:
         the prefix benchmark samples it while a batch streams), from ``read_memory``;
         ``process_memory()`` the resident memory of the server's process group (/proc).

What stays engine-specific is small: ``server_name``, ``start_timeout_s``, ``stop_grace_s``,
``ready()``, ``read_memory(client)``, plus render / effective / measure and the raw-prompt
``completion_request`` / ``completion_counts`` of the prefix benchmark.
"""

from __future__ import annotations

from pathlib import Path

from kvmatrix.runners.backends.base import Backend, EngineError
from kvmatrix.runners.backends.http import HttpClient
from kvmatrix.runners.backends.process import HOST, EngineProcess, free_port, group_memory


class ServerBackend(Backend):
    """Base of the server adapters; see the module docstring."""

    #: how start-up errors and a dead engine are named
    server_name: str = "server"
    start_timeout_s: float = 120.0
    #: seconds between SIGTERM and SIGKILL of the process group
    stop_grace_s: float = 10.0
    reference_client = "stdlib http.client, same request bytes, fresh connection"

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.port = free_port()
        self.proc: EngineProcess | None = None
        self.client: HttpClient | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- engine-specific ------------------------------------------------------
    def ready(self) -> bool:
        """The readiness probe (an exception or False: not up yet)."""
        raise NotImplementedError

    def read_memory(self, client: HttpClient) -> dict:
        """The engine's KV-cache read-outs through ``client`` (its own, not ``self.client``)."""
        return {}

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        if not self.rendered.get("argv"):
            self.render()
        self.proc = EngineProcess(self.rendered["argv"], self.log_path, env=self.rendered.get("env"))
        self.proc.start()
        self.client = HttpClient(self.base_url)
        self.start_seconds = self.proc.wait_ready(self.ready, self.start_timeout_s, self.server_name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=self.stop_grace_s)
            self.proc = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def request_failed(self, exc: BaseException, what: str | None = None) -> EngineError:
        """A request that failed: raises the dead server's exit, else the EngineError to raise, with the log tail."""
        self.proc.check_alive(self.server_name)
        return EngineError(f"{what or self.server_name} request failed: {exc}", self.log_tail())

    # -- process --------------------------------------------------------------
    def server_pid(self) -> int | None:
        return self.proc.proc.pid if self.proc is not None and self.proc.proc is not None else None

    def process_memory(self) -> dict:
        """VmRSS / VmHWM of the server's whole process group (worker processes included)."""
        return group_memory(self.server_pid())

    def memory_readout(self) -> dict:
        """The engine's KV-cache read-outs, on a client of its own (callable from a sampling thread)."""
        client = HttpClient(self.base_url, timeout_s=10)
        try:
            return self.read_memory(client)
        finally:
            client.close()
