"""The ``docker`` runtime: identical container options for every cell, one container per group of cells
sharing an engine start (one cell with --no-engine-reuse), cleanup.

``run_options`` is the ONE place that renders how a cell's container runs;
every cell of every backend gets the same options except its image, command,
environment and cell label:

    --network host --init --ipc private --shm-size S --cpuset-cpus C --memory M
    --user UID:GID [--gpus all | device=IDS]  (only when `docker info` lists the nvidia runtime; the
    CPUs, memory and GPUs default to this process's allocation: matrix/allocation.py)
    -v REPO:REPO:ro  (the runner: mounted, never baked in)
    -v MODEL_DIR:MODEL_DIR:ro ... -v OUT:OUT:rw
    --label io.kvmatrix.run=RUN --label io.kvmatrix.owner=HOST:PID [--label io.kvmatrix.task=TASK]

Paths are mounted at the same absolute path, so the cell spec's paths mean
the same thing inside and out. The options are kept as data (``RunOptions``)
that renders both the Docker SDK call and the equivalent ``docker run``
command line recorded in each cell's provenance.

Faults: a container that exits without a result (engine crash, OOM kill,
health timeout inside the runner) gives a failed cell with the container's
log tail and OOMKilled flag; SIGINT/SIGTERM removes every container of the
run (label), records the interrupted cell as failed and keeps completed
cells; a later run removes containers left by a run whose process is gone.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmatrix.matrix import allocation
from kvmatrix.matrix.images import LABEL_PREFIX
from kvmatrix.plumbing.console import fail, say

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_LABEL = f"{LABEL_PREFIX}.run"
OWNER_LABEL = f"{LABEL_PREFIX}.owner"
CELL_LABEL = f"{LABEL_PREFIX}.cell"
TASK_LABEL = f"{LABEL_PREFIX}.task"  # the scheduler task (allocation.task_tag): cleanup stays within it


@dataclass(frozen=True)
class ContainerSettings:
    """Resource settings shared by every container of a run (from the command line)."""

    cpuset_cpus: str
    memory: str
    shm_size: str = "8g"
    ipc: str = "private"
    user: str = ""
    gpus: bool = False
    gpu_devices: tuple[str, ...] | None = None  # the granted GPUs (a scheduler's allocation); None: all

    @staticmethod
    def for_host(cpuset: str | None, memory: str | None, shm_size: str, gpus: bool) -> ContainerSettings:
        """Defaults from this process's allocation (``matrix.allocation``): its CPUs, 90% of its memory, its GPUs."""
        if memory is None:
            memory = f"{max(1, int(allocation.memory_bytes() * 0.9) >> 30)}g"
        devices = allocation.gpu_devices() if gpus else None
        return ContainerSettings(cpuset_cpus=cpuset or allocation.cpuset(), memory=memory, shm_size=shm_size,
                                 user=f"{os.getuid()}:{os.getgid()}", gpus=gpus,
                                 gpu_devices=tuple(devices) if devices is not None else None)

    def gpus_flag(self) -> str:
        """``docker run --gpus`` value: all, or the granted devices."""
        return "all" if self.gpu_devices is None else f"device={','.join(self.gpu_devices)}"


@dataclass(frozen=True)
class Mount:
    path: str
    read_only: bool


@dataclass(frozen=True)
class RunOptions:
    image: str
    command: tuple[str, ...]
    settings: ContainerSettings
    mounts: tuple[Mount, ...]
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    name: str = ""
    workdir: str = "/tmp"

    def cli(self) -> list[str]:
        """The equivalent ``docker run`` command line."""
        s = self.settings
        cmd = ["docker", "run", "--init", "--network", "host", "--ipc", s.ipc, "--shm-size", s.shm_size,
               "--cpuset-cpus", s.cpuset_cpus, "--memory", s.memory, "--user", s.user, "--workdir", self.workdir]
        if s.gpus:
            cmd += ["--gpus", s.gpus_flag()]
        if self.name:
            cmd += ["--name", self.name]
        for m in self.mounts:
            cmd += ["-v", f"{m.path}:{m.path}:{'ro' if m.read_only else 'rw'}"]
        for k, v in sorted(self.env.items()):
            cmd += ["-e", f"{k}={v}"]
        for k, v in sorted(self.labels.items()):
            cmd += ["--label", f"{k}={v}"]
        return [*cmd, self.image, *self.command]

    def sdk_kwargs(self) -> dict:
        """The same options for ``client.containers.create``."""
        import docker.types  # noqa: PLC0415

        s = self.settings
        kw = {
            "image": self.image, "command": list(self.command), "init": True, "network_mode": "host",
            "ipc_mode": s.ipc, "shm_size": s.shm_size, "cpuset_cpus": s.cpuset_cpus, "mem_limit": s.memory,
            "user": s.user, "working_dir": self.workdir, "environment": dict(self.env), "labels": dict(self.labels),
            "volumes": {m.path: {"bind": m.path, "mode": "ro" if m.read_only else "rw"} for m in self.mounts},
            "detach": True,
        }
        if self.name:
            kw["name"] = self.name
        if s.gpus:
            kw["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
                                     if s.gpu_devices is None else
                                     docker.types.DeviceRequest(device_ids=list(s.gpu_devices), capabilities=[["gpu"]])]
        return kw


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_options(image: str, python: str, spec_path: Path | list[Path], out_dir: Path, model_paths: list[str],
                settings: ContainerSettings, run_id: str, cell_id: str | list[str], env: dict[str, str]) -> RunOptions:
    """How ONE group's container runs: identical for every group but image, command, env and cell label.

    ``spec_path``/``cell_id``: the group's cell specs and ids (one each for a single cell); the container
    is named after the first cell and labelled with all of them.
    """
    spec_paths = spec_path if isinstance(spec_path, list) else [spec_path]
    cell_ids = cell_id if isinstance(cell_id, list) else [cell_id]
    mounts = [Mount(str(REPO_ROOT), True)]
    # a folder inside another mounted folder needs no mount of its own
    reads = sorted(set(model_paths))
    mounts += [Mount(p, True) for p in reads if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in reads)]
    mounts.append(Mount(str(out_dir), False))
    full_env = {
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **env,
    }
    labels = {RUN_LABEL: run_id, OWNER_LABEL: owner(), CELL_LABEL: ",".join(cell_ids)}
    if allocation.task_tag():
        labels[TASK_LABEL] = allocation.task_tag()
    return RunOptions(image=image, command=(python, "-m", "kvmatrix.runners", *map(str, spec_paths)),
                      settings=settings, mounts=tuple(mounts), env=full_env, labels=labels,
                      name=_container_name(run_id, cell_ids[0]))


def _container_name(run_id: str, cell_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"kvmatrix-{run_id}-{cell_id}")[:200]


# -- engine connection ----------------------------------------------------------

@dataclass
class DockerFacts:
    server_version: str
    api_version: str
    runtimes: list[str]

    @property
    def nvidia(self) -> bool:
        return "nvidia" in self.runtimes

    def provenance(self) -> dict:
        return {"server_version": self.server_version, "api_version": self.api_version, "runtimes": self.runtimes}


def client():
    """A Docker SDK client, or one line naming the fix."""
    try:
        import docker  # noqa: PLC0415
    except ImportError:
        fail("--runtime docker needs the Docker SDK for Python: pip install 'docker>=7' (nox -s matrix installs it)")
    try:
        c = docker.from_env(timeout=600)
        c.ping()
    except Exception as exc:  # noqa: BLE001 - any connection failure means the same thing to the user
        fail(f"no Docker engine answers ({str(exc)[:100]}); start dockerd (or set DOCKER_HOST), or use --runtime host")
    return c


def facts(c) -> DockerFacts:
    info = c.info()
    version = c.version()
    return DockerFacts(server_version=info.get("ServerVersion", "?"), api_version=version.get("ApiVersion", "?"),
                       runtimes=sorted((info.get("Runtimes") or {}).keys()))


def engine_down() -> str | None:
    """None when a Docker engine answers, else why not, as a whole clause ("none answers at ...")."""
    try:
        import docker  # noqa: PLC0415
    except ImportError:
        return "the Docker SDK for Python is missing (pip install 'docker>=7'; nox -s matrix installs it)"
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        docker.from_env(timeout=10).ping()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the same thing to the user
        return f"none answers at {where} ({root_cause(exc)})"
    return None


def root_cause(exc: BaseException) -> str:
    """A short, whole reason for a failed connection: the innermost OS error in the chain when there is one."""
    seen, todo, found = set(), [exc], None
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno or e.strerror):
            found = e
        todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]
    if isinstance(found, FileNotFoundError):
        return "no such socket"
    if isinstance(found, PermissionError):
        return "permission denied on the socket: join the docker group or use a rootless engine"
    if found is not None:
        return found.strerror.lower() if found.strerror else type(found).__name__
    return type(exc).__name__


def engine_available() -> bool:
    """Whether a Docker engine answers (for --runtime auto); never raises."""
    return engine_down() is None


# -- cleanup ---------------------------------------------------------------------

def remove_run_containers(c, run_id: str) -> int:
    """Remove every container of run ``run_id`` started by this scheduler task (every one of the run outside a
    scheduler: tasks of one run share its name, so another task's containers are never touched); how many."""
    task = allocation.task_tag()
    labels = [f"{RUN_LABEL}={run_id}", *([f"{TASK_LABEL}={task}"] if task else [])]
    n = 0
    for ct in c.containers.list(all=True, filters={"label": labels}):
        try:
            ct.remove(force=True)
            n += 1
        except Exception:  # noqa: BLE001 - already gone
            pass
    return n


def remove_orphans(c) -> int:
    """Remove containers whose kvmatrix process (on this host) is gone, e.g. after a SIGKILL."""
    host = socket.gethostname()
    n = 0
    for ct in c.containers.list(all=True, filters={"label": OWNER_LABEL}):
        owner_host, _, pid = (ct.labels.get(OWNER_LABEL) or "").rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            ct.remove(force=True)
            n += 1
        except Exception:  # noqa: BLE001
            pass
    if n:
        say(f"removed {n} container(s) left by an earlier kvmatrix run that no longer exists")
    return n


def remove_images(c, every: bool = False) -> list[str]:
    """Remove superseded kvmatrix images; ``every``: all kvmatrix images (base included).

    Superseded: untagged ones, and for each (repository, slug, device) every image but the newest (a changed
    Dockerfile or build arg gives a new content-keyed tag; the old tag stays behind). Images in use by a
    container are left alone (Docker refuses). Returns what was removed.
    """
    import docker.errors  # noqa: PLC0415

    family = f"{LABEL_PREFIX}.family"
    images = c.images.list(filters={"label": family})
    if every:
        doomed = images + [i for i in c.images.list(name="kvmatrix/debian") if i not in images]
    else:
        doomed = list(c.images.list(filters={"label": family, "dangling": True}))
        groups: dict[tuple, list] = {}
        for image in images:
            for tag in image.tags:
                labels = image.labels or {}
                key = (tag.rsplit(":", 1)[0], labels.get(f"{LABEL_PREFIX}.slug"), labels.get(f"{LABEL_PREFIX}.device"))
                groups.setdefault(key, []).append(image)
        for members in groups.values():
            members.sort(key=lambda i: i.attrs.get("Created", ""), reverse=True)
            doomed += [i for i in members[1:] if i not in doomed]
    removed = []
    for image in doomed:
        name = (image.tags or [image.short_id])[0]
        try:
            c.images.remove(image.id, force=len(image.tags) > 1)  # force only untags several names of one image
            removed.append(name)
        except docker.errors.APIError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# -- running cells ---------------------------------------------------------------

def model_paths(spec) -> list[str]:
    """Host paths a cell reads (mounted read-only at the same path): model files and prompt sets."""
    paths = []
    gguf = spec.model.get("gguf")
    if gguf:
        paths.append(str(Path(gguf).resolve().parent))
    if spec.model.get("hf_dir"):
        paths.append(str(Path(spec.model["hf_dir"]).resolve()))
    if spec.experiment.prompts_file:
        paths.append(str(Path(spec.experiment.prompts_file).resolve().parent))
    return paths


class DockerExecutor:
    """Runs one group of cells (one engine start) in one container (``host.run_cells`` calls it); the
    container never outlives the call."""

    def __init__(self, c, settings: ContainerSettings, run_id: str, docker_facts: DockerFacts):
        self.client = c
        self.settings = settings
        self.run_id = run_id
        self.facts = docker_facts

    def options(self, specs, launch, out_dir: Path) -> RunOptions:
        specs = specs if isinstance(specs, list) else [specs]
        paths = [out_dir / "cells" / f"{spec.cell_id}.json" for spec in specs]
        model = sorted({p for spec in specs for p in model_paths(spec)})
        return run_options(launch.image.id, str(launch.python), paths, out_dir, model,
                           self.settings, self.run_id, [spec.cell_id for spec in specs], launch.env)

    def __call__(self, specs, launch, out_dir: Path) -> dict[str, dict]:
        from kvmatrix.matrix import host  # noqa: PLC0415

        opts = self.options(specs, launch, out_dir)
        specs = [replace(spec, provenance={
            **spec.provenance,
            "container": {"image": launch.image.provenance(), "run_options": opts.cli(),
                          "docker": self.facts.provenance()},
        }) for spec in specs]
        for spec in specs:
            host.write_spec(spec, out_dir)
        before = {spec.cell_id: host.mtime(out_dir / f"{spec.cell_id}.json") for spec in specs}
        first = specs[0].cell_id
        log_path = out_dir / "logs" / f"{first}.container.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ct = None
        state: dict = {}
        code = None
        try:
            ct = self.client.containers.create(**opts.sdk_kwargs())
            ct.start()
            with open(log_path, "wb") as fh:
                for chunk in ct.logs(stream=True, follow=True):
                    fh.write(chunk)
                    fh.flush()
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
            code = ct.wait().get("StatusCode")
            ct.reload()
            state = ct.attrs.get("State") or {}
        finally:
            if ct is not None:
                try:
                    ct.remove(force=True)
                except Exception:  # noqa: BLE001 - gone already
                    pass
            # the runner's engine pid is a pid inside the container: meaningless (and unsafe) on the host
            (out_dir / "logs" / f"{first}.engine.pid").unlink(missing_ok=True)
        oom = bool(state.get("OOMKilled"))
        why = "was OOM-killed (container memory limit " + self.settings.memory + ")" if oom else f"exited {code}"
        return host.collect(specs, out_dir, before, None if oom else code,
                            f"container {why} before the runner wrote a result",
                            extra={"container_state": {k: state.get(k) for k in
                                                       ("ExitCode", "OOMKilled", "Error", "FinishedAt")}},
                            logs=("engine", "container"))
