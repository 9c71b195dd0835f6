"""JSON objects as dataclasses that write back what they read: the generic part of the cell document.

Stdlib only. A ``Record`` is a dataclass (``kw_only``) whose fields, declared with ``record_field``, are the
JSON keys it names; ``kvmatrix.runners.document`` declares the cell document's records with it. The rules
(``Record.from_dict(d).to_dict() == d`` for every JSON object ``d``, in ``d``'s key order, at every level):

* a key the record does not name is kept verbatim in its ``extra``;
* a named key the source lacked is not written back unless it is assigned later; a fresh record (built by
  its constructor) writes its required keys and, of its optional ones, those given or assigned later;
* a value of the wrong shape where a record, dict or list belongs (``"runtime": null``) reads as the empty
  one and is written back as it was, unless the field is assigned;
* key order is a dict's: the keys the record was read with (a fresh one: the keys it was built with, in
  declaration order), then every key set later (attribute assignment, ``update``) in the order it was
  first set; assigning a key it already has keeps its place. So a writer that fills a record step by step
  writes the same JSON as one that filled a plain dict in the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


def record_field(kind: Any = None, *, optional: bool = False, default: Any = None):
    """A record field (a JSON key). ``kind``: "dict", "list", a Record class (nested), ("records", cls) (a list
    of them) or None (any JSON value). ``optional``: a fresh record writes it only once given or assigned."""
    meta = {"kind": kind, "optional": optional}
    if optional:
        return field(default=None, metadata=meta)
    if kind == "dict":
        return field(default_factory=dict, metadata=meta)
    if kind == "list" or isinstance(kind, tuple):
        return field(default_factory=list, metadata=meta)
    if isinstance(kind, type):
        return field(default_factory=kind, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Record:
    """A JSON object with named keys (the dataclass fields) and the rest kept verbatim in ``extra``.

    Subclasses add dataclass fields that are not JSON keys with ``metadata={"local": True}`` and list them in
    ``LOCAL``; ``_put_other`` (a key the record does not name) and ``_items`` (the named keys as written) are
    the hooks a subclass may extend.
    """

    extra: dict[str, Any] = field(default_factory=dict)
    _absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    _raw: dict = field(default_factory=dict, repr=False, compare=False)
    _order: tuple = field(default=(), repr=False, compare=False)
    _ready: bool = field(default=False, repr=False, compare=False)

    #: field names that are not JSON keys
    LOCAL: ClassVar[frozenset[str]] = frozenset({"extra", "_absent", "_raw", "_order", "_ready"})

    def __post_init__(self) -> None:
        if not self._ready:  # a fresh record: an optional key is written once given or assigned
            object.__setattr__(self, "_absent", frozenset(
                f.name for f in self._fields() if f.metadata.get("optional") and getattr(self, f.name) is None))
            object.__setattr__(self, "_ready", True)
            object.__setattr__(self, "_order", tuple(self._layout()))  # the keys it was built with, as written

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if self.__dict__.get("_ready") and name not in self.LOCAL:  # assigned: written, not the raw value
            object.__setattr__(self, "_absent", self._absent - {name})
            if name in self._raw:
                object.__setattr__(self, "_raw", {k: v for k, v in self._raw.items() if k != name})
            if name in self.keys():
                self._mark(name)

    def _mark(self, key: str) -> None:
        """``key`` is set: a key the record did not have yet is written after those it had."""
        if key not in self._order:
            object.__setattr__(self, "_order", (*self._order, key))

    @classmethod
    def _fields(cls):
        return [f for f in fields(cls) if f.name not in cls.LOCAL and not f.metadata.get("local")]

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The JSON keys this record names."""
        return tuple(f.name for f in cls._fields())

    @classmethod
    def from_dict(cls, d: dict):
        obj = cls(_ready=True)
        obj._load(d)
        return obj

    def _load(self, d: dict) -> None:
        known = {f.name: f for f in self._fields()}
        absent = set(known)
        for key, value in d.items():
            if key in known:
                absent.discard(key)
                self._put_field(known[key], value)
            else:
                self._put_other(key, value)
        object.__setattr__(self, "_absent", frozenset(absent))
        object.__setattr__(self, "_order", tuple(d))

    def _put_field(self, f, value) -> None:
        kind = f.metadata.get("kind")
        decoded, ok = _decode(kind, value)
        self._raw.pop(f.name, None)
        if not ok or (decoded is None and kind is not None and not f.metadata.get("optional")):
            decoded = _empty(f)  # the wrong shape: read as the empty one, written back as it was
            self._raw[f.name] = value
        object.__setattr__(self, f.name, decoded)

    def _put_other(self, key: str, value) -> None:
        self.extra[key] = value

    def update(self, d: dict) -> None:
        """Set keys as ``dict.update`` would (named keys decoded, the rest into ``extra``); they are written,
        a key the record did not have after those it had."""
        known = {f.name: f for f in self._fields()}
        for key, value in d.items():
            if key in known:
                self._put_field(known[key], value)
                object.__setattr__(self, "_absent", self._absent - {key})
            else:
                self._put_other(key, value)
            self._mark(key)

    def __contains__(self, key: str) -> bool:
        """Whether the JSON object has ``key``."""
        return key in self.extra or (key in self.keys() and key not in self._absent)

    def get(self, key: str, default=None):
        """A key by its JSON name: the named field when the document has it, else ``extra``. For keys outside
        the schema (an older writer's spelling); named keys are read as attributes."""
        if key in self.keys():
            return getattr(self, key) if key not in self._absent else default
        return self.extra.get(key, default)

    def _items(self) -> list[tuple[str, Any]]:
        out = []
        for f in self._fields():
            if f.name in self._absent:
                continue
            value = getattr(self, f.name)
            if f.name in self._raw and value == _empty(f):
                out.append((f.name, self._raw[f.name]))
            else:
                out.append((f.name, _encode(value)))
        return out

    def _layout(self) -> dict:
        """The JSON object in declaration order (named keys, then ``extra``), before ``_order`` applies."""
        out = dict(self._items())
        out.update(self.extra)
        return out

    def to_dict(self) -> dict:
        return _ordered(self._layout(), self._order)


def _empty(f):
    kind = f.metadata.get("kind")
    if f.metadata.get("optional"):
        return None
    if kind == "dict":
        return {}
    if kind == "list" or isinstance(kind, tuple):
        return []
    if isinstance(kind, type):
        return kind()
    return f.default


def _decode(kind, value) -> tuple[Any, bool]:
    """(value as the field holds it, whether it had the expected shape)."""
    if kind is None:
        return value, True
    if kind == "dict":
        return (value, True) if isinstance(value, dict) else ({}, False)
    if kind == "list":
        return (value, True) if isinstance(value, list) else ([], False)
    if isinstance(kind, tuple):  # ("records", cls): dict items become records, others stay as they are
        if not isinstance(value, list):
            return [], False
        return [kind[1].from_dict(v) if isinstance(v, dict) else v for v in value], True
    if isinstance(value, dict):
        return kind.from_dict(value), True
    return None, value is None


def _encode(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [v.to_dict() if isinstance(v, Record) else v for v in value]
    return value


def _ordered(out: dict, order: tuple) -> dict:
    """``out`` with the keys of ``order`` first, in that order, then the rest of ``out`` in its order."""
    if not order:
        return out
    first = [k for k in order if k in out]
    seen = set(first)
    return {k: out[k] for k in first + [k for k in out if k not in seen]}
