"""What this process may use, as the scheduler granted it (Slurm, Kubernetes) or the whole host otherwise.

A Slurm task on a shared node owns only part of it: its CPUs are the affinity mask, its memory the job's
limit (``SLURM_MEM_PER_NODE`` / ``SLURM_MEM_PER_CPU``, or the cgroup's ``memory.max``), its GPUs
``SLURM_JOB_GPUS`` / ``CUDA_VISIBLE_DEVICES``. Thread counts, container CPU sets, container memory and
``--gpus device=...`` are all derived here, so a task never spreads onto CPUs or GPUs of another task.
``scheduler()`` is the provenance record (job, array task, node); ``task_tag()`` names the task in
container labels so one task's cleanup never touches another's containers.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmatrix.runners.spec import allowed_cpus

#: the scheduler variables recorded in provenance (present ones only)
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURMD_NODENAME",
              "SLURM_JOB_PARTITION", "SLURM_JOB_GPUS", "SLURM_CPUS_ON_NODE", "SLURM_MEM_PER_NODE",
              "SLURM_RESTART_COUNT")
K8S_VARS = ("JOB_COMPLETION_INDEX", "HOSTNAME", "KVMATRIX_K8S_NODE")
CGROUP_MEMORY = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: Slurm's and Docker's --cpuset both set it)."""
    return allowed_cpus()


def cpu_count() -> int:
    return len(cpus()) or 1


def cpuset(ids: list[int] | None = None) -> str:
    """The CPU list in cpuset notation, ranges compressed: [0, 1, 2, 5] -> "0-2,5"."""
    ids = sorted(set(cpus() if ids is None else ids))
    parts, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


def memory_bytes(environ=os.environ) -> int:
    """The memory this task may use: the smallest of the host's RAM, the Slurm job's limit and the cgroup's."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    if environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        limits.append(int(environ["SLURM_MEM_PER_NODE"]) << 20)
    elif environ.get("SLURM_MEM_PER_CPU", "").isdigit():
        limits.append((int(environ["SLURM_MEM_PER_CPU"]) << 20) * cpu_count())
    for f in CGROUP_MEMORY:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
        break
    return min(limits)


def gpu_devices(environ=os.environ) -> list[str] | None:
    """The GPUs granted to this task (Slurm's ``SLURM_JOB_GPUS``, else ``CUDA_VISIBLE_DEVICES``), or None when
    nothing restricts them (every GPU of the host). An empty list: the task was given no GPU."""
    for var in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = environ.get(var)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]
    return None


def scheduler(environ=os.environ) -> dict | None:
    """Provenance of the scheduler task this process runs as (None outside one)."""
    if environ.get("SLURM_JOB_ID"):
        doc = {"kind": "slurm", **{k.lower(): environ[k] for k in SLURM_VARS if k in environ}}
    elif environ.get("JOB_COMPLETION_INDEX") is not None and environ.get("KUBERNETES_SERVICE_HOST"):
        doc = {"kind": "kubernetes", **{k.lower(): environ[k] for k in K8S_VARS if k in environ}}
    else:
        return None
    doc["cpus"] = cpuset()
    doc["memory_bytes"] = memory_bytes(environ)
    doc["gpus"] = gpu_devices(environ)
    return doc


def task_tag(environ=os.environ) -> str | None:
    """A short name of this scheduler task, unique within its run: ``s<array job>_<task>`` (Slurm; the plain
    job id outside an array), ``k<index>`` (Kubernetes Indexed Job); None outside a scheduler."""
    if environ.get("SLURM_JOB_ID"):
        job = environ.get("SLURM_ARRAY_JOB_ID") or environ["SLURM_JOB_ID"]
        task = environ.get("SLURM_ARRAY_TASK_ID")
        return f"s{job}_{task}" if task else f"s{job}"
    if environ.get("JOB_COMPLETION_INDEX") is not None and environ.get("KUBERNETES_SERVICE_HOST"):
        return f"k{environ['JOB_COMPLETION_INDEX']}"
    return None
