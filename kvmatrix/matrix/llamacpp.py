"""One llama.cpp source, built once, used by every llama.cpp interface.

* source: the llama.cpp vendored inside a llama-cpp-python sdist from PyPI
  (default ``vendored:0.3.36``), or any checkout given as a directory.
* build: CMake, once per (source content, flags) whichever command asks (``build_key``), cached; produces
  ``llama-server`` and the shared ``libllama.so`` that the bindings load
  through ``LLAMA_CPP_LIB_PATH``. CUDA is switched on when nvcc and a GPU exist.
* bindings: llama-cpp-python installed WITHOUT compiling
  (``CMAKE_ARGS=-DLLAMA_BUILD=OFF``) in a cached runner venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmatrix import catalog
from kvmatrix.matrix import allocation
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import fail, say

DEFAULT_SOURCE = "vendored:0.3.36"

#: first llama.cpp build number whose server lives in tools/server (commit "move end-user examples to
#: tools directory", #13249, 2025-05-02: rev-list count 5269); older trees need LLAMA_BUILD_EXAMPLES=ON
SERVER_IN_TOOLS_SINCE = 5269
#: where a tag's source archive comes from on a host that can reach GitHub
TAG_ARCHIVE_URL = "https://github.com/ggml-org/llama.cpp/archive/refs/tags/{tag}.tar.gz"
#: environment variable overriding it: a URL template with ``{tag}`` (a mirror, or ``file:///dir/{tag}.tar.gz``)
ARCHIVE_URL_ENV = "KVMATRIX_LLAMA_ARCHIVE_URL"

# Python packages the runner imports (kept in step with pyproject's [runner] extra).
RUNNER_REQUIREMENTS = ["aiohttp>=3.9", "numpy>=1.24"]


@dataclass
class LlamaSource:
    origin: str  # "vendored:0.3.36" or a directory
    path: Path  # the llama.cpp tree (has CMakeLists.txt, convert_hf_to_gguf.py)
    commit: str
    bindings_sdist: Path | None = None  # llama-cpp-python source matching this tree
    bindings_version: str | None = None


@dataclass
class LlamaBuild:
    source: LlamaSource
    build_dir: Path
    bin_dir: Path
    cmake_flags: list[str]
    cuda: bool
    compiler: str
    build_seconds: float
    info: dict = field(default_factory=dict)

    @property
    def server(self) -> Path:
        return self.bin_dir / "llama-server"

    def provenance(self) -> dict:
        return {
            "llama_cpp_source": self.source.origin,
            "llama_cpp_commit": self.source.commit,
            "llama_cpp_python_version": self.source.bindings_version,
            "build_flags": self.cmake_flags,
            "build_cuda": self.cuda,
            "compiler": self.compiler,
            "nvcc": self.info.get("nvcc"),
            "build_dir": str(self.build_dir),
        }


def ensure_source(spec: str | None, bindings_version: str | None = None) -> LlamaSource:
    """Resolve ``vendored:X.Y.Z``, a tag ``bNNNN`` or a directory to a llama.cpp tree."""
    spec = spec or DEFAULT_SOURCE
    if spec.startswith("vendored:"):
        return _vendored_source(spec.split(":", 1)[1])
    if build_number(spec) is not None:
        return _tag_source(spec, bindings_version)
    path = Path(spec).expanduser().resolve()
    if not (path / "CMakeLists.txt").is_file() or not (path / "include" / "llama.h").is_file():
        fail(f"--llama-source {spec}: not a llama.cpp checkout (no CMakeLists.txt / include/llama.h); "
             f"pass a llama.cpp directory or {DEFAULT_SOURCE}")
    commit = _git_commit(path) or os.environ.get("KVMATRIX_LLAMA_COMMIT") or "unknown"
    sdist = None
    version = None
    parent = path.parent.parent  # <sdist>/vendor/llama.cpp -> <sdist>
    if path.parent.name == "vendor" and (parent / "llama_cpp" / "llama_cpp.py").is_file():
        sdist, version = parent, _sdist_version(parent)
        commit = commit if commit != "unknown" else (vendored_commit(version) if version else "unknown")
    return LlamaSource(origin=str(path), path=path, commit=commit, bindings_sdist=sdist, bindings_version=version)


def _vendored_source(version: str) -> LlamaSource:
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        fail(f"vendored:{version}: expected a llama-cpp-python version such as {DEFAULT_SOURCE}")
    root = envs.cache_dir() / "sources" / f"llama-cpp-python-{version}"
    tree = root / f"llama_cpp_python-{version}"
    with envs.entry_lock(root):
        if not envs.is_complete(root):
            envs.reset_entry(root)
            root.mkdir(parents=True, exist_ok=True)
            say(f"downloading llama-cpp-python=={version} source from PyPI (~76 MB, cached)")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={version}", "-d", str(root)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            archives = list(root.glob("*.tar.gz"))
            if proc.returncode != 0 or not archives:
                print(proc.stdout[-2000:], file=sys.stderr)
                fail(f"could not download llama-cpp-python=={version} from PyPI; check the network or pass --llama-source DIR")
            with tarfile.open(archives[0]) as tf:
                tf.extractall(root, filter="data")
            archives[0].unlink()
            envs.mark_complete(root, {"version": version})
    commit = vendored_commit(version) or os.environ.get("KVMATRIX_LLAMA_COMMIT") or "unknown"
    return LlamaSource(origin=f"vendored:{version}", path=tree / "vendor" / "llama.cpp", commit=commit,
                       bindings_sdist=tree, bindings_version=version)


def vendored_commit(version: str) -> str | None:
    """The llama.cpp commit (7 hex digits) a llama-cpp-python release vendors, from the bindings map
    (the sdist's vendor/llama.cpp carries no .git); None for a release the map does not list."""
    from kvmatrix.matrix import bindings_map  # noqa: PLC0415

    try:
        return bindings_map.for_version(version).llama_cpp_commit[:7]
    except bindings_map.BindingsMapError:
        return None


def bindings_for_tag(tag: str, bindings_version: str | None = None) -> str:
    """The llama-cpp-python release to pair with llama.cpp ``tag`` (the nearest vendored one, see bindings_map)."""
    from kvmatrix.matrix import bindings_map  # noqa: PLC0415

    try:
        release = bindings_map.for_version(bindings_version) if bindings_version else bindings_map.for_llama_tag(tag)
    except bindings_map.BindingsMapError as exc:
        fail(str(exc))
    return release.bindings_version


def planned_tag_source(tag: str, bindings_version: str | None = None) -> LlamaSource:
    """A tag's source as far as it is known without downloading it (for rendering plans and command lines)."""
    return LlamaSource(origin=tag, path=Path(f"/nonexistent/llama.cpp-{tag}"), commit=tag,
                       bindings_version=bindings_for_tag(tag, bindings_version))


def _tag_source(tag: str, bindings_version: str | None) -> LlamaSource:
    """llama.cpp at a release tag: the tag's source archive (cached), paired with the nearest bindings release."""
    version = bindings_for_tag(tag, bindings_version)
    bindings = _vendored_source(version)
    root = envs.cache_dir() / "sources" / f"llama.cpp-{tag}"
    info = root / envs.MARKER
    with envs.entry_lock(root):
        if not envs.is_complete(root):
            envs.reset_entry(root)
            root.mkdir(parents=True, exist_ok=True)
            url = archive_url(tag)
            say(f"downloading llama.cpp {tag} from {url} (cached)")
            archive = root / f"{tag}.tar.gz"
            try:
                import urllib.request  # noqa: PLC0415

                with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as fh:
                    shutil.copyfileobj(resp, fh)
            except (OSError, ValueError) as exc:
                shutil.rmtree(root, ignore_errors=True)
                fail(f"cannot download llama.cpp {tag} from {url} ({exc}); on a host without GitHub access set "
                     f"{ARCHIVE_URL_ENV} to a mirror, or pass --llama DIR (a checkout of {tag}) or {DEFAULT_SOURCE}")
            try:
                with tarfile.open(archive) as tf:
                    commit = (tf.pax_headers.get("comment") or "unknown")[:7]  # GitHub archives carry the commit id
                    tf.extractall(root, filter="data")
            except (tarfile.TarError, OSError) as exc:
                shutil.rmtree(root, ignore_errors=True)
                fail(f"llama.cpp {tag} from {url} is not a readable .tar.gz ({exc}); check {ARCHIVE_URL_ENV} or the mirror")
            archive.unlink()
            trees = [p for p in root.iterdir() if p.is_dir()]
            if len(trees) != 1 or not (trees[0] / "CMakeLists.txt").is_file():
                shutil.rmtree(root, ignore_errors=True)
                fail(f"llama.cpp {tag} from {url} does not hold one llama.cpp tree (a top folder with CMakeLists.txt)")
            envs.mark_complete(root, {"tag": tag, "commit": commit, "url": url})
    commit = json.loads(info.read_text()).get("commit", "unknown")
    tree = next(p for p in root.iterdir() if p.is_dir())
    return LlamaSource(origin=tag, path=tree, commit=commit, bindings_sdist=bindings.bindings_sdist,
                       bindings_version=version)


def archive_url(tag: str) -> str:
    """The source archive URL of llama.cpp ``tag``: ``$KVMATRIX_LLAMA_ARCHIVE_URL`` (a template with ``{tag}``)
    or GitHub's tag archive. Any scheme urllib opens works, so a ``file://`` mirror serves offline hosts."""
    template = os.environ.get(ARCHIVE_URL_ENV) or TAG_ARCHIVE_URL
    if "{tag}" not in template:
        fail(f"{ARCHIVE_URL_ENV}={template!r} has no {{tag}}; give a template such as file:///mirror/{{tag}}.tar.gz")
    return template.format(tag=tag)


def _sdist_version(sdist: Path) -> str | None:
    init = sdist / "llama_cpp" / "__init__.py"
    m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text()) if init.is_file() else None
    return m.group(1) if m else None


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=7", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def detect_cuda() -> tuple[bool, str | None]:
    """(cuda usable, compute capability like '90') from nvcc + nvidia-smi."""
    if os.environ.get("KVMATRIX_CUDA", "").lower() in {"0", "off", "no"}:
        return False, None
    if not shutil.which("nvcc"):
        return False, None
    arch = gpu_arch()
    return (True, arch) if arch else (False, None)


def gpu_arch() -> str | None:
    """The first GPU's compute capability without the dot ('90'), from nvidia-smi; None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    caps = out.stdout.strip().splitlines()
    if out.returncode != 0 or not caps or not caps[0].strip():
        return None
    return caps[0].strip().replace(".", "")


def resolve_cuda(cuda: str = "auto") -> tuple[bool, str | None]:
    """(CUDA on, architecture) for ``--cuda auto|on|off``, the same whichever way CUDA was switched on.

    ``on`` and ``auto`` (on a host where auto finds nvcc and a GPU) give the SAME architecture (the GPU's,
    from nvidia-smi), so ``build --cuda on`` and ``run`` (auto) share one build; ``native`` (CMake asks
    the GPU) only where no GPU answers.
    """
    if cuda == "off":
        return False, None
    if cuda == "on":
        return True, gpu_arch()
    return detect_cuda()


def server_in_examples(source: LlamaSource) -> bool:
    """Older trees keep the server under examples/ (built only with LLAMA_BUILD_EXAMPLES=ON)."""
    if (source.path / "tools" / "server").is_dir():
        return False
    if (source.path / "examples" / "server").is_dir():
        return True
    number = build_number(source.origin)
    return number is not None and number < SERVER_IN_TOOLS_SINCE


def build_number(origin: str) -> int | None:
    """The N of a llama.cpp tag ``bN`` (None for other sources)."""
    m = re.fullmatch(r"b(\d+)", origin)
    return int(m.group(1)) if m else None


def cmake_flags(source: LlamaSource, cuda: bool, arch: str | None, openssl: bool | None = None) -> list[str]:
    """The CMake flags of a build: identical for server and shared library, host and Docker.

    ``openssl``: link the server with OpenSSL (None: when this host has its headers; images say False).
    """
    if openssl is None:
        openssl = Path("/usr/include/openssl/ssl.h").is_file()
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        f"-DLLAMA_BUILD_EXAMPLES={'ON' if server_in_examples(source) else 'OFF'}",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_CURL=OFF",
        f"-DLLAMA_OPENSSL={'ON' if openssl else 'OFF'}",
        f"-DLLAMA_BUILD_COMMIT={source.commit}",
        "-DCMAKE_BUILD_RPATH=$ORIGIN",
        "-DGGML_NATIVE=ON",
    ]
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch or 'native'}"]
    return flags


@dataclass(frozen=True)
class BuildKey:
    """What decides a build, and where it lives: the source's content and the CMake flags, nothing else
    (not how the source was named, not which command or phases asked for it)."""

    cuda: bool
    arch: str | None
    flags: tuple[str, ...]
    source_digest: str
    key: str

    @property
    def build_dir(self) -> Path:
        return envs.cache_dir() / "builds" / f"llama-{self.key}"


def build_key(source: LlamaSource, cuda: str = "auto") -> BuildKey:
    """The ONE computation of a build's flags and cache key (``build``, ``run``, ``matrix``, ``prefix``)."""
    has_cuda, arch = resolve_cuda(cuda)
    flags = cmake_flags(source, has_cuda, arch)
    digest = source_digest(source.path)
    key = envs.content_key(flags, digest)
    return BuildKey(has_cuda, arch, tuple(flags), digest, f"{source.commit}-{key}")


def planned_build(source: LlamaSource, cuda: str = "auto") -> LlamaBuild:
    """The flags a build WOULD use, without compiling (for variants that compile their own copy)."""
    has_cuda, arch = resolve_cuda(cuda)
    flags = cmake_flags(source, has_cuda, arch)
    return LlamaBuild(source=source, build_dir=Path("/nonexistent"), bin_dir=Path("/nonexistent"), cmake_flags=flags,
                      cuda=has_cuda, compiler="(not built)", build_seconds=0.0, info={"planned_only": True})


def gather_shared_libraries(build_dir: Path) -> list[str]:
    """Older trees (e.g. b4094) leave libllama.so / libggml*.so next to their sources (src/, ggml/src/);
    copy them into bin/ beside llama-server (its RPATH is $ORIGIN, and LLAMA_CPP_LIB_PATH names one
    folder), links kept as links, files already there untouched. The Dockerfile does the same."""
    bin_dir = build_dir / "bin"
    copied = []
    for lib in sorted(build_dir.rglob("lib*.so*")):
        if bin_dir in lib.parents or (bin_dir / lib.name).exists() or (bin_dir / lib.name).is_symlink():
            continue
        if lib.is_symlink():
            (bin_dir / lib.name).symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, bin_dir / lib.name)
        copied.append(lib.name)
    return copied


def ensure_build(source: LlamaSource, cuda: str = "auto", jobs: int | None = None) -> LlamaBuild:
    """Build llama-server + libllama once per (source content, flags); return the cached build."""
    if cuda == "on" and not shutil.which("nvcc"):
        fail("--cuda on but nvcc is not on PATH; install the CUDA toolkit or use --cuda off")
    bk = build_key(source, cuda)
    has_cuda, arch, flags, build_dir = bk.cuda, bk.arch, list(bk.flags), bk.build_dir
    info_file = build_dir / "kvmatrix-build.json"
    with envs.entry_lock(build_dir):  # one builder per build; others wait, then find it complete
        if not envs.is_complete(build_dir):
            _adopt_legacy_build(source, flags, build_dir)
        if envs.is_complete(build_dir) and info_file.is_file():
            info = json.loads(info_file.read_text())
            return LlamaBuild(source=source, build_dir=build_dir, bin_dir=build_dir / "bin", cmake_flags=flags,
                              cuda=has_cuda, compiler=info["compiler"], build_seconds=info["build_seconds"], info=info)
        envs.reset_entry(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
        jobs = jobs or max(2, allocation.cpu_count())
        say(f"building llama.cpp {source.commit} ({'CUDA ' + (arch or '') if has_cuda else 'CPU'}) "
            f"with {jobs} jobs into {build_dir} (cached after this; ~10 min on 2 cores, seconds with a warm ccache)")
        t0 = time.monotonic()
        log = build_dir / "build.log"
        _stream(["cmake", "-S", str(source.path), "-B", str(build_dir), *flags, *launcher], log, "configure")
        _stream(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama-server", "llama"], log, "build")
        seconds = time.monotonic() - t0
        gather_shared_libraries(build_dir)
        if not (build_dir / "bin" / "llama-server").is_file() or not (build_dir / "bin" / "libllama.so").is_file():
            fail(f"llama.cpp build finished without bin/llama-server or bin/libllama.so; see {log}")
        info = {"compiler": _compiler(build_dir), "build_seconds": round(seconds, 1), "cmake_flags": flags,
                "commit": source.commit, "source_digest": bk.source_digest, "built_from": str(source.path),
                "cuda": has_cuda, "cuda_arch": arch, "nvcc": _nvcc_version() if has_cuda else None}
        info_file.write_text(json.dumps(info, indent=1))
        envs.mark_complete(build_dir, info)
        say(f"llama.cpp build done in {seconds:.0f}s")
        return LlamaBuild(source=source, build_dir=build_dir, bin_dir=build_dir / "bin", cmake_flags=flags,
                          cuda=has_cuda, compiler=info["compiler"], build_seconds=seconds, info=info)


def _adopt_legacy_build(source: LlamaSource, flags: list[str], build_dir: Path) -> None:
    """Reuse a build cached under the key of earlier kvmatrix versions (source name, commit, flags, key-file
    sizes) for the same source and flags: link it under the content key instead of compiling it again."""
    if build_dir.is_symlink() and not envs.is_complete(build_dir):
        build_dir.unlink()  # a link to an adopted build that is gone
    old_key = envs.content_key(source.origin, source.commit, flags, tree_stamp(source.path))
    legacy = build_dir.parent / f"llama-{source.commit}-{old_key}"
    if legacy == build_dir or not envs.is_complete(legacy) or not (legacy / "kvmatrix-build.json").is_file():
        return
    envs.reset_entry(build_dir)
    if build_dir.exists():
        return
    tmp = build_dir.with_name(f".{build_dir.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(legacy.name, target_is_directory=True)
    os.replace(tmp, build_dir)
    say(f"llama.cpp build {legacy.name} (cached by an earlier kvmatrix) reused as {build_dir.name}")


#: top-level folders of a llama.cpp tree that no CMake build of the server / library reads
_NOT_BUILT = {"docs", "models", "media", "tests", "benches", "gguf-py", "requirements", "ci", "skills"}


def source_digest(path: Path) -> str:
    """The content of a llama.cpp tree as far as the build reads it: every file's path and bytes.

    Left out: hidden entries (.git, .github), Python caches, CMake build folders inside the tree (a folder
    holding CMakeCache.txt) and the top-level folders in ``_NOT_BUILT``. Where the tree lies, what it is
    called and file times do not count, so the same source under two names is one build, and an edited
    file is another.
    """
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    root = Path(path)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if "CMakeCache.txt" in filenames and rel_dir != ".":
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                             and not (rel_dir == "." and d in _NOT_BUILT))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(dirpath, name)
            try:
                with open(full, "rb") as fh:
                    data = hashlib.sha256(fh.read()).hexdigest()
            except OSError:  # a dangling link
                continue
            h.update(f"{os.path.relpath(full, root)}\0{data}\n".encode())
    return h.hexdigest()[:16]


def tree_stamp(path: Path) -> str:
    """Cheap identity of a source tree without git: sizes of key files (the Docker image plan's identity;
    host builds key on ``source_digest``)."""
    parts = []
    for rel in ("CMakeLists.txt", "include/llama.h", "src/llama.cpp", "tools/server/server.cpp"):
        p = path / rel
        if p.exists():
            st = p.stat()
            parts.append(f"{rel}:{st.st_size}")
    return ";".join(parts)


def _stream(cmd: list[str], log: Path, what: str) -> None:
    """Run a build step, append its output to log and show progress lines."""
    last = 0.0
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                now = time.monotonic()
                if m and now - last > 15:
                    say(f"llama.cpp {what}: {m.group(1)}% ({line.strip().split()[-1]})")
                    last = now
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        print(tail, file=sys.stderr)
        fail(f"llama.cpp {what} failed (exit {rc}); full log: {log}")


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.strip().splitlines()
    return lines[-1] if lines else None


def _compiler(build_dir: Path) -> str:
    cache = build_dir / "CMakeCache.txt"
    text = cache.read_text() if cache.is_file() else ""
    m = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", text, re.M)
    cxx = m.group(1).strip() if m else "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except OSError:
        return cxx


def ensure_bindings_env(source: LlamaSource) -> Path:
    """A cached venv with the runner's packages and llama-cpp-python bindings built WITHOUT llama.cpp."""
    if source.bindings_sdist is None:
        fail(f"no llama-cpp-python source matches {source.origin}; use {DEFAULT_SOURCE} or a vendor/llama.cpp "
             f"inside an extracted llama-cpp-python sdist")
    reqs = [*RUNNER_REQUIREMENTS, str(source.bindings_sdist)]
    return envs.ensure_venv("llamacpp-runner", reqs, env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF"})


def engine_env(build: LlamaBuild) -> dict[str, str]:
    """Environment for a process that loads the bindings: point them at THIS build."""
    return {"LLAMA_CPP_LIB_PATH": str(build.bin_dir)}


def dump(build: LlamaBuild) -> str:
    d = asdict(build)
    return json.dumps(d, default=str, indent=1)


# -- bindings build variants -------------------------------------------------
#: How llama-cpp-python gets its llama.cpp, for the same source commit:
#:   shared: bindings built WITHOUT llama.cpp, loading the server's libllama.so (LLAMA_CPP_LIB_PATH)
#:   pip:    pip compiles its vendored llama.cpp with the SAME CMake flags as the server build
#:   stock:  pip compiles it with no CMAKE_ARGS, as users install it by default (CPU only)
BUILD_VARIANTS = catalog.BINDINGS_BUILDS  # the bindings build variants (the catalogue names them)

# Settings a variant cannot honour by definition; the runner accepts (and records) exactly these.
STOCK_DEVIATIONS = {"n_gpu_layers": 0}


def pip_cmake_args(build: LlamaBuild) -> str:
    """The build's compute flags, as CMAKE_ARGS for pip-compiling the bindings."""
    return pip_cmake_args_of(build.cmake_flags)


def pip_cmake_args_of(flags: list[str]) -> str:
    keep = ("-DGGML_", "-DCMAKE_CUDA_ARCHITECTURES", "-DCMAKE_BUILD_TYPE", "-DLLAMA_BUILD_COMMIT")
    return " ".join(f for f in flags if f.startswith(keep))


def ensure_variant_env(source: LlamaSource, build: LlamaBuild, variant: str) -> tuple[Path, dict[str, str], dict]:
    """(python, environment, provenance) of the runner for a bindings build variant."""
    if variant not in BUILD_VARIANTS:
        fail(f"unknown llama build variant {variant!r}; use one of server, {', '.join(BUILD_VARIANTS)}")
    if variant == "shared":
        return ensure_bindings_env(source), engine_env(build), {"build_variant": "shared",
                                                                 "bindings_cmake_args": "-DLLAMA_BUILD=OFF"}
    if source.bindings_sdist is None:
        fail(f"no llama-cpp-python source matches {source.origin}; the {variant} variant needs {DEFAULT_SOURCE}")
    cmake_args = pip_cmake_args(build) if variant == "pip" else ""
    jobs = str(max(2, allocation.cpu_count()))
    say(f"bindings variant '{variant}': pip compiles llama-cpp-python's vendored llama.cpp "
        f"(CMAKE_ARGS={cmake_args or '<none>'}; ~10 min on 2 cores, cached after this)")
    py = envs.ensure_venv(f"llamacpp-{variant}", [*RUNNER_REQUIREMENTS, str(source.bindings_sdist)],
                          env={"CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": jobs})
    return py, {}, {"build_variant": variant, "bindings_cmake_args": cmake_args or "(none: pip default)"}
