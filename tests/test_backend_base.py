"""The backend side of the catalogue: registry, declared capabilities, the ServerBackend base (no engine).

* every catalogue interface is registered from its ``adapter`` and imports without its engine library;
* what an adapter declares (``catalog.capabilities``) agrees with what its class implements: ``server`` <->
  a ``ServerBackend``, ``slots`` <-> ``slot_readout``, ``token_control`` <-> ``token_id_path``, ``reference``
  <-> a reference client, ``chat`` / ``token_ids`` <-> what a request puts on the wire;
* ``ServerBackend``'s plumbing (process group, readiness wait, pid, /proc memory, stop) on a stdlib HTTP
  server standing in for an engine process;
* ``--engine-arg``: the family targets cover the token-id interfaces, which refuse the same flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmatrix import catalog
from kvmatrix.runners import engine_args as ea
from kvmatrix.runners.backends import get_backend, known_backends
from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import Backend, EngineError, Request, added_special_tokens
from kvmatrix.runners.backends.http import HttpClient, StreamResult
from kvmatrix.runners.backends.process import HOST
from kvmatrix.runners.backends.server import ServerBackend
from kvmatrix.runners.experiments import slot_eviction
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError
from tests.conftest import REPO

ROWS = {i.backend: i for i in catalog.INTERFACES}  # one row per adapter (3b's variants share theirs)
ENGINE_LIBRARIES = ("vllm", "llama_cpp", "torch", "transformers")


# ---------------------------------------------------------------- registry
def test_every_catalogue_interface_is_registered_from_its_adapter():
    assert known_backends() == sorted(catalog.backends())
    for name, row in ROWS.items():
        cls = get_backend(name)
        module, cls_name = row.adapter.split(":")
        assert (cls.__module__, cls.__name__) == (f"kvmatrix.runners.backends.{module}", cls_name)
        assert cls.name == name and issubclass(cls, Backend)
        # declared, not repeated: the class's phase and capabilities are its catalogue row's
        assert cls.phase == row.phase and cls.capabilities == row.capabilities
        assert Path(REPO, "kvmatrix/runners/backends", f"{module}.py").is_file()
    with pytest.raises(KeyError, match="unknown backend 'nope'"):
        get_backend("nope")


def test_adapters_import_without_their_engine_libraries():
    """Importing every adapter loads no engine library (they are imported inside the adapters' methods)."""
    code = ("import sys, json; from kvmatrix.runners.backends import get_backend; from kvmatrix import catalog\n"
            "[get_backend(b) for b in catalog.backends()]\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_LIBRARIES!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == []


# ---------------------------------------------------------------- capabilities declared = implemented
#: what a capability means for an adapter class, checked without an engine
IMPLEMENTS = {
    "server": lambda cls: issubclass(cls, ServerBackend),
    "slots": lambda cls: callable(getattr(cls, "slot_readout", None)),
    "token_control": lambda cls: cls.token_id_path is True,
    "reference": lambda cls: bool(cls.reference_client),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_declared_capabilities_agree_with_the_class(name):
    cls, row = get_backend(name), ROWS[name]
    for cap, implemented in IMPLEMENTS.items():
        assert implemented(cls) is row.has(cap), (name, cap)
    assert row.has("chat") is not row.has("token_ids"), name  # the prompt is one or the other
    if row.has("token_ids"):
        assert not row.has("token_control"), name  # a token-id interface IS the token-id path
    if row.has("streaming") or row.has("cache_switch"):
        assert row.has("server"), name  # the prefix benchmark's streamed completions: servers only
    for cap in row.capabilities:
        assert cap in catalog.CAPABILITIES


def test_a_test_double_outside_the_catalogue_declares_its_own():
    class Double(Backend):
        name = "double"
        capabilities = frozenset({"slots"})

        def render(self): ...
        def start(self): ...
        def effective(self): ...
        def measure(self, request): ...
        def prompt_tokens(self, messages): ...
        def tokenize(self, text): ...
        def stop(self): ...

    assert Double.capabilities == {"slots"} and Double.phase == "" and Double.token_id_path is False


class RecordingClient:
    """An HttpClient stand-in that records what an adapter would send (no engine: the wire shape only)."""

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []

    def post_json(self, path, payload, timeout_s=None):
        self.sent.append((path, payload))
        if path == "/tokenize":
            text = payload.get("content") or payload.get("prompt") or json.dumps(payload.get("messages"))
            return {"tokens": [len(w) for w in text.split()]}
        if path == "/apply-template":
            return {"prompt": "<|user|>" + payload["messages"][0]["content"]}
        return {}

    def get_text(self, path, timeout_s=None):
        return ""

    def get_json(self, path, timeout_s=None):
        return {}

    def exchange(self, path, payload, client="harness"):
        self.sent.append((path, payload))
        return StreamResult(ttft_s=0.001, total_s=0.002, connect_s=0.0, text="x", chunks=1,
                            fields={"timings": {"cache_n": 0, "prompt_n": 3}, "usage": {"prompt_tokens": 3}})

    def close(self):
        pass


def server_adapter(name: str, tmp_path: Path, monkeypatch) -> ServerBackend:
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"dtype": "float16"}))
    (hf / "tokenizer.json").write_text("{}")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    monkeypatch.setattr(vc, "make_run_dir", lambda: tmp_path / "run")
    engine = {"server": str(tmp_path / "llama-server"),
              "vllm": {**vc.EngineOptions(device="cpu", dtype="float32").to_dict(), "version": "0.32.0"}}
    cell = CellSpec(cell_id="t", run="t", phase=ROWS[name].phase, backend=name,
                    model={"gguf": str(tmp_path / "m.gguf"), "name": "tiny", "hf_dir": str(hf)},
                    runtime=RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=1, n_threads_batch=1,
                                        cache_type_k="f32", cache_type_v="f32"),
                    experiment=ExperimentSpec(config=ABConfig(512, 256)), out_dir=str(tmp_path), engine=engine)
    backend = get_backend(name)(cell, tmp_path)
    backend.client = RecordingClient()
    backend._apply_template = True  # llama-server: as effective() finds it on current servers
    return backend


@pytest.mark.parametrize("name", [n for n, row in ROWS.items() if row.has("server")])
def test_chat_or_token_ids_is_what_goes_on_the_wire(name, tmp_path, monkeypatch):
    backend = server_adapter(name, tmp_path, monkeypatch)
    messages = [{"role": "user", "content": " the of and"}]
    m = backend.measure(Request(messages, max_tokens=1, stream=True))
    path, payload = backend.client.sent[-1]
    if ROWS[name].has("token_ids"):
        assert path in ("/completion", "/v1/completions") and "messages" not in payload
        ids = backend.prompt_tokens(messages)
        assert payload["prompt"] == ids and all(isinstance(t, int) for t in ids)
        # the ids are the content as plain text, special tokens added where the tokenizer adds them
        assert any(p == "/tokenize" for p, _ in backend.client.sent)
        assert not any(p == "/apply-template" or "messages" in body for p, body in backend.client.sent)
        assert m.prompt_token_ids == ids
    else:
        assert path == "/v1/chat/completions" and payload["messages"] == messages
    # the raw-prompt completions of the prefix benchmark follow the interface too
    path, payload = backend.completion_request(" the of", 4)
    assert isinstance(payload["prompt"], list) is ROWS[name].has("token_ids")


def test_added_special_tokens():
    assert added_special_tokens([5, 6], [1, 5, 6]) == {"token_prompt_bos": True,
                                                       "token_prompt_special": {"prefix": [1], "suffix": []}}
    assert added_special_tokens([5, 6], [5, 6]) == {"token_prompt_bos": False,
                                                    "token_prompt_special": {"prefix": [], "suffix": []}}
    assert added_special_tokens([5], [1, 5, 2])["token_prompt_special"] == {"prefix": [1], "suffix": [2]}


# ---------------------------------------------------------------- experiments read the declaration
@pytest.mark.parametrize("name", list(ROWS))
def test_slot_eviction_runs_only_where_the_catalogue_says(name):
    """The experiment checks the interface's declared capabilities against its catalogue row's needs."""
    cls = get_backend(name)
    backend = cls.__new__(cls)  # no engine, no __init__: the refusal comes before any request
    exp = catalog.experiment("slot_eviction")
    if catalog.runs_on(exp, ROWS[name]):
        assert ROWS[name].phase in catalog.phases_for("slot_eviction")
        return
    phases = ", ".join(catalog.phases_for("slot_eviction"))
    with pytest.raises(SpecError, match=rf"slot_eviction needs an interface with .*\(phases {phases}\), not {name}"):
        slot_eviction.run(backend, ExperimentSpec(name="slot_eviction"))


# ---------------------------------------------------------------- the ServerBackend plumbing
class StdlibServer(ServerBackend):
    """A stdlib HTTP server standing in for an engine process (the base class's plumbing, not an engine)."""

    name = "stdlib_server"
    server_name = "stdlib server"
    start_timeout_s = 30.0
    stop_grace_s = 2.0
    exit_code: int | None = None  # render a server that exits at once

    def render(self):
        code = f"raise SystemExit({self.exit_code})" if self.exit_code is not None else \
            f"import http.server as h; h.test(h.SimpleHTTPRequestHandler, port={self.port}, bind='{HOST}')"
        self.rendered = {"argv": [sys.executable, "-c", code], "env": {"KVMATRIX_TEST_SERVER": "1"}}
        return self.rendered

    def ready(self):
        return self.client.get_text("/", timeout_s=2) is not None

    def read_memory(self, client: HttpClient) -> dict:
        return {"index_bytes": len(client.get_text("/"))}

    def effective(self):
        return {}

    def measure(self, request):
        raise NotImplementedError

    def prompt_tokens(self, messages):
        return []

    def tokenize(self, text):
        return []


def stdlib_cell(tmp_path: Path) -> CellSpec:
    return CellSpec(cell_id="srv", run="t", phase="x", backend="stdlib_server", model={}, runtime=RuntimeSpec(),
                    experiment=ExperimentSpec(), out_dir=str(tmp_path), engine={})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_backend_starts_reads_and_stops_its_process_group(tmp_path):
    backend = StdlibServer(stdlib_cell(tmp_path), tmp_path)
    assert backend.server_pid() is None and backend.process_memory() == {}
    try:
        backend.start()  # renders first, like every adapter's start
        pid, pid_path = backend.server_pid(), backend.proc.pid_path
        assert pid and os.getpgid(pid) == pid  # its own process group
        assert backend.start_seconds is not None and backend.base_url == f"http://{HOST}:{backend.port}"
        assert pid_path.read_text() == str(pid)  # for the host to reap
        mem = backend.process_memory()
        assert mem["processes"] == 1 and mem["rss_mib"] > 0 and mem["hwm_mib"] >= mem["rss_mib"]
        assert backend.memory_readout()["index_bytes"] > 0  # on a client of its own
        assert backend.log_path.read_text().startswith("$ " + sys.executable)
    finally:
        backend.stop()
    assert not _group_alive(pid) and backend.proc is None and backend.client is None
    assert not pid_path.exists()
    backend.stop()  # idempotent


def test_server_backend_names_an_early_exit(tmp_path):
    backend = StdlibServer(stdlib_cell(tmp_path), tmp_path)
    backend.exit_code = 3
    try:
        with pytest.raises(EngineError, match=r"stdlib server exited during start-up \(exit code 3\)"):
            backend.start()
    finally:
        backend.stop()


# ---------------------------------------------------------------- --engine-arg reaches the new interfaces
def test_family_targets_cover_the_token_id_interfaces():
    assert ea.FAMILIES == {"llamacpp": ("llamacpp_http", "llamacpp_python", "llamacpp_tokens"),
                           "vllm": ("vllm_http", "vllm_python", "vllm_tokens")}
    rules = lambda backend: get_backend(backend).engine_args  # noqa: E731
    got = ea.collect(["llamacpp=--load-mode mlock", "vllm_tokens=--max-logprobs 5", "llamacpp_tokens=--no-mmap"],
                     rules)
    assert got == {"llamacpp_http": ["--load-mode mlock"], "llamacpp_python": ["--load-mode mlock"],
                   "llamacpp_tokens": ["--load-mode mlock", "--no-mmap"], "vllm_tokens": ["--max-logprobs 5"]}
    with pytest.raises(ea.EngineArgError, match=r"llamacpp_tokens\): -c is RuntimeSpec.n_ctx"):
        ea.collect(["llamacpp_tokens=-c 4096"], rules)
    with pytest.raises(ea.EngineArgError, match=r"\(vllm_tokens\): --max-model-len is RuntimeSpec.n_ctx"):
        ea.collect(["vllm_tokens=--max-model-len 4096"], rules)
