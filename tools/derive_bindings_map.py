#!/usr/bin/env python3
"""Derive kvmatrix/matrix/data/llama_cpp_python_vendored.json: which llama.cpp commit (and build
number) each llama-cpp-python release vendors.

How to run (git and network to PyPI only; the standard library otherwise)::

    # 1. Full (not shallow) clones: the bindings with their tags, llama.cpp with its master history.
    git clone --bare https://github.com/abetlen/llama-cpp-python  /tmp/lcp.git
    git clone --bare https://github.com/ggml-org/llama.cpp         /tmp/llama.cpp.git
    # 2. Optional: sdists of releases the bindings clone has no tag for yet (their tarball carries
    #    .git/modules/vendor/llama.cpp/HEAD, the vendored commit).
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sd
    # 3. Derive (the PyPI JSON is read from pypi.org unless --pypi-json names a saved copy).
    python tools/derive_bindings_map.py --bindings-git github:abetlen/llama-cpp-python=/tmp/lcp.git \\
        --llama-cpp-git github:ggml-org/llama.cpp=/tmp/llama.cpp.git \\
        --sdist /tmp/sd/llama_cpp_python-0.3.36.tar.gz --note "free text recorded in derived.notes"

``NAME=PATH`` records NAME as the repository's identity in "derived" (a bare PATH records the path).

``--llama-cpp-git`` may be given more than once (e.g. an older mirror with tags a newer one lacks):
tags are pooled, a commit's build number comes from the first mirror whose master contains it.

Method, per release tag ``vX.Y.Z`` of the bindings (variant tags such as ``v0.3.2-cu124`` are skipped):

* vendored commit: ``git ls-tree vX.Y.Z vendor/llama.cpp`` (the gitlink sha);
* build number: ``git rev-list --count <commit>`` in a llama.cpp mirror whose master contains it.
  That is how llama.cpp numbers its builds (CMake's LLAMA_BUILD_NUMBER) and names its release tags
  ``bNNNN``; the script checks the relation on every ``bNNNN`` tag of the mirrors and records the
  agreements and exceptions in "derived";
* tag: a verified ``bNNNN`` tag at the commit (``tag_relation: "exact"``), else the verified tag with
  the highest number that is an ancestor of it (``"after"``: the commit comes after that tag), else
  null (the commit predates every tag in the mirrors). A tag is verified when it points at a commit
  on master whose commit count equals NNNN. Mirrors rarely hold every upstream tag, so "after" means
  only that no tag for the commit itself was seen; the build number is the commit's own count;
* released / pypi_status: the earliest upload time of the version on PyPI, and whether it is
  published, yanked or absent there.

A release known only from an sdist gets its commit from the sdist; its build number stays null
unless a llama.cpp mirror contains that commit. Nothing is guessed: what cannot be derived is null.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "kvmatrix" / "matrix" / "data" / "llama_cpp_python_vendored.json"
PYPI_URL = "https://pypi.org/pypi/llama-cpp-python/json"
RELEASE_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
BUILD_TAG = re.compile(r"^b(\d+)$")
SHA = re.compile(r"^[0-9a-f]{40}$")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class Git:
    """A bare (or any) git directory, read through the git CLI."""

    def __init__(self, git_dir: Path, master: str = "master", work_tree: Path | None = None,
                 label: str | None = None) -> None:
        self.dir = git_dir
        self.label = label or str(git_dir)
        self.master = master
        # A submodule's git dir names its work tree (core.worktree); an extracted one lacks it.
        self.prefix = ["git", "--git-dir", str(git_dir)] + (["--work-tree", str(work_tree)] if work_tree else [])

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} in {self.dir}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def ok(self, *args: str) -> bool:
        return subprocess.run([*self.prefix, *args], capture_output=True).returncode == 0

    def head(self, ref: str = "HEAD") -> str:
        return self.run("rev-parse", f"{ref}^{{commit}}")

    def has_commit(self, sha: str) -> bool:
        return self.ok("cat-file", "-e", f"{sha}^{{commit}}")

    def on_master(self, sha: str) -> bool:
        return self.ok("merge-base", "--is-ancestor", sha, f"refs/heads/{self.master}")

    def count(self, sha: str) -> int:
        return int(self.run("rev-list", "--count", sha))

    def commit_date(self, sha: str) -> str:
        stamp = int(self.run("log", "-1", "--format=%ct", sha))
        return dt.datetime.fromtimestamp(stamp, dt.UTC).date().isoformat()

    def tags(self, pattern: re.Pattern[str]) -> dict[str, str]:
        """Tag name -> commit sha, for tags whose name matches."""
        out = self.run("for-each-ref", "--format=%(refname:strip=2) %(objectname) %(*objectname)", "refs/tags")
        result = {}
        for line in out.splitlines():
            name, obj, *peeled = line.split()
            if pattern.match(name):
                result[name] = peeled[0] if peeled else obj
        return result

    def master_counts(self) -> dict[str, int]:
        """Commit count of every commit on master's first-parent chain (one rev-list per merge)."""
        counts: dict[str, int] = {}
        previous: str | None = None
        total = 0
        for line in self.run("rev-list", "--first-parent", "--reverse", "--parents", f"refs/heads/{self.master}").splitlines():
            sha, *parents = line.split()
            if previous is None or len(parents) == 1:
                total += 1
            else:
                total += int(self.run("rev-list", "--count", sha, f"^{previous}"))
            counts[sha] = total
            previous = sha
        return counts


@dataclass
class LlamaCpp:
    """The pooled llama.cpp mirrors: verified bNNNN tags and build numbers."""

    mirrors: list[Git]
    verified: dict[int, str] = field(default_factory=dict)  # build number -> commit
    by_commit: dict[str, str] = field(default_factory=dict)  # commit -> tag name
    checked: dict[str, dict] = field(default_factory=dict)  # per-mirror verification summary

    def verify_tags(self) -> None:
        for mirror in self.mirrors:
            counts = mirror.master_counts()
            agree, exceptions = 0, []
            for name, sha in sorted(mirror.tags(BUILD_TAG).items(), key=lambda kv: int(kv[0][1:])):
                number = int(name[1:])
                count = counts.get(sha)
                if count is None and mirror.on_master(sha):
                    count = mirror.count(sha)
                if count == number:
                    agree += 1
                    known = self.verified.setdefault(number, sha)
                    if known != sha:
                        raise RuntimeError(f"{name}: {known} and {sha} both verify")
                    self.by_commit.setdefault(sha, name)
                else:
                    where = "not on master" if count is None else f"commit count {count}"
                    exceptions.append(f"{name} -> {sha} ({where})")
            self.checked[mirror.label] = {
                "tags_verified": agree,
                "tags_rejected": exceptions,
                "master": f"{mirror.master} {mirror.head(f'refs/heads/{mirror.master}')}",
            }

    def locate(self, sha: str) -> Git | None:
        for mirror in self.mirrors:
            if mirror.has_commit(sha) and mirror.on_master(sha):
                return mirror
        return None

    def describe(self, sha: str) -> dict:
        """Commit date, build number, tag and relation for a vendored commit (nulls when unknown)."""
        mirror = self.locate(sha)
        if mirror is None:
            return {"llama_cpp_commit_date": None, "llama_cpp_build_number": None,
                    "llama_cpp_tag": None, "tag_relation": None}
        number = mirror.count(sha)
        tag, relation = self.by_commit.get(sha), "exact"
        if tag is None:
            relation = None
            for candidate in sorted((n for n in self.verified if n < number), reverse=True):
                if mirror.has_commit(self.verified[candidate]) and mirror.ok(
                        "merge-base", "--is-ancestor", self.verified[candidate], sha):
                    tag, relation = f"b{candidate}", "after"
                    break
        return {"llama_cpp_commit_date": mirror.commit_date(sha), "llama_cpp_build_number": number,
                "llama_cpp_tag": tag, "tag_relation": relation}


def load_pypi(source: str | None) -> tuple[dict, str]:
    if source:
        return json.loads(Path(source).read_text()), f"{PYPI_URL} (saved copy {Path(source).name})"
    with urllib.request.urlopen(PYPI_URL, timeout=60) as response:
        return json.load(response), PYPI_URL


def pypi_facts(pypi: dict, version: str) -> tuple[str | None, str]:
    files = pypi.get("releases", {}).get(version) or []
    if not files:
        return None, "absent"
    first = min(f["upload_time_iso_8601"] for f in files)
    status = "yanked" if all(f.get("yanked") for f in files) else "published"
    return first[:10], status


def read_sdist(path: Path) -> tuple[str, str, str, str | None]:
    """(version, vendored commit, sdist sha256, vendored commit date or None) from a bindings sdist."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        names = tar.getnames()
        pkg_info = next(n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO"))
        meta = tar.extractfile(pkg_info).read().decode()
        version = re.search(r"^Version: (\S+)$", meta, re.M).group(1)
        head_name = next(n for n in names if n.endswith(".git/modules/vendor/llama.cpp/HEAD"))
        sha = tar.extractfile(head_name).read().decode().strip()
        module = head_name[: -len("/HEAD")]
        date = None
        with tempfile.TemporaryDirectory() as tmp:
            members = [m for m in tar.getmembers() if m.name.startswith(module + "/")]
            tar.extractall(tmp, members=members, filter="data")
            try:
                date = Git(Path(tmp) / module, work_tree=Path(tmp)).commit_date(sha)
            except RuntimeError:
                pass
    if not SHA.match(sha):
        raise RuntimeError(f"{path}: vendored HEAD {sha!r} is not a commit sha")
    return version, sha, digest, date


def labelled(arg: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` (NAME recorded as the repository's identity) or a bare ``PATH``."""
    name, sep, path = arg.partition("=")
    return (name, Path(path)) if sep else (None, Path(arg))


def derive(args: argparse.Namespace) -> dict:
    label, path = labelled(args.bindings_git)
    bindings = Git(path, label=label)
    llama = LlamaCpp([Git(p, args.llama_cpp_master, label=n) for n, p in map(labelled, args.llama_cpp_git)])
    llama.verify_tags()
    pypi, pypi_source = load_pypi(args.pypi_json)

    releases: dict[str, dict] = {}
    for name, tag_commit in bindings.tags(RELEASE_TAG).items():
        version = name[1:]
        tree = bindings.run("ls-tree", tag_commit, "vendor/llama.cpp")
        if not tree:
            continue  # before the submodule existed
        mode, kind, sha, _ = tree.split(None, 3)
        if kind != "commit":
            raise RuntimeError(f"{name}: vendor/llama.cpp is a {kind}, not a submodule")
        released, status = pypi_facts(pypi, version)
        releases[version] = {"bindings_version": version, "released": released, "pypi_status": status,
                             "llama_cpp_commit": sha, **llama.describe(sha),
                             "source": f"git tag {name} ({tag_commit})"}

    for sdist in args.sdist:
        version, sha, digest, date = read_sdist(Path(sdist))
        source = f"PyPI sdist {Path(sdist).name} (sha256 {digest})"
        if version in releases:
            if releases[version]["llama_cpp_commit"] != sha:
                raise RuntimeError(f"{version}: tag vendors {releases[version]['llama_cpp_commit']}, sdist {sha}")
            releases[version]["source"] += f"; agrees with {source}"
            continue
        released, status = pypi_facts(pypi, version)
        entry = {"bindings_version": version, "released": released, "pypi_status": status,
                 "llama_cpp_commit": sha, **llama.describe(sha), "source": source}
        if entry["llama_cpp_commit_date"] is None:
            entry["llama_cpp_commit_date"] = date
        releases[version] = entry

    ordered = [releases[v] for v in sorted(releases, key=version_key)]
    unnumbered = [r["bindings_version"] for r in ordered if r["llama_cpp_build_number"] is None]
    derived = {
        "generated": dt.datetime.now(dt.UTC).date().isoformat(),
        "tool": "tools/derive_bindings_map.py",
        "bindings_repository": {"repository": bindings.label, "head": bindings.head(),
                                "release_tags_read": len([r for r in ordered if r["source"].startswith("git tag")])},
        "llama_cpp_repositories": llama.checked,
        "sdists": [Path(p).name for p in args.sdist],
        "pypi": {"source": pypi_source, "latest_version": pypi.get("info", {}).get("version")},
        "method": {
            "llama_cpp_commit": "gitlink of vendor/llama.cpp at the release tag vX.Y.Z (git ls-tree), "
                                "or .git/modules/vendor/llama.cpp/HEAD inside the release's PyPI sdist",
            "llama_cpp_build_number": "git rev-list --count <commit> in a llama.cpp mirror whose master "
                                      "contains it (llama.cpp's build number; its bNNNN tags carry it)",
            "llama_cpp_tag": "verified bNNNN tag at the commit (tag_relation exact), else the highest "
                             "verified tag that is an ancestor (after); a tag is verified when its commit "
                             "is on master and has commit count NNNN",
            "released": "date (UTC) of the earliest file uploaded for the version on PyPI",
            "pypi_status": "published, yanked (every file yanked) or absent from PyPI",
        },
        "unnumbered_releases": unnumbered,
        "notes": list(args.note),
    }
    return {"derived": derived, "releases": ordered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bindings-git", required=True, metavar="[NAME=]PATH",
                        help="git dir of abetlen/llama-cpp-python (with tags); NAME is recorded as its identity")
    parser.add_argument("--llama-cpp-git", action="append", required=True, metavar="[NAME=]PATH",
                        help="git dir of ggml-org/llama.cpp or a full fork (master history); repeatable")
    parser.add_argument("--llama-cpp-master", default="master", help="llama.cpp's main branch (default master)")
    parser.add_argument("--sdist", action="append", default=[], help="a llama-cpp-python sdist tarball; repeatable")
    parser.add_argument("--pypi-json", help="a saved copy of the PyPI JSON API answer (default: fetch it)")
    parser.add_argument("--note", action="append", default=[], help="a free-text note recorded in 'derived'")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    document = derive(args)
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    count = len(document["releases"])
    print(f"wrote {count} releases to {args.out}; unnumbered: {document['derived']['unnumbered_releases']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
