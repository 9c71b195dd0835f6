"""Cached host environments: the cache folder and content-keyed virtualenvs.

Everything slow that the host runtime needs (virtualenvs, llama.cpp builds,
generated models) lives under one cache folder, keyed by the content that
determines it, so a second run is fast and two different inputs never share
an entry. An entry is usable only once its ``.complete`` marker exists: an
interrupted creation is removed and redone on the next call.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from kvmatrix.plumbing.console import fail, say

MARKER = ".complete"


def cache_dir() -> Path:
    """The cache root: $KVMATRIX_CACHE, else ~/.cache/kvmatrix."""
    root = os.environ.get("KVMATRIX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kvmatrix"
    )
    path = Path(root).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def mark_complete(path: Path, info: dict | None = None) -> None:
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info or {}, indent=1, sort_keys=True))
    os.replace(tmp, path / MARKER)


def reset_entry(path: Path) -> None:
    """Remove a half-made cache entry so it can be made again."""
    if path.exists() and not is_complete(path):
        shutil.rmtree(path)


@contextmanager
def entry_lock(path: Path):
    """Hold an exclusive lock on cache entry ``path`` (the file ``.<name>.lock`` beside it) while it is checked
    and made: two processes sharing the cache (Slurm tasks on one node, two shells) never make or reset the same
    entry at once; the second waits, then finds it complete. ``flock``: local file systems and NFSv4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another kvmatrix process that is making {path.name}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_python() -> str:
    """The interpreter venvs are made from: the base installation, whichever venv (nox's, say)
    kvmatrix itself runs in, so every session shares the same cached environments."""
    candidate = Path(sys.base_prefix) / "bin" / "python"
    if candidate.is_file():
        return str(candidate)
    return getattr(sys, "_base_executable", None) or sys.executable


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(
    name: str,
    requirements: list[str],
    *,
    env: dict[str, str] | None = None,
    pip_args: list[str] | None = None,
    python: str | None = None,
    offline_closure: bool = False,
    import_check: str | None = None,
) -> Path:
    """Return the python of a cached venv holding ``requirements``.

    The venv lives at <cache>/venvs/<name>-<key> where key hashes the
    requirements, the extra environment and the base interpreter, so a
    changed pin makes a new venv instead of mutating an old one.

    ``offline_closure`` (offline hosts only): the wheel folder IS the environment: the
    requirements and every wheel in the folder are installed with ``--no-deps`` (a release
    whose metadata pins packages it does not need here, e.g. vLLM's flashinfer or a numpy
    cap, cannot be resolved by pip offline); ``import_check`` (python code) then proves the
    set complete, and a missing module is named in one line.
    """
    base = python or base_python()
    offline = os.environ.get("KVMATRIX_OFFLINE_WHEELS")
    if offline:
        # Hosts without a package index (the lent GPU machine): reuse the system's
        # packages, take the rest from a folder of wheels, build without isolation.
        if not Path(offline).is_dir():
            fail(f"KVMATRIX_OFFLINE_WHEELS={offline} is not a folder; point it at the folder of wheels "
                 "(or unset it on a host with a package index)")
        pip_args = [*(pip_args or []), "--no-index", "--find-links", offline, "--no-build-isolation"]
    wheels: list[str] = []
    if offline and offline_closure:
        wheels = sorted(str(p) for p in Path(offline).glob("*.whl"))
        pip_args = [*pip_args, "--no-deps"]
    key = content_key(name, requirements, env or {}, pip_args or [], base,
                      *([[Path(w).name for w in wheels]] if wheels else []))
    venv = cache_dir() / "venvs" / f"{name}-{key}"
    if is_complete(venv):
        return venv_python(venv)
    with entry_lock(venv):
        if is_complete(venv):  # made by another process while this one waited
            return venv_python(venv)
        reset_entry(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        say(f"creating environment {venv.name} ({len(requirements)} requirements; cached after this)")
        _run([base, "-m", "venv", *(["--system-site-packages"] if offline else []), str(venv)], what=f"create venv {venv}")
        py = str(venv_python(venv))
        if offline:
            _inherit_site_packages(venv, py)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        if requirements:
            cmd = [py, "-m", "pip", "install", "--progress-bar", "off", *(pip_args or []), *requirements, *wheels]
            _run(cmd, what=f"pip install into {venv.name}", env=full_env, wheels=offline)
        if import_check:
            proc = subprocess.run([py, "-c", import_check], env=full_env, capture_output=True, text=True)
            if proc.returncode != 0:
                m = re.findall(r"No module named '([^']+)'", proc.stderr)
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                shutil.rmtree(venv, ignore_errors=True)
                if m and offline:
                    fail(f"{name}: module {m[-1]!r} is missing from KVMATRIX_OFFLINE_WHEELS={offline}; add the wheel "
                         f"that provides it (where an index is reachable: pip download --no-deps --only-binary=:all: "
                         f"{m[-1].split('.')[0]} -d DIR) and rerun")
                fail(f"{name}: the new environment cannot import what it needs ({last}); fix that and rerun")
        mark_complete(venv, {"requirements": requirements, "env": env or {}, "python": base,
                             **({"offline_wheels": [Path(w).name for w in wheels]} if wheels else {})})
    return venv_python(venv)


def _inherit_site_packages(venv: Path, py: str) -> None:
    """Make the packages of the interpreter that runs kvmatrix visible in the new venv.

    ``--system-site-packages`` only reaches the BASE interpreter's packages; on
    hosts whose python is itself a venv (the GPU machine's torch venv) the
    useful packages live there, so a .pth file adds those folders.
    """
    import site

    target = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(target) / "_kvmatrix_inherit.pth").write_text("\n".join(paths) + "\n")


#: pip's words for a requirement that no index / wheel folder / installed package satisfies
_MISSING = (
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
)
_FROM = re.compile(r"Could not find a version that satisfies the requirement (\S+) \(from ([^)]*)\)")


def missing_distribution(pip_output: str) -> tuple[str, str | None] | None:
    """(requirement, what needs it or None) pip could not find, from its output; None for other failures."""
    for pattern in _MISSING:
        found = pattern.findall(pip_output)
        if found:
            req = found[-1].rstrip(".,")
            needed = [by for r, by in _FROM.findall(pip_output) if r == req and not by.startswith("versions:")]
            return req, (needed[-1] if needed else None)
    return None


def missing_wheel_message(what: str, req: str, needed_by: str | None, wheels: str) -> str:
    """The one line for an offline install that lacks a wheel."""
    by = f" (needed by {needed_by})" if needed_by else ""
    return (f"{what}: no wheel for {req}{by} in KVMATRIX_OFFLINE_WHEELS={wheels}, nor among this interpreter's "
            f"packages; add one to that folder (where an index is reachable: pip download --no-deps "
            f"--only-binary=:all: '{req}' -d DIR) and rerun")


def _run(cmd: list[str], *, what: str, env: dict[str, str] | None = None, wheels: str | None = None) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 and wheels:
        missing = missing_distribution(proc.stdout)
        if missing:
            fail(missing_wheel_message(what, *missing, wheels))
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        fail(f"{what} failed (exit {proc.returncode}); see the output above, fix it and rerun")
