"""The token-id interfaces on real engines: 3t (llama-server ``/completion``) and 1t (vLLM ``/v1/completions``).

Each runs an invalidation cell through the runner entry point (``python -m kvmatrix.runners CELL.json``,
hand-made cell specs as the host writes them) on the generated tiny model: every timed hit and miss is
``cache_verified`` by the engine's own cached-token count, against the expectation computed from the
ids actually sent. Beside 3t the same config runs on 3a (the chat path of the same build) for comparison:
same engine, same A/B/Q text; 3t's prompt is exactly the content tokens (plus the special tokens the
tokenizer adds to plain text), 3a's adds the chat template.

The vLLM half uses the cached vLLM environment and is gated like tests/test_vllm_engine.py (markers
``engine`` + ``vllm``; skipped with the reason when the environment cannot be made).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec
from tests.conftest import REPO
from tests.test_vllm_engine import hf_model, vllm_env  # noqa: F401 - the same gate (and environment) as phase 1

pytestmark = pytest.mark.engine

CONFIG = ABConfig(128, 64)
TRIALS = 3


def _experiment(config: ABConfig = CONFIG) -> ExperimentSpec:
    return ExperimentSpec(name="invalidation", config=config, num_trials=TRIALS, warmup_trials=1, settle_ms=20,
                          max_output_tokens=4)


def _run(python: Path, spec: CellSpec, env: dict, timeout: float = 900) -> dict:
    """One cell through the runner entry point; its result document."""
    out = Path(spec.out_dir)
    path = out / "cells" / f"{spec.cell_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    proc = subprocess.run([str(python), "-m", "kvmatrix.runners", str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    doc = json.loads((out / f"{spec.cell_id}.json").read_text())
    assert proc.returncode == 0, (spec.cell_id, doc.get("error"), proc.stderr[-2000:])
    return doc


def _measured(doc: dict, cond: str) -> list[dict]:
    return [t for t in doc[cond]["trials"] if not t["warmup"]]


def _special(doc: dict) -> int:
    """How many special tokens the tokenizer adds to plain text (recorded by the token-id interfaces)."""
    added = doc["runtime"]["effective"]["token_prompt_special"]
    return len(added["prefix"]) + len(added["suffix"])


def _check_token_cell(doc: dict, config: ABConfig, granularity: int = 1) -> None:
    """Every trial of a token-id invalidation cell engine-verified, with the exact token arithmetic."""
    assert doc["status"] == "ok", doc.get("error")
    assert doc["runtime"]["mismatches"] == []
    eff = doc["runtime"]["effective"]
    assert isinstance(eff["token_prompt_bos"], bool) and eff["token_prompt"]
    bos = len(eff["token_prompt_special"]["prefix"])
    q = config.q
    for cond, n_prompt in (("cache_hit", config.a + config.b + q), ("cache_miss", config.b + q)):
        trials = doc[cond]["trials"]
        assert len(_measured(doc, cond)) == TRIALS and doc[cond]["stats"]["verified_trials"] == TRIALS
        for t in trials:
            assert t["cache_verified"], (cond, t)
            assert t["cached_tokens"] == t["expected_cached_tokens"], (cond, t)
            assert t["prompt_tokens"] == n_prompt + _special(doc), (cond, t)  # no template: the content's tokens
            assert t["reference_verified"] is True and t["reference_cached_tokens"] == t["cached_tokens"]
            assert t["tokenid_ttft_ms"] is None  # no separate token-id control: this is the token-id path
            assert t["ttft_ms"] > 0 and t["completion_tokens"] == 4
        for t in _measured(doc, cond):
            if cond == "cache_hit":  # [BOS,]A,B reused (whole blocks on vLLM)
                assert t["cached_tokens"] > 0
                assert t["cached_tokens"] == (bos + config.a + config.b) // granularity * granularity
            else:  # [B,Q] after [A,B]: only the BOS, where the tokenizer adds one
                assert t["cached_tokens"] == (bos // granularity) * granularity
    cal = doc["calibration"]
    assert cal["enabled"] and cal["token_id_path"] is False
    assert cal["conditions"]["cache_hit"]["reference_verified"] == TRIALS


# ---------------------------------------------------------------- llama-server, phase 3t
@pytest.fixture(scope="module")
def llama_cells(llama_build, tiny_model, tmp_path_factory):
    from kvmatrix.matrix import llamacpp

    _, build, python = llama_build
    out = tmp_path_factory.mktemp("tokenid")
    model = {"name": tiny_model.name, "gguf": str(tiny_model.gguf_f16), "quant": "f16", "params": tiny_model.params}
    runtime = RuntimeSpec(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2)
    env = {**os.environ, **llamacpp.engine_env(build), "PYTHONPATH": str(REPO), "KVMATRIX_QUIET": "1"}
    docs = {}
    for phase, backend in (("3t", "llamacpp_tokens"), ("3a", "llamacpp_http")):
        cell_id = f"phase{phase}-{backend}-{CONFIG.a}x{CONFIG.b}"
        spec = CellSpec(cell_id=cell_id, run="tokenid", phase=phase, backend=backend, model=model, runtime=runtime,
                        experiment=_experiment(), out_dir=str(out),
                        engine={"server": str(build.server), "variant": None, "label": backend},
                        provenance={**build.provenance(), "build_variant": "server"})
        docs[phase] = _run(python, spec, env)
    return out, docs


def test_3t_every_hit_and_miss_is_engine_verified(llama_cells):
    _, docs = llama_cells
    doc = docs["3t"]
    _check_token_cell(doc, CONFIG)
    for t in doc["cache_hit"]["trials"] + doc["cache_miss"]["trials"]:
        assert t["cached_tokens_source"] == "timings.cache_n"
    assert doc["phase"] == "3t" and doc["backend"] == "llamacpp_tokens"


def test_3t_beside_3a_same_engine_same_text_no_template(llama_cells):
    _, docs = llama_cells
    t3, a3 = docs["3t"], docs["3a"]
    assert a3["status"] == "ok", a3.get("error")
    # the same server and flags: only the port differs
    argv_t, argv_a = t3["runtime"]["rendered"]["argv"], a3["runtime"]["rendered"]["argv"]
    port = argv_t.index("--port") + 1
    assert argv_t[:port] + argv_t[port + 1:] == argv_a[:port] + argv_a[port + 1:]
    eff_a = a3["runtime"]["effective"]
    eff_t = {k: v for k, v in t3["runtime"]["effective"].items() if not k.startswith("token_prompt")}
    assert eff_t == eff_a
    # the chat path adds the template's tokens; the token-id path sends the content alone
    hit_t, hit_a = _measured(t3, "cache_hit")[-1], _measured(a3, "cache_hit")[-1]
    assert hit_a["prompt_tokens"] > hit_t["prompt_tokens"] == CONFIG.a + CONFIG.b + CONFIG.q + _special(t3)
    assert all(t["cache_verified"] for c in ("cache_hit", "cache_miss") for t in a3[c]["trials"])


def test_3t_raw_prompt_completions_of_the_prefix_benchmark(llama_build, tiny_model, tmp_path):
    """The prefix benchmark's client on 3t: token ids streamed to /completion, the engine's cache_n read."""
    from kvmatrix.runners.backends import get_backend

    _, build, _ = llama_build
    cell = CellSpec(cell_id="prefix3t", run="t", phase="3t", backend="llamacpp_tokens",
                    model={"gguf": str(tiny_model.gguf_f16), "name": tiny_model.name},
                    runtime=RuntimeSpec(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2),
                    experiment=ExperimentSpec(config=CONFIG), out_dir=str(tmp_path),
                    engine={"server": str(build.server)})
    backend = get_backend("llamacpp_tokens")(cell, tmp_path)
    backend.render()
    try:
        backend.start()
        backend.effective()
        prompt = " the of and to in is was that for on with as by at from this be are or it" * 4
        path, payload = backend.completion_request(prompt, 4, slot=0)
        assert path == "/completion" and payload["prompt"] == backend.text_ids(prompt)
        results = backend.client.stream_many(path, [payload, payload], 1)
        counts = [backend.completion_counts(r.fields) for _, r in results]
        n = len(payload["prompt"])
        assert [c["prompt_tokens"] for c in counts] == [n, n] and [c["completion_tokens"] for c in counts] == [4, 4]
        assert counts[0]["cached_tokens"] == 0 and counts[1]["cached_tokens"] == n - 1  # the repeat: all but one
        assert all(r.ttft_s is not None and r.ttft_s > 0 for _, r in results)
        assert backend.memory_readout()["slots"] == 1 and backend.process_memory()["rss_mib"] > 0
    finally:
        backend.stop()


def test_no_llama_server_left_running(llama_cells):
    _, docs = llama_cells
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for doc in docs.values():
        argv = doc["runtime"]["rendered"]["argv"]
        port = argv[argv.index("--port") + 1]
        assert not [line for line in listing.splitlines() if "llama-server" in line and f"--port {port} " in line]


# ---------------------------------------------------------------- vLLM server, phase 1t
VLLM_CONFIG = ABConfig(256, 110)  # spans CPU blocks of 128: the hit reuses whole blocks only
BLOCK = 128


@pytest.fixture(scope="module")
def vllm_cell(vllm_env, hf_model, tmp_path_factory):
    from kvmatrix.matrix import vllm as vllmenv

    env_, model = vllm_env, hf_model

    out = tmp_path_factory.mktemp("tokenid_vllm")
    opts = vllmenv.options("cpu", model.name)
    runtime = vllmenv.runtime_for(RuntimeSpec(n_ctx=2048, n_batch=2048, n_threads=2, n_threads_batch=2), opts,
                                  model.hf_dir)
    vllmenv.check(env_.version, runtime, opts, model.hf_dir, model.name)
    spec = CellSpec(cell_id=f"phase1t-vllm_tokens-{VLLM_CONFIG.a}x{VLLM_CONFIG.b}", run="tokenid", phase="1t",
                    backend="vllm_tokens", model={"name": model.name, "hf_dir": str(model.hf_dir)}, runtime=runtime,
                    experiment=_experiment(VLLM_CONFIG), out_dir=str(out),
                    engine=vllmenv.engine_doc(env_, opts, "vllm_tokens"), provenance=env_.provenance())
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVMATRIX_QUIET": "1", "TMPDIR": tempfile.gettempdir()}
    return out, _run(env_.python, spec, env, timeout=1500)


@pytest.mark.vllm
def test_1t_every_hit_and_miss_is_engine_verified(vllm_cell):
    out, doc = vllm_cell
    _check_token_cell(doc, VLLM_CONFIG, granularity=BLOCK)
    assert doc["runtime"]["effective"]["block_size"] == BLOCK
    log = out / "logs" / f"{doc['cell_id']}.requests.jsonl"
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    assert requests and all(r["endpoint"] == "/v1/completions" and r["prompt_ids_source"] == "request"
                            for r in requests)
    # the engine's per-request count agrees with its prefix-cache counters
    assert all(r["cached_tokens_usage"] == r["metrics_prefix_cache_hits"] for r in requests
               if r.get("metrics_prefix_cache_hits") is not None)
