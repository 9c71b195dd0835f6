"""Which llama-cpp-python release goes with a llama.cpp build tag.

The bindings (``llama-cpp-python``) are installed against the libllama.so of the
llama.cpp tag under test, so their ctypes declarations must match that tag's C
API. Each bindings release vendors one llama.cpp commit; the nearest release
by build number is the best match, and one too far away is refused.

The facts live in ``data/llama_cpp_python_vendored.json`` (derived by
``tools/derive_bindings_map.py``, which records its sources under "derived").
Standard library only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

DATA_FILE = "llama_cpp_python_vendored.json"
DEFAULT_MAX_DISTANCE = 150
_TAG = re.compile(r"b(\d+)")


class BindingsMapError(ValueError):
    """A tag or version the map cannot serve; ``str(e)`` is one line naming the fix."""


@dataclass(frozen=True)
class BindingsRelease:
    """One llama-cpp-python release and the llama.cpp commit it vendors.

    ``llama_cpp_build_number`` is the commit's llama.cpp build number (its commit
    count, which llama.cpp's ``bNNNN`` tags carry); None where it is not known.
    ``llama_cpp_tag`` is the ``bNNNN`` tag at the commit (``tag_relation``
    "exact") or the nearest one before it ("after"), None where none was seen.
    """

    bindings_version: str
    released: str | None
    llama_cpp_commit: str
    llama_cpp_tag: str | None
    llama_cpp_build_number: int | None
    tag_relation: str | None
    llama_cpp_commit_date: str | None
    pypi_status: str
    source: str

    @property
    def installable(self) -> bool:
        """Published (not yanked, not absent) on PyPI."""
        return self.pypi_status == "published"

    def describe(self) -> str:
        build = "an unknown build" if self.llama_cpp_build_number is None else f"b{self.llama_cpp_build_number}"
        return f"{self.bindings_version} at {build}"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _read_document() -> dict[str, Any]:
    try:
        text = resources.files(__package__).joinpath("data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        text = (Path(__file__).resolve().parent / "data" / DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _load() -> tuple[BindingsRelease, ...]:
    document = _read_document()
    rows = [BindingsRelease(**row) for row in document["releases"]]
    return tuple(sorted(rows, key=lambda r: _version_key(r.bindings_version)))


def derivation() -> dict[str, Any]:
    """The "derived" block of the data file: sources, commits read and method."""
    return dict(_read_document()["derived"])


def releases() -> list[BindingsRelease]:
    """Every release in the map, oldest bindings version first."""
    return list(_load())


def for_version(version: str) -> BindingsRelease:
    """The release with this bindings version (``0.3.2``; a leading ``v`` is accepted)."""
    wanted = version.strip().removeprefix("v")
    for release in _load():
        if release.bindings_version == wanted:
            return release
    known = _load()
    span = f"{known[0].bindings_version} .. {known[-1].bindings_version}" if known else "none"
    raise BindingsMapError(
        f"llama-cpp-python {version!r} is not in the bindings map (known: {span}); "
        f"pass a listed --bindings-version or rerun tools/derive_bindings_map.py"
    )


def parse_tag(tag: str) -> int:
    """The build number of a llama.cpp ``bNNNN`` tag; BindingsMapError if it is not one."""
    match = _TAG.fullmatch(tag) if isinstance(tag, str) else None
    if match is None:
        raise BindingsMapError(
            f"llama.cpp tag {tag!r} is not a build tag of the form bNNNN (e.g. b4000); "
            f"choose a bNNNN release tag or pass --bindings-version X explicitly"
        )
    return int(match.group(1))


def nearest(build: int, candidates: list[BindingsRelease]) -> BindingsRelease | None:
    """The candidate whose build number is nearest ``build``: at or before it on a tie, and the
    newest bindings version among releases that vendor the same build. None if none is numbered."""
    numbered = [r for r in candidates if r.llama_cpp_build_number is not None]
    if not numbered:
        return None

    def rank(r: BindingsRelease) -> tuple[int, int, tuple[int, ...]]:
        number = r.llama_cpp_build_number
        assert number is not None
        negated = tuple(-part for part in _version_key(r.bindings_version))
        return abs(build - number), 0 if number <= build else 1, negated

    return min(numbered, key=rank)


def for_llama_tag(tag: str, max_distance: int = DEFAULT_MAX_DISTANCE) -> BindingsRelease:
    """The PyPI-installable release whose vendored llama.cpp is nearest the tag ``bNNNN``.

    Raises BindingsMapError (one line naming the fix) for a malformed tag or when the nearest
    release is more than ``max_distance`` builds away.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    build = parse_tag(tag)
    installable = [r for r in _load() if r.installable]
    best = nearest(build, installable)
    if best is None:
        raise BindingsMapError("the bindings map has no numbered release; rerun tools/derive_bindings_map.py")
    number = best.llama_cpp_build_number
    assert number is not None
    if abs(build - number) <= max_distance:
        return best
    low, high = max(number - max_distance, 1), number + max_distance
    message = (
        f"llama.cpp {tag} has no llama-cpp-python release within {max_distance} builds "
        f"(nearest: {best.describe()}); pass --bindings-version X explicitly "
        f"or choose a tag between b{low} and b{high}"
    )
    if build > number:
        newer = [r.bindings_version for r in installable
                 if r.llama_cpp_build_number is None and _version_key(r.bindings_version) > _version_key(best.bindings_version)]
        if newer:
            message += f" ({', '.join(newer)} vendor{'s' if len(newer) == 1 else ''} a newer llama.cpp of unrecorded build number)"
    raise BindingsMapError(message)
