"""The JSON Schema of the cell document (draft 2020-12), derived from its dataclasses, and validation on read.

The schema is built from the declarations, so it follows them: every record of ``kvmatrix.runners.document``
(``CellDoc`` and its parts: one ``$defs`` entry per record, its fields typed from their annotations), the
trial (``kvmatrix.runners.results.Trial``: keys, types and the keys every trial has), the statistics of a
condition (``results.condition_block`` / ``results.describe``) and ``SCHEMA_VERSION``. Hand-declared here
only what the code declares nowhere: a prefix_reuse request row (``REQUEST``), the status values and the
keys a cell file must have (``REQUIRED``). Unknown keys are allowed everywhere (the document keeps them);
a top-level object with a ``trials`` list and a ``stats`` object is a condition block
(``document.is_condition``) and is checked as one.

The published copy is ``docs/schema/cell.schema.json`` (a test checks it equals ``cell_schema()``)::

    python -m kvmatrix.analysis.schema --write docs/schema/cell.schema.json   # regenerate
    python -m kvmatrix.analysis.schema --check docs/schema/cell.schema.json   # exit 1 when it is stale
    python -m kvmatrix.analysis.schema DIR_OR_FILE...                          # validate result folders

Validation needs the ``jsonschema`` package (the ``analysis`` extra), imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import kvmatrix.runners.document as document
from kvmatrix.runners.document import CellDoc, Record
from kvmatrix.runners.results import SCHEMA_VERSION, Trial, condition_block, describe

__all__ = ["PUBLISHED", "REQUIRED", "SCHEMA_ID", "Problem", "cell_schema", "errors", "first_error",
           "problem_line", "problems_section", "runner_keys", "schema_text", "validate", "main"]

SCHEMA_ID = f"urn:kvmatrix:schema:cell:{SCHEMA_VERSION}"
#: the published copy, relative to the repository root
PUBLISHED = Path("docs/schema/cell.schema.json")

#: the keys a cell file must have: what ``results.load_cells`` recognises a cell by, and its status. Every
#: document the runner or the host writes has every key ``CellDoc`` declares non-optional (``runner_keys``);
#: the schema requires only these three, so a hand-made cell with fewer keys (as the tests write) still reads.
REQUIRED = ("schema_version", "cell_id", "status")
STATUS = ("ok", "failed", "running")  # "running" only while the cell runs

#: prefix_reuse: one timed request (``runners.experiments.prefix_reuse.run``: the row, ``row_of`` and the
#: adapter's ``completion_counts``); None where a failed request has no value
REQUEST: dict[str, Any] = {
    "engine": str, "mode": str, "cell_id": str, "workload": str, "regime": str, "prefix_len_tokens": int,
    "concurrency": int, "reuse_pct": int, "index": int, "shares_prefix": bool, "question": str,
    "start_offset_s": float, "ok": bool, "error": str | None, "ttft_s": float | None, "e2e_s": float | None,
    "connect_s": float | None, "prompt_tokens": int | None, "completion_tokens": int | None,
    "cached_tokens": int | None, "engine_prompt_ms": float | None, "cached_tokens_source": str | None,
    "cache_granularity": int, "hit_threshold_tokens": int, "batch_wall_s": float, "cache_hit": bool,
    "expected_hit": bool,
}

#: list / dict fields whose items the annotation does not say: (record, field) -> what each item is
ITEMS = {
    ("Condition", "trials"): {"items": {"$ref": "#/$defs/Trial"}},
    ("Condition", "stats"): {"$ref": "#/$defs/Stats"},
    ("ScanPoint", "trials"): {"items": {"$ref": "#/$defs/Trial"}},
    ("ScanPoint", "stats"): {"$ref": "#/$defs/Stats"},
    ("CellDoc", "requests"): {"items": {"$ref": "#/$defs/Request"}},
    ("CellDoc", "order"): {"items": {"type": "string"}},  # "cache_hit:3w" = trial 3 of cache_hit, warm-up
}
#: CellDoc fields the annotation leaves looser than the runner writes them
TIGHTER = {
    "schema_version": {"const": SCHEMA_VERSION},
    "cell_id": {"type": "string", "minLength": 1},
    "status": {"enum": list(STATUS)},
}

_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
         type(None): "null"}


class Problem(NamedTuple):
    """A result file that is not a readable, valid cell: its path and one line saying why."""

    path: str
    reason: str


# ---------------------------------------------------------------- the schema


def _hint_schema(hint) -> dict:
    """The JSON Schema of a Python annotation (``str | None``, ``dict``, ``Model``, ``Any`` ...)."""
    if hint is Any:
        return {}
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    names: list[str] = []
    refs: list[dict] = []
    for a in args:
        if a is Any:
            return {}
        if isinstance(a, type) and issubclass(a, Record):
            refs.append({"$ref": f"#/$defs/{a.__name__}"})
            continue
        origin = typing.get_origin(a) or a
        if origin not in _JSON:
            return {}
        names.append(_JSON[origin])
    if "number" in names and "integer" in names:
        names.remove("integer")
    if not refs:
        return {"type": names[0] if len(names) == 1 else names}
    if not names:
        return refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"anyOf": [*refs, {"type": names[0] if len(names) == 1 else names}]}


def _description(cls) -> str | None:
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(f"{cls.__name__}("):  # the dataclass's generated signature
        return None
    return " ".join(doc.split("\n\n")[0].split())


def _record_schema(cls: type[Record]) -> dict:
    hints = typing.get_type_hints(cls, vars(document))
    props = {}
    for f in cls._fields():
        s = dict(_hint_schema(hints[f.name]))
        kind = f.metadata.get("kind")
        if isinstance(kind, tuple):  # ("records", cls): a list of them
            s["items"] = {"$ref": f"#/$defs/{kind[1].__name__}"}
        s.update(ITEMS.get((cls.__name__, f.name), {}))
        if cls is CellDoc and f.name in TIGHTER:
            s = dict(TIGHTER[f.name])
        props[f.name] = s
    out: dict = {"type": "object"}
    if (d := _description(cls)) is not None:
        out["description"] = d
    out["properties"] = props
    return out


def _records() -> list[type[Record]]:
    """Every record class of the document, in declaration order (CellDoc first)."""
    found = [v for v in vars(document).values() if isinstance(v, type) and issubclass(v, Record) and v is not Record
             and v.__module__ == document.__name__]
    return [CellDoc] + [c for c in found if c is not CellDoc]


def _trial_schema() -> dict:
    hints = typing.get_type_hints(Trial)
    fields = dataclasses.fields(Trial)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    return {"type": "object", "description": "One timed query and its companions (results.Trial); warm-up "
            "trials included, marked by warmup.",
            "properties": {f.name: _hint_schema(hints[f.name]) for f in fields}, "required": required}


def _stats_schemas() -> tuple[dict, dict]:
    """(Stats, Describe): the runner's stats{} of a condition and one metric's summary in it."""
    sample = describe([1.0, 2.0])
    desc = {"type": "object", "description": "results.describe: n, and over the finite values " +
            ", ".join(k for k in sample if k != "n") + " (absent when n is 0)",
            "properties": {k: {"type": _JSON[type(v)]} for k, v in sample.items()}, "required": ["n"]}
    stats = condition_block([])["stats"]
    props = {k: ({"$ref": "#/$defs/Describe"} if isinstance(v, dict) else {"type": _JSON[type(v)]})
             for k, v in stats.items()}
    return {"type": "object", "description": "results.condition_block: the summary of the measured trials",
            "properties": props}, desc


def _request_schema() -> dict:
    return {"type": "object", "description": "prefix_reuse: one timed request",
            "properties": {k: _hint_schema(v) for k, v in REQUEST.items()}}


def runner_keys() -> tuple[str, ...]:
    """The top-level keys every document the runner (``run_cell.cell_document``) or the host writes has."""
    return tuple(f.name for f in CellDoc._fields() if not f.metadata.get("optional"))


@functools.lru_cache(maxsize=1)
def _schema() -> str:
    defs = {c.__name__: _record_schema(c) for c in _records()}
    top = defs.pop("CellDoc")
    stats, desc = _stats_schemas()
    defs.update(Trial=_trial_schema(), Stats=stats, Describe=desc, Request=_request_schema())
    top["description"] = (
        f"One benchmark cell's result (<cell-id>.json), schema_version {SCHEMA_VERSION}, as "
        "kvmatrix.runners.document.CellDoc reads and writes it. The runner always writes the keys "
        f"{', '.join(runner_keys())}; a file must have {', '.join(REQUIRED)}. Unknown keys are allowed and kept. "
        "Every other top-level object with a trials array and a stats object is a condition block.")
    top["required"] = list(REQUIRED)
    # document.is_condition: another top-level {trials[], stats{}} object is a condition (slot_eviction's)
    top["additionalProperties"] = {
        "if": {"type": "object", "required": ["trials", "stats"],
               "properties": {"trials": {"type": "array"}, "stats": {"type": "object"}}},
        "then": {"$ref": "#/$defs/Condition"},
    }
    top["properties"]["cache_hit"] = top["properties"]["cache_miss"] = {"$ref": "#/$defs/Condition"}
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
              "title": "kvmatrix cell document", **top, "$defs": defs}
    return json.dumps(schema, indent=1) + "\n"


def cell_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a cell document, a fresh dict."""
    return json.loads(_schema())


def schema_text() -> str:
    """The schema as the published file holds it (JSON, indent 1, a final newline)."""
    return _schema()


# ---------------------------------------------------------------- validation


@functools.lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema  # noqa: PLC0415  (the analysis extra; only validation needs it)
    except ImportError as exc:  # pragma: no cover - the analysis / test extras install it
        raise ImportError("validating cell files needs the jsonschema package: pip install 'jsonschema>=4' "
                          "(the analysis extra)") from exc
    schema = cell_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _where(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def _line(err) -> str:
    msg = " ".join(str(err.message).split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{_where(err.absolute_path)}: {msg}"


def errors(doc) -> list[str]:
    """Every way ``doc`` (a parsed cell file) breaks the schema, one line each (``where: what``); [] = valid."""
    import jsonschema  # noqa: PLC0415

    errs = list(_validator().iter_errors(doc))
    key = jsonschema.exceptions.relevance
    return [_line(e) for e in sorted(errs, key=lambda e: (list(map(str, e.absolute_path)), key(e)))]


def first_error(doc) -> str | None:
    """The most relevant error (one line, with how many more), or None when ``doc`` is valid."""
    import jsonschema  # noqa: PLC0415

    errs = list(_validator().iter_errors(doc))
    if not errs:
        return None
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return _line(jsonschema.exceptions.best_match(errs)) + more


def validate(doc) -> None:
    """Raise ValueError (one line) when ``doc`` is not a valid cell document."""
    err = first_error(doc)
    if err is not None:
        raise ValueError(err)


# ---------------------------------------------------------------- reporting problems


def problem_line(p: Problem) -> str:
    """The stderr line of one problem."""
    return f"kvmatrix: warning: {p.path}: {p.reason}"


def problems_section(problems: list[Problem]) -> str:
    """The report's markdown section listing unreadable / invalid files ("" when there are none)."""
    if not problems:
        return ""
    n = len(problems)
    lines = ["## Unreadable or invalid result files", "",
             f"{n} file{'s' if n != 1 else ''} in the result folders {'is' if n == 1 else 'are'} not a readable, "
             f"valid cell document (JSON Schema `{PUBLISHED}`) and {'was' if n == 1 else 'were'} left out of every "
             "table and figure of this report:", "",
             "| file | problem |", "|---|---|"]
    for p in problems:
        reason = p.reason.replace("|", "\\|")
        lines.append(f"| `{p.path}` | {reason} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from kvmatrix.analysis.load import load_checked  # noqa: PLC0415  (load imports this module)
    from kvmatrix.cli_parser import ArgumentParser  # noqa: PLC0415

    ap = ArgumentParser(prog="python -m kvmatrix.analysis.schema",
                        description="The JSON Schema of the cell document: write it, check it, validate files.")
    ap.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="result folders / cell files to validate")
    ap.add_argument("--write", type=Path, metavar="FILE", help=f"write the schema to FILE (the published {PUBLISHED})")
    ap.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE differs from the generated schema")
    args = ap.parse_args(argv)
    if not (args.paths or args.write or args.check):
        sys.stdout.write(schema_text())
        return 0
    rc = 0
    if args.write:
        from kvmatrix.runners.results import write_text_atomic  # noqa: PLC0415

        print(write_text_atomic(args.write, schema_text()))
    if args.check:
        current = args.check.read_text() if args.check.is_file() else None
        if current != schema_text():
            print(f"kvmatrix: error: {args.check} is not the generated schema; run "
                  f"python -m kvmatrix.analysis.schema --write {args.check}", file=sys.stderr)
            rc = 1
    if args.paths:
        cells, problems = load_checked(args.paths)
        for p in problems:
            print(problem_line(p), file=sys.stderr)
        print(f"{len(cells)} valid cell{'s' if len(cells) != 1 else ''}, {len(problems)} unreadable or invalid")
        rc = rc or (1 if problems else 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
