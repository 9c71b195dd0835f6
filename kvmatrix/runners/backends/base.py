"""The backend contract, written down once, and the registry.

Lifecycle of every adapter (the runner drives it; an adapter never skips a step):

1. ``render()``    RuntimeSpec -> this engine's flags / kwargs for its version.
2. ``start()``     start the engine in a process the adapter owns; bounded wait
                   until it is ready; on failure raise ``EngineError`` with the
                   tail of the engine log.
3. ``effective()`` read back what the engine really uses; the runner compares
                   it with the spec (``compare_settings``) and refuses a mismatch.
4. ``measure()``   one ``Request`` in, one ``Measurement`` out (shared by every
                   engine); HTTP engines use the one stream reader in
                   ``backends/http.py``.
5. ``stop()``      always, also on error; idempotent; leaves no process behind.

An adapter is the only place that knows its engine's API: flags, endpoints,
token counters, log formats. Experiments only see Request/Measurement.

What an adapter CAN do is declared in the catalogue (``kvmatrix.catalog``, its ``Interface`` row),
not probed: a subclass whose ``name`` is a catalogue backend gets ``capabilities`` and ``phase``
from its row, and ``token_id_path`` from the ``token_control`` capability. The registry below is
filled from the same rows (``adapter = "module:Class"``, imported on first use).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmatrix import catalog
from kvmatrix.runners.engine_args import EngineArgError, Rules
from kvmatrix.runners.spec import CellSpec


class EngineError(RuntimeError):
    """The engine failed to start, crashed, or answered wrongly (one line + log tail)."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


class ContextExceeded(EngineError):
    """The engine refused a prompt that does not fit the context it has for the request
    (llama-server: the slot's share of ``n_ctx``). Not a crash: the engine keeps running and
    its cache is unchanged, so an experiment may record the refusal and go on."""

    def __init__(self, message: str, prompt_tokens: int | None = None, n_ctx: int | None = None,
                 id_slot: int | None = None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx
        self.id_slot = id_slot


class SettingsMismatch(RuntimeError):
    """Effective settings differ from the requested ones."""

    def __init__(self, mismatches: list[dict]):
        first = mismatches[0]
        super().__init__(
            f"engine runs {first['setting']}={first['effective']!r} but the spec requests "
            f"{first['requested']!r}" + (f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
        )
        self.mismatches = mismatches


@dataclass
class Request:
    """One chat request; every engine gets the same shape.

    ``slot``: the llama-server slot to pin (``id_slot``, taken modulo the slot count);
    None lets the server choose (prompt similarity, else least recently used).
    Engines without slots ignore it.
    ``prompt_ids``: send these token ids on the engine's token-id path instead of the chat
    messages (``Backend.token_id_path``: llama-server ``/completion``, vLLM ``/v1/completions``,
    llama-cpp-python ``create_completion``); the template/tokenization cost control.
    ``client``: ``harness`` (kvmatrix's own request path) or ``reference`` (the timing control,
    ``Backend.reference_client``): the same request, same cache state, nothing around it.
    """

    messages: list[dict]
    max_tokens: int = 1
    stream: bool = True
    ignore_eos: bool = False
    slot: int | None = 0
    prompt_ids: list[int] | None = None
    client: str = "harness"


@dataclass
class Measurement:
    """What one request measured, as the client saw it and as the engine reported it.

    ``cached_tokens`` is the ENGINE's own count of prompt tokens it reused;
    ``prompt_token_ids`` is the prompt as the engine tokenized it and
    ``held_token_ids`` what the engine held before the request (when the
    adapter can know them), so the experiment can compute what SHOULD have
    been reused. ``id_slot`` is the slot that served the request where the
    engine has several (llama-server), else None (one sequence).
    """

    ttft_s: float | None
    total_s: float
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    engine_prompt_ms: float | None = None
    engine_predicted_ms: float | None = None
    connect_s: float | None = None
    prompt_token_ids: list[int] | None = None
    id_slot: int | None = None
    send_s: float | None = None  # connection established -> request handed to the socket (servers)
    first_byte_s: float | None = None  # connection established -> response status line (servers)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("prompt_token_ids")
        return d


class Backend(abc.ABC):
    """Base of every adapter; see the module docstring for the lifecycle."""

    name: str = ""
    #: from the catalogue (``__init_subclass__``): the interface's capabilities and phase
    capabilities: frozenset[str] = frozenset()
    phase: str = ""
    #: a token-id path distinct from the measured chat path exists (``Request.prompt_ids``):
    #: the catalogue's ``token_control`` capability
    token_id_path: bool = False
    #: the engine caches in units of this many tokens (vLLM: its block size)
    cache_granularity: int = 1
    #: what ``Request(client="reference")`` measures (the timing control), or "" when there is none
    reference_client: str = ""
    #: how ``--engine-arg`` reaches this engine (runners/engine_args.py): argv items or keyword arguments,
    #: the names kvmatrix renders itself (refused) and the engine options an argument may override
    engine_args: Rules = Rules("argv")

    def __init_subclass__(cls, **kwargs):
        """A catalogue adapter takes what it can do from its row (a test double outside it declares its own)."""
        super().__init_subclass__(**kwargs)
        if cls.name in catalog.backends():
            row = catalog.interface(cls.name)
            cls.capabilities = row.capabilities
            cls.phase = row.phase
            cls.token_id_path = row.has("token_control")

    def has(self, capability: str) -> bool:
        """Whether the catalogue declares ``capability`` for this interface (``catalog.CAPABILITIES``)."""
        return capability in self.capabilities

    def __init__(self, cell: CellSpec, log_dir: Path):
        self.cell = cell
        self.spec = cell.runtime
        self.log_dir = log_dir
        self.log_path = log_dir / f"{cell.cell_id}.engine.log"
        self.rendered: dict = {}
        self.start_seconds: float | None = None
        #: what THIS engine release lacks (a flag, a read-back, a counter) -> what kvmatrix does instead;
        #: filled by render / effective, written to the cell as ``runtime.release_gaps`` (never guessed silently)
        self.release_gaps: dict[str, str] = {}
        #: the cell's ``--engine-arg`` strings (original spelling), rendered after everything kvmatrix renders
        self.extra_args: list[str] = list(cell.engine.get("extra_args") or [])

    @abc.abstractmethod
    def render(self) -> dict:
        """Engine flags/kwargs for this spec; stored as ``self.rendered``."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def effective(self) -> dict:
        """Settings as the engine reports them, keyed like RuntimeSpec."""

    @abc.abstractmethod
    def measure(self, request: Request) -> Measurement: ...

    @abc.abstractmethod
    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The token ids this engine evaluates for ``messages`` (template applied)."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Plain text -> token ids (no special tokens added)."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def provenance(self) -> dict:
        return {}

    def split_engine_args(self) -> tuple[dict, list[str] | dict]:
        """(engine-option overrides, the rest in this engine's form) of the cell's engine arguments."""
        try:
            return self.engine_args.split(self.extra_args)
        except EngineArgError as exc:  # the host refuses these before any work; a hand-made cell lands here
            raise EngineError(f"--engine-arg: {exc}") from None

    def engine_args_record(self, overrides: dict | None = None) -> dict:
        """What ``rendered`` records of the engine arguments (nothing without any)."""
        out: dict = {"extra_args": list(self.extra_args)} if self.extra_args else {}
        if overrides:
            out["option_overrides"] = dict(overrides)
        return out

    def begin_cell(self, cell: CellSpec, reused: bool) -> dict | None:
        """Before each cell on this engine (engine reuse, runners/run_cell.py): on a ``reused`` engine
        leave no cached prompt state behind and say what was done; ``{"restart": why}`` when that is
        impossible (the runner then starts a fresh engine). Default: nothing held across cells matters,
        because every trial protocol begins with a discarded warm-up that re-establishes the state."""
        return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# Settings that must match exactly between spec and engine.
def compare_settings(requested: dict, effective: dict) -> list[dict]:
    out = []
    for key, want in requested.items():
        if key not in effective:
            continue
        got = effective[key]
        if got != want:
            out.append({"setting": key, "requested": want, "effective": got})
    return out


def added_special_tokens(plain: list[int], special: list[int]) -> dict:
    """What a tokenizer adds to plain text, from one text tokenized without (``plain``) and with (``special``)
    special tokens: ``token_prompt_special`` {prefix, suffix} and ``token_prompt_bos`` (the token-id interfaces
    record it among their effective settings)."""
    at = next((i for i in range(len(special) - len(plain) + 1) if special[i:i + len(plain)] == plain), None)
    added = {"prefix": list(special), "suffix": []} if at is None else \
        {"prefix": special[:at], "suffix": special[at + len(plain):]}
    return {"token_prompt_bos": bool(added["prefix"]), "token_prompt_special": added}


_REGISTRY: dict[str, Callable[[], type[Backend]]] = {}


def register(name: str, loader: Callable[[], type[Backend]]) -> None:
    _REGISTRY[name] = loader


def adapter_loader(adapter: str) -> Callable[[], type[Backend]]:
    """A catalogue ``adapter`` ("module:Class" under kvmatrix.runners.backends) -> its lazy loader."""
    module, _, cls = adapter.partition(":")

    def load() -> type[Backend]:
        return getattr(importlib.import_module(f"kvmatrix.runners.backends.{module}"), cls)

    return load


def get_backend(name: str) -> type[Backend]:
    """Import the adapter lazily: engine libraries load only in their own environment."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def known_backends() -> list[str]:
    return sorted(_REGISTRY)
