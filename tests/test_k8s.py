"""``matrix --emit k8s``: an Indexed Job manifest, validated offline against the Kubernetes schema.

``kubernetes-validate`` (PyPI) holds the API's OpenAPI schemas; strict mode refuses unknown fields, so a typo
in the manifest fails here rather than on the user's cluster.
"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from kvmatrix.matrix import k8s, planfile
from tests.conftest import run_kvmatrix
from tests.test_slurm import SMALL

#: the oldest release whose batch/v1 Job has backoffLimitPerIndex, and the newest the validator knows
VERSIONS = ("1.29.0", "1.33.0", kubernetes_validate.utils.latest_version())


def emit(tmp_path, *extra):
    return run_kvmatrix(*SMALL, "--emit", "k8s", "--out", str(tmp_path / "run"), *extra)


def test_emit_k8s_writes_a_valid_indexed_job(tmp_path):
    proc = emit(tmp_path, "--k8s-image", "registry.example/kvmatrix:abc123", "--k8s-claim", "kv-results",
                "--k8s-gpu-product", "NVIDIA-H200", "--max-parallel", "2", "--retries", "3",
                "--k8s-namespace", "bench")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    frozen = planfile.read(run)
    assert frozen.scheduler == "k8s" and len(frozen.cells) == 4
    assert frozen.options[-2:] == ["--runtime", "host"]  # pods run the host runtime
    doc = yaml.safe_load((run / k8s.MANIFEST).read_text())
    assert doc == json.loads(json.dumps(k8s.manifest(frozen, **{
        "image": "registry.example/kvmatrix:abc123", "claim": "kv-results", "gpu_product": "NVIDIA-H200",
        "max_parallel": 2, "retries": 3, "namespace": "bench"})))
    spec = doc["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 4 and spec["parallelism"] == 2
    assert spec["backoffLimitPerIndex"] == 3
    pod = spec["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["restartPolicy"] == "Never"
    run_in_pod = f"/results/{frozen.run_name}"
    assert ctr["command"][-1] == (f"exec python -m kvmatrix.matrix matrix --plan {run_in_pod}/plan.json "
                                  f"--task $((JOB_COMPLETION_INDEX + 1)) --resume --out {run_in_pod}")
    assert {"name": "results", "persistentVolumeClaim": {"claimName": "kv-results"}} in pod["volumes"]
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_cpu_job_asks_for_no_gpu_and_stays_valid(tmp_path):
    assert emit(tmp_path, "--k8s-image", "i:1", "--k8s-claim", "c", "--k8s-gpus", "0").returncode == 0
    doc = yaml.safe_load((tmp_path / "run" / k8s.MANIFEST).read_text())
    ctr = doc["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in ctr and "nodeSelector" not in doc["spec"]["template"]["spec"]
    assert doc["spec"]["parallelism"] == 4
    kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_a_broken_manifest_is_caught_by_the_validator(tmp_path):
    """The check is not vacuous: a misspelt field and a wrong type both fail strict validation."""
    assert emit(tmp_path, "--k8s-image", "i:1", "--k8s-claim", "c").returncode == 0
    doc = yaml.safe_load((tmp_path / "run" / k8s.MANIFEST).read_text())
    typo = json.loads(json.dumps(doc))
    typo["spec"]["completionsMode"] = typo["spec"].pop("completionMode")
    wrong = json.loads(json.dumps(doc))
    wrong["spec"]["completions"] = "four"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("extra, needle", [
    ((), "--emit k8s needs --k8s-image IMAGE"),
    (("--k8s-image", "i", "--k8s-claim", "c", "--runtime", "docker"), "host runtime (no Docker inside pods)"),
    (("--k8s-image", "i", "--k8s-claim", "c", "--retries", "-1"), "--retries and --k8s-gpus take 0 or more"),
])
def test_emit_k8s_bad_input_is_one_line(tmp_path, extra, needle):
    proc = emit(tmp_path, *extra)  # SMALL says --runtime host; a later --runtime docker wins
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_job_names_are_dns_labels():
    assert k8s.job_name("Run_2026-12-02 H200") == "kvmatrix-run-2026-12-02-h200"
    assert len(k8s.job_name("x" * 100)) <= 63


def test_yaml_writer_round_trips_plain_data():
    data = {"a": [1, {"b": "x: y", "c": [True, None]}, []], "d": {}, "e": "$((I + 1))", "f": [{"g": {"h": 2}}]}
    assert yaml.safe_load(k8s.to_yaml(data)) == data
