"""The one catalogue of interfaces and experiments (standard library only, imported by every layer).

An **interface** is one way of asking an engine for tokens: a backend adapter (``runners/backends``),
optionally with a variant (the bindings' two API paths), named in cell ids by its *phase* (the seeds'
names: 1, 2, 3a, 3b; the token-id completions are 1t and 3t). Its capabilities are declared here and
nowhere else; experiments state which capabilities they need, and the planner, the CLI choices, the
validation and the report sections all read these tables.

An **experiment** is one trial protocol (``runners/experiments``): the function that runs it, what it
needs of an interface, and its extra axis (one cell per value).

Adding an interface: its adapter (one class in one file) + one ``Interface`` row (+ tests).
Adding an experiment: its protocol module + one ``Experiment`` row + its analysis module (+ tests).
"""

from __future__ import annotations

from dataclasses import dataclass

#: capabilities an interface may declare
#:   server        an HTTP server kvmatrix starts (process, pid, /metrics memory readout)
#:   streaming     streamed responses: TTFT from the first token event
#:   slots         llama-server slots: pinning (id_slot), /slots read-back, several slots sharing n_ctx
#:   chat          the prompt goes through the engine's chat template (messages in, template applied)
#:   token_ids     the prompt is sent as token ids, no template and no tokenizer in the timed path
#:   token_control a token-id path beside the chat path (the calibration's template/tokenization control)
#:   reference     a minimal reference client for the timing control (runners/calibration.py)
#:   cache_switch  prefix caching can be switched off per engine start (the prefix benchmark's off/on)
CAPABILITIES = ("server", "streaming", "slots", "chat", "token_ids", "token_control", "reference", "cache_switch")


@dataclass(frozen=True)
class Interface:
    phase: str  # the id in cell ids and --phases (the seeds' names)
    backend: str  # the adapter's registry name
    adapter: str  # "module:Class" under kvmatrix.runners.backends, imported lazily
    family: str  # "llama" or "vllm": which engine host provides its environment
    title: str  # how reports name it
    variant: str | None = None  # the bindings' API path (chat, template); one cell each
    capabilities: frozenset[str] = frozenset()
    #: the llama.cpp builds this interface runs on: "server" (llama-server) or the bindings variants
    builds: tuple[str, ...] = ()

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


def _caps(*names: str) -> frozenset[str]:
    unknown = set(names) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}")
    return frozenset(names)


BINDINGS_BUILDS = ("shared", "pip", "stock")

INTERFACES: tuple[Interface, ...] = (
    Interface("1", "vllm_http", "vllm_http:VllmHttp", "vllm", "vLLM server",
              capabilities=_caps("server", "streaming", "chat", "token_control", "reference", "cache_switch")),
    Interface("2", "vllm_python", "vllm_python:VllmPython", "vllm", "vLLM in-process",
              capabilities=_caps("chat", "reference")),
    Interface("3a", "llamacpp_http", "llamacpp_http:LlamaCppHttp", "llama", "llama-server",
              capabilities=_caps("server", "streaming", "slots", "chat", "token_control", "reference", "cache_switch"),
              builds=("server",)),
    Interface("3b", "llamacpp_python", "llamacpp_python:LlamaCppPython", "llama", "llama-cpp-python", "chat",
              capabilities=_caps("chat", "token_control", "reference"), builds=BINDINGS_BUILDS),
    Interface("3b", "llamacpp_python", "llamacpp_python:LlamaCppPython", "llama", "llama-cpp-python", "template",
              capabilities=_caps("chat", "token_control", "reference"), builds=BINDINGS_BUILDS),
    Interface("1t", "vllm_tokens", "vllm_tokens:VllmTokens", "vllm", "vLLM server, token ids",
              capabilities=_caps("server", "streaming", "token_ids", "reference", "cache_switch")),
    Interface("3t", "llamacpp_tokens", "llamacpp_tokens:LlamaCppTokens", "llama", "llama-server, token ids",
              capabilities=_caps("server", "streaming", "slots", "token_ids", "reference", "cache_switch"),
              builds=("server",)),
)


@dataclass(frozen=True)
class Experiment:
    name: str
    runner: str  # "module:function" under kvmatrix.runners.experiments, imported lazily
    help: str
    #: capabilities an interface must have for this experiment to get a cell on it
    requires: frozenset[str] = frozenset()
    #: the extra axis: one cell per value of this RuntimeSpec / ExperimentSpec field (None: no axis)
    axis: str | None = None
    #: runs in `run` / `matrix` (--experiments); prefix_reuse has its own command and options
    in_matrix: bool = True


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("invalidation", "invalidation:run", "T1 warm [A,B] -> T2 hit [A,B,Q] / T3 miss [B,Q], interleaved"),
    Experiment("recompute_scan", "recompute_scan:run", "keep k tokens of [A,B], recompute the rest",
               axis="scan_points"),
    Experiment("batch_sweep", "invalidation:run_miss_only", "the miss at several n_batch values", axis="n_batch"),
    # slot_eviction's untimed preparation requests and its prompt accounting are chat requests
    Experiment("slot_eviction", "slot_eviction:run", "llama-server slots sharing one n_ctx",
               requires=_caps("slots", "chat"), axis="n_parallel"),
    # prefix_reuse sends its own text completions, so the token-id twins of the chat servers would repeat
    # the same cells: it runs on the chat servers
    Experiment("prefix_reuse", "prefix_reuse:run", "repeated-prefix benchmark: caching off vs on, concurrency",
               requires=_caps("server", "streaming", "cache_switch", "chat"), in_matrix=False),
)

FAMILIES = {"llama": "llama.cpp", "vllm": "vLLM"}


def phases() -> dict[str, list[Interface]]:
    """phase id -> its interfaces (3b: chat and template), in catalogue order."""
    out: dict[str, list[Interface]] = {}
    for i in INTERFACES:
        out.setdefault(i.phase, []).append(i)
    return out


def phase_ids() -> tuple[str, ...]:
    return tuple(phases())


def interface(backend: str, variant: str | None = None) -> Interface:
    """The row of an adapter (and variant); KeyError naming the known ones."""
    for i in INTERFACES:
        if i.backend == backend and (variant is None or i.variant == variant):
            return i
    raise KeyError(f"unknown interface {backend!r}; known: {', '.join(backends())}")


def backends() -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.backend for i in INTERFACES))


def capabilities(backend: str) -> frozenset[str]:
    return interface(backend).capabilities


def family_backends(family: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.backend for i in INTERFACES if i.family == family))


def phase_title(phase: str) -> str:
    rows = phases().get(phase)
    return rows[0].title if rows else phase


def experiment(name: str) -> Experiment:
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(f"unknown experiment {name!r}; known: {', '.join(experiment_names())}")


def experiment_names(in_matrix: bool | None = None) -> tuple[str, ...]:
    return tuple(e.name for e in EXPERIMENTS if in_matrix is None or e.in_matrix == in_matrix)


def runs_on(exp: Experiment, iface: Interface) -> bool:
    """Whether ``exp`` gets a cell on ``iface`` (the interface has every capability it requires)."""
    return exp.requires <= iface.capabilities


def phases_for(exp_name: str) -> tuple[str, ...]:
    """The phases ``exp_name`` runs on (slot_eviction: the ones with slots)."""
    exp = experiment(exp_name)
    return tuple(p for p, rows in phases().items() if any(runs_on(exp, i) for i in rows))
