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

An EXISTING server (``cell.engine["base_url"]``, the host's ``--base-url``): nothing is rendered or started
and nothing is stopped; ``start`` waits (bounded) for its health endpoint, ``render`` records the URL with
``started_by_kvmatrix: false``, ``server_pid`` is None (its memory is not ours to read), and each adapter
reads back from the API what it can (``external_gaps``: what only a server kvmatrix starts can show).

What stays engine-specific is small: ``server_name``, ``start_timeout_s``, ``stop_grace_s``,
``ready()``, ``read_memory(client)``, plus render / effective / measure and the raw-prompt
``completion_request`` / ``completion_counts`` of the prefix benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvmatrix.runners.backends.base import Backend, EngineError
from kvmatrix.runners.backends.http import HttpClient
from kvmatrix.runners.backends.process import HOST, EngineProcess, free_port, group_memory


class ServerBackend(Backend):
    """Base of the server adapters; see the module docstring."""

    #: how start-up errors and a dead engine are named
    server_name: str = "server"
    start_timeout_s: float = 120.0
    #: how long an existing server (--base-url) may take to answer its health endpoint
    attach_timeout_s: float = 15.0
    #: seconds between SIGTERM and SIGKILL of the process group
    stop_grace_s: float = 10.0
    reference_client = "stdlib http.client, same request bytes, fresh connection"

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        #: an existing server's URL (not started by kvmatrix), else None
        self.external_url: str | None = (cell.engine.get("base_url") or "").rstrip("/") or None
        self.port = free_port()
        self.proc: EngineProcess | None = None
        self.client: HttpClient | None = None

    @property
    def base_url(self) -> str:
        return self.external_url or f"http://{HOST}:{self.port}"

    def render_external(self) -> dict:
        """What ``render`` records for an existing server: its URL, and that kvmatrix did not start it."""
        self.rendered = {"base_url": self.external_url, "started_by_kvmatrix": False}
        return self.rendered

    # -- engine-specific ------------------------------------------------------
    def ready(self) -> bool:
        """The readiness probe (an exception or False: not up yet)."""
        raise NotImplementedError

    def read_memory(self, client: HttpClient) -> dict:
        """The engine's KV-cache read-outs through ``client`` (its own, not ``self.client``)."""
        return {}

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        if self.external_url:
            self._attach()
            return
        if not self.rendered.get("argv"):
            self.render()
        self.proc = EngineProcess(self.rendered["argv"], self.log_path, env=self.rendered.get("env"))
        self.proc.start()
        self.client = HttpClient(self.base_url)
        self.start_seconds = self.proc.wait_ready(self.ready, self.start_timeout_s, self.server_name)

    def _attach(self) -> None:
        """An existing server: wait (bounded) until it answers, note in the engine log that we did not start it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"{self.server_name} at {self.external_url}: not started by kvmatrix (no log)\n")
        self.client = HttpClient(self.base_url)
        t0 = time.monotonic()
        while True:
            try:
                if self.ready():
                    break
                error = "not ready"
            except Exception as exc:  # noqa: BLE001 - unreachable or not up yet
                error = str(exc) or type(exc).__name__
            if time.monotonic() - t0 > self.attach_timeout_s:
                raise EngineError(f"no {self.server_name} answers at {self.external_url} ({error}); start it, or "
                                  "check --base-url")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=self.stop_grace_s)
            self.proc = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def request_failed(self, exc: BaseException, what: str | None = None) -> EngineError:
        """A request that failed: raises the dead server's exit, else the EngineError to raise, with the log tail."""
        if self.proc is not None:
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
