"""``--model org/name[@revision]`` through the Hugging Face cache conventions, offline.

The cache is built here the way ``huggingface_hub`` lays it out (blobs, snapshots of symlinks, refs), holding
the generated tiny model under an ``org/name`` id; ``HF_HUB_CACHE`` points at it and ``HF_HUB_OFFLINE=1``.
A planted ``HF_TOKEN`` must appear in no file the run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_kvmatrix

from kvmatrix.models import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "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42"
SMALL = ["--phases", "3a", "--config", "256/128", "--trials", "2", "--settle-ms", "50", "--max-output-tokens", "8",
         "--no-calibration"]


def make_cache(root: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT, refs=("main",)) -> Path:
    """A hub cache holding ``files`` (name -> source file) as repo ``repo_id`` at ``commit``; the snapshot path."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


def test_ids_revisions_and_cache_folders(tmp_path, monkeypatch):
    assert hub.parse_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert hub.parse_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_id("tiny") is None and hub.parse_id("./x/y") is None and hub.parse_id("a/b.gguf") is None
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.hub_cache() == tmp_path / "c"
    src = tmp_path / "config.json"
    src.write_text("{}")
    snap = make_cache(tmp_path / "c", "org/name", {"config.json": src}, refs=("main", "v1"))
    for rev in ("main", "v1", COMMIT):
        found = hub.cached("org/name", rev)
        assert found.snapshot == snap and found.commit == COMMIT and found.revision == rev
    assert hub.cached("org/name", "v2") is None and hub.cached("org/other", "main") is None


def test_gguf_choice_by_quantization(tmp_path):
    for name in ("m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert hub.pick_gguf(tmp_path, "q8_0", "repo").name == "m-Q8_0.gguf"
    assert hub.pick_gguf(tmp_path, "Q4_K_M", "repo").name == "m-Q4_K_M.gguf"
    from kvmatrix.plumbing.console import UserError

    with pytest.raises(UserError, match="several GGUF files"):
        hub.pick_gguf(tmp_path, None, "repo")
    with pytest.raises(UserError, match="no GGUF file of repo matches"):
        hub.pick_gguf(tmp_path, "Q5_0", "repo")
    (tmp_path / "none").mkdir()
    assert hub.pick_gguf(tmp_path / "none", None, "repo") is None


def test_offline_id_not_in_cache_is_one_line(tmp_path):
    out = tmp_path / "out"
    proc = run_kvmatrix("run", "--model", "kvtest/missing", *SMALL, "--out", str(out), timeout=120,
                        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert not out.exists()


def _no_token(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), f"HF_TOKEN written to {path}"


@pytest.mark.engine
def test_hub_model_runs_offline_and_never_records_the_token(llama_build, tiny_model, tmp_path):
    hf = Path(tiny_model.hf_dir)
    cache = tmp_path / "hub"
    make_cache(cache, "kvtest/tiny", {p.name: p for p in hf.iterdir() if p.is_file()})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}
    out = tmp_path / "out"
    proc = run_kvmatrix("run", "--model", f"kvtest/tiny@{COMMIT}", *SMALL, "--out", str(out), env=env, check=True)
    doc = json.loads((out / "phase3a-llamacpp_http-256x128.json").read_text())
    assert doc["status"] == "ok" and doc["cache_hit"]["stats"]["verified_trials"] == 2
    assert doc["model"]["name"] == "kvtest/tiny"
    assert doc["provenance"]["model_manifest"]["hub"] == {"repo_id": "kvtest/tiny", "revision": COMMIT,
                                                          "commit": COMMIT, "cache": str(cache)}
    converted = Path(doc["model"]["gguf"]).parent  # converted once with the benchmarked llama.cpp's converter
    assert converted.name.startswith("hf-tiny-") and (converted / "manifest.json").is_file()
    _no_token(out, converted)
    assert TOKEN not in proc.stdout + proc.stderr

    # a repository with its own GGUF files: chosen by --gguf-quant, nothing converted
    snap = make_cache(cache, "kvtest/tiny-gguf", {"tiny-F16.gguf": Path(tiny_model.gguf_f16),
                                                  "tiny-Q8_0.gguf": Path(tiny_model.gguf_q8_0)})
    out2 = tmp_path / "out2"
    run_kvmatrix("run", "--model", "kvtest/tiny-gguf", "--gguf-quant", "Q8_0", *SMALL, "--out", str(out2), env=env,
                 check=True)
    doc = json.loads((out2 / "phase3a-llamacpp_http-256x128.json").read_text())
    assert doc["status"] == "ok" and doc["model"]["gguf"] == str(snap / "tiny-Q8_0.gguf")
    assert doc["model"]["quant"] == "Q8_0"
    _no_token(out2)
