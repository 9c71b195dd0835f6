"""``--engine-arg TARGET=ARG``: extra engine arguments carried in a cell, one parser for every adapter.

``TARGET`` is a backend or a family: every interface of that engine family in the catalogue
(``kvmatrix.catalog``; ``llamacpp``: llamacpp_http, llamacpp_python, llamacpp_tokens; ``vllm``: vllm_http,
vllm_python, vllm_tokens). ``ARG`` is written as on a command line, one string (``--mlock``,
``--max-num-seqs=8``, ``"--max-num-seqs 8"``: split with shlex). The host keeps the original strings in
``cell.engine["extra_args"]`` of the backends the target covers; each adapter turns them into its own
form with its ``Rules`` (defined next to its rendering code, where its flag names are known):

* ``argv``: the items appended to the rendered command line, after everything kvmatrix renders
  (llama.cpp's parser has no ``--flag=VALUE`` form: there it becomes ``--flag VALUE``);
* ``kwargs``: keyword arguments merged into the rendered ones: ``--max-num-seqs=8`` -> ``max_num_seqs=8``,
  ``--mlock`` -> ``mlock=True``; values read as int, float, true/false, else str; where the engine's CLI
  negates booleans with ``--no-X`` (vLLM), ``--no-X`` -> ``X=False``.

A name kvmatrix renders itself (``Rules.controlled``: every alias of it) is refused with one line naming
the RuntimeSpec field / option to use instead; a name in ``Rules.overridable`` (an engine option
kvmatrix merely defaults) replaces kvmatrix's value instead of being appended. Stdlib only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kvmatrix import catalog
from kvmatrix.runners.spec import SpecError

BACKENDS = tuple(sorted(catalog.backends()))
#: the family targets: the catalogue's engine families under their --engine-arg names
FAMILY_TARGETS = {"llamacpp": "llama", "vllm": "vllm"}
FAMILIES = {target: catalog.family_backends(family) for target, family in FAMILY_TARGETS.items()}
TARGETS = {**{b: (b,) for b in BACKENDS}, **FAMILIES}

_OPTION = re.compile(r"--?[A-Za-z]")  # "-1" and "-0.5" are values, not options
_KWARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EngineArgError(SpecError):
    """A refused engine argument; str(e) is one line naming the fix."""


@dataclass(frozen=True)
class Controlled:
    """A setting kvmatrix renders itself: what it comes from, and what to use instead."""

    setting: str  # "RuntimeSpec.n_ctx"
    fix: str  # "use --n-ctx (alias --ctx-size, -c)"


@dataclass(frozen=True)
class Override:
    """An engine option kvmatrix merely defaults: the engine argument replaces kvmatrix's value."""

    field: str  # EngineOptions field
    kind: type  # int, float, bool or str
    negated: bool = False  # ``--no-X``: X=False


#: RuntimeSpec field -> what sets it instead of an engine argument (the run / matrix options)
SPEC_FIXES = {
    "n_ctx": "use --n-ctx (alias --ctx-size, -c)",
    "n_batch": "use --n-batch (alias --batch-size, -b, --max-num-batched-tokens)",
    "n_ubatch": "use --n-ubatch (alias --ubatch-size, -ub)",
    "n_parallel": "use --experiments slot_eviction with --parallel-slots (the other experiments run one slot)",
    "n_gpu_layers": "use --cuda (on a GPU every layer is offloaded, on the CPU none)",
    "flash_attn": "use --flash-attn on|off",
    "cache_ram_mib": "use --cache-ram MIB",
    "cache_type_k": "the KV cache type is fixed per engine (f16; vLLM: the model dtype): leave it out",
    "cache_type_v": "the KV cache type is fixed per engine (f16; vLLM: the model dtype): leave it out",
    "n_threads": "use --threads",
    "n_threads_batch": "use --threads",
    "prefix_caching": "on in run / matrix cells (the prefix command switches it per cell): leave it out",
    "seed": "the seed is fixed (every request sends it too): leave it out",
    "temperature": "the temperature is fixed (every request sends it too): leave it out",
}


def controlled(rows: tuple[tuple, ...]) -> dict[str, Controlled]:
    """One row per setting, every alias -> {alias: Controlled}. A row is ``(aliases, RuntimeSpec field)``
    (the fix from SPEC_FIXES) or ``(aliases, what kvmatrix sets it from, the fix)``."""
    out = {}
    for aliases, setting, *fix in rows:
        row = Controlled(setting, fix[0]) if fix else Controlled(f"RuntimeSpec.{setting}", SPEC_FIXES[setting])
        out.update(dict.fromkeys(aliases, row))
    return out


@dataclass(frozen=True)
class Option:
    """One option of an ARG: its name as written (before any ``=``), its values, its items as written."""

    name: str
    values: tuple[str, ...]
    tokens: tuple[str, ...]
    inline: bool  # the value was given as --name=VALUE


def options(arg: str) -> list[Option]:
    """``ARG`` -> its options; one-line EngineArgError when it is empty, unparsable or starts with a value."""
    try:
        tokens = shlex.split(arg)
    except ValueError as exc:
        raise EngineArgError(f"cannot split {arg!r} like a shell ({exc}); check its quotes") from None
    if not tokens:
        raise EngineArgError("the engine argument is empty; give one such as --mlock or --max-num-seqs=8")
    if not _OPTION.match(tokens[0]):
        raise EngineArgError(f"{tokens[0]!r} is not an option; an engine argument starts with -x or --name")
    out: list[Option] = []
    for tok in tokens:
        if _OPTION.match(tok):
            name, eq, value = tok.partition("=")
            out.append(Option(name, (value,) if eq else (), (tok,), bool(eq)))
        else:
            last = out[-1]
            if last.inline:
                raise EngineArgError(f"{tok!r} follows {last.tokens[0]}, which already has its value")
            out[-1] = Option(last.name, last.values + (tok,), last.tokens + (tok,), False)
    return out


def parse_value(text: str):
    """An option value as a keyword argument: int, float, true/false, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def kwarg_name(name: str, negatable: bool = False) -> tuple[str, bool]:
    """``--max-num-seqs`` -> (``max_num_seqs``, False); negatable: ``--no-enforce-eager`` -> (``enforce_eager``,
    True), the X of ``X=False``."""
    key = name.lstrip("-").replace("-", "_")
    if negatable and name.startswith("--no-"):
        return key[3:], True
    return key, False


@dataclass(frozen=True)
class Rules:
    """How one adapter takes engine arguments, and which names it refuses or lets override."""

    form: str  # "argv" | "kwargs"
    #: names as the engine reads them (flags, or keyword names for the kwargs form; flags are converted)
    controlled: Mapping[str, Controlled] = field(default_factory=dict)
    overridable: Mapping[str, Override] = field(default_factory=dict)
    #: argv: --flag=VALUE is handed over as --flag VALUE (the engine's parser has no = form)
    split_inline: bool = False
    #: argv: the flag as the engine normalizes it before matching (vLLM: underscores -> dashes)
    normalize: Callable[[str], str] | None = None
    #: argv: the engine accepts unambiguous prefixes of long flags (argparse's allow_abbrev)
    abbreviations: bool = False
    #: kwargs: --no-X means X=False (the engine's CLI has BooleanOptionalAction flags)
    negatable: bool = False

    # -- the names as this engine reads them -------------------------------------------------------
    def _key(self, name: str) -> str:
        if self.form == "kwargs":
            return kwarg_name(name, self.negatable)[0]
        return self.normalize(name) if self.normalize else name

    def _lookup(self, table: Mapping) -> dict:
        return {self._key(name): value for name, value in table.items()
                if not (self.form == "kwargs" and isinstance(value, Override) and value.negated)}

    def check(self, arg: str) -> None:
        """Refuse ``arg`` (one line) when it sets what kvmatrix controls, or cannot take this engine's form."""
        self.split([arg])

    def split(self, args: list[str]) -> tuple[dict, list[str] | dict]:
        """(EngineOptions overrides, the rest in this engine's form: argv items or keyword arguments)."""
        controlled, overridable = self._lookup(self.controlled), self._lookup(self.overridable)
        overrides: dict = {}
        rest: list[str] | dict = {} if self.form == "kwargs" else []
        for arg in args:
            for opt in options(arg):
                key = self._key(opt.name)
                self._refuse_controlled(opt.name, key, controlled, overridable)
                if self.form == "kwargs":
                    key, value = self._kwarg(opt)
                    if key in overridable:
                        if not opt.values and overridable[key].kind is not bool:
                            raise EngineArgError(f"{opt.name} takes one value")
                        overrides[overridable[key].field] = _typed(opt.name, value, overridable[key])
                    else:
                        rest[key] = value
                elif key in overridable:
                    ov = overridable[key]
                    value = _flag_value(opt, ov)
                    overrides[ov.field] = _typed(opt.name, value, ov)
                else:
                    rest += [opt.name, *opt.values] if self.split_inline and opt.inline else list(opt.tokens)
        return overrides, rest

    def _refuse_controlled(self, name: str, key: str, controlled: Mapping[str, Controlled],
                           overridable: Mapping[str, Override]) -> None:
        hit = controlled.get(key)
        if hit is not None:
            spelled = name if key == name else f"{name} ({key})"
            raise EngineArgError(f"{spelled} is {hit.setting}, which kvmatrix sets itself; {hit.fix}")
        if self.form == "argv" and self.abbreviations and key.startswith("--") and key not in overridable:
            full = sorted(n for n in (*controlled, *overridable) if n.startswith(key))
            if full:
                what = (f"which kvmatrix sets from {controlled[full[0]].setting}; {controlled[full[0]].fix}"
                        if full[0] in controlled else
                        f"which replaces kvmatrix's EngineOptions.{overridable[full[0]].field} only when written "
                        f"whole: write {full[0]}")
                raise EngineArgError(f"{name} abbreviates {full[0]} (the engine accepts prefixes of its flags), "
                                     + what)

    def _kwarg(self, opt: Option) -> tuple[str, object]:
        if not opt.name.startswith("--"):
            raise EngineArgError(f"{opt.name}: an in-process engine takes keyword arguments; write the long "
                                 "form --name or --name=VALUE (it becomes name=VALUE)")
        key, negated = kwarg_name(opt.name, self.negatable)
        if not _KWARG.fullmatch(key):
            raise EngineArgError(f"{opt.name}: {key!r} is not a keyword argument name (letters, digits, _)")
        if len(opt.values) > 1:
            raise EngineArgError(f"{opt.name} has {len(opt.values)} values; a keyword argument takes one")
        if negated:
            if opt.values:
                raise EngineArgError(f"{opt.name} takes no value (it means {key}=False)")
            return key, False
        return key, parse_value(opt.values[0]) if opt.values else True


def _flag_value(opt: Option, ov: Override):
    if ov.kind is bool and not opt.values:
        return not ov.negated
    if len(opt.values) != 1 or ov.negated:
        raise EngineArgError(f"{opt.name} takes {'no value' if ov.negated else 'one value'}")
    return parse_value(opt.values[0])


_KINDS = {int: "a whole number", float: "a number", bool: "true or false (or no value)", str: "a name"}


def _typed(name: str, value, ov: Override):
    """The override's value, of its field's type, or one line naming what it takes."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) if ov.kind is int else \
        (isinstance(value, (int, float)) and not isinstance(value, bool)) if ov.kind is float else \
        isinstance(value, ov.kind)
    if not ok:
        raise EngineArgError(f"{name} takes {_KINDS[ov.kind]} (EngineOptions.{ov.field}), not {value!r}")
    return float(value) if ov.kind is float else value


# ---------------------------------------------------------------- the host side: TARGET=ARG
def parse_target(text: str) -> tuple[str, str]:
    """``TARGET=ARG`` -> (target, arg); one-line EngineArgError when malformed or the target is unknown."""
    target, eq, arg = text.partition("=")
    if not eq or not target:
        raise EngineArgError(f"--engine-arg {text}: write TARGET=ARG, such as vllm=--max-num-seqs=8 or "
                             f"llamacpp_http=--mlock (TARGET: {', '.join(TARGETS)})")
    if target not in TARGETS:
        raise EngineArgError(f"--engine-arg {text}: unknown target {target!r}; use a backend "
                             f"({', '.join(BACKENDS)}) or a family ({', '.join(FAMILIES)})")
    if not arg.strip():
        raise EngineArgError(f"--engine-arg {text}: the argument after {target}= is empty; give one such as "
                             "--mlock or --max-num-seqs=8")
    return target, arg


def collect(values: list[str] | None, rules_of: Callable[[str], Rules]) -> dict[str, list[str]]:
    """Every ``--engine-arg`` -> {backend: [ARG, ...]} in the order given, each checked against the rules of
    every backend its target covers (``rules_of(backend)``); one-line EngineArgError naming the option."""
    out: dict[str, list[str]] = {}
    for text in values or []:
        target, arg = parse_target(text)
        for backend in TARGETS[target]:
            try:
                rules_of(backend).check(arg)
            except EngineArgError as exc:
                where = backend if backend == target else f"{backend}, of {target}"
                raise EngineArgError(f"--engine-arg {text} ({where}): {exc}") from None
            out.setdefault(backend, []).append(arg)
    return out
