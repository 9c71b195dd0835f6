"""Hugging Face model ids (``--model org/name[@revision]``) resolved through the hub cache conventions.

Where a model lives, as ``huggingface_hub`` lays it out (so a cache filled by ``huggingface-cli download``, by
vLLM or by transformers is found as it is):

    $HF_HUB_CACHE  (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--ORG--NAME/refs/REVISION        the commit a branch / tag points at
      models--ORG--NAME/snapshots/COMMIT/... the files of that commit

A revision is a branch or tag (refs/REVISION) or a commit hash (snapshots/COMMIT); the default is ``main``.
The resolved commit is recorded in the model manifest, never the token. A model that is not in the cache is
downloaded once into that cache by ``huggingface_hub.snapshot_download`` in the model venv, with ``HF_TOKEN`` taken
from the environment only (never put on a command line, in a file or in a result); ``HF_HUB_OFFLINE=1`` refuses
instead, naming the cache folder it looked in.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmatrix.plumbing.console import fail, say

ID_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str  # as given (default main)
    commit: str
    snapshot: Path
    cache: Path

    def manifest(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "cache": str(self.cache)}


def parse_id(text: str) -> tuple[str, str] | None:
    """``org/name[@rev]`` -> (repo id, revision); None when ``text`` is not shaped like one or is an existing path."""
    m = ID_RE.fullmatch(text)
    if not m or Path(text).expanduser().exists() or text.endswith(".gguf"):
        return None
    return m.group("repo"), m.group("rev") or "main"


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_folder(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def cached(repo_id: str, revision: str) -> HubModel | None:
    """The snapshot of ``repo_id`` at ``revision`` in the cache, or None."""
    folder = repo_folder(repo_id)
    commit = revision if COMMIT_RE.fullmatch(revision) else None
    if commit is None:
        ref = folder / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None or not (folder / "snapshots" / commit).is_dir():
        return None
    return HubModel(repo_id, revision, commit, folder / "snapshots" / commit, hub_cache())


def resolve(text: str, python: Callable[[], Path] | None = None) -> HubModel:
    """``org/name[@rev]`` -> its snapshot in the cache (downloaded once if missing and allowed)."""
    parsed = parse_id(text)
    if parsed is None:
        fail(f"--model {text!r}: expected a Hugging Face id such as org/name or org/name@revision")
    repo_id, revision = parsed
    found = cached(repo_id, revision)
    if found is not None:
        return found
    where = repo_folder(repo_id)
    if offline():
        fail(f"--model {text}: not in the Hugging Face cache ({where}, revision {revision}) and HF_HUB_OFFLINE is set; "
             f"download it first (huggingface-cli download {repo_id}) or unset HF_HUB_OFFLINE")
    if python is None:
        fail(f"--model {text}: not in the Hugging Face cache ({where}, revision {revision})")
    say(f"downloading {repo_id}@{revision} into {hub_cache()} (HF_TOKEN from the environment if set; cached)")
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3])")
    proc = subprocess.run([str(python()), "-c", code, repo_id, revision, str(hub_cache())], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"--model {text}: download failed ({last[:300]}); check the id, HF_TOKEN for gated models, or the network")
    found = cached(repo_id, revision)
    if found is None:
        fail(f"--model {text}: downloaded, but no snapshot for revision {revision} appeared under {where}")
    return found


def gguf_files(snapshot: Path) -> list[Path]:
    return sorted(p for p in snapshot.rglob("*.gguf") if p.is_file() or p.is_symlink())


def pick_gguf(snapshot: Path, quant: str | None, what: str) -> Path | None:
    """The repository's own GGUF file for ``quant`` (e.g. Q8_0, matched in the file name); None when it has none."""
    files = gguf_files(snapshot)
    if not files:
        if quant:
            fail(f"--gguf-quant {quant}: {what} has no .gguf files; leave --gguf-quant out (its safetensors are "
                 "converted once with the benchmarked llama.cpp's converter)")
        return None
    if quant is None and len(files) == 1:
        return files[0]
    names = ", ".join(p.name for p in files)
    if quant is None:
        fail(f"{what} has several GGUF files ({names}); choose one with --gguf-quant, e.g. --gguf-quant Q8_0")
    chosen = [p for p in files if re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9])", p.name, re.I)]
    if len(chosen) != 1:
        fail(f"--gguf-quant {quant}: {'no' if not chosen else 'more than one'} GGUF file of {what} matches "
             f"({names}); give the quantization as it appears in one file name")
    return chosen[0]
