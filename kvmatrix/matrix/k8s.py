"""``matrix ... --emit k8s --out RUN``: the run as a Kubernetes Indexed Job, one completion index per cell.

Writes ``RUN/plan.json`` (``matrix/planfile.py``) and ``RUN/kvmatrix-job.yaml``: ``completionMode: Indexed``,
``completions`` = cells, ``parallelism`` = ``--max-parallel``, ``backoffLimitPerIndex`` = ``--retries`` (a
failed index is retried on its own, the others are untouched), each pod running
``python -m kvmatrix.matrix matrix --plan MOUNT/RUN/plan.json --task $((JOB_COMPLETION_INDEX + 1)) --resume
--out MOUNT/RUN`` in the host runtime of the pod (no Docker inside pods), GPU requests (``nvidia.com/gpu``) and
a node selector on the GPU product label (``nvidia.com/gpu.product``, NVIDIA's GPU feature discovery).

What the user provides: an image holding this checkout at the planned commit (the task refuses other code)
with Python and kvmatrix's requirements (``--k8s-image``, pushed to a registry the cluster pulls from), and a
ReadWriteMany volume (``--k8s-claim``, a PersistentVolumeClaim) mounted at ``--k8s-mount``, holding the run
folder (copy RUN there before applying) and the build / venv cache (``KVMATRIX_CACHE`` on the volume, locked
per entry). Afterwards: ``kvmatrix status`` and ``nox -s report -- RUN`` on the volume's copy.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from kvmatrix.matrix.planfile import PLAN_FILE, FrozenPlan
from kvmatrix.plumbing.console import fail

MANIFEST = "kvmatrix-job.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def job_name(run_name: str) -> str:
    """A DNS-1123 name from the run name (lower case, '-', at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"kvmatrix-{run_name}".lower()).strip("-")
    return name[:63].rstrip("-")


def manifest(frozen: FrozenPlan, *, image: str, claim: str, mount: str = "/results", gpus: int = 1,
             gpu_product: str | None = None, namespace: str | None = None, max_parallel: int | None = None,
             retries: int = 1, workdir: str = "/opt/kvmatrix") -> dict:
    """The Indexed Job of the frozen plan (a dict, as ``kubectl apply`` takes it)."""
    run = str(PurePosixPath(mount) / frozen.run_name)
    n = len(frozen.cells)
    task = (f"exec python -m kvmatrix.matrix matrix --plan {run}/{PLAN_FILE} --task $((JOB_COMPLETION_INDEX + 1)) "
            f"--resume --out {run}")
    container = {
        "name": "kvmatrix",
        "image": image,
        "workingDir": workdir,
        "command": ["/bin/sh", "-c", task],
        "env": [{"name": "KVMATRIX_CACHE", "value": str(PurePosixPath(mount) / "kvmatrix-cache")},
                {"name": "KVMATRIX_K8S_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "volumeMounts": [{"name": "results", "mountPath": mount}],
    }
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: gpus}}
    pod: dict = {"restartPolicy": "Never", "containers": [container],
                 "volumes": [{"name": "results", "persistentVolumeClaim": {"claimName": claim}}]}
    if gpu_product:
        pod["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu_product}
    meta: dict = {"name": job_name(frozen.run_name),
                  "labels": {"app.kubernetes.io/name": "kvmatrix", "kvmatrix.io/run": job_name(frozen.run_name)[:63]}}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": min(n, max_parallel or n),
            "backoffLimitPerIndex": retries,
            "maxFailedIndexes": n,
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod},
        },
    }


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of plain data (dicts, lists, strings, numbers, booleans); strings JSON-quoted."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        out = []
        for v in value:
            body = to_yaml(v, indent + 2) if isinstance(v, (dict, list)) and v else f"{pad}  {_scalar(v)}\n"
            out.append(f"{pad}- {body[indent + 2:]}")
        return "".join(out)
    return pad + _scalar(value) + "\n"


def _scalar(v) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return json.dumps(v)


def emit(frozen: FrozenPlan, run_dir, **options) -> list:
    """Write the plan and the Job manifest into ``run_dir``; the paths written."""
    for key in ("image", "claim"):
        if not options.get(key):
            fail(f"--emit k8s needs --k8s-{key} (" + ("the image holding this checkout" if key == "image" else
                 "a ReadWriteMany PersistentVolumeClaim for results and cache") + ")")
    frozen.settings = {k: v for k, v in options.items() if v is not None}
    doc = manifest(frozen, **options)
    path = run_dir / MANIFEST
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [frozen.write(run_dir)]
    path.write_text(f"# kvmatrix run {frozen.run_name}: {len(frozen.cells)} cells, one per completion index\n"
                    f"# copy {run_dir.name}/ to the volume {options['claim']} at {options.get('mount', '/results')}/,"
                    " then: kubectl apply -f " + MANIFEST + "\n" + to_yaml(doc))
    return [*written, path]
